"""Python video decoders doing lvpipe's `uniform:N` sampling, for docs/benchmarks.md.

    python benches/peers/video_sample.py N FILE...

For each file: N target times spread evenly from the first to the last frame
(lvpipe's and VILA's `linspace`), and the frame shown at each (the last frame
whose timestamp is at most the target), decoded to RGB on one thread.
Best of 3 per tool; one JSON line each. Also times `ffmpeg -threads 1 -i FILE
-f null -` (a full decode, no RGB conversion) as the reference.

Tools: torchcodec (`get_frames_played_at`, exact and approximate seek modes),
decord (`get_batch` of frame indices), PyAV (seek to the keyframe before each
target and decode forward; and one sequential pass picking the targets).
"""

import json
import subprocess
import sys
import time

N = int(sys.argv[1])
FILES = sys.argv[2:]


def targets(duration, fps):
    last = max(0.0, duration - 1.0 / fps)
    if N == 1:
        return [last / 2]
    return [last * i / (N - 1) for i in range(N)]


def probe(path):
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        duration = float(s.duration * s.time_base) if s.duration else c.duration / 1e6
        return duration, float(s.average_rate), s.frames


def best_of(name, fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        frames = fn()
        best = min(best, time.perf_counter() - t)
    print(json.dumps({
        "tool": name, "videos": len(FILES), "frames": frames, "seconds": round(best, 3),
        "ms_per_video": round(best / len(FILES) * 1000, 1),
        "loadavg": open("/proc/loadavg").read().strip(),
    }), flush=True)


def ffmpeg_full():
    for f in FILES:
        subprocess.run(["ffmpeg", "-v", "error", "-threads", "1", "-i", f, "-f", "null", "-"], check=True)
    return sum(probe(f)[2] for f in FILES)


def torchcodec(mode):
    from torchcodec.decoders import VideoDecoder

    def run():
        n = 0
        for f in FILES:
            d = VideoDecoder(f, seek_mode=mode, num_ffmpeg_threads=1)
            md = d.metadata
            ts = targets(md.duration_seconds, md.average_fps)
            n += len(d.get_frames_played_at(seconds=ts).data)
        return n
    return run


def decord_batch():
    import decord

    n = 0
    for f in FILES:
        vr = decord.VideoReader(f, ctx=decord.cpu(0), num_threads=1)
        fps = vr.get_avg_fps()
        duration = len(vr) / fps
        idx = [min(len(vr) - 1, int(t * fps + 1e-6)) for t in targets(duration, fps)]
        n += len(vr.get_batch(idx).asnumpy())
    return n


def pyav_seek():
    import av

    n = 0
    for f in FILES:
        with av.open(f) as c:
            s = c.streams.video[0]
            s.thread_count = 1
            tb = s.time_base
            duration = float(s.duration * tb)
            for t in targets(duration, float(s.average_rate)):
                c.seek(int(t / tb), stream=s, backward=True, any_frame=False)
                held = None
                for frame in c.decode(s):
                    if frame.pts * tb <= t + 1e-9:
                        held = frame
                    else:
                        break
                held = held or frame
                held.to_ndarray(format="rgb24")
                n += 1
    return n


def pyav_sequential():
    import av

    n = 0
    for f in FILES:
        with av.open(f) as c:
            s = c.streams.video[0]
            s.thread_count = 1
            tb = s.time_base
            ts = targets(float(s.duration * tb), float(s.average_rate))
            i, prev = 0, None
            for frame in c.decode(s):
                while i < len(ts) and frame.pts * tb > ts[i] + 1e-9:
                    (prev or frame).to_ndarray(format="rgb24")
                    n, i = n + 1, i + 1
                prev = frame
                if i == len(ts):
                    break
            while i < len(ts):
                prev.to_ndarray(format="rgb24")
                n, i = n + 1, i + 1
    return n


tools = [
    ("ffmpeg -threads 1 full decode (no RGB)", ffmpeg_full),
    ("torchcodec exact", None),
    ("torchcodec approximate", None),
    ("decord get_batch", decord_batch),
    ("PyAV seek + decode forward", pyav_seek),
    ("PyAV sequential + pick", pyav_sequential),
]
for name, fn in tools:
    try:
        if name.startswith("torchcodec"):
            fn = torchcodec(name.split()[-1])
        best_of(name, fn)
    except ImportError as e:
        print(json.dumps({"tool": name, "skipped": str(e)}), flush=True)
