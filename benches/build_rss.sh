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
  python3 "$(dirname "$0")/tools/repeat_llava.py" "$WORK/raw/pretrain.json" "$WORK/raw/pretrain-x$copies.jsonl" "$copies"
  rm -rf "$WORK/shards-x$copies"
  /usr/bin/time -f "%e %M" -o "$WORK/time-x$copies" \
    "$BIN" build-shards --out "$WORK/shards-x$copies" --tokenizer "$WORK/raw/tokenizer.json" \
    --source "llava:$WORK/raw/pretrain-x$copies.jsonl" --json > "$WORK/summary-x$copies.json"
  read -r secs rss_kb < "$WORK/time-x$copies"
  samples=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['samples'])" "$WORK/summary-x$copies.json")
  echo "{\"copies\": $copies, \"samples\": $samples, \"seconds\": $secs, \"samples_per_s\": $(python3 -c "print(round($samples/$secs,1))"), \"peak_rss_mb\": $((rss_kb / 1024))}"
done
