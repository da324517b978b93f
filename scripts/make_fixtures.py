#!/usr/bin/env python3
"""Golden fixtures for llama-pro's parity tests, produced by transformers itself.

Regenerate (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_fixtures.py

Writes tests/fixtures/:
  tokenizer/            a small byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)
  tokenizer_cases.json  texts and the ids transformers' AutoTokenizer gives them
  models/<name>/        small random HF checkpoints (config.json + safetensors, as save_pretrained writes)
  golden/<name>.safetensors
                        inputs and transformers' outputs for that model:
      input_ids [2, S] (i64), logits [2, S, V], layer_<i> [2, S, d] (output of block i),
      final_hidden [2, S, d] (after model.norm), loss [1] (labels = input_ids),
      pad_input_ids [2, S], pad_mask [2, S], pad_loss [1] (second row right-padded, labels -100 there),
      kv_prefix_logits [1, P, V] and kv_step_logits [N, V] (prefix of row 0, then N single-token
      steps through past_key_values), and for bf16 checkpoints logits_f32 (same weights upcast).
  expansion_hashes.json sha256 of every tensor of checkpoints expanded by the official LLaMA Pro
                        expansion loop (`official_expand`, below) for several layouts
  train/seqs.jsonl, golden/train-<case>.safetensors
                        torch.optim.AdamW on the expanded llama-mha-f32 with only the new blocks
                        trainable (decay on >= 2-D tensors only): `adamw-1` one step, lr 1e-3,
                        betas 0.9/0.95, eps 1e-8, wd 0.1, batch = both sequences (no packing);
                        `clip-accum` two steps of 2 accumulated micro-batches with
                        clip_grad_norm_(0.05). Keys: `param.<name>` after training, `loss` per step,
                        `loss_after` (adamw-1: loss of the batch after the step).
  golden/expanded-grads.safetensors
                        llama-mha-f32 expanded with N=2, P=1, only the new blocks trainable (as the
                        paper's open-instruct fork freezes): loss and the gradient of every trainable
                        tensor after one backward pass (keys `grad.<name>`), and `logits`.

Every model uses random weights with a larger init range than HF's default (so logits are far
from uniform and a wrong operation shows), random RMSNorm scales and, where present, random biases.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
VOCAB = 320
SEQ = 16

TRAIN_TEXT = """
LLaMA Pro expands a pretrained model with identity blocks and trains only the new blocks on a
domain corpus, so the model gains code and math skill without forgetting its general ability.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
The quick brown fox jumps over the lazy dog. Grüße aus Köln! 数学 and code: x = y + 3.
""" * 4

TOKENIZER_CASES = [
    "Hello world",
    "LLaMA Pro expands a pretrained model with identity blocks.",
    "def add(a, b):\n    return a + b\n",
    "  leading and trailing spaces  ",
    "Grüße aus Köln! 数学 🙂",
    "",
    "x = y + 3; print(x)",
]


def make_tokenizer(out: Path):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 128,
            },
            indent=2,
        )
    )
    assert tok.get_vocab_size() <= VOCAB
    return tok


def randomize(model, seed):
    """Non-trivial weights: normal(0, 0.08) matrices, norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def layer_hooks(model):
    outs = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m, _inp, out, i=i):
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        handles.append(layer.register_forward_hook(hook))
    def norm_hook(_m, _inp, out):
        outs["final"] = out.detach().clone()
    handles.append(model.model.norm.register_forward_hook(norm_hook))
    return outs, handles


def golden(model, name, seed, compute_f32_too=False):
    g = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    out = {}
    with torch.no_grad():
        outs, handles = layer_hooks(model)
        res = model(input_ids=input_ids, labels=input_ids)
        for h in handles:
            h.remove()
        out["input_ids"] = input_ids
        out["logits"] = res.logits.float()
        out["loss"] = res.loss.float().reshape(1)
        for i in range(len(model.model.layers)):
            out[f"layer_{i}"] = outs[i].float()
        out["final_hidden"] = outs["final"].float()

        # Right-padded batch: row 1 has 11 real tokens.
        pad_ids = input_ids.clone()
        mask = torch.ones_like(pad_ids)
        mask[1, 11:] = 0
        pad_ids[1, 11:] = 0
        labels = pad_ids.clone()
        labels[mask == 0] = -100
        res = model(input_ids=pad_ids, attention_mask=mask, labels=labels)
        out["pad_input_ids"] = pad_ids
        out["pad_mask"] = mask
        out["pad_loss"] = res.loss.float().reshape(1)

        # KV cache: prefix of row 0, then single-token steps.
        prefix = 10
        cache = DynamicCache(config=model.config)
        res = model(input_ids=input_ids[:1, :prefix], past_key_values=cache, use_cache=True)
        out["kv_prefix_logits"] = res.logits.float()
        steps = []
        cache = res.past_key_values
        for t in range(prefix, SEQ):
            res = model(input_ids=input_ids[:1, t : t + 1], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            steps.append(res.logits[0, -1].float())
        out["kv_step_logits"] = torch.stack(steps)

        if compute_f32_too:
            m32 = model.float()
            out["logits_f32"] = m32(input_ids=input_ids).logits.float()
    (FIX / "golden").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden" / f"{name}.safetensors"))


def build(name, config, seed, dtype=torch.float32, shard=None, v4_layout=False):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    out = FIX / "models" / name
    if out.exists():
        shutil.rmtree(out)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(out, **kwargs)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(FIX / "tokenizer" / f, out / f)
    if v4_layout:
        # Rewrite config.json the way transformers 4 wrote it (top-level rope_theta, rope_scaling,
        # torch_dtype), to test that we accept both layouts.
        cfg = json.loads((out / "config.json").read_text())
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = None if rp.get("rope_type") == "default" else rp
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg["transformers_version"] = "4.46.0"
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    # Reload from disk so the golden outputs come from exactly what was written.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, attn_implementation="eager").eval()
    golden(model, name, seed, compute_f32_too=(dtype != torch.float32))


def official_expand(sd, L, N, P):
    """TencentARC/LLaMA-Pro scripts/block_expansion.py (the loop over `layers.{i}.` keys, copies
    after the last block of every group with o_proj/down_proj zeroed), generalised from one to P
    copies per group: the group's top P blocks, in order."""
    split = L // N
    out, cnt = {}, 0
    for i in range(L):
        for k, v in sd.items():
            if f"layers.{i}." in k:
                out[k.replace(f"layers.{i}.", f"layers.{cnt}.")] = v
        cnt += 1
        if (i + 1) % split == 0:
            for j in range(i - P + 1, i + 1):
                for k, v in sd.items():
                    if f"layers.{j}." in k:
                        zero = "down_proj" in k or "o_proj" in k
                        out[k.replace(f"layers.{j}.", f"layers.{cnt}.")] = torch.zeros_like(v) if zero else v
                cnt += 1
    assert cnt == L + N * P
    for k, v in sd.items():
        if "layers" not in k:
            out[k] = v
    return out


def stacked_expand(sd, L, K, top):
    """The paper's suffix (top) / prefix (bottom) stacking: K zero-initialised copies of the last
    (first) block after (before) the stack."""
    out = {}
    src = L - 1 if top else 0
    order = list(range(L)) + [None] * K if top else [None] * K + list(range(L))
    for new, old in enumerate(order):
        j = src if old is None else old
        for k, v in sd.items():
            if f"layers.{j}." in k:
                zero = old is None and ("down_proj" in k or "o_proj" in k)
                out[k.replace(f"layers.{j}.", f"layers.{new}.")] = torch.zeros_like(v) if zero else v
    for k, v in sd.items():
        if "layers" not in k:
            out[k] = v
    return out


def sha(t):
    import hashlib
    t = t.contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16
                          else t.view(torch.int16).numpy().tobytes()).hexdigest()


def expanded_model():
    src = FIX / "models" / "llama-mha-f32"
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = base.config.to_dict()
    cfg["num_hidden_layers"] = 6
    exp = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}),
                                           dtype=torch.float32, attn_implementation="eager")
    exp.load_state_dict(official_expand(base.state_dict(), 4, 2, 1), strict=True)
    return exp.eval()


def expansion_fixtures():
    from safetensors.torch import load_file
    hashes = {}
    cases = [("llama-mha-f32", "interleaved-2-1", ("i", 2, 1)), ("llama-mha-f32", "interleaved-4-1", ("i", 4, 1)),
             ("llama-mha-f32", "interleaved-2-2", ("i", 2, 2)), ("llama-mha-f32", "top-2", ("t", 2)),
             ("llama-mha-f32", "bottom-1", ("b", 1)), ("llama3-gqa-headdim-bf16", "interleaved-2-1", ("i", 2, 1)),
             ("qwen2-bias-f32", "interleaved-2-1", ("i", 2, 1))]
    for model, case, spec in cases:
        sd = load_file(str(FIX / "models" / model / "model.safetensors"))
        L = 4
        if spec[0] == "i":
            out = official_expand(sd, L, spec[1], spec[2])
        else:
            out = stacked_expand(sd, L, spec[1], top=spec[0] == "t")
        hashes[f"{model}/{case}"] = {k: sha(v) for k, v in sorted(out.items())}

    # Gradients of the first step with only the new blocks trainable, and the identity.
    base = AutoModelForCausalLM.from_pretrained(FIX / "models" / "llama-mha-f32", dtype=torch.float32,
                                                attn_implementation="eager").eval()
    exp = expanded_model()
    golden_ids = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(FIX / "golden" / "llama-mha-f32.safetensors"))["input_ids"]
    with torch.no_grad():
        d = (exp(input_ids=golden_ids).logits - base(input_ids=golden_ids).logits).abs().max().item()
    assert d == 0.0, f"transformers: expanded logits differ from the base by {d}"
    exp.requires_grad_(False)
    new_layers = [2, 5]
    for name, p in exp.named_parameters():
        if any(f"layers.{i}." in name for i in new_layers):
            p.requires_grad_(True)
    res = exp(input_ids=golden_ids, labels=golden_ids)
    res.loss.backward()
    out = {"loss": res.loss.detach().reshape(1), "logits": res.logits.detach()}
    for name, p in exp.named_parameters():
        if p.requires_grad:
            out[f"grad.{name}"] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden" / "expanded-grads.safetensors"))
    (FIX / "expansion_hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True))


def training_fixtures():
    from safetensors.torch import load_file
    ids = load_file(str(FIX / "golden" / "llama-mha-f32.safetensors"))["input_ids"]
    rows = [ids[0].tolist(), ids[1, :11].tolist()]
    (FIX / "train").mkdir(parents=True, exist_ok=True)
    (FIX / "train" / "seqs.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))

    def batch(rs):
        n = max(len(r) for r in rs)
        x = torch.zeros(len(rs), n, dtype=torch.long)
        labels = torch.full((len(rs), n), -100, dtype=torch.long)
        mask = torch.zeros(len(rs), n, dtype=torch.long)
        for i, r in enumerate(rs):
            x[i, :len(r)] = torch.tensor(r)
            labels[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return x, labels, mask

    def setup(dtype=torch.float32):
        model = expanded_model().to(dtype)
        model.requires_grad_(False)
        train = [(n, p) for n, p in model.named_parameters() if any(f"layers.{i}." in n for i in (2, 5))]
        for _, p in train:
            p.requires_grad_(True)
        decay = [p for _, p in train if p.dim() >= 2]
        plain = [p for _, p in train if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        return model, train, opt

    # adamw-1: one step on the whole batch.
    model, train, opt = setup()
    x, labels, mask = batch(rows)
    loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=x, attention_mask=mask, labels=labels).loss
    out = {"loss": loss.detach().reshape(1), "loss_after": after.reshape(1)}
    out.update({f"param.{n}": p.detach().clone() for n, p in train})
    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden" / "train-adamw-1.safetensors"))

    # clip-accum: 2 steps x 2 micro-batches of one sequence, global clipping at 0.05. After
    # clipping, Adam's second step is ill-conditioned (elements whose gradient starts near zero),
    # so the same run in float64 is recorded as the exact reference (`param64.<name>`).
    def clip_accum(dtype):
        model, train, opt = setup(dtype)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            total = 0.0
            for r in rows:
                x, labels, mask = batch([r])
                l = model(input_ids=x, attention_mask=mask, labels=labels).loss
                (l / 2).backward()
                total += l.item() / 2
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in train], 0.05)
            assert norm > 0.05, f"clipping must be active in this case (norm {norm})"
            opt.step()
            losses.append(total)
        return losses, train

    losses, train = clip_accum(torch.float32)
    _, train64 = clip_accum(torch.float64)
    out = {"loss": torch.tensor(losses, dtype=torch.float32)}
    out.update({f"param.{n}": p.detach().clone() for n, p in train})
    out.update({f"param64.{n}": p.detach().clone() for n, p in train64})
    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden" / "train-clip-accum.safetensors"))


DEMO_TOKENIZER_CASES = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD spake unto Moses, saying,",
    "def read(path, mode='r'):\n    with open(path, mode) as f:\n        return f.read()\n",
    "class Queue(object):\n    \"\"\"A FIFO queue.\"\"\"\n\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n",
    "x = {'a': [1, 2, 3], \"b\": (4.5e-3, None)}  # comment\n\tif x: pass",
    "Unicode — naïve café ✓ 日本",
]


def demo_tokenizer_golden():
    """ids of the shipped demo tokenizer (data/base) as transformers' AutoTokenizer gives them."""
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "base")
    cases = [{"text": t, "ids": tok(t)["input_ids"]} for t in DEMO_TOKENIZER_CASES]
    (FIX / "golden" / "demo-tokenizer.json").write_text(
        json.dumps({"made_by": "python scripts/make_fixtures.py demo-tokenizer", "cases": cases},
                   indent=1, ensure_ascii=False))


def main():
    if sys.argv[1:] == ["demo-tokenizer"]:
        demo_tokenizer_golden()
        return 0
    torch.use_deterministic_algorithms(True)
    FIX.mkdir(parents=True, exist_ok=True)
    make_tokenizer(FIX / "tokenizer")
    hf_tok = AutoTokenizer.from_pretrained(FIX / "tokenizer")
    cases = [{"text": t, "ids": hf_tok(t)["input_ids"]} for t in TOKENIZER_CASES]
    (FIX / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False))

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    build("llama-mha-f32", LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                                       tie_word_embeddings=False), seed=1, v4_layout=True)
    build("llama-gqa-tied-sharded-f32", LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                                    tie_word_embeddings=True), seed=2, shard="150KB")
    build("llama3-gqa-headdim-bf16", LlamaConfig(
        **common, num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        seed=3, dtype=torch.bfloat16)
    build("qwen2-bias-f32", Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False), seed=4)
    build("mistral-window-f32", MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                              sliding_window=6, tie_word_embeddings=False), seed=5)
    expansion_fixtures()
    training_fixtures()
    demo_tokenizer_golden()
    (FIX / "VERSIONS.txt").write_text(
        f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
        "made by: python scripts/make_fixtures.py\n"
    )
    print("fixtures written to", FIX)


if __name__ == "__main__":
    sys.exit(main())
