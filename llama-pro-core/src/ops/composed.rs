//! The operations composed from burn tensor ops: what backends without a kernel run (and what
//! the CPU kernels are tested against), plus the attention of the cached decoding path.

use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, FloatDType, Int, Tensor, backend::Backend};

use super::AttentionShape;

pub(super) fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(w.transpose())
}

pub(super) fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
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

pub(super) fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    burn::tensor::activation::silu(gate) * up
}

pub(super) fn attention<B: Backend>(
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
    let out = causal_attention(q, k, heads(v, kv), sh.window, sh.scale);
    out.swap_dims(1, 2).reshape([b * s, h * hd])
}

/// [`attention`] per packed document (`spans`: first token row and length), concatenated.
pub(super) fn attention_packed<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    sh: AttentionShape,
    spans: &[(usize, usize)],
) -> Tensor<B, 2> {
    let outs: Vec<Tensor<B, 2>> = spans
        .iter()
        .map(|&(start, len)| {
            attention(
                q.clone().narrow(0, start, len),
                k.clone().narrow(0, start, len),
                v.clone().narrow(0, start, len),
                cos.clone().narrow(0, 0, len),
                sin.clone().narrow(0, 0, len),
                AttentionShape {
                    batch: 1,
                    seq: len,
                    ..sh
                },
            )
        })
        .collect();
    Tensor::cat(outs, 0)
}

pub(super) fn causal_ce<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, s, _] = logits.dims();
    let logits = logits.narrow(1, 0, s - 1).cast(FloatDType::F32);
    let targets = input_ids.narrow(1, 1, s - 1);
    let mask = weights.narrow(1, 0, s - 1).cast(FloatDType::F32);
    let log_probs = burn::tensor::activation::log_softmax(logits, 2);
    let picked = log_probs
        .gather(2, targets.reshape([b, s - 1, 1]))
        .reshape([b, s - 1]);
    (picked.neg() * mask).sum()
}

/// `mask[t] · mask[t+1]` in f32: position `t` counts when it and its target are real tokens.
///
/// # Shapes
/// - mask: `[batch, seq]`
/// - output: `[batch, seq - 1]`
pub fn pair_mask<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [_, s] = mask.dims();
    mask.clone().narrow(1, 1, s - 1).cast(FloatDType::F32)
        * mask.narrow(1, 0, s - 1).cast(FloatDType::F32)
}

/// Apply RoPE (rotate-half form, see `crate::rope`) to queries or keys:
/// `x ⊙ cos + rotate_half(x) ⊙ sin` with `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[seq, head_dim]`
/// - output: `[batch, heads, seq, head_dim]`
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [_, _, _, d] = x.dims();
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.unsqueeze::<4>() + rotated * sin.unsqueeze::<4>()
}

/// Causal attention of roped heads composed from burn ops: K/V heads repeated for the query
/// heads, the causal boundary aligned to the last position (queries are the last `q_len` of the
/// `kv_len` positions), an optional sliding window. The cached decoding path calls it directly.
///
/// # Shapes
/// - q: `[batch, H, q_len, hd]`; k, v: `[batch, H_kv, kv_len, hd]`
/// - output: `[batch, H, q_len, hd]`
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: Option<usize>,
    scale: f64,
) -> Tensor<B, 4> {
    causal_attention_padded(q, k, v, window, scale, None)
}

/// [`causal_attention`] over left-padded rows (batched decoding of prompts of different
/// lengths): the first `left_pad[r]` keys of row `r` are padding, which no real query of that
/// row sees. A padding query still sees itself and the padding before it (a row with every key
/// masked would give NaN, which would reach the real positions through the values).
///
/// # Shapes
/// - q: `[batch, H, q_len, hd]`; k, v: `[batch, H_kv, kv_len, hd]`; `left_pad`: `batch` values
/// - output: `[batch, H, q_len, hd]`
pub fn causal_attention_padded<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: Option<usize>,
    scale: f64,
    left_pad: Option<&[usize]>,
) -> Tensor<B, 4> {
    let [b, h, s, _] = q.dims();
    let n_rep = h / k.dims()[1];
    let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
    let kv_len = k.dims()[2];
    if let Some(pads) = left_pad.filter(|p| p.iter().any(|&n| n > 0)) {
        assert_eq!(pads.len(), b, "one left-padding count per row");
        let offset = kv_len - s;
        let mut m = Vec::with_capacity(b * s * kv_len);
        for &pad in pads {
            for qi in 0..s {
                let i = offset + qi;
                for j in 0..kv_len {
                    let future = j > i;
                    let outside = window.is_some_and(|w| j + w <= i);
                    m.push(future || outside || (j < pad && i >= pad));
                }
            }
        }
        let mask = Tensor::<B, 3, Bool>::from_data(
            burn::tensor::TensorData::new(m, [b, s, kv_len]),
            &q.device(),
        )
        .unsqueeze_dim::<4>(1)
        .expand([b, h, s, kv_len]);
        let options = AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: false,
        };
        return burn_attention(q, k, v, Some(mask), None, options);
    }
    // Masking. `is_causal` is used only when queries and keys cover the same positions. When
    // they differ (cached decoding), the boundary must align to the last position: burn's
    // fallback does that, but the option does not specify it for every kernel, so the mask is
    // explicit then. A single new query sees every cached key: no mask at all.
    let window = window.filter(|&w| kv_len > w);
    let (mask, is_causal) = if window.is_none() && s == kv_len {
        (None, true)
    } else if window.is_none() && s == 1 {
        (None, false)
    } else {
        (
            Some(causal_mask::<B>(b, h, s, kv_len, window, &q.device())),
            false,
        )
    };
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal,
    };
    burn_attention(q, k, v, mask, None, options)
}

/// Share each K/V head with `n_rep` consecutive query heads (HF `repeat_kv`).
///
/// # Shapes
/// - x: `[batch, H_kv, seq, hd]`
/// - output: `[batch, H_kv·n_rep, seq, hd]`
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, s, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n_rep, s, hd])
        .reshape([b, kv * n_rep, s, hd])
}

/// True where query `i` (absolute position `kv_len - q_len + i`) may not see key `j`: keys after
/// it, and with a sliding window (Mistral: `j > i - window` is visible) keys `window` or more
/// positions back.
fn causal_mask<B: Backend>(
    b: usize,
    h: usize,
    q_len: usize,
    kv_len: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let offset = (kv_len - q_len) as i64;
    let rows = Tensor::<B, 1, Int>::arange(0..q_len as i64, device).reshape([q_len, 1]) + offset;
    let cols = Tensor::<B, 1, Int>::arange(0..kv_len as i64, device).reshape([1, kv_len]);
    let future = cols.clone().greater(rows.clone());
    let mask = match window {
        // masked when j <= i - window  ⇔  j + window <= i
        Some(w) => future.bool_or((cols + w as i64).lower_equal(rows)),
        None => future,
    };
    mask.reshape([1, 1, q_len, kv_len])
        .expand([b, h, q_len, kv_len])
}
