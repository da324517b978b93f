#!/usr/bin/env python3
"""Ours vs PyTorch on the same training step, same machine, one run.

    python3 benches/compare_torch.py [--cases S M] [--modes full pro forward generate] [--rounds 3] [--steps 10]

Creates its own venv (benches/.venv, from scripts/requirements.txt: torch 2.15, transformers 5.23)
on first use, builds `cargo run --release --example bench_step`, then alternates ours and torch
(each step in a fresh process, `torch.set_num_threads` = our thread count) and prints tokens/s,
peak RSS and the ratio ours / PyTorch per case (median over rounds).

The PyTorch step is the identical model: transformers' LlamaForCausalLM (sdpa attention) with the
same configuration, expanded the same way (groups of 4 blocks, one zero-initialised copy after
each), the same freezing (`pro`: only the new blocks require grad), mean cross-entropy,
`torch.optim.AdamW(lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1)` on the trainable
parameters. `forward`: the same model, loss without gradients. `generate`: greedy decoding with the KV
cache (transformers' `generate`, batch 1, 16-token prompt, 112 new tokens; tokens/s counts new tokens).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benches" / ".venv"

GEN_TOKENS = 112  # generate mode: new tokens per step (greedy, KV cache, batch 1, 16-token prompt)

CASES = {
    "S": dict(vocab=4096, hidden=256, inter=688, layers=4, heads=4, seq=128, batch=8),
    "M": dict(vocab=8192, hidden=512, inter=1376, layers=8, heads=8, seq=256, batch=4),
}


def ensure_venv():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV} (torch, transformers; pinned in scripts/requirements.txt)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(ROOT / "scripts" / "requirements.txt")], check=True)
    os.execv(str(py), [str(py), *sys.argv])


def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def torch_child(case, mode, steps, warmup, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    c = CASES[case]
    groups = c["layers"] // 4
    new = [g * 5 + 4 for g in range(groups)]
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                      num_hidden_layers=c["layers"] + groups, num_attention_heads=c["heads"],
                      num_key_value_heads=c["heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for i in new:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    if mode == "pro":
        model.requires_grad_(False)
        for i in new:
            model.model.layers[i].requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    n = c["batch"] * c["seq"]
    prompt = (torch.arange(16, dtype=torch.int64) * 2654435761 % c["vocab"]).reshape(1, 16)
    ids = (torch.arange(n, dtype=torch.int64) * 2654435761 % c["vocab"]).reshape(c["batch"], c["seq"])
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        if mode == "generate":
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                                     do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
            assert out.shape[1] == prompt.shape[1] + GEN_TOKENS
            loss = torch.tensor(float("nan"))
        elif mode == "forward":
            with torch.no_grad():
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    n = GEN_TOKENS if mode == "generate" else n
    print(json.dumps({"impl": "torch", "case": case, "mode": mode, "params": sum(p.numel() for p in model.parameters()),
                      "trainable": sum(p.numel() for p in params) if mode in ("full", "pro") else 0,
                      "tokens_per_step": n, "median_step_s": med, "tokens_per_s": n / med,
                      "peak_rss_mb": peak_rss_mb(), "loss_first": losses[0], "loss_last": losses[-1],
                      "threads": threads, "torch": torch.__version__}))


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["S", "M"])
    ap.add_argument("--modes", nargs="+", default=["full", "pro"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--torch-child", nargs=5, metavar=("CASE", "MODE", "STEPS", "WARMUP", "THREADS"))
    a = ap.parse_args()
    ensure_venv()
    if a.torch_child:
        c, m, s, w, t = a.torch_child
        return torch_child(c, m, int(s), int(w), int(t))
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "bench_step"], cwd=ROOT, check=True)
    ours_bin = target / "release" / "examples" / "bench_step"
    threads = os.cpu_count() or 1
    rows = []
    for case in a.cases:
        for mode in a.modes:
            res = {"llama-pro": [], "torch": []}
            for _ in range(a.rounds):
                res["llama-pro"].append(run_json([str(ours_bin), "--case", case, "--mode", mode,
                                                  "--steps", str(a.steps), "--warmup", str(a.warmup)]))
                res["torch"].append(run_json([sys.executable, __file__, "--torch-child", case, mode,
                                              str(a.steps), str(a.warmup), str(threads)]))
            ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(res["llama-pro"], res["torch"])]
            med = lambda k, impl: statistics.median(r[k] for r in res[impl])  # noqa: E731
            rows.append((case, mode, med("tokens_per_s", "llama-pro"), med("tokens_per_s", "torch"),
                         statistics.median(ratios), med("peak_rss_mb", "llama-pro"), med("peak_rss_mb", "torch"),
                         res["llama-pro"][0]["trainable"], res["llama-pro"][0]["params"]))
            print(json.dumps({"case": case, "mode": mode, "rounds": res}), file=sys.stderr)
    print(f"\n{'case':<5}{'mode':<6}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>8}{'ours RSS MB':>13}"
          f"{'torch RSS MB':>14}  trainable/params   ({threads} threads)")
    for case, mode, o, t, r, om, tm, tr, p in rows:
        print(f"{case:<5}{mode:<6}{o:>12.0f}{t:>13.0f}{r:>8.2f}{om:>13.0f}{tm:>14.0f}  {tr}/{p}")


if __name__ == "__main__":
    sys.exit(main())
