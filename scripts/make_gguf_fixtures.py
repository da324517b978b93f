#!/usr/bin/env python3
"""Golden fixtures for llama-pro's GGUF import/export (issue 16), produced by gguf-py and llama.cpp.

Regenerate (from the repository root):

    benches/.venv/bin/pip install -r scripts/requirements-gguf.txt   # see its header for CMAKE_ARGS
    benches/.venv/bin/python scripts/make_gguf_fixtures.py

It needs llama.cpp's source tree as vendored by the llama-cpp-python sdist of the pinned version
(for convert_hf_to_gguf.py and models/ggml-vocab-*.gguf), extracted to $LLAMA_CPP_DIR (default
~/.cache/llama-pro/llama.cpp-src/vendor/llama.cpp); see scripts/llama_cpp_convert.py.

Pinned versions (see tests/fixtures/gguf/VERSIONS.txt for what produced the committed files):
gguf==0.19.0 (PyPI), llama-cpp-python==0.3.36 (vendors ggml-org/llama.cpp@0c1e57098),
numpy==2.4.6, torch==2.15.0, transformers==5.23.0, safetensors==0.8.0.

Writes tests/fixtures/gguf/:

  quants.gguf               GGUF v3 (general.architecture "quants-test", alignment 32), written by
                            gguf-py's GGUFWriter. One 2-D tensor per ggml type in QUANT_TYPES, named
                            after the type (e.g. "Q4_K"), of numpy shape [ROWS, COLS] = [4, 512]
                            (GGUF shape [512, 4]), stored raw (raw_dtype=the type):
        F32 / F16 / BF16   random normal values, plus edge values at the start of row 0:
                           +0, -0, +inf, -inf, the smallest subnormal, the largest finite value
                           (of that type), and for F16 / BF16 a few subnormals. No NaN.
        quantized types    random bytes (numpy default_rng(SEED + type id)), with every f16 scale
                           field replaced by a finite f16: `d` uniform(-0.1, 0.1), `dmin`/`m`
                           uniform(0, 0.1) (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K have a min). Block layouts
                           (byte offsets of the f16 fields) in SCALE_FIELDS below.
                           Q8_K is left out: gguf-py 0.19.0 has no dequantizer for it.
                            Plus metadata of every GGUF value type, with the values in quants-kv.json.
  quants-golden.safetensors for each tensor of quants.gguf, `gguf.quants.dequantize(raw, type)` as
                            f32 of shape [4, 512] under the same name (bit-exact reference for the
                            Rust dequantizers).
  quants-kv.json            every metadata key of quants.gguf: {"type": GGUFValueType name,
                            "value": ..., "array_type": ... for arrays}; floats as written
                            (f32 values are the f32 rounding of the number), u64/i64 as JSON ints.

  <model>-<outtype>.gguf    llama.cpp's own converter (convert_hf_to_gguf.py, through
                            scripts/llama_cpp_convert.py --pre-fallback gpt-2) on
                            tests/fixtures/models/<model> (MODELS x OUTTYPES below, only the small
                            ones are kept). The fixture tokenizers are tiny byte-level BPEs whose
                            pre-tokenizer hash llama.cpp does not know, so tokenizer.ggml.pre is
                            written as "gpt-2" (their pre-tokenizer is GPT-2's ByteLevel regex).
                            Note: convert maps MistralForCausalLM to arch "llama" and drops
                            sliding_window (llama.cpp's llama arch has no sliding window).
                            Each file is checked here: transformers loads it (gguf_file=) and its
                            logits are compared with the HF checkpoint (printed, not stored).

  vocab-llama-spm.gguf (+ .inp / .out)
                            llama.cpp's models/ggml-vocab-llama-spm.gguf (LLaMA 1/2 SentencePiece
                            vocab, 32000 tokens, vocab only, no tensors) with its tokenizer test
                            cases: .inp = texts separated by "\\n__ggml_vocab_test__\\n", .out = one
                            line per text with the ids llama.cpp's tokenizer gives
                            (add_special=false, parse_special=false). Copied unchanged.

  tokenizer-cases.json      for each tokenizer-bearing fixture GGUF above: TOKENIZER_TEXTS and the
                            ids llama.cpp gives them (llama-cpp-python, vocab_only):
                              "llama_cpp":         tokenize(add_special=False, parse_special=False)
                              "llama_cpp_special": tokenize(add_special=True,  parse_special=True)
                            and transformers' AutoTokenizer(gguf_file=...)(text).input_ids as
                            "transformers" (it adds BOS when the file's add_bos_token says so).
                            "agree" lists where transformers and llama.cpp (special) agree.

  SOURCES.md, VERSIONS.txt  provenance and the versions that produced the files.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "gguf"
SEED = 16
ROWS, COLS = 4, 512

QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
               "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]

# Byte offsets of the f16 fields inside one block: (offset, kind) with kind "d" (signed scale)
# or "m" (min / dmin, non-negative). From ggml-common.h / gguf-py quants.py dequantize_blocks.
SCALE_FIELDS = {
    "Q8_0": [(0, "d")],                 # 34 B: d, qs[32]
    "Q4_0": [(0, "d")],                 # 18 B: d, qs[16]
    "Q4_1": [(0, "d"), (2, "m")],       # 20 B: d, m, qs[16]
    "Q5_0": [(0, "d")],                 # 22 B: d, qh[4], qs[16]
    "Q5_1": [(0, "d"), (2, "m")],       # 24 B: d, m, qh[4], qs[16]
    "Q2_K": [(80, "d"), (82, "m")],     # 84 B: scales[16], qs[64], d, dmin
    "Q3_K": [(108, "d")],               # 110 B: hmask[32], qs[64], scales[12], d
    "Q4_K": [(0, "d"), (2, "m")],       # 144 B: d, dmin, scales[12], qs[128]
    "Q5_K": [(0, "d"), (2, "m")],       # 176 B: d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": [(208, "d")],               # 210 B: ql[128], qh[64], scales[16] (i8), d
    "IQ4_NL": [(0, "d")],               # 18 B: d, qs[16] (indices into kvalues_iq4nl)
    "IQ4_XS": [(0, "d")],               # 136 B: d, scales_h (u16), scales_l[4], qs[128]
}

MODELS = ["llama-mha-f32", "qwen2-bias-f32", "mistral-window-f32"]
# (model, outtype) pairs kept in the repository (the f32 conversions are ~800 KB each).
KEEP = [
    ("llama-mha-f32", "f16"),
    ("llama-mha-f32", "q8_0"),
    ("qwen2-bias-f32", "q8_0"),
    ("mistral-window-f32", "q8_0"),
]

SPM_VOCAB = "ggml-vocab-llama-spm.gguf"

TOKENIZER_TEXTS = [
    "Hello world",
    " Hello world",
    "LLaMA Pro expands a pretrained model with identity blocks.",
    "def add(a, b):\n    return a + b\n",
    "  leading and trailing spaces  ",
    "Grüße aus Köln! 数学 🙂",
    "",
    " ",
    "   ",
    "\t",
    "\n\n\n",
    "x = y + 3; print(x)",
    "12345 apples, 3.14159 and 1,000,000",
    "I've been 'told he's there, 'RE you sure?",
    "<s>literal specials</s> <unk>",
    "tab\tseparated\tvalues\r\nwindows line",
    "ünïcödé ñ 日本語のテキスト 한국어 Привет мир",
]


def llama_cpp_dir() -> Path:
    default = Path.home() / ".cache" / "llama-pro" / "llama.cpp-src" / "vendor" / "llama.cpp"
    d = Path(os.environ.get("LLAMA_CPP_DIR", default))
    if not (d / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"llama.cpp source not found under {d}: see scripts/llama_cpp_convert.py")
    return d


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# quants.gguf
# ----------------------------------------------------------------------------------------------

def float_tensor(name: str, rng: np.random.Generator) -> np.ndarray:
    """Values for F32 / F16 / BF16, as raw bytes of that type, numpy shape [ROWS, COLS * size]."""
    vals = (rng.standard_normal((ROWS, COLS)) * 2.0).astype(np.float32)
    flat = vals.reshape(-1)
    if name == "F32":
        edge = np.array([0.0, -0.0, np.inf, -np.inf], dtype=np.float32)
        bits = np.array([0x00000001, 0x7F7FFFFF, 0x80000001, 0x00800000], dtype=np.uint32).view(np.float32)
        flat[: len(edge)] = edge
        flat[len(edge): len(edge) + len(bits)] = bits
        return vals.view(np.uint8)
    if name == "F16":
        h = vals.astype(np.float16)
        hb = h.reshape(-1).view(np.uint16)
        special = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x7BFF, 0x03FF, 0x8001, 0x0200, 0xFBFF]
        hb[: len(special)] = special
        return h.view(np.uint8)
    if name == "BF16":
        # truncate random f32 to bf16 bit patterns (any bf16 value is exact in f32)
        b = (vals.view(np.uint32) >> 16).astype(np.uint16)
        bb = b.reshape(-1)
        special = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F, 0x007F, 0x8001, 0x0040, 0xFF7F]
        bb[: len(special)] = special
        return b.view(np.uint8)
    raise ValueError(name)


def quant_tensor(name: str, rng: np.random.Generator) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert COLS % block == 0
    n_blocks = ROWS * COLS // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off, kind in SCALE_FIELDS[name]:
        if kind == "d":
            v = rng.uniform(-0.1, 0.1, size=n_blocks)
        else:
            v = rng.uniform(0.0, 0.1, size=n_blocks)
        raw[:, off: off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(ROWS, COLS // block * size)


KV_SPEC = [
    # key, GGUFValueType name, value, array sub-type name (arrays only)
    ("test.u8", "UINT8", 200, None),
    ("test.i8", "INT8", -100, None),
    ("test.u16", "UINT16", 60000, None),
    ("test.i16", "INT16", -30000, None),
    ("test.u32", "UINT32", 4000000000, None),
    ("test.i32", "INT32", -2000000000, None),
    ("test.f32", "FLOAT32", 0.1, None),
    ("test.bool_true", "BOOL", True, None),
    ("test.bool_false", "BOOL", False, None),
    ("test.string", "STRING", "héllo wörld ✓", None),
    ("test.empty_string", "STRING", "", None),
    ("test.u64", "UINT64", 18000000000000000000, None),
    ("test.i64", "INT64", -9000000000000000000, None),
    ("test.f64", "FLOAT64", 0.1, None),
    ("test.arr_i32", "ARRAY", [1, -2, 3, 2147483647], "INT32"),
    ("test.arr_u8", "ARRAY", [0, 1, 255], "UINT8"),
    ("test.arr_f32", "ARRAY", [0.5, -1.25, 3.0e-5], "FLOAT32"),
    ("test.arr_bool", "ARRAY", [True, False, True], "BOOL"),
    ("test.arr_string", "ARRAY", ["a", "", "ünï", "line\nbreak"], "STRING"),
    ("test.arr_u64", "ARRAY", [0, 18446744073709551615], "UINT64"),
]


def write_quants() -> None:
    import gguf
    from safetensors.numpy import save_file

    path = OUT / "quants.gguf"
    w = gguf.GGUFWriter(str(path), arch="quants-test")
    w.add_name("llama-pro quants fixture")
    kv_json = {
        "general.architecture": {"type": "STRING", "value": "quants-test"},
        "general.name": {"type": "STRING", "value": "llama-pro quants fixture"},
    }
    for key, vt, val, sub in KV_SPEC:
        vtype = gguf.GGUFValueType[vt]
        w.add_key_value(key, val, vtype, sub_type=gguf.GGUFValueType[sub] if sub else None)
        entry = {"type": vt, "value": val}
        if vt == "FLOAT32":
            entry["value"] = float(np.float32(val))
        if sub:
            entry["array_type"] = sub
            if sub == "FLOAT32":
                entry["value"] = [float(np.float32(x)) for x in val]
        kv_json[key] = entry
    golden = {}
    for i, name in enumerate(QUANT_TYPES):
        qtype = gguf.GGMLQuantizationType[name]
        rng = np.random.default_rng(SEED + int(qtype))
        raw = float_tensor(name, rng) if name in ("F32", "F16", "BF16") else quant_tensor(name, rng)
        w.add_tensor(name, raw, raw_dtype=qtype)
        deq = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS)
        assert not np.isnan(deq).any(), name
        if name not in ("F32", "F16", "BF16"):
            assert np.isfinite(deq).all(), name
        golden[name] = np.ascontiguousarray(deq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(golden, str(OUT / "quants-golden.safetensors"), metadata={"source": "gguf.quants.dequantize"})
    os.chmod(OUT / "quants-golden.safetensors", 0o644)  # safetensors writes 0600
    (OUT / "quants-kv.json").write_text(json.dumps(kv_json, indent=1, ensure_ascii=False) + "\n")

    # read back with gguf-py: shapes, types and metadata as intended
    r = gguf.GGUFReader(str(path))
    assert [t.name for t in r.tensors] == QUANT_TYPES
    for t in r.tensors:
        assert t.tensor_type.name == t.name
        assert [int(x) for x in t.shape] == [COLS, ROWS], (t.name, t.shape)
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ROWS, COLS)
        assert np.array_equal(back.view(np.uint32), golden[t.name].view(np.uint32)), t.name
    for key, vt, val, sub in KV_SPEC:
        f = r.fields[key]
        assert gguf.GGUFValueType(f.types[0]).name == vt, key
        if vt == "ARRAY":
            got = [f.contents(i) for i in range(len(f.data))]
            want = kv_json[key]["value"]
            assert got == want, (key, got, want)
        else:
            assert f.contents() == kv_json[key]["value"], (key, f.contents())
    print(f"quants.gguf: {len(QUANT_TYPES)} tensors, {path.stat().st_size} bytes; "
          f"golden {(OUT / 'quants-golden.safetensors').stat().st_size} bytes")


# ----------------------------------------------------------------------------------------------
# models through llama.cpp's converter
# ----------------------------------------------------------------------------------------------

def convert(model: str, outtype: str, outfile: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "llama_cpp_convert.py"), "--pre-fallback", "gpt-2",
           str(FIX / "models" / model), "--outtype", outtype, "--outfile", str(outfile)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        sys.exit(f"convert failed for {model} {outtype}")


def check_with_transformers(model: str, gguf_path: Path) -> float:
    """Max |logits(HF checkpoint) - logits(transformers loading the GGUF)| on a fixed batch."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(FIX / "models" / model, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, ref.config.vocab_size, (2, 5), generator=g)  # < sliding window 6
    with torch.no_grad():
        a = ref(ids).logits
        b = got(ids).logits
    return float((a - b).abs().max())


def write_models() -> list[dict]:
    rows = []
    tmp = OUT / ".convert-tmp"
    tmp.mkdir(exist_ok=True)
    for model, outtype in KEEP:
        name = f"{model}-{outtype}.gguf"
        convert(model, outtype, tmp / name)
        shutil.move(str(tmp / name), OUT / name)
        diff = check_with_transformers(model, OUT / name)
        print(f"{name}: {(OUT / name).stat().st_size} bytes; transformers(gguf) vs HF max|dlogits| {diff:.3g}")
        rows.append({"file": name, "model": model, "outtype": outtype, "max_abs_logit_diff_vs_hf": diff})
    shutil.rmtree(tmp)
    return rows


# ----------------------------------------------------------------------------------------------
# vocab files and tokenizer cases
# ----------------------------------------------------------------------------------------------

def copy_spm_vocab() -> None:
    src = llama_cpp_dir() / "models"
    for suffix in ("", ".inp", ".out"):
        shutil.copyfile(src / (SPM_VOCAB + suffix), OUT / ("vocab-llama-spm.gguf" + suffix))
    print(f"vocab-llama-spm.gguf: {(OUT / 'vocab-llama-spm.gguf').stat().st_size} bytes")


def spm_cases_check() -> None:
    """llama-cpp-python reproduces llama.cpp's own .inp/.out for the copied vocab."""
    from llama_cpp import Llama

    inp = (OUT / "vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    outs = (OUT / "vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    outs = outs[: len(texts)]
    llm = Llama(model_path=str(OUT / "vocab-llama-spm.gguf"), vocab_only=True, verbose=False)
    bad = 0
    for t, o in zip(texts, outs):
        want = [int(x) for x in o.split()]
        got = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
        bad += got != want
    print(f"vocab-llama-spm: llama-cpp-python matches {len(texts) - bad}/{len(texts)} .inp/.out cases")
    assert bad == 0


def tokenizer_cases(files: list[str]) -> dict:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    out = {}
    for f in files:
        llm = Llama(model_path=str(OUT / f), vocab_only=True, verbose=False)
        hf = AutoTokenizer.from_pretrained(OUT, gguf_file=f)
        cases = []
        for t in TOKENIZER_TEXTS:
            a = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
            b = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
            h = hf(t).input_ids
            cases.append({"text": t, "llama_cpp": a, "llama_cpp_special": b, "transformers": h,
                          "agree": h == b})
        n = sum(c["agree"] for c in cases)
        print(f"{f}: transformers(gguf_file) == llama.cpp(add_special, parse_special) on {n}/{len(cases)} texts")
        out[f] = {"cases": cases}
    return out


def write_sources(model_rows: list[dict]) -> None:
    lines = [
        "# Sources of tests/fixtures/gguf",
        "",
        "Made by `scripts/make_gguf_fixtures.py` (see its docstring for the exact contents).",
        "",
        "| file | source | sha256 |",
        "|---|---|---|",
    ]
    for f in sorted(p.name for p in OUT.iterdir() if p.is_file() and p.suffix in (".gguf", ".safetensors", ".json", ".inp", ".out")):
        if f in ("SOURCES.md",):
            continue
        if f.startswith("vocab-llama-spm"):
            src = (f"llama.cpp `models/{SPM_VOCAB}{f[len('vocab-llama-spm.gguf'):]}` (ggml-org/llama.cpp@0c1e57098, "
                   f"as vendored in the llama-cpp-python 0.3.36 sdist), copied unchanged; MIT license")
        elif f.startswith("quants"):
            src = "gguf-py 0.19.0 GGUFWriter / gguf.quants.dequantize on seeded random blocks"
        elif f == "tokenizer-cases.json":
            src = "llama-cpp-python 0.3.36 (vocab_only) and transformers 5.23.0 AutoTokenizer(gguf_file=) tokenizing TOKENIZER_TEXTS"
        else:
            row = next((r for r in model_rows if r["file"] == f), None)
            src = (f"llama.cpp convert_hf_to_gguf.py --outtype {row['outtype']} on tests/fixtures/models/{row['model']} "
                   f"(via scripts/llama_cpp_convert.py --pre-fallback gpt-2)") if row else "?"
        lines.append(f"| {f} | {src} | `{sha256(OUT / f)[:16]}` |")
    lines += [
        "",
        "llama.cpp tree: the one vendored in the llama-cpp-python 0.3.36 sdist, extracted to `$LLAMA_CPP_DIR`",
        "(default `~/.cache/llama-pro/llama.cpp-src/vendor/llama.cpp`).",
        "",
        "Not included (size): llama.cpp's byte-level BPE vocab test files are all over 1 MB",
        "(ggml-vocab-gpt-2.gguf 1.77 MB, deepseek-coder 1.16 MB, starcoder 1.72 MB, refact 1.72 MB,",
        "qwen2 5.9 MB, llama-bpe 7.8 MB); the byte-level BPE cases here use the fixture tokenizer inside",
        "llama-mha-f32-f16.gguf (tokenizer-cases.json).",
        "",
    ]
    (OUT / "SOURCES.md").write_text("\n".join(lines))


def write_versions() -> None:
    import importlib.metadata as md

    pk = ["gguf", "llama_cpp_python", "numpy", "torch", "transformers", "safetensors", "tokenizers"]
    lines = [f"{p} {md.version(p)}" for p in pk]
    lines.insert(2, "llama.cpp ggml-org/llama.cpp@0c1e57098 (vendored in llama-cpp-python 0.3.36)")
    lines.append("made by: python scripts/make_gguf_fixtures.py")
    (OUT / "VERSIONS.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_quants()
    rows = write_models()
    copy_spm_vocab()
    spm_cases_check()
    cases = tokenizer_cases([r["file"] for r in rows if r["model"] == "llama-mha-f32"][:1] + ["vocab-llama-spm.gguf"])
    (OUT / "tokenizer-cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    write_sources(rows)
    write_versions()
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"tests/fixtures/gguf: {total} bytes in {len(list(OUT.iterdir()))} files")


if __name__ == "__main__":
    main()
