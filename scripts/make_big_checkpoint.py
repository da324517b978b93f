#!/usr/bin/env python3
"""Write a large random LLaMA checkpoint (HF layout, sharded safetensors, bf16) to measure
`llama-pro expand` on a realistic size without downloading weights.

    python3 scripts/make_big_checkpoint.py OUT_DIR [--preset llama2-7b|tinyllama]

Needs only numpy. Tensors are streamed to disk one at a time (random bf16 bit patterns of normal
values). The weights are noise: use this for I/O and memory measurements, not for numerics.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
}


def tensors(c):
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,)
        yield p + "mlp.down_proj.weight", (d, f)
        yield p + "mlp.gate_proj.weight", (f, d)
        yield p + "mlp.up_proj.weight", (f, d)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "self_attn.k_proj.weight", (kv, d)
        yield p + "self_attn.o_proj.weight", (d, d)
        yield p + "self_attn.q_proj.weight", (d, d)
        yield p + "self_attn.v_proj.weight", (kv, d)
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (v, d)


def write_shard(path, items, rng):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)))
        fh.write(h)
        for _, shape in items:
            # bf16 of N(0, 0.02): the top 16 bits of float32 values.
            x = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02).view(np.uint32)
            fh.write((x >> 16).astype(np.uint16).tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
    ap.add_argument("--shard-bytes", type=int, default=5_000_000_000)
    a = ap.parse_args()
    c = PRESETS[a.preset]
    os.makedirs(a.out, exist_ok=True)
    shards, cur, size = [], [], 0
    for name, shape in tensors(c):
        n = int(np.prod(shape)) * 2
        if cur and size + n > a.shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(a.out, fname), items, rng)
        for name, shape in items:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=2)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
               bos_token_id=1, eos_token_id=2, **c)
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    print(f"wrote {a.out}: {total / 1e9:.2f} GB in {len(shards)} shards")


if __name__ == "__main__":
    sys.exit(main())
