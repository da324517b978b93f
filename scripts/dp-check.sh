#!/usr/bin/env bash
# Data parallelism on a device: the same short run on one worker (batch 6) and on two workers of
# the same device (batch 3 each), then the largest relative difference of their losses. Proves the
# collective path runs on that backend (one GPU, two workers); `scripts/device-check.sh` runs it
# as the step `dp-cuda`.
#
#   scripts/dp-check.sh BIN DEVICE OUTDIR     e.g. scripts/dp-check.sh dist/llama-pro cuda:0 /tmp/dp
set -euo pipefail
BIN=$1 DEV=$2 OUT=$3
rm -rf "$OUT" && mkdir -p "$OUT"
"$BIN" expand --model tests/fixtures/models/llama-mha-f32 --output "$OUT/m" --groups 2 --copies 1 >/dev/null
common=(--model "$OUT/m" --data examples/data/code.txt --eval code=examples/data/code.txt
  --eval-max-sequences 10 --max-steps 5 --grad-accum 2 --seq-len 24 --no-packing --lr 3e-3
  --clip-grad-norm 0.3 --log-every 1 --no-token-cache)
"$BIN" train "${common[@]}" --device "$DEV" --batch-size 6 --output "$OUT/one" >"$OUT/one.log" 2>&1
"$BIN" train "${common[@]}" --devices "$DEV,$DEV" --batch-size 3 --output "$OUT/two" >"$OUT/two.log" 2>&1
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{r}/report.json")) for r in ("one", "two"))
d = max(abs(x - y) / abs(y) for x, y in zip(b["losses"], a["losses"]))
print(json.dumps({"losses_one": a["losses"], "losses_two": b["losses"], "max_rel_diff": d,
                  "tokens_per_sec_one": a["tokens_per_sec"], "tokens_per_sec_two": b["tokens_per_sec"]}))
sys.exit(0 if d <= 1e-4 else 1)
PY
