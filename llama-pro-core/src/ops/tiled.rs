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

/// The inputs of attention in the layout the blocks use: roped queries grouped by their K/V head
/// `[b, H_kv, rep, s, hd]`, roped keys and values `[b, H_kv, s, hd]`.
type Heads<B> = (Tensor<B, 5>, Tensor<B, 4>, Tensor<B, 4>);

fn heads<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    sh: &AttentionShape,
) -> Heads<B> {
    let (b, s, h, kv, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let split = |t: Tensor<B, 2>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
    let q = rope(split(q, h), cos, sin, false).reshape([b, kv, h / kv, s, hd]);
    let k = rope(split(k, kv), cos, sin, false);
    (q, k, split(v, kv))
}

/// `[b, H_kv, rep, s, hd]` (grouped query heads) → `[b·s, H·hd]`.
fn merge<B: Backend>(x: Tensor<B, 5>, sh: &AttentionShape) -> Tensor<B, 2> {
    let (b, s, h, hd) = (sh.batch, sh.seq, sh.heads, sh.head_dim);
    x.reshape([b, h, s, hd])
        .swap_dims(1, 2)
        .reshape([b * s, h * hd])
}

/// The scores of one query block against its keys, masked, in f32: `[b, H_kv, rep·n, kl]`.
fn block_scores<B: Backend>(
    qb: Tensor<B, 4>,
    kb: Tensor<B, 4>,
    (i0, n, k0): (usize, usize, usize),
    sh: &AttentionShape,
) -> Tensor<B, 4> {
    let kl = kb.dims()[2];
    let rep = sh.heads / sh.kv_heads;
    let device = qb.device();
    let scores = f32(qb.matmul(kb.swap_dims(2, 3))) * sh.scale;
    scores.mask_fill(
        block_mask::<B>(i0, n, rep, k0, kl, sh.window, &device),
        f32::NEG_INFINITY,
    )
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
    let (b, s, h, kv, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let rep = h / kv;
    let dtype = q.dtype();
    let (qg, kh, vh) = heads(q, k, v, &cos, &sin, &sh);
    let step = block_rows(s, b * h, s);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for i0 in (0..s).step_by(step) {
        let n = step.min(s - i0);
        let k0 = key_start(i0, sh.window);
        let kl = i0 + n - k0;
        let qb = qg.clone().narrow(3, i0, n).reshape([b, kv, rep * n, hd]);
        let scores = block_scores(qb, kh.clone().narrow(2, k0, kl), (i0, n, k0), &sh);
        let max = scores.clone().max_dim(3);
        let p = (scores - max.clone()).exp();
        let sum = p.clone().sum_dim(3);
        let out = to(p / sum.clone(), dtype).matmul(vh.clone().narrow(2, k0, kl));
        outs.push(out.reshape([b, kv, rep, n, hd]));
        lses.push((max + sum.log()).reshape([b, kv, rep, n]));
    }
    let out = merge(Tensor::cat(outs, 3), &sh);
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
    let (b, s, h, kv, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let rep = h / kv;
    let dtype = q.dtype();
    let device = q.device();
    let (qg, kh, vh) = heads(q, k, v, &cos, &sin, &sh);
    let grouped = |t: Tensor<B, 2>| {
        t.reshape([b, s, h, hd])
            .swap_dims(1, 2)
            .reshape([b, kv, rep, s, hd])
    };
    let dog = grouped(to(dout, dtype));
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
        let p = (block_scores(qb.clone(), kb.clone(), (i0, n, k0), &sh) - lb).exp();
        let dp = f32(dob.clone().matmul(vb.clone().swap_dims(2, 3)));
        let ds = to(p.clone() * (dp - db) * sh.scale, dtype);
        let dv_b = to(p, dtype).swap_dims(2, 3).matmul(dob);
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
    let dq = rope(f32(dq), &f32(cos.clone()), &f32(sin.clone()), true);
    let dk = rope(dk, &f32(cos), &f32(sin), true);
    let tokens = |t: Tensor<B, 4>, n: usize| to(t.swap_dims(1, 2).reshape([b * s, n * hd]), dtype);
    [tokens(dq, h), tokens(dk, kv), tokens(dv, kv)]
}

/// Per-row targets and weights of the causal-LM loss over all `b·s` rows: row `t` predicts
/// token `t+1` with weight `weights[t]`; the last row of each sequence has weight 0.
fn ce_targets<B: Backend>(
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
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
    (targets.reshape([b * s, 1]), weights.reshape([b * s, 1]))
}

/// Forward of the causal-LM cross-entropy sum (see [`super::causal_ce_weighted`]; `mask` holds
/// its per-position weights) over row chunks: the
/// loss `[1]` (f32) and every row's log-sum-exp `[b·s]` (f32). At most one chunk of the logits is
/// in f32 at a time.
pub fn causal_ce_fwd<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, s, vocab] = logits.dims();
    let rows = b * s;
    let logits = logits.reshape([rows, vocab]);
    let (targets, weights) = ce_targets(ids, mask);
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

/// Gradient of the logits `[b, s, vocab]` (their dtype) of [`causal_ce_fwd`] for an upstream
/// gradient `dloss` (`[1]`): `(softmax − onehot(target)) · weight · dloss`, chunk by chunk.
pub fn causal_ce_bwd<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    lse: Tensor<B, 1>,
    dloss: Tensor<B, 1>,
) -> Tensor<B, 3> {
    let [b, s, vocab] = logits.dims();
    let rows = b * s;
    let dtype = logits.dtype();
    let logits = logits.reshape([rows, vocab]);
    let (targets, weights) = ce_targets(ids, mask);
    let weights = weights * f32(dloss).reshape([1, 1]);
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
    grad.reshape([b, s, vocab])
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
