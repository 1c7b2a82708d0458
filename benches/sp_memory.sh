#!/usr/bin/env bash
# Peak memory per rank and tokens/s of training rows of CONTEXT tokens as
# one process and split over sequence-parallel groups of 2 and 4 (Ulysses).
#
#   benches/sp_memory.sh [LVPIPE_BINARY (built --features mpi)] [WORK_DIR] [CONTEXT]
#
# Long documents are the tiny corpus's long texts joined end to end and cut
# into CONTEXT-token chunks (`long_samples = "chunk"`); the model is the
# tiny recipe's with 4 key-value heads, so that degree 4 divides them; two
# steps of one row each, one thread per rank.
set -euo pipefail
BIN=${1:-target/release/lvpipe}
WORK=${2:-target/bench-sp}
CONTEXT=${3:-16384}
mkdir -p "$WORK"
[ -f "$WORK/raw/longdocs.jsonl" ] || "$BIN" synth --out "$WORK/raw" --scale tiny >/dev/null
python3 - "$WORK/raw/longdocs.jsonl" "$WORK/long.jsonl" <<'PY'
import json, sys
texts = [json.loads(l)["text"] for l in open(sys.argv[1])]
with open(sys.argv[2], "w") as out:
    for k in range(len(texts)):
        out.write(json.dumps({"id": f"joined-{k}", "text": " ".join(texts[k % len(texts):] + texts) * 6}) + "\n")
PY
sed -e 's/^num_kv_heads = 2/num_kv_heads = 4/' recipes/tiny.toml | awk '/^\[\[stage\]\]/{exit} {print}' > "$WORK/recipe.toml"
for degree in 1 2 4; do
  cat >> "$WORK/recipe.toml" <<TOML
[[stage]]
name = "long-$degree"
init = "base"
trainable = ["llm"]
context = $CONTEXT
lr = 1e-4
schedule = "constant"
warmup = 0.0
global_batch = 1
steps = 2
seed = 1
long_samples = "chunk"
sequence_parallel = $degree
  [[stage.source]]
  name = "long"
  query = "source = 'long'"
TOML
done
[ -f "$WORK/shards/manifest.json" ] || "$BIN" build-shards --out "$WORK/shards" \
  --tokenizer "$WORK/raw/tokenizer.json" --source "text:$WORK/long.jsonl" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm=isolated \
  OMPI_MCA_btl_vader_single_copy_mechanism=none RAYON_NUM_THREADS=1
cat /proc/loadavg
stage=0
for degree in 1 2 4; do
  stage=$((stage + 1))
  rm -rf "$WORK/mixes/stage-$stage" "$WORK/run-$degree" "$WORK"/time-$degree-*
  "$BIN" mix --recipe "$WORK/recipe.toml" --stage $stage --shards "$WORK/shards" --out "$WORK/mixes" >/dev/null
  # GNU time per rank, each into a file of its own.
  mpirun --oversubscribe --bind-to none -n "$degree" sh -c \
    '/usr/bin/time -f "%M %e" -o "$0-$OMPI_COMM_WORLD_RANK" "$@"' "$WORK/time-$degree" \
    "$BIN" train --recipe "$WORK/recipe.toml" --stage $stage --mix "$WORK/mixes/stage-$stage" \
    --tokenizer "$WORK/raw/tokenizer.json" --out "$WORK/run-$degree" 2>&1 | grep "tokens/s"
  for f in "$WORK"/time-$degree-*; do
    read -r kb secs < "$f"
    echo "degree $degree, rank ${f##*-}: peak RSS $((kb / 1024)) MB, $secs s"
  done
done
