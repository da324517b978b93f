//! The operations composed from burn tensor ops: what backends without a kernel run (and what
//! the CPU kernels are tested against).

use burn::tensor::{FloatDType, Int, Tensor, backend::Backend};

use super::AttentionShape;
use crate::rope::apply_rope;

pub(crate) fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(w.transpose())
}

pub(crate) fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let dtype = x.dtype();
    let xf = x.cast(FloatDType::F32);
    let variance = xf.clone().square().mean_dim(1);
    let normed = xf * (variance + eps).sqrt().recip();
    let normed = normed.cast(dtype);
    if w.dtype() == dtype {
        w.unsqueeze::<2>() * normed
    } else {
        // Mixed precision (an f32 master weight, bf16/f16 activations): multiply in f32 and
        // return the activations' dtype, as autocast would.
        (w.cast(FloatDType::F32).unsqueeze::<2>() * normed.cast(FloatDType::F32))
            .cast(FloatDType::from(dtype))
    }
}

pub(crate) fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    burn::tensor::activation::silu(gate) * up
}

pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    sh: AttentionShape,
) -> Tensor<B, 2> {
    let (b, s, h, kv, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    // [b·s, n·hd] → [b, n, s, hd]
    let heads = |t: Tensor<B, 2>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
    let q = apply_rope(heads(q, h), cos.clone(), sin.clone());
    let k = apply_rope(heads(k, kv), cos, sin);
    let out = crate::attention::attend(q, k, heads(v, kv), sh.window, sh.scale);
    out.swap_dims(1, 2).reshape([b * s, h * hd])
}

pub(crate) fn causal_ce<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, s, _] = logits.dims();
    let logits = logits.narrow(1, 0, s - 1).cast(FloatDType::F32);
    let targets = input_ids.narrow(1, 1, s - 1);
    let mask = pair_mask(mask);
    let log_probs = burn::tensor::activation::log_softmax(logits, 2);
    let picked = log_probs
        .gather(2, targets.reshape([b, s - 1, 1]))
        .reshape([b, s - 1]);
    (picked.neg() * mask).sum()
}

/// `mask[t] · mask[t+1]` in f32: position `t` counts when it and its target are real tokens.
pub(crate) fn pair_mask<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [_, s] = mask.dims();
    mask.clone().narrow(1, 1, s - 1).cast(FloatDType::F32)
        * mask.narrow(1, 0, s - 1).cast(FloatDType::F32)
}
