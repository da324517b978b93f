#!/usr/bin/env bash
# Crash loop: kill `llama-pro train` with SIGKILL at random moments (during steps, checkpoint
# writes and the export: no handler runs), resume it from its newest checkpoint, again and again
# until it finishes; the final model and the losses in report.json must be bitwise those of an
# uninterrupted run. Prints one line per trial and a summary; exits 1 on any difference.
#
#     scripts/crash_loop.sh [TRIALS]        # default 20 trials; LLAMA_PRO_BIN to use a built binary
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-20}
if [ -z "${LLAMA_PRO_BIN:-}" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama-pro-target}"
  cargo build --release --quiet
  LLAMA_PRO_BIN="$CARGO_TARGET_DIR/release/llama-pro"
fi
BIN=$LLAMA_PRO_BIN
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$BIN" expand --model tests/fixtures/models/llama-mha-f32 --output "$WORK/model" --groups 2 >/dev/null
ARGS=(train --model "$WORK/model" --data examples/data/code.txt --seq-len 16 --batch-size 2
      --grad-accum 2 --max-steps 40 --save-every 1 --keep 2 --lr 3e-3 --eval-every 10
      --eval "code=examples/data/code.txt" --eval-max-sequences 4 --no-token-cache --log-every 0)

digest() { sha256sum "$1" | cut -d' ' -f1; }
losses() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["losses"])' "$1"; }

start=$(date +%s.%N)
"$BIN" "${ARGS[@]}" --output "$WORK/ref" >/dev/null 2>&1
ref_secs=$(python3 -c "import time; print(round(time.time() - $start, 2))")
ref_model=$(digest "$WORK/ref/model/model.safetensors")
ref_losses=$(losses "$WORK/ref/report.json")
echo "reference run: ${ref_secs}s, model sha256 ${ref_model:0:16}"

total_kills=0
bad=0
for trial in $(seq 1 "$TRIALS"); do
  out="$WORK/t$trial"
  kills=0
  while :; do
    if [ -n "$(ls -d "$out"/checkpoints/step-* 2>/dev/null)" ]; then
      mode=(--resume)
    else
      mode=(--overwrite)   # killed before its first checkpoint: start again
    fi
    "$BIN" "${ARGS[@]}" --output "$out" "${mode[@]}" >"$WORK/log" 2>&1 &
    pid=$!
    # A random moment within the length of a whole run (up to 4 kills a trial, then it may end).
    sleep "$(python3 -c "import random; print(round(random.uniform(0, $ref_secs * (0.6 if $kills < 4 else 3.0)), 3))")"
    if kill -9 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null || true
      kills=$((kills + 1))
      continue
    fi
    if ! wait "$pid"; then
      echo "trial $trial: a resumed run failed:"; cat "$WORK/log"; exit 1
    fi
    break
  done
  total_kills=$((total_kills + kills))
  model=$(digest "$out/model/model.safetensors")
  if [ "$model" = "$ref_model" ] && [ "$(losses "$out/report.json")" = "$ref_losses" ]; then
    echo "trial $trial: $kills kills, resumed to the end: model and losses bitwise equal"
  else
    echo "trial $trial: $kills kills: DIFFERENT (model ${model:0:16})"
    bad=$((bad + 1))
  fi
  rm -rf "$out"
done
echo "crash loop: $TRIALS trials, $total_kills SIGKILLs, $bad differences"
[ "$bad" -eq 0 ]
