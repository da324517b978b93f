#!/usr/bin/env bash
# Rebuild everything under data/: the corpora (from Debian packages), the tokenizer and the small
# pretrained base model used by `llama-pro demo`. See data/DATA.md. About 25 minutes on 2 CPU cores.
#
#     bash scripts/make_base.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llama-pro-target}"
python3 scripts/make_corpora.py
cargo build --release
bin="$CARGO_TARGET_DIR/release/llama-pro"
# 1. A byte-level BPE (4096 tokens) trained on both training splits.
"$bin" train-tokenizer --output data/base-config --vocab-size 4096 \
  data/general-train.jsonl data/domain-train.jsonl
# 2. Pretraining from a random init of data/base-config/config.json (2.56 M parameters) on 90%
#    general / 10% domain tokens (code is a weak skill of the base, as for LLaMA-2):
#    1000 steps x 8 x 256 tokens.
run="$(mktemp -d)/pretrain"
"$bin" train --model data/base-config --random-init --method full \
  --data data/general-train.jsonl:0.9 --data data/domain-train.jsonl:0.1 \
  --eval general=data/general-valid.jsonl --eval domain=data/domain-valid.jsonl \
  --output "$run" --max-steps 1000 --seq-len 256 --batch-size 8 \
  --lr 1.5e-3 --min-lr 1.5e-4 --warmup-ratio 0.03 --eval-every 250 --save-every 250 --log-every 50 --seed 0
# 3. Stored in bf16 (half the size; the demo computes in f32 from these exact values).
"$bin" convert --model "$run/model" --output data/base --dtype bf16 --overwrite
cp "$run/report.json" data/base/pretraining-report.json
cp "$run/loss.png" data/base/pretraining-loss.png
echo "data/base written; pretraining run in $run"
