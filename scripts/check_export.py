#!/usr/bin/env python3
"""Check that models exported by llama-pro load in transformers with no missing/unused weights and
give the same logits as the model they came from.

    cargo build --release
    .venv/bin/python scripts/check_export.py [--bin target/release/llama-pro] [MODEL_DIR ...]

Default models: every directory under tests/fixtures/models. For each, `llama-pro convert` writes an
export (same dtype, and once more sharded into bf16), which transformers loads with
`output_loading_info=True`; any missing, unexpected or mismatched key fails the check, as does a
logit difference (the export must be bitwise identical, so the logits must be equal).
Each model is also expanded by `llama-pro expand` (several layouts); transformers must load the
expanded directory and give exactly the base model's logits.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parent.parent


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(Path(target) / "release" / "llama-pro")


def load(path, dtype="auto"):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=dtype)
    return model.eval(), info


def loading_problems(info):
    return {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("models", nargs="*")
    args = ap.parse_args()
    models = args.models or sorted(str(p) for p in (ROOT / "tests" / "fixtures" / "models").iterdir())
    hf_logging.set_verbosity_warning()
    failures = 0
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for src in models:
        ref, _ = load(src)
        with torch.no_grad():
            want = ref(input_ids=ids).logits.float()
        for label, extra in [("same dtype", []), ("bf16, sharded", ["--dtype", "bf16", "--max-shard-size", "100KB"])]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "export"
                subprocess.run([args.bin, "convert", "--model", src, "--output", str(out), *extra], check=True,
                               stdout=subprocess.DEVNULL)
                model, info = load(out)
                problems = loading_problems(info)
                with torch.no_grad():
                    got = model(input_ids=ids).logits.float()
                if extra:
                    # Reference: the source loaded by transformers in bf16 (round to nearest even,
                    # as our export does), so the logits must again be equal.
                    ref16, _ = load(src, torch.bfloat16)
                    with torch.no_grad():
                        want_l = ref16(input_ids=ids).logits.float()
                else:
                    want_l = want
                diff = (got - want_l).abs().max().item()
                ok = not problems and diff == 0.0
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} {Path(src).name:<28} {label:<14} max|Δlogits| = {diff:.3e} "
                      f"loading problems: {problems or 'none'}")
        # Block expansion: the expanded export loads and computes exactly the base model's logits.
        for layout in (["--groups", "2"], ["--groups", "2", "--copies", "2"], ["--top", "1"], ["--bottom", "2"]):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "expanded"
                subprocess.run([args.bin, "expand", "--model", src, "--output", str(out), *layout], check=True,
                               stdout=subprocess.DEVNULL)
                model, info = load(out)
                problems = loading_problems(info)
                with torch.no_grad():
                    got = model(input_ids=ids).logits.float()
                diff = (got - want).abs().max().item()
                ok = not problems and diff == 0.0 and model.config.num_hidden_layers > ref.config.num_hidden_layers
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} {Path(src).name:<28} expand {' '.join(layout):<18} "
                      f"{ref.config.num_hidden_layers}->{model.config.num_hidden_layers} layers, "
                      f"max|Δlogits| vs base = {diff:.3e} loading problems: {problems or 'none'}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
