"""Writes a LLaVA JSON file's records `copies` times as JSONL, each copy
with its own ids and first-turn text (so nothing is deduplicated).

    python benches/tools/repeat_llava.py IN.json OUT.jsonl COPIES
"""

import json
import sys

records = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as out:
    for k in range(int(sys.argv[3])):
        for r in records:
            r = dict(r, id=f"{r['id']}-{k}")
            r["conversations"] = [dict(t) for t in r["conversations"]]
            r["conversations"][0]["value"] += f" (copy {k})"
            out.write(json.dumps(r) + "\n")
