#!/usr/bin/env bash
# Peak resident memory of `mix` as the corpus grows.
#
#   benches/mix_rss.sh [LVPIPE_BINARY] [WORK_DIR]
#
# Builds shards from the small synthetic corpus's image captions (1,200
# samples with a JPEG each) repeated 1x, 4x and 16x with distinct text, then
# mixes one stage that selects every sample, and prints samples, seconds and
# peak RSS (benches/rss.py: anonymous and file-backed) for each.
set -euo pipefail
BIN=${1:-target/release/lvpipe}
WORK=${2:-target/bench-mix-rss}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
[ -f "$WORK/raw/pretrain.json" ] || "$BIN" synth --out "$WORK/raw" --scale small >/dev/null
cat > "$WORK/recipe.toml" <<'TOML'
[model]
image_size = 64
patch_size = 8
projector_downsample = 2
vision_hidden_size = 64
vision_layers = 2
vision_heads = 4
hidden_size = 128
intermediate_size = 256
num_layers = 2
num_heads = 4
num_kv_heads = 2
vocab_size = 4096
rope_base = 10000.0

[[stage]]
name = "everything"
init = "base"
trainable = ["llm"]
context = 512
lr = 1e-4
schedule = "constant"
warmup = 0.0
global_batch = 8
epochs = 1
seed = 1
  [[stage.source]]
  name = "all"
  query = "true"
TOML
cat /proc/loadavg
for copies in 1 4 16; do
  if [ ! -f "$WORK/shards-x$copies/manifest.json" ]; then
    python3 "$(dirname "$0")/tools/repeat_llava.py" "$WORK/raw/pretrain.json" "$WORK/raw/pretrain-x$copies.jsonl" "$copies"
    "$BIN" build-shards --out "$WORK/shards-x$copies" --tokenizer "$WORK/raw/tokenizer.json" \
      --source "llava:$WORK/raw/pretrain-x$copies.jsonl" >/dev/null
  fi
  rm -rf "$WORK/mix-x$copies"
  python3 "$HERE/rss.py" "$BIN" mix --recipe "$WORK/recipe.toml" --stage 1 \
    --shards "$WORK/shards-x$copies" --out "$WORK/mix-x$copies" > "$WORK/rss-x$copies.json"
  python3 - "$WORK/rss-x$copies.json" "$WORK/mix-x$copies/stage-1/mix.json" "$copies" <<'PY'
import json, sys
rss, mix = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(json.dumps({"copies": int(sys.argv[3]), "samples": mix["samples"], "seconds": rss["seconds"],
                  "peak_rss_mb": rss["peak_rss_mb"], "peak_anon_mb": rss["peak_anon_mb"],
                  "peak_file_mb": rss["peak_file_mb"]}))
PY
done
