"""Runs a command and reports its wall time and peak resident memory, split
into anonymous memory (what the process allocated) and file-backed pages
(memory-mapped files, which the page cache holds and can drop).

    python benches/rss.py CMD [ARGS...]
"""

import json
import subprocess
import sys
import time

start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
while proc.poll() is None:
    try:
        for line in open(f"/proc/{proc.pid}/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]))
    except (FileNotFoundError, ProcessLookupError):
        break
    time.sleep(0.002)
print(json.dumps({
    "cmd": " ".join(sys.argv[1:]), "exit": proc.wait(), "seconds": round(time.perf_counter() - start, 3),
    "peak_anon_mb": round(peak["RssAnon"] / 1024, 1), "peak_file_mb": round(peak["RssFile"] / 1024, 1),
    "peak_rss_mb": round(peak["VmRSS"] / 1024, 1), "loadavg": open("/proc/loadavg").read().strip(),
}))
