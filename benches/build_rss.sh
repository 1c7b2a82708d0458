#!/usr/bin/env bash
# Peak resident memory and throughput of build-shards as the input grows.
#
#   benches/build_rss.sh [LVPIPE_BINARY] [WORK_DIR]
#
# Builds shards from the small synthetic corpus's pretrain set (1200 image
# captions) and from the same file repeated 4x and 16x with distinct text
# (so nothing is deduplicated), and prints records, seconds and peak RSS
# (GNU time's "Maximum resident set size") for each.
set -euo pipefail
BIN=${1:-target/release/lvpipe}
WORK=${2:-target/bench-rss}
mkdir -p "$WORK"
[ -f "$WORK/raw/pretrain.json" ] || "$BIN" synth --out "$WORK/raw" --scale small >/dev/null
cat /proc/loadavg
for copies in 1 4 16; do
  python3 - "$WORK/raw/pretrain.json" "$WORK/raw/pretrain-x$copies.jsonl" "$copies" <<'PY'
import json, sys
records = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as out:
    for k in range(int(sys.argv[3])):
        for r in records:
            r = dict(r, id=f"{r['id']}-{k}")
            r["conversations"] = [dict(t) for t in r["conversations"]]
            r["conversations"][0]["value"] += f" (copy {k})"
            out.write(json.dumps(r) + "\n")
PY
  rm -rf "$WORK/shards-x$copies"
  /usr/bin/time -f "%e %M" -o "$WORK/time-x$copies" \
    "$BIN" build-shards --out "$WORK/shards-x$copies" --tokenizer "$WORK/raw/tokenizer.json" \
    --source "llava:$WORK/raw/pretrain-x$copies.jsonl" --json > "$WORK/summary-x$copies.json"
  read -r secs rss_kb < "$WORK/time-x$copies"
  samples=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['samples'])" "$WORK/summary-x$copies.json")
  echo "{\"copies\": $copies, \"samples\": $samples, \"seconds\": $secs, \"samples_per_s\": $(python3 -c "print(round($samples/$secs,1))"), \"peak_rss_mb\": $((rss_kb / 1024))}"
done
