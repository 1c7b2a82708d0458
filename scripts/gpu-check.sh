#!/usr/bin/env bash
# Trains on DEVICE in each of DTYPES (default "bf16 f16") and on the CPU in
# f32 from the same fresh weights and mixes: 50 steps of recipes/tiny.toml's
# stage 3, then 20 steps of its stage 4 with activation checkpointing. Prints
# the loss curves and fails when a step's losses differ by more than TOL
# (default 0.10) of the f32 one, or the mean of a stage's last five steps by
# more than TOL_END (0.05): half- and full-precision trajectories drift apart
# step by step (on the CPU, bf16 against f32 peaked at 7.2% at one step of
# stage 4 and ended 3.3% apart).
#
#   DTYPES="bf16 f16" scripts/gpu-check.sh [LVPIPE] [DEVICE] [WORK]
#
# LVPIPE: an lvpipe binary (built with `--features cuda` for a GPU; default
# target/release/lvpipe). DEVICE: cuda:0 (default), or cpu to check bf16 on
# the CPU. WORK: a scratch folder (default: a new temporary one).
set -euo pipefail

LVPIPE=${1:-target/release/lvpipe}
DEVICE=${2:-cuda:0}
WORK=${3:-$(mktemp -d)}
TOL=${TOL:-0.10}
TOL_END=${TOL_END:-0.05}
DTYPES=${DTYPES:-bf16 f16}
RECIPE="$(cd "$(dirname "$0")/.." && pwd)/recipes/tiny.toml"
mkdir -p "$WORK"

"$LVPIPE" synth --out "$WORK/raw" --scale tiny
"$LVPIPE" build-shards --registry "$WORK/raw/registry.toml" \
    --tokenizer "$WORK/raw/tokenizer.json" --out "$WORK/shards"
for stage in 3 4; do
    "$LVPIPE" mix --recipe "$RECIPE" --stage "$stage" --shards "$WORK/shards" --out "$WORK/mixes"
done

# train NAME DEVICE DTYPE: stage 3 from fresh weights, then stage 4 from it.
train() {
    local out="$WORK/$1"
    "$LVPIPE" train --recipe "$RECIPE" --stage 3 --mix "$WORK/mixes/stage-3" \
        --tokenizer "$WORK/raw/tokenizer.json" --out "$out/stage-3" --steps 50 \
        --device "$2" --dtype "$3"
    "$LVPIPE" train --recipe "$RECIPE" --stage 4 --mix "$WORK/mixes/stage-4" \
        --tokenizer "$WORK/raw/tokenizer.json" --out "$out/stage-4" --steps 20 \
        --init "$out/stage-3" --gradient-checkpointing --device "$2" --dtype "$3"
}
train reference cpu f32
for dtype in $DTYPES; do
    train "$dtype" "$DEVICE" "$dtype"
done

python3 - "$WORK" "$DEVICE" "$TOL" "$TOL_END" $DTYPES <<'PY'
import json, sys
work, device = sys.argv[1], sys.argv[2]
tol, tol_end = float(sys.argv[3]), float(sys.argv[4])
dtypes = sys.argv[5:]
def losses(run):
    with open(f"{work}/{run}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]
ok = True
for dtype in dtypes:
    worst, worst_end = 0.0, 0.0
    for stage in ("stage-3", "stage-4"):
        ref, got = losses(f"reference/{stage}"), losses(f"{dtype}/{stage}")
        assert len(ref) == len(got), f"{stage}: {len(ref)} and {len(got)} steps"
        print(f"{stage}: step, cpu f32 loss, {device} {dtype} loss")
        for step, (r, g) in enumerate(zip(ref, got), 1):
            worst = max(worst, abs(r - g) / abs(r))
            print(f"  {step:3d} {r:.4f} {g:.4f}")
        end_ref, end_got = sum(ref[-5:]) / 5, sum(got[-5:]) / 5
        worst_end = max(worst_end, abs(end_ref - end_got) / abs(end_ref))
    print(f"{dtype}: largest difference at a step: {worst:.2%} of the f32 loss (tolerance {tol:.0%})")
    print(f"{dtype}: largest difference of the last five steps' mean: {worst_end:.2%} (tolerance {tol_end:.0%})")
    ok = ok and worst <= tol and worst_end <= tol_end
sys.exit(0 if ok else 1)
PY
