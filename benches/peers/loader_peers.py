"""Python loaders over the same tokens as `loader_mix.py`, for docs/benchmarks.md.

    python benches/peers/loader_peers.py MIX_DIR WORK_DIR hf|litdata|streaming|numpy

Reads MIX_DIR/samples.arrow (written by loader_mix.py: fixed-length samples
of u32 ids), writes the same ids in each tool's own format under WORK_DIR
(not timed), then times one pass over every sample, touching every id
(a sum over each batch), best of 3. Prints one JSON line per configuration.

- hf: Hugging Face `datasets`, Arrow memory-mapped, `iter(batch_size)` in
  numpy format, no shuffle (its fast path), and `shuffle(seed)` (an index
  mapping over the same file).
- litdata: `optimize()` chunks, then `StreamingDataset` iteration, unshuffled
  and shuffled.
- streaming: MosaicML `streaming` (MDS shards), `StreamingDataset`
  iteration with and without shuffle, and `ds[i]` random access.
- numpy: the floor, a sum over the mapped Arrow buffer in 64 MiB slices.
"""

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa

mix, work, tool = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(work, exist_ok=True)
table = pa.ipc.open_file(pa.memory_map(os.path.join(mix, "samples.arrow"))).read_all()
ids = table.column("input_ids").combine_chunks()
T = len(ids.value(0)) if hasattr(ids, "value") else len(ids[0])
flat = ids.flatten().to_numpy(zero_copy_only=False)
N = len(flat) // T
TOKENS = N * T
LIMIT = float(os.environ.get("PEER_SECONDS", "60"))


def report(name, seconds, samples):
    tokens = samples * T
    print(json.dumps({
        "tool": tool, "config": name, "samples": samples, "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds), "tokens_per_s": round(tokens / seconds),
        "gb_per_s": round(tokens * 4 / seconds / 1e9, 3),
        "loadavg": open("/proc/loadavg").read().strip(),
    }), flush=True)


def best_of(name, run, repeats=3):
    """`run()` returns the samples it visited; stops early past PEER_SECONDS."""
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        n = run()
        dt = time.perf_counter() - t
        if best is None or n / dt > best[1] / best[0]:
            best = (dt, n)
        if dt > LIMIT:
            break
    report(name, *best)


def drain(it, deadline_samples=None):
    n, acc = 0, 0
    t = time.perf_counter()
    for x in it:
        a = x if isinstance(x, np.ndarray) else np.asarray(x)
        acc += int(a.sum(dtype=np.uint64))
        n += a.size // T
        if time.perf_counter() - t > LIMIT:
            break
    return n


if tool == "numpy":
    step = 16 * 2**20
    best_of("sum over mapped ids", lambda: sum(int(flat[i:i + step].sum(dtype=np.uint64)) * 0 + min(step, len(flat) - i) for i in range(0, len(flat), step)) // T)

elif tool == "hf":
    import datasets

    path = os.path.join(work, "hf")
    if not os.path.exists(path):
        datasets.Dataset(pa.table({"input_ids": ids})).save_to_disk(path)
    ds = datasets.load_from_disk(path).with_format("numpy")
    for bs in (16, 1024):
        best_of(f"iter(batch_size={bs}), no shuffle",
                lambda: drain(b["input_ids"] for b in ds.iter(batch_size=bs)))
    sh = ds.shuffle(seed=1)
    best_of("shuffle(seed).iter(batch_size=16)",
            lambda: drain(b["input_ids"] for b in sh.iter(batch_size=16)), repeats=1)

elif tool == "litdata":
    import litdata

    path = os.path.join(work, "litdata")
    if not os.path.exists(path):
        # The writer `optimize()` runs in its workers, used in-process (a
        # spawned worker would re-run this script).
        from litdata.streaming.writer import BinaryWriter
        os.makedirs(path)
        w = BinaryWriter(path, chunk_bytes="64MB")
        for i in range(N):
            w.add_item(i, {"input_ids": flat[i * T:(i + 1) * T]})
        w.done()
        w.merge()
    for shuffle in (False, True):
        ds = litdata.StreamingDataset(path, shuffle=shuffle, seed=1)
        best_of(f"StreamingDataset shuffle={shuffle}",
                lambda: drain(x["input_ids"] for x in ds))

elif tool == "streaming":
    from streaming import MDSWriter, StreamingDataset

    path = os.path.join(work, "mds")
    if not os.path.exists(path):
        with MDSWriter(out=path, columns={"input_ids": "ndarray:uint32"},
                       size_limit=64 * 2**20) as w:
            for i in range(N):
                w.write({"input_ids": flat[i * T:(i + 1) * T]})
    for shuffle in (False, True):
        ds = StreamingDataset(local=path, shuffle=shuffle, shuffle_seed=1, batch_size=16)
        best_of(f"StreamingDataset shuffle={shuffle}",
                lambda: drain(x["input_ids"] for x in ds))
    ds = StreamingDataset(local=path, shuffle=False, batch_size=16)
    order = np.random.default_rng(1).permutation(len(ds))
    best_of("ds[i] in a random order", lambda: drain(ds[int(i)]["input_ids"] for i in order))
else:
    sys.exit(f"unknown tool {tool}")
