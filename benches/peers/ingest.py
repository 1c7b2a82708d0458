"""Python peers of `cargo bench -p lvpipe-sharding --bench ingest`, on the same files.

    python benches/peers/ingest.py target/bench-data

Images: the 1000 JPEGs of 640x480 in DATA/jpeg640, decoded, resized to 384x384
and re-encoded as JPEG q90, as lvpipe does; Pillow with BILINEAR (antialiased,
the filter lvpipe uses) and OpenCV with INTER_AREA (its antialiased choice),
in 1 and 2 processes. Text: HF `tokenizers` (the same Rust engine) on the
documents of DATA/synth-small/docs.txt with the same tokenizer.json,
`encode_batch` with 2 threads and 1 thread (RAYON_NUM_THREADS=1 in a child).
Best of 3; one JSON object per line.
"""

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

DATA = sys.argv[1] if len(sys.argv) > 1 else "target/bench-data"


def best_of(n, f):
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def load_images():
    d = os.path.join(DATA, "jpeg640")
    return [open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))]


def pillow_one(b):
    from PIL import Image

    im = Image.open(io.BytesIO(b)).convert("RGB").resize((384, 384), Image.BILINEAR)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return len(out.getvalue())


def opencv_one(b):
    import cv2
    import numpy as np

    im = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    im = cv2.resize(im, (384, 384), interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return len(enc)


def images():
    import cv2

    cv2.setNumThreads(1)
    imgs = load_images()
    for name, f in [("pillow", pillow_one), ("opencv", opencv_one)]:
        for procs in (1, 2):
            if procs == 1:
                secs = best_of(3, lambda: [f(b) for b in imgs])
            else:
                with mp.Pool(procs) as pool:
                    secs = best_of(3, lambda: pool.map(f, imgs, chunksize=16))
            print(json.dumps({"bench": f"{name} decode+resize(384x384)+jpeg q90", "processes": procs,
                              "img_per_s": round(len(imgs) / secs, 1)}), flush=True)


def text(threads_label):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(DATA, "synth-small", "tokenizer.json"))
    docs = open(os.path.join(DATA, "synth-small", "docs.txt"), encoding="utf-8").read().splitlines()
    size = sum(len(d.encode()) for d in docs)
    n_tokens = [0]

    def run():
        n_tokens[0] = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))

    secs = best_of(3, run)
    print(json.dumps({"bench": "hf tokenizers encode_batch", "threads": threads_label,
                      "mb_per_s": round(size / 1e6 / secs, 2), "tokens_per_s": round(n_tokens[0] / secs)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--text-only":
        text(os.environ.get("RAYON_NUM_THREADS", "all"))
        sys.exit(0)
    print(json.dumps({"loadavg": open("/proc/loadavg").read().strip()}))
    images()
    text("all")
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    subprocess.run([sys.executable, __file__, DATA, "--text-only"], env=env, check=True)
