//! Forward and backward of the model's operations written block by block in burn tensor ops, for
//! backends whose own autodiff would keep too much (the GPU backends, `cube.rs`).
//!
//! Why: under `Autodiff`, burn 0.21 differentiates `attention` through its decomposed fallback and
//! keeps the `[batch, heads, seq, seq]` probabilities of every layer (1 GiB per layer per 4096-token
//! sequence at 32 heads in bf16), and the composed cross-entropy keeps the whole `[tokens, vocab]`
//! logits in f32 plus its log-softmax. Here, as in FlashAttention-2:
//!
//! - attention runs over blocks of queries against the keys they may see (causal, sliding
//!   window); only the output and each row's log-sum-exp are kept, the probabilities are
//!   recomputed block by block in backward. Peak memory per call is one block of f32 scores
//!   ([`block_rows`] bounds it to ~256 MiB), activation memory O(seq), not O(seq²);
//! - K/V heads are never repeated for grouped-query attention: the query heads that share a K/V
//!   head are stacked into one matmul (`[batch, H_kv, rep·rows, hd]`), and the gradients of K/V
//!   sum over them inside the matmul;
//! - the cross-entropy works through the logits in chunks of rows in f32 and keeps only each
//!   row's log-sum-exp; backward writes the logits' gradient chunk by chunk in their dtype;
//! - RMSNorm and SwiGLU keep only their inputs (and RMSNorm's `1/rms`), with the arithmetic in
//!   f32 whatever the activations' dtype.
//!
//! The matmuls are the backend's (tensor cores through `cubek-matmul` on CUDA for bf16/f16);
//! scores are computed in the activations' dtype and the softmax in f32, as transformers' eager
//! attention does. Generic over `B: Backend` so the CPU tests can check every function against
//! the composition and burn's autodiff (`tests/it/kernels.rs`).

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, FloatDType, IndexingUpdateOp, Int, Tensor};

use super::AttentionShape;

thread_local! {
    static BLOCK_ROWS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Rows of a query (or loss) block such that one f32 block of `rows × width` per `lanes`
/// (batch × heads) stays near 256 MiB, between 16 and `total` (or the rows set by
/// [`with_block_rows`] on this thread).
pub fn block_rows(total: usize, lanes: usize, width: usize) -> usize {
    const BUDGET: usize = 1 << 26; // f32 elements (256 MiB)
    let rows = BLOCK_ROWS
        .with(|r| r.get())
        .unwrap_or_else(|| (BUDGET / (lanes.max(1) * width.max(1))).max(16));
    rows.clamp(1, total.max(1))
}

/// Run `f` with blocks of `rows` rows on this thread (tests use small blocks to cover the
/// block boundaries on small inputs; the results do not depend on the block size beyond
/// rounding).
pub fn with_block_rows<R>(rows: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BLOCK_ROWS.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(BLOCK_ROWS.with(|r| r.replace(Some(rows.max(1)))));
    f()
}

fn f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.cast(FloatDType::F32)
}

fn to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    t.cast(FloatDType::from(dtype))
}

/// `rotate_half` of the last dimension: `[x1, x2] → [−x2, x1]`; with `transpose`, its transpose
/// `[a1, a2] → [a2, −a1]` (what RoPE's backward applies).
fn rotate_half<B: Backend>(x: Tensor<B, 4>, transpose: bool) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    if transpose {
        Tensor::cat(vec![x2, x1.neg()], 3)
    } else {
        Tensor::cat(vec![x2.neg(), x1], 3)
    }
}

/// RoPE on `[batch, heads, seq, hd]` (forward), or its transpose (the gradient of the input from
/// the gradient of the output).
fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    back: bool,
) -> Tensor<B, 4> {
    let (c, s) = (cos.clone().unsqueeze::<4>(), sin.clone().unsqueeze::<4>());
    if back {
        x.clone() * c + rotate_half(x * s, true)
    } else {
        x.clone() * c + rotate_half(x, false) * s
    }
}

/// Keys visible to the query rows `i0..i1`: `k0..i1`.
fn key_start(i0: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i0 + 1).saturating_sub(w))
}

/// True where a query row of the block (rows `i0..i0+n`, repeated `rep` times for the stacked
/// heads) may not see key `k0 + j`: keys after it and, with a window `w`, keys `w` or more back.
///
/// # Shapes
/// - output: `[1, 1, rep·n, kl]`
fn block_mask<B: Backend>(
    i0: usize,
    n: usize,
    rep: usize,
    k0: usize,
    kl: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let rows = Tensor::<B, 1, Int>::arange(i0 as i64..(i0 + n) as i64, device).reshape([n, 1]);
    let cols = Tensor::<B, 1, Int>::arange(k0 as i64..(k0 + kl) as i64, device).reshape([1, kl]);
    let future = cols.clone().greater(rows.clone());
    let mask = match window {
        Some(w) => future.bool_or((cols + w as i64).lower_equal(rows)),
        None => future,
    };
    mask.reshape([1, n, kl])
        .expand([rep, n, kl])
        .reshape([1, 1, rep * n, kl])
}

/// Token rows `[b·s, n·hd]` → heads `[b, n, s, hd]`, with RoPE when `rotate`.
fn to_heads<B: Backend>(
    x: Tensor<B, 2>,
    n: usize,
    rope_tables: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
    sh: &AttentionShape,
) -> Tensor<B, 4> {
    let x = x
        .reshape([sh.batch, sh.seq, n, sh.head_dim])
        .swap_dims(1, 2);
    match rope_tables {
        Some((cos, sin)) => rope(x, cos, sin, false),
        None => x,
    }
}

/// Roped query and key heads and the value heads of token rows.
fn qkv_heads<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    sh: &AttentionShape,
) -> [Tensor<B, 4>; 3] {
    let tables = Some((cos, sin));
    [
        to_heads(q, sh.heads, tables, sh),
        to_heads(k, sh.kv_heads, tables, sh),
        to_heads(v, sh.kv_heads, None, sh),
    ]
}

/// Heads `[b, n, s, hd]` (any dtype) → token rows `[b·s, n·hd]` in `dtype`, through RoPE's
/// transpose (in f32) when `rope_tables` are given: the inverse layout of [`to_heads`] for the
/// gradients.
fn to_tokens<B: Backend>(
    x: Tensor<B, 4>,
    rope_tables: Option<(&Tensor<B, 2>, &Tensor<B, 2>)>,
    dtype: DType,
) -> Tensor<B, 2> {
    let [b, n, s, hd] = x.dims();
    let x = match rope_tables {
        Some((cos, sin)) => rope(f32(x), &f32(cos.clone()), &f32(sin.clone()), true),
        None => x,
    };
    to(x.swap_dims(1, 2).reshape([b * s, n * hd]), dtype)
}

/// One query block of attention: query rows `i0..i0+n` (each repeated for the `rep` query heads
/// of a K/V group, stacked as `rep·n` rows) against keys `k0..k0+kl`.
#[derive(Debug, Clone, Copy)]
pub struct Block {
    /// First query position.
    pub i0: usize,
    /// Query positions.
    pub n: usize,
    /// First key position.
    pub k0: usize,
    /// Key positions (`i0 + n − k0`).
    pub kl: usize,
}

/// The softmax part of a block of attention, between the backend's matmuls: from the raw scores
/// `q·kᵀ` (`[b, H_kv, rep·n, kl]`, the inputs' dtype) to the probabilities, and back. Scaling and
/// the causal / sliding-window mask are applied here. [`Composed`] does it in burn ops; the GPU
/// backends use a fused CubeCL kernel (`cube_kernels.rs`).
pub trait BlockSoftmax<B: Backend> {
    /// The probabilities (the scores' dtype) and each row's log-sum-exp (`[.., rep·n, 1]`, f32).
    fn forward(
        &self,
        scores: Tensor<B, 4>,
        block: Block,
        sh: &AttentionShape,
    ) -> (Tensor<B, 4>, Tensor<B, 4>);

    /// The probabilities recomputed from the scores and the saved log-sum-exp, and the scores'
    /// gradient `dS = P ⊙ (dP − D)·scale` (both in the scores' dtype), from `dp = dO·vᵀ` and
    /// each row's `D = Σ dO ⊙ O` (`[.., rep·n, 1]`, f32).
    fn backward(
        &self,
        scores: Tensor<B, 4>,
        dp: Tensor<B, 4>,
        lse: Tensor<B, 4>,
        delta: Tensor<B, 4>,
        block: Block,
        sh: &AttentionShape,
    ) -> (Tensor<B, 4>, Tensor<B, 4>);
}

/// [`BlockSoftmax`] in burn ops, the softmax and its gradient in f32.
pub struct Composed;

impl Composed {
    /// The scores scaled and masked, in f32.
    fn masked<B: Backend>(scores: Tensor<B, 4>, bl: Block, sh: &AttentionShape) -> Tensor<B, 4> {
        let rep = sh.heads / sh.kv_heads;
        let device = scores.device();
        (f32(scores) * sh.scale).mask_fill(
            block_mask::<B>(bl.i0, bl.n, rep, bl.k0, bl.kl, sh.window, &device),
            f32::NEG_INFINITY,
        )
    }
}

impl<B: Backend> BlockSoftmax<B> for Composed {
    fn forward(
        &self,
        scores: Tensor<B, 4>,
        block: Block,
        sh: &AttentionShape,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let dtype = scores.dtype();
        let scores = Self::masked(scores, block, sh);
        let max = scores.clone().max_dim(3);
        let p = (scores - max.clone()).exp();
        let sum = p.clone().sum_dim(3);
        (to(p / sum.clone(), dtype), max + sum.log())
    }

    fn backward(
        &self,
        scores: Tensor<B, 4>,
        dp: Tensor<B, 4>,
        lse: Tensor<B, 4>,
        delta: Tensor<B, 4>,
        block: Block,
        sh: &AttentionShape,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let dtype = scores.dtype();
        let p = (Self::masked(scores, block, sh) - lse).exp();
        let ds = to(p.clone() * (f32(dp) - delta) * sh.scale, dtype);
        (to(p, dtype), ds)
    }
}

/// Forward of causal attention with RoPE and grouped K/V heads (see [`super::attention`]):
/// the output `[b·s, H·hd]` in q's dtype and each row's log-sum-exp `[b, H, s]` in f32.
pub fn attention_fwd<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    sh: AttentionShape,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let dtype = q.dtype();
    let [q, k, v] = qkv_heads(q, k, v, &cos, &sin, &sh);
    let (out, lse) = attention_fwd_heads(q, k, v, sh, &Composed);
    (to_tokens(out, None, dtype), lse)
}

/// [`attention_fwd`] on inputs already in head layout: roped queries `[b, H, s, hd]`, roped keys
/// and values `[b, H_kv, s, hd]`. Returns the output `[b, H, s, hd]` and the log-sum-exp
/// `[b, H, s]` (f32).
pub fn attention_fwd_heads<B: Backend>(
    q: Tensor<B, 4>,
    kh: Tensor<B, 4>,
    vh: Tensor<B, 4>,
    sh: AttentionShape,
    softmax: &dyn BlockSoftmax<B>,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let (b, s, h, kv, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let rep = h / kv;
    let qg = q.reshape([b, kv, rep, s, hd]);
    let step = block_rows(s, b * h, s);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for i0 in (0..s).step_by(step) {
        let n = step.min(s - i0);
        let k0 = key_start(i0, sh.window);
        let kl = i0 + n - k0;
        let qb = qg.clone().narrow(3, i0, n).reshape([b, kv, rep * n, hd]);
        let scores = qb.matmul(kh.clone().narrow(2, k0, kl).swap_dims(2, 3));
        let (p, lse) = softmax.forward(scores, Block { i0, n, k0, kl }, &sh);
        let out = p.matmul(vh.clone().narrow(2, k0, kl));
        outs.push(out.reshape([b, kv, rep, n, hd]));
        lses.push(lse.reshape([b, kv, rep, n]));
    }
    let out = Tensor::cat(outs, 3).reshape([b, h, s, hd]);
    (out, Tensor::cat(lses, 3).reshape([b, h, s]))
}

/// Gradients `[dq, dk, dv]` of [`attention_fwd`] (in the inputs' dtype), from the saved output
/// and log-sum-exp; the probabilities are recomputed block by block.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    out: Tensor<B, 2>,
    lse: Tensor<B, 3>,
    dout: Tensor<B, 2>,
    sh: AttentionShape,
) -> [Tensor<B, 2>; 3] {
    let dtype = q.dtype();
    let tables = Some((&cos, &sin));
    let [q, k, v] = qkv_heads(q, k, v, &cos, &sin, &sh);
    let [dq, dk, dv] = attention_bwd_heads(
        q,
        k,
        v,
        to_heads(out, sh.heads, None, &sh),
        to_heads(to(dout, dtype), sh.heads, None, &sh),
        lse,
        sh,
        &Composed,
    );
    [
        to_tokens(dq, tables, dtype),
        to_tokens(dk, tables, dtype),
        to_tokens(dv, None, dtype),
    ]
}

/// [`attention_bwd`] in head layout (inputs as in [`attention_fwd_heads`], the output and its
/// gradient `[b, H, s, hd]`): the gradients of the roped queries `[b, H, s, hd]` (q's dtype),
/// roped keys and values `[b, H_kv, s, hd]` (f32), before RoPE's transpose.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_heads<B: Backend>(
    q: Tensor<B, 4>,
    kh: Tensor<B, 4>,
    vh: Tensor<B, 4>,
    out: Tensor<B, 4>,
    dout: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    sh: AttentionShape,
    softmax: &dyn BlockSoftmax<B>,
) -> [Tensor<B, 4>; 3] {
    let (b, s, h, kv, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let rep = h / kv;
    let device = q.device();
    let grouped = |t: Tensor<B, 4>| t.reshape([b, kv, rep, s, hd]);
    let qg = grouped(q);
    let dog = grouped(dout);
    // D_i = Σ_d dO_id · O_id: the softmax backward's row term.
    let delta = (f32(dog.clone()) * f32(grouped(out))).sum_dim(4); // [b, kv, rep, s, 1]
    let lse = lse.reshape([b, kv, rep, s, 1]);
    let mut dk = Tensor::<B, 4>::zeros([b, kv, s, hd], (&device, DType::F32));
    let mut dv = Tensor::<B, 4>::zeros([b, kv, s, hd], (&device, DType::F32));
    let mut dqs = Vec::new();
    let step = block_rows(s, b * h, s);
    for i0 in (0..s).step_by(step) {
        let n = step.min(s - i0);
        let k0 = key_start(i0, sh.window);
        let kl = i0 + n - k0;
        let rows = |t: Tensor<B, 5>| t.narrow(3, i0, n).reshape([b, kv, rep * n, hd]);
        let qb = rows(qg.clone());
        let dob = rows(dog.clone());
        let lb = lse.clone().narrow(3, i0, n).reshape([b, kv, rep * n, 1]);
        let db = delta.clone().narrow(3, i0, n).reshape([b, kv, rep * n, 1]);
        let (kb, vb) = (kh.clone().narrow(2, k0, kl), vh.clone().narrow(2, k0, kl));
        let scores = qb.clone().matmul(kb.clone().swap_dims(2, 3));
        let dp = dob.clone().matmul(vb.swap_dims(2, 3));
        let (p, ds) = softmax.backward(scores, dp, lb, db, Block { i0, n, k0, kl }, &sh);
        let dv_b = p.swap_dims(2, 3).matmul(dob);
        let dk_b = ds.clone().swap_dims(2, 3).matmul(qb);
        dqs.push(ds.matmul(kb).reshape([b, kv, rep, n, hd]));
        // Accumulate into the keys' rows; the sum is taken before the assignment so that `dk`/`dv`
        // are the only owners of their buffers then and the backend updates them in place.
        let range = [0..b, 0..kv, k0..k0 + kl, 0..hd];
        let dk_sum = dk.clone().slice(range.clone()) + f32(dk_b);
        dk = dk.slice_assign(range.clone(), dk_sum);
        let dv_sum = dv.clone().slice(range.clone()) + f32(dv_b);
        dv = dv.slice_assign(range, dv_sum);
    }
    let dq = Tensor::cat(dqs, 3).reshape([b, h, s, hd]);
    [dq, dk, dv]
}

/// Per-row targets and weights of the causal-LM loss over all `b·s` rows: row `t` predicts
/// token `t+1` with weight `weights[t]`; the last row of each sequence has weight 0.
///
/// # Shapes
/// - ids, mask: `[b, s]`
/// - outputs: targets `[b·s]` (int), weights `[b·s]` (f32)
pub fn ce_targets<B: Backend>(
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1, Int>, Tensor<B, 1>) {
    let [b, s] = ids.dims();
    let device = ids.device();
    let targets = Tensor::cat(
        vec![
            ids.narrow(1, 1, s - 1),
            Tensor::<B, 2, Int>::zeros([b, 1], &device),
        ],
        1,
    );
    let weights = Tensor::cat(
        vec![
            mask.narrow(1, 0, s - 1).cast(FloatDType::F32),
            Tensor::<B, 2>::zeros([b, 1], (&device, DType::F32)),
        ],
        1,
    );
    (targets.reshape([b * s]), weights.reshape([b * s]))
}

/// Forward of the cross-entropy sum over rows (see [`super::causal_ce_weighted`] and
/// [`ce_targets`]) in chunks of rows: the loss `[1]` (f32) and every row's log-sum-exp `[rows]`
/// (f32). At most one chunk of the logits is in f32 at a time.
///
/// # Shapes
/// - logits: `[rows, vocab]`; targets: `[rows]` (int); weights: `[rows]` (f32)
pub fn ce_fwd<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [rows, vocab] = logits.dims();
    let (targets, weights) = (targets.reshape([rows, 1]), weights.reshape([rows, 1]));
    let step = block_rows(rows, 1, vocab);
    let (mut loss, mut lses) = (Vec::new(), Vec::new());
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let x = f32(logits.clone().narrow(0, r0, n));
        let max = x.clone().max_dim(1);
        let lse = max.clone() + (x.clone() - max).exp().sum_dim(1).log();
        let picked = x.gather(1, targets.clone().narrow(0, r0, n));
        loss.push(((lse.clone() - picked) * weights.clone().narrow(0, r0, n)).sum());
        lses.push(lse.reshape([n]));
    }
    (Tensor::cat(loss, 0).sum(), Tensor::cat(lses, 0))
}

/// Gradient of the logits `[rows, vocab]` (their dtype) of [`ce_fwd`] for an upstream gradient
/// `dloss` (`[1]`): `(softmax − onehot(target)) · weight · dloss`, chunk by chunk.
pub fn ce_bwd<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
    lse: Tensor<B, 1>,
    dloss: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let [rows, vocab] = logits.dims();
    let dtype = logits.dtype();
    let targets = targets.reshape([rows, 1]);
    let weights = weights.reshape([rows, 1]) * f32(dloss).reshape([1, 1]);
    let lse = lse.reshape([rows, 1]);
    let step = block_rows(rows, 1, vocab);
    let mut grad = Tensor::<B, 2>::empty([rows, vocab], (&logits.device(), dtype));
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let w = weights.clone().narrow(0, r0, n);
        let x = f32(logits.clone().narrow(0, r0, n));
        let g = (x - lse.clone().narrow(0, r0, n)).exp() * w.clone();
        let g = g.scatter(
            1,
            targets.clone().narrow(0, r0, n),
            w.neg(),
            IndexingUpdateOp::Add,
        );
        grad = grad.slice_assign([r0..r0 + n, 0..vocab], to(g, dtype));
    }
    grad
}

/// [`ce_fwd`] of the causal-LM loss (see [`super::causal_ce_weighted`]; `mask` holds its
/// per-position weights): logits `[b, s, vocab]`, ids and mask `[b, s]`.
pub fn causal_ce_fwd<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, s, vocab] = logits.dims();
    let (targets, weights) = ce_targets(ids, mask);
    ce_fwd(logits.reshape([b * s, vocab]), targets, weights)
}

/// [`ce_bwd`] of [`causal_ce_fwd`]: the gradient of the logits `[b, s, vocab]`.
pub fn causal_ce_bwd<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    lse: Tensor<B, 1>,
    dloss: Tensor<B, 1>,
) -> Tensor<B, 3> {
    let [b, s, vocab] = logits.dims();
    let (targets, weights) = ce_targets(ids, mask);
    let rows = logits.reshape([b * s, vocab]);
    ce_bwd(rows, targets, weights, lse, dloss).reshape([b, s, vocab])
}

/// Forward of RMSNorm (see [`super::rms_norm`]): the output and each row's `1/rms` (`[n]`, f32).
pub fn rms_norm_fwd<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let n = x.dims()[0];
    let dtype = x.dtype();
    let xf = f32(x);
    let rstd = (xf.clone().square().mean_dim(1) + eps).sqrt().recip();
    let normed = to(xf * rstd.clone(), dtype);
    let y = if w.dtype() == dtype {
        w.unsqueeze::<2>() * normed
    } else {
        to(f32(w).unsqueeze::<2>() * f32(normed), dtype)
    };
    (y, rstd.reshape([n]))
}

/// Gradients `[dx, dw]` of [`rms_norm_fwd`] in the dtypes of `x` and `w`.
pub fn rms_norm_bwd<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 1>,
    rstd: Tensor<B, 1>,
    dy: Tensor<B, 2>,
    need: [bool; 2],
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 1>>) {
    let [n, d] = x.dims();
    let (xd, wd) = (x.dtype(), w.dtype());
    let rstd = rstd.reshape([n, 1]);
    let xhat = f32(x) * rstd.clone();
    let dyf = f32(dy);
    let dw =
        need[1].then(|| to((dyf.clone() * f32(to(xhat.clone(), xd))).sum_dim(0), wd).reshape([d]));
    let dx = need[0].then(|| {
        let g = dyf * f32(w).unsqueeze::<2>();
        let dot = (g.clone() * xhat.clone()).mean_dim(1);
        to((g - xhat * dot) * rstd, xd)
    });
    (dx, dw)
}

/// Forward of SwiGLU `silu(gate) ⊙ up`, in f32 arithmetic, in gate's dtype.
pub fn swiglu_fwd<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    let dtype = gate.dtype();
    let g = f32(gate);
    to(
        g.clone() * burn::tensor::activation::sigmoid(g) * f32(up),
        dtype,
    )
}

/// Gradients `[dgate, dup]` of [`swiglu_fwd`].
pub fn swiglu_bwd<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    dy: Tensor<B, 2>,
    need: [bool; 2],
) -> [Option<Tensor<B, 2>>; 2] {
    let dtype = gate.dtype();
    let (g, u, dy) = (f32(gate), f32(up), f32(dy));
    let sig = burn::tensor::activation::sigmoid(g.clone());
    let silu = g.clone() * sig.clone();
    let du = need[1].then(|| to(dy.clone() * silu, dtype));
    let dg = need[0].then(|| {
        // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
        let dsilu = sig.clone() * (g * (sig.neg() + 1.0) + 1.0);
        to(dy * u * dsilu, dtype)
    });
    [dg, du]
}

/// `x · wᵀ` and its gradients `[dx, dw]` (dw in HF's `[out, in]` layout).
pub fn linear_fwd<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(w.transpose())
}

/// Gradients of [`linear_fwd`]: `dx = dy · w`, `dw = dyᵀ · x`.
pub fn linear_bwd<B: Backend>(
    x: Option<Tensor<B, 2>>,
    w: Tensor<B, 2>,
    dy: Tensor<B, 2>,
    need: [bool; 2],
) -> [Option<Tensor<B, 2>>; 2] {
    let dw = match (need[1], x) {
        (true, Some(x)) => Some(dy.clone().transpose().matmul(x)),
        _ => None,
    };
    let dx = need[0].then(|| dy.matmul(w));
    [dx, dw]
}
