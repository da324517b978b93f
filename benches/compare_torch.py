#!/usr/bin/env python3
"""Ours vs PyTorch on the same training step, same machine, one run.

CPU (the default):

    python3 benches/compare_torch.py [--cases S M] [--modes full pro forward generate] [--rounds 3] [--steps 10]

creates its own venv (benches/.venv, from scripts/requirements.txt: torch 2.15, transformers 5.23)
on first use, builds `llama-pro` (`cargo build --release`), then alternates `llama-pro bench` and
the PyTorch twin (each step in a fresh process, `torch.set_num_threads` = our thread count) and
prints tokens/s, peak RSS and the ratio ours / PyTorch per case (median over rounds, tokens/s from
the median step).

GPU:

    python3 benches/compare_torch.py --device cuda --cases 1b --modes pro --seq 2048 --dtype bf16 \\
        [--batch 4] [--checkpointing] [--bin dist/llama-pro] [--json out.json]

runs `llama-pro bench --device cuda` and the PyTorch twin on the same GPU in one invocation (each in
its own process), with the machine's torch and transformers (no download: models are built from a
configuration with random weights), and prints tokens/s (from the mean step), MFU, peak memory
(ours: cubecl's allocator and nvidia-smi; torch: `torch.cuda.max_memory_allocated`/`reserved`)
and the ratio. `--json` writes both reports and the ratios.

The PyTorch step is the identical model: transformers' LlamaForCausalLM (sdpa attention, or
flash_attention_2 when `flash_attn` is installed and the dtype is a half type) with the preset's
configuration, expanded the same way (one zero-initialised copy after each group of 4 blocks), the
same freezing (`pro`: only the new blocks require grad), mean cross-entropy over every position,
AdamW (lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1 on every trainable tensor; `fused=True`
on CUDA) and the loss read back; the device is synchronised after the forward and the backward
passes, as `llama-pro bench` does. `--dtype bf16|f16` mirrors our mixed precision: frozen weights
stored in the half type, trainable weights and AdamW state in f32, matmuls under
`torch.autocast` in the half type (`full`: every weight f32 under autocast, torch's usual AMP).
`--checkpointing`: transformers' gradient checkpointing (whole blocks recomputed; ours is burn's
balanced strategy, which recomputes the memory-bound ops only). `forward`: the loss without
gradients. `generate`: greedy decoding with the KV cache (transformers' `generate`, batch 1,
16-token prompt, 112 new tokens; tokens/s counts new tokens).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benches" / ".venv"

GEN_TOKENS = 112  # generate mode: new tokens per step (greedy, KV cache, batch 1, 16-token prompt)
PROMPT_TOKENS = 16

# The presets of `llama-pro bench` (base shapes; each is expanded by one copy per 4 blocks).
PRESETS = {
    "S": dict(vocab=4096, hidden=256, inter=688, layers=4, heads=4, kv=4, tie=False, seq=128, batch=8,
              rope={"rope_type": "default", "rope_theta": 10000.0}, max_pos=4096),
    "M": dict(vocab=8192, hidden=512, inter=1376, layers=8, heads=8, kv=8, tie=False, seq=256, batch=4,
              rope={"rope_type": "default", "rope_theta": 10000.0}, max_pos=4096),
    "1b": dict(vocab=128256, hidden=2048, inter=8192, layers=16, heads=32, kv=8, tie=True, seq=2048, batch=None,
               rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, max_pos=131072),
    "llama2-7b-pro": dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv=32, tie=False, seq=4096,
                          batch=1, rope={"rope_type": "default", "rope_theta": 10000.0}, max_pos=4096),
}

# Dense peak TFLOP/s (bf16/f16 tensor cores, f32 without) of a few GPUs, for the MFU when our
# report has none (`llama-pro bench` carries the full table).
GPU_PEAKS = [("H200 NVL", 835, 60), ("H200", 989, 67), ("GH200", 989, 67), ("H100 PCIe", 756, 51),
             ("H100 NVL", 835, 60), ("H100", 989, 67), ("A100", 312, 19.5), ("L40S", 362, 91.6),
             ("RTX 4090", 165, 82.6), ("RTX 3090", 71, 35.6)]


def shape(preset, seq=None, batch=None):
    p = PRESETS[preset]
    seq = seq or p["seq"]
    if batch is None:
        batch = p["batch"] if p["batch"] is not None else max(1, 8192 // seq)
    return seq, batch


def new_layers(preset):
    groups = PRESETS[preset]["layers"] // 4
    return [g * 5 + 4 for g in range(groups)]


def flops_per_step(preset, mode, seq, batch, gen_tokens=GEN_TOKENS):
    """Model FLOPs of a step, counted as `llama-pro bench` counts them (PaLM's convention: 2 per
    multiply-add, attention over the full window; backward activation gradients only from the top
    down to the lowest trainable block; weight gradients only for trainable matmuls)."""
    p = PRESETS[preset]
    d, f, v = p["hidden"], p["inter"], p["vocab"]
    hd = d // p["heads"]
    q, kvd = p["heads"] * hd, p["kv"] * hd
    L = p["layers"] + p["layers"] // 4
    block = d * q + 2 * d * kvd + q * d + 3 * d * f
    head = v * d
    attn = 4 * q * seq  # per token per block
    fwd = 2 * (L * block + head) + L * attn
    if mode == "forward":
        return fwd * seq * batch
    if mode == "generate":
        a = 4 * q * L
        total = PROMPT_TOKENS * 2 * (L * block + head) + a * PROMPT_TOKENS * PROMPT_TOKENS
        total += sum(2 * (L * block + head) + a * (PROMPT_TOKENS + k) for k in range(1, gen_tokens))
        return total
    if mode == "pro":
        through = L - min(new_layers(preset))
        trainable = len(new_layers(preset)) * block
    else:  # full: everything, embeddings included (tied: the head's matmul trains)
        through = L
        # Every block and the head (untied: the embedding rows are a lookup, no matmul; tied: the
        # shared matrix trains as the head).
        trainable = L * block + head
    bwd = 2 * (through * block + head) + 2 * through * attn + 2 * trainable
    return (fwd + bwd) * seq * batch


def ensure_venv():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return
    except ImportError:
        pass
    if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1].startswith("cuda"):
        sys.exit("the cuda mode uses this machine's torch and transformers: install them (no venv is made)")
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


def build_config(preset):
    import transformers
    from transformers import LlamaConfig

    p = PRESETS[preset]
    kw = dict(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
              num_hidden_layers=p["layers"] + p["layers"] // 4, num_attention_heads=p["heads"],
              num_key_value_heads=p["kv"], head_dim=p["hidden"] // p["heads"], max_position_embeddings=p["max_pos"],
              rms_norm_eps=1e-5, tie_word_embeddings=p["tie"], use_cache=False)
    rope = dict(p["rope"])
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = rope
    else:
        kw["rope_theta"] = rope.pop("rope_theta")
        kw["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    return LlamaConfig(**kw)


def torch_child(a):
    """The PyTorch step; prints one JSON line."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads)
    seq, batch = shape(a.preset, a.seq, a.batch)
    half = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    attn = a.attn
    if attn == "auto":
        attn = "sdpa"
        if cuda and half is not None and importlib.util.find_spec("flash_attn"):
            try:  # installed and importable with this torch
                import flash_attn  # noqa: F401
                attn = "flash_attention_2"
            except Exception:  # noqa: BLE001
                pass
    cfg = build_config(a.preset)
    torch.manual_seed(0)
    t_setup = time.perf_counter()
    with torch.device(dev):
        try:
            model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
        except TypeError:  # transformers 4 spells it torch_dtype
            model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, torch_dtype=torch.float32)
    new = new_layers(a.preset)
    with torch.no_grad():
        for i in new:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    trains = a.mode in ("pro", "full")
    if a.mode == "pro":
        model.requires_grad_(False)
        for i in new:
            model.model.layers[i].requires_grad_(True)
    elif not trains:
        model.requires_grad_(False)
    if half is not None:
        # Our mixed precision: frozen weights in the half type, trainable ones stay f32.
        with torch.no_grad():
            for p_ in model.parameters():
                if not p_.requires_grad:
                    p_.data = p_.data.to(half)
    if trains:
        model.train()
        if a.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval()
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = None
    if trains:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                fused=True if cuda else None)
    n = batch * seq
    v = cfg.vocab_size
    ids = (torch.arange(n, dtype=torch.int64) * 2654435761 % v).reshape(batch, seq).to(dev)
    prompt = (torch.arange(PROMPT_TOKENS, dtype=torch.int64) * 2654435761 % v).reshape(1, PROMPT_TOKENS).to(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def autocast():
        if half is None:
            return torch.autocast(device_type=dev.type, enabled=False)
        return torch.autocast(device_type=dev.type, dtype=half)

    sync()
    setup_s = time.perf_counter() - t_setup
    times, phases, losses = [], [[], [], []], []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        if a.mode == "generate":
            with torch.no_grad(), autocast():
                out = model.generate(prompt, max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens,
                                     do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
            assert out.shape[1] == PROMPT_TOKENS + a.gen_tokens
            loss = float("nan")
            sync()
        elif a.mode == "forward":
            with torch.no_grad(), autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
            sync()
        else:
            with autocast():
                out = model(input_ids=ids, labels=ids, use_cache=False)
            lt = out.loss
            sync()
            t_fwd = time.perf_counter() - t
            lt.backward()
            sync()
            t_bwd = time.perf_counter() - t
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = lt.item()
            del out, lt
            sync()
            if i >= a.warmup:
                t_all = time.perf_counter() - t
                phases[0].append(t_fwd)
                phases[1].append(t_bwd - t_fwd)
                phases[2].append(t_all - t_bwd)
        losses.append(loss)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    tokens = a.gen_tokens if a.mode == "generate" else n
    mean = statistics.fmean(times)
    flops = flops_per_step(a.preset, a.mode, seq, batch, a.gen_tokens)
    rep = {
        "impl": "torch", "preset": a.preset, "mode": a.mode, "dtype": a.dtype, "device": a.device,
        "attn_implementation": attn, "checkpointing": a.checkpointing, "seq": seq, "batch": batch,
        "params": sum(p_.numel() for p_ in model.parameters()),
        "trainable": sum(p_.numel() for p_ in params) if trains else 0,
        "tokens_per_step": tokens, "setup_s": setup_s,
        "step_s": {"mean": mean, "min": min(times), "median": statistics.median(times), "max": max(times), "all": times},
        "phase_s": {k: (statistics.fmean(v_) if v_ else None) for k, v_ in zip(["forward", "backward", "optimizer"], phases)},
        "tokens_per_s": tokens / mean, "tokens_per_s_median": tokens / statistics.median(times),
        "flops_per_step": flops, "achieved_tflops": flops / mean / 1e12,
        "peak_rss_mb": peak_rss_mb(), "loss_first": losses[0], "loss_last": losses[-1],
        "threads": a.threads, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if cuda:
        rep["device_name"] = torch.cuda.get_device_name(dev)
        rep["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        rep["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    print(json.dumps(rep))


def ours_cmd(bin_, a, preset, mode, json_path):
    seq, batch = shape(preset, a.seq, a.batch)
    cmd = [str(bin_), "bench", "--preset", preset, "--mode", mode, "--device", a.device, "--dtype", a.dtype,
           "--seq", str(seq), "--batch", str(batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--gen-tokens", str(a.gen_tokens), "--json", str(json_path)]
    if a.checkpointing:
        cmd.append("--checkpointing")
    if a.peak_tflops:
        cmd += ["--peak-tflops", str(a.peak_tflops)]
    return cmd


def run_ours(bin_, a, preset, mode):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.json"
        p = subprocess.run(ours_cmd(bin_, a, preset, mode, path), capture_output=True, text=True,
                           timeout=a.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"llama-pro bench failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        return json.loads(path.read_text())


def run_torch(a, preset, mode, threads):
    cmd = [sys.executable, __file__, "--torch-child", "--device", a.device, "--dtype", a.dtype,
           "--cases", preset, "--modes", mode, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(threads), "--attn", a.attn, "--gen-tokens", str(a.gen_tokens)]
    if a.seq:
        cmd += ["--seq", str(a.seq)]
    if a.batch:
        cmd += ["--batch", str(a.batch)]
    if a.checkpointing:
        cmd.append("--checkpointing")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        raise RuntimeError(f"the PyTorch twin failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def find_bin(a):
    if a.bin:
        return Path(a.bin)
    if os.environ.get("LLAMA_PRO_BIN"):
        return Path(os.environ["LLAMA_PRO_BIN"])
    dist = ROOT / "dist" / "llama-pro"
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if a.device.startswith("cuda") and dist.exists():
        return dist
    if not a.no_build:
        features = [] if a.device == "cpu" else ["--features", a.device.split(":")[0]]
        subprocess.run(["cargo", "build", "--release", *features], cwd=ROOT, check=True)
    return target / "release" / "llama-pro"


def gpu_peak(name, dtype):
    for pat, half, f32 in GPU_PEAKS:
        if pat in name:
            return (f32 if dtype == "f32" else half) * 1e12
    return None


def main_device(a, bin_):
    """One ours/torch pair per case and mode on a GPU (or any device), reported side by side."""
    results = []
    for preset in a.cases:
        for mode in a.modes:
            row = {"preset": preset, "mode": mode, "dtype": a.dtype, "device": a.device,
                   "checkpointing": a.checkpointing}
            for name, fn in (("llama-pro", lambda: run_ours(bin_, a, preset, mode)),
                             ("torch", lambda: run_torch(a, preset, mode, os.cpu_count() or 1))):
                try:
                    row[name] = fn()
                except Exception as e:  # noqa: BLE001 (one side failing is a result too)
                    row[name] = {"error": str(e)}
                    print(f"{name} {preset} {mode}: {e}", file=sys.stderr)
            o, t = row["llama-pro"], row["torch"]
            if "tokens_per_s" in o and "tokens_per_s" in t:
                row["ratio_tokens_per_s"] = o["tokens_per_s"] / t["tokens_per_s"]
                if o.get("peak_tflops"):
                    peak = o["peak_tflops"] * 1e12
                elif a.peak_tflops:
                    peak = a.peak_tflops * 1e12
                else:
                    peak = gpu_peak(t.get("device_name", ""), a.dtype)
                if peak:
                    t["mfu"] = t["flops_per_step"] / t["step_s"]["mean"] / peak
                    t["peak_tflops"] = peak / 1e12
                # The two FLOP counts are computed independently (Rust and Python): they must agree.
                row["flops_agree"] = abs(o["flops_per_step"] - t["flops_per_step"]) <= 1e-9 * t["flops_per_step"]
            results.append(row)
    gb = lambda b: f"{b / 1e9:.2f}" if isinstance(b, (int, float)) else "?"  # noqa: E731
    print(f"\n{'case':<15}{'mode':<10}{'dtype':<6}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>7}"
          f"{'ours MFU':>10}{'torch MFU':>10}{'ours GB':>9}{'torch GB':>10}")
    for r in results:
        o, t = r["llama-pro"], r["torch"]
        om = o.get("mfu")
        tm = t.get("mfu")
        mem_o = (o.get("memory") or {}).get("peak_in_use_bytes") or (o.get("memory") or {}).get("peak_bytes")
        mem_t = t.get("max_memory_allocated_bytes") or (t.get("peak_rss_mb", 0) * 1e6 or None)
        print(f"{r['preset']:<15}{r['mode']:<10}{r['dtype']:<6}{o.get('tokens_per_s', float('nan')):>12.0f}"
              f"{t.get('tokens_per_s', float('nan')):>13.0f}{r.get('ratio_tokens_per_s', float('nan')):>7.2f}"
              f"{(100 * om if om else float('nan')):>9.1f}%{(100 * tm if tm else float('nan')):>9.1f}%"
              f"{gb(mem_o):>9}{gb(mem_t):>10}")
    print("(tokens/s from the mean step; ours GB: cubecl's peak in-use sample, or peak RSS on the CPU; "
          "torch GB: max_memory_allocated)")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": a.device, "results": results}, indent=1) + "\n")
    return 0 if all("error" not in r["llama-pro"] and "error" not in r["torch"] for r in results) else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=None, help="presets: S M 1b llama2-7b-pro")
    ap.add_argument("--modes", nargs="+", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default: alternating rounds) or cuda[:N]")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--attn", default="auto", help="auto (flash_attention_2 if installed, else sdpa), sdpa, eager")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=GEN_TOKENS)
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--bin", help="the llama-pro binary (default: dist/llama-pro for cuda, else a fresh build)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ensure_venv()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    gpu = a.device != "cpu"
    a.cases = a.cases or (["1b"] if gpu else ["S", "M"])
    a.modes = a.modes or (["pro"] if gpu else ["full", "pro"])
    if a.torch_child:
        a.preset, a.mode = a.cases[0], a.modes[0]
        return torch_child(a)
    bin_ = find_bin(a)
    if gpu or a.dtype != "f32" or a.seq or a.batch or a.checkpointing:
        return main_device(a, bin_)
    threads = os.cpu_count() or 1
    rows, results = [], []
    for case in a.cases:
        for mode in a.modes:
            res = {"llama-pro": [], "torch": []}
            for _ in range(a.rounds):
                res["llama-pro"].append(run_ours(bin_, a, case, mode))
                res["torch"].append(run_torch(a, case, mode, threads))
            tps = lambda r: r["tokens_per_step"] / r["step_s"]["median"]  # noqa: E731
            ratios = [tps(o) / tps(t) for o, t in zip(res["llama-pro"], res["torch"])]
            med = lambda f, impl: statistics.median(f(r) for r in res[impl])  # noqa: E731
            rss = lambda r: r["memory"]["peak_bytes"] / 2**20 if "memory" in r else r["peak_rss_mb"]  # noqa: E731
            rows.append((case, mode, med(tps, "llama-pro"), med(tps, "torch"), statistics.median(ratios),
                         med(rss, "llama-pro"), med(rss, "torch"), res["llama-pro"][0]["trainable"],
                         res["llama-pro"][0]["params"]))
            print(json.dumps({"case": case, "mode": mode, "rounds": res}), file=sys.stderr)
            results.append({"preset": case, "mode": mode, "dtype": "f32", "device": "cpu", "rounds": res,
                            "llama-pro": res["llama-pro"][-1], "torch": res["torch"][-1],
                            "ratio_tokens_per_s": statistics.median(ratios),
                            "ratio_note": "median over rounds of ratios of tokens/s from each run's median step"})
    print(f"\n{'case':<5}{'mode':<6}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>8}{'ours RSS MB':>13}"
          f"{'torch RSS MB':>14}  trainable/params   ({threads} threads)")
    for case, mode, o, t, r, om, tm, tr, p in rows:
        print(f"{case:<5}{mode:<6}{o:>12.0f}{t:>13.0f}{r:>8.2f}{om:>13.0f}{tm:>14.0f}  {tr}/{p}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": "cpu", "threads": threads, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
