"""Writes a token-only mix for `lvpipe stream` and measures memcpy in the same run.

    python benches/peers/loader_mix.py OUT_DIR [GIB] [TOKENS_PER_SAMPLE]
    time target/release/lvpipe stream --mix OUT_DIR --steps STEPS > /dev/null

The mix has GIB GiB of u32 token ids in TOKENS_PER_SAMPLE-token samples
(default 4096), two per pack, global batch 8, in the layout `lvpipe mix` writes
(docs/mixes.md). It prints the step count for one epoch and a numpy memcpy
of the same number of bytes (best of 3), for the bandwidth comparison.
"""

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa

out = sys.argv[1]
gib = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
T = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
PER_PACK, G = 2, 8
samples = int(gib * 2**30 / (T * 4)) // PER_PACK * PER_PACK
packs = samples // PER_PACK
os.makedirs(out, exist_ok=True)

item = lambda t: pa.field("item", t, nullable=False)
schema = pa.schema([
    pa.field("pack_id", pa.uint32(), False), pa.field("sample_id", pa.string(), False),
    pa.field("source", pa.string(), False), pa.field("chunk", pa.uint32(), False),
    pa.field("num_media", pa.uint32(), False), pa.field("expanded_len", pa.uint32(), False),
    pa.field("input_ids", pa.list_(item(pa.uint32())), False),
    pa.field("loss_mask", pa.list_(item(pa.uint8())), False),
    pa.field("media", pa.list_(item(pa.binary())), False),
])
rows = 1024
with pa.OSFile(os.path.join(out, "samples.arrow"), "wb") as f, pa.ipc.new_file(f, schema) as w:
    for start in range(0, samples, rows):
        n = min(rows, samples - start)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * T)
        ids = pa.array((np.arange(n * T, dtype=np.uint64) * 2654435761 % 151000).astype(np.uint32))
        mask = pa.array(np.ones(n * T, dtype=np.uint8))
        r = np.arange(start, start + n)
        w.write_batch(pa.record_batch([
            pa.array((r // PER_PACK).astype(np.uint32)), pa.array([f"{i:032x}" for i in r]),
            pa.array(["bench"] * n), pa.array(np.zeros(n, np.uint32)), pa.array(np.zeros(n, np.uint32)),
            pa.array(np.full(n, T, np.uint32)),
            pa.ListArray.from_arrays(offsets, ids).cast(schema.field("input_ids").type),
            pa.ListArray.from_arrays(offsets, mask).cast(schema.field("loss_mask").type),
            pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.binary())).cast(schema.field("media").type),
        ], schema=schema))
pschema = pa.schema([pa.field(n, t, False) for n, t in [("stage", pa.uint32()), ("pack_id", pa.uint32()),
    ("first_row", pa.uint64()), ("num_samples", pa.uint32()), ("tokens", pa.uint32()), ("waste", pa.uint32())]])
with pa.OSFile(os.path.join(out, "packs.arrow"), "wb") as f, pa.ipc.new_file(f, pschema) as w:
    p = np.arange(packs)
    w.write_batch(pa.record_batch([pa.array(np.ones(packs, np.uint32)), pa.array(p.astype(np.uint32)),
        pa.array((p * PER_PACK).astype(np.uint64)), pa.array(np.full(packs, PER_PACK, np.uint32)),
        pa.array(np.full(packs, T * PER_PACK, np.uint32)), pa.array(np.zeros(packs, np.uint32))], schema=pschema))
meta = dict(stage=1, name="bench", context=T * PER_PACK, seed=1, global_batch=G, epochs=1, steps=None,
            tokens_per_media=1, image_size=64, recipe_fingerprint="", shards_build_fingerprint="",
            tokenizer_fingerprint="", samples=samples, packs=packs, tokens=samples * T, padding=0)
json.dump(meta, open(os.path.join(out, "mix.json"), "w"))

src = np.ones(samples * T * 4, np.uint8)
dst = np.empty_like(src)
best = min((lambda t: (np.copyto(dst, src), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
print(json.dumps({"tokens": samples * T, "token_bytes": samples * T * 4, "steps_per_epoch": packs // G,
                  "memcpy_gb_per_s_1_thread": round(src.nbytes / best / 1e9, 2),
                  "loadavg": open("/proc/loadavg").read().strip()}))
