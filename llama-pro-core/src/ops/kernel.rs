//! The kernel interface: what a backend with fused kernels implements, and the autodiff steps
//! that make those kernels differentiable.
//!
//! A backend implements the `*_kernel` hooks it has (each returns `None` for inputs it does not
//! handle, e.g. another dtype); the provided `lp_*` methods try the kernel and fall back to the
//! composition. [`Autodiff`] over a kernel backend records one backward step per kernel call,
//! which calls the backend's backward kernel. Which backends have kernels is decided at run time
//! by [`super::dispatch`]; model code never names this trait.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorPrimitive};

use super::{AdamWStep, AttentionShape};
use super::{composed, tiled};

/// A burn backend with fused kernels for some of the model's operations: the five operations
/// below, each with a composed default and optional kernel hooks (the `*_kernel` methods return
/// `None` when the backend has none for the given inputs).
///
/// Implemented for `Flex` (CPU kernels, `cpu.rs`) and `Autodiff` over any kernel backend.
pub(crate) trait KernelBackend: Backend {
    /// `x · wᵀ`.
    ///
    /// # Shapes
    /// - x: `[n, in]`; w: `[out, in]` (HF layout)
    /// - output: `[n, out]`
    fn lp_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        match Self::linear_kernel(fp(x.clone()), fp(w.clone())) {
            Some(y) => {
                super::count_kernel_call();
                tp(y)
            }
            None => composed::linear(x, w),
        }
    }

    /// RMSNorm of each row (statistics in f32, result in x's dtype, then scaled by `w`).
    ///
    /// # Shapes
    /// - x: `[n, d]`; w: `[d]`
    /// - output: `[n, d]`
    fn lp_rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        match Self::rms_norm_kernel(fp(x.clone()), fp(w.clone()), eps) {
            Some((y, _)) => {
                super::count_kernel_call();
                tp(y)
            }
            None => composed::rms_norm(x, w, eps),
        }
    }

    /// `silu(gate) ⊙ up`.
    ///
    /// # Shapes
    /// - gate, up, output: `[n, f]`
    fn lp_swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        match Self::swiglu_kernel(fp(gate.clone()), fp(up.clone())) {
            Some(y) => {
                super::count_kernel_call();
                tp(y)
            }
            None => composed::swiglu(gate, up),
        }
    }

    /// Causal self-attention with RoPE on q and k and grouped K/V heads:
    /// `softmax(rope(q) rope(k)ᵀ · scale + causal) v` per head.
    ///
    /// # Shapes
    /// - q: `[batch·seq, H·hd]`; k, v: `[batch·seq, H_kv·hd]` (projection outputs, token-major)
    /// - cos, sin: `[seq, hd]` RoPE tables for positions `0..seq`
    /// - output: `[batch·seq, H·hd]` (the input of `o_proj`)
    fn lp_attention(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        shape: AttentionShape,
    ) -> Tensor<Self, 2> {
        let kernel = Self::attention_kernel(
            fp(q.clone()),
            fp(k.clone()),
            fp(v.clone()),
            fp(cos.clone()),
            fp(sin.clone()),
            shape,
        );
        match kernel {
            Some((out, _)) => {
                super::count_kernel_call();
                tp(out)
            }
            None => composed::attention(q, k, v, cos, sin, shape),
        }
    }

    /// [`super::attention_packed`]: the attention kernel per document.
    fn lp_attention_packed(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        shape: AttentionShape,
        spans: &[(usize, usize)],
    ) -> Tensor<Self, 2> {
        let outs: Vec<Tensor<Self, 2>> = spans
            .iter()
            .map(|&(start, len)| {
                Self::lp_attention(
                    q.clone().narrow(0, start, len),
                    k.clone().narrow(0, start, len),
                    v.clone().narrow(0, start, len),
                    cos.clone().narrow(0, 0, len),
                    sin.clone().narrow(0, 0, len),
                    doc_shape(shape, len),
                )
            })
            .collect();
        Tensor::cat(outs, 0)
    }

    /// Sum of the causal-LM cross-entropy (position `t` predicts token `t+1`, in f32) weighted
    /// by `mask[t]` (the per-position weights of [`super::causal_ce_weighted`]; the last
    /// position of each sequence counts 0).
    ///
    /// # Shapes
    /// - logits: `[batch, seq, vocab]`; ids: `[batch, seq]`; mask: `[batch, seq]`
    /// - output: `[1]`
    fn lp_causal_ce(
        logits: Tensor<Self, 3>,
        ids: Tensor<Self, 2, Int>,
        mask: Tensor<Self, 2>,
    ) -> Tensor<Self, 1> {
        let [b, s, vocab] = logits.dims();
        let (targets, weights) = tiled::ce_targets(ids.clone(), mask.clone());
        let rows = fp(logits.clone().reshape([b * s, vocab]));
        match Self::ce_kernel(rows, targets.into_primitive(), fp(weights)) {
            Some((loss, _)) => {
                super::count_kernel_call();
                tp(loss)
            }
            None => composed::causal_ce(logits, ids, mask),
        }
    }

    /// [`Self::lp_causal_ce`] of the logits `h · wᵀ`, which are never whole: the head and the
    /// loss run over chunks of rows (see [`head_ce_chunks`]).
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]`; w: `[vocab, hidden]`; ids, mask: `[batch, seq]`
    /// - output: `[1]`
    fn lp_head_ce(
        h: Tensor<Self, 3>,
        w: Tensor<Self, 2>,
        ids: Tensor<Self, 2, Int>,
        mask: Tensor<Self, 2>,
    ) -> Tensor<Self, 1> {
        let [b, s, d] = h.dims();
        let h2 = h.clone().reshape([b * s, d]);
        let (targets, weights) = tiled::ce_targets(ids.clone(), mask.clone());
        match head_ce_chunks::<Self>(h2, w.clone(), targets, weights, [false, false]) {
            Some(fused) => fused.loss,
            None => composed::causal_ce(head_logits(h, w), ids, mask),
        }
    }

    // ---- kernels: `None` = this backend has none for these inputs -------------------------

    /// Forward of [`Self::lp_linear`].
    fn linear_kernel(_x: FloatTensor<Self>, _w: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }
    /// Gradients `[dx, dw]` of [`Self::lp_linear`] (each only when `need` says so; `x` is
    /// given when `dw` is needed). Called only after [`Self::linear_kernel`] returned `Some`
    /// for the same inputs.
    fn linear_backward_kernel(
        _x: Option<FloatTensor<Self>>,
        _w: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _need: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        unreachable!("linear_backward_kernel without linear_kernel")
    }
    /// Forward of [`Self::lp_rms_norm`]: output and the per-row `1/rms` (`[n]`).
    fn rms_norm_kernel(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _eps: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// Gradients `[dx, dw]` of [`Self::lp_rms_norm`].
    fn rms_norm_backward_kernel(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _rstd: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _need: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        unreachable!("rms_norm_backward_kernel without rms_norm_kernel")
    }
    /// Forward of [`Self::lp_swiglu`].
    fn swiglu_kernel(
        _gate: FloatTensor<Self>,
        _up: FloatTensor<Self>,
    ) -> Option<FloatTensor<Self>> {
        None
    }
    /// Gradients `[dgate, dup]` of [`Self::lp_swiglu`].
    fn swiglu_backward_kernel(
        _gate: FloatTensor<Self>,
        _up: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _need: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        unreachable!("swiglu_backward_kernel without swiglu_kernel")
    }
    /// Forward of [`Self::lp_attention`]: output and the log-sum-exp of every score row
    /// (`[batch, H, seq]`).
    fn attention_kernel(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
        _shape: AttentionShape,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// Gradients `[dq, dk, dv]` of [`Self::lp_attention`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_kernel(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
        _shape: AttentionShape,
    ) -> [FloatTensor<Self>; 3] {
        unreachable!("attention_backward_kernel without attention_kernel")
    }
    /// Forward of the cross-entropy over rows (the loss of [`Self::lp_causal_ce`] once its
    /// targets and weights are laid out by [`tiled::ce_targets`]): the loss sum (`[1]`, f32) and
    /// each row's log-sum-exp (`[rows]`, f32).
    ///
    /// # Shapes
    /// - logits: `[rows, vocab]`; targets: `[rows]` (int); weights: `[rows]` (f32)
    fn ce_kernel(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _weights: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// One AdamW update of a parameter, fused: returns the new parameter, first and second
    /// moments (`m`, `v` are `None` on the first step). The arithmetic is burn's `AdamW`
    /// (decoupled weight decay `p·(1 − lr·wd)`, bias corrections `1 − βᵗ` in f32).
    fn adamw_kernel(
        _param: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        _step: AdamWStep,
    ) -> Option<[FloatTensor<Self>; 3]> {
        None
    }

    /// Gradient of the logits of [`Self::ce_kernel`] for an upstream gradient `dloss` (`[1]`),
    /// in the logits' dtype (written over them when nothing else holds them).
    fn ce_backward_kernel(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _weights: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("ce_backward_kernel without ce_kernel")
    }
}

/// `h · wᵀ` as `[batch, seq, vocab]` logits (the unfused head of [`KernelBackend::lp_head_ce`]).
fn head_logits<B: KernelBackend>(h: Tensor<B, 3>, w: Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, s, d] = h.dims();
    let vocab = w.dims()[0];
    B::lp_linear(h.reshape([b * s, d]), w).reshape([b, s, vocab])
}

/// What [`head_ce_chunks`] computed.
pub(super) struct HeadCe<B: Backend> {
    /// The loss sum, `[1]` (f32).
    pub loss: Tensor<B, 1>,
    /// The gradient of `h` for an upstream gradient of 1 (when asked for).
    pub dh: Option<Tensor<B, 2>>,
    /// The gradient of `w` for an upstream gradient of 1, in `w`'s dtype (when asked for).
    pub dw: Option<Tensor<B, 2>>,
}

/// The causal-LM loss of the logits `h · wᵀ` without ever holding them whole (as Liger-Kernel's
/// fused linear cross-entropy does): for each chunk of rows, the head's matmul, the loss kernel,
/// and — when `need` asks for them — the logits' gradient written over them, then that chunk's
/// contribution to `dh` (`dlogits · w`) and `dw` (`dlogitsᵀ · h`, summed in f32). The gradients
/// are computed in the forward pass because the loss is the graph's last operation: the
/// upstream gradient is a scalar the backward only scales them by. So the peak is one chunk of
/// logits (about 256 MiB of f32-equivalent elements, [`tiled::block_rows`]) instead of the whole
/// `[tokens, vocab]` logits and their gradient (1 GiB per 4096-token sequence at Llama-3's 128K
/// vocabulary in bf16), and nothing is recomputed: the head's three matmuls run once each, as
/// unfused. `None`: the backend has no kernel for these inputs (the caller composes).
///
/// # Shapes
/// - h: `[rows, hidden]`; w: `[vocab, hidden]`; targets: `[rows]` (int); weights: `[rows]` (f32)
pub(super) fn head_ce_chunks<B: KernelBackend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
    need: [bool; 2],
) -> Option<HeadCe<B>> {
    let [rows, _] = h.dims();
    let vocab = w.dims()[0];
    // The upstream gradient the chunks' gradients are for (see `HeadCeStep`).
    let unit = (need[0] || need[1]).then(|| Tensor::<B, 1>::ones([1], (&h.device(), DType::F32)));
    let step = tiled::block_rows(rows, 1, vocab);
    let (mut loss, mut dhs, mut dw) = (Vec::new(), Vec::new(), None::<Tensor<B, 2>>);
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let hc = h.clone().narrow(0, r0, n);
        let (tc, wc) = (
            targets.clone().narrow(0, r0, n),
            weights.clone().narrow(0, r0, n),
        );
        let logits = B::linear_kernel(fp(hc.clone()), fp(w.clone()))?;
        let (l, lse) = B::ce_kernel(logits.clone(), tc.clone().into_primitive(), fp(wc.clone()))?;
        loss.push(tp::<B, 1>(l));
        let Some(unit) = &unit else {
            continue;
        };
        let d = B::ce_backward_kernel(logits, tc.into_primitive(), fp(wc), lse, fp(unit.clone()));
        let x = need[1].then(|| fp(hc));
        let [dx, dwc] = B::linear_backward_kernel(x, fp(w.clone()), d, need);
        dhs.extend(dx.map(tp::<B, 2>));
        if let Some(g) = dwc.map(tp::<B, 2>) {
            let g = g.cast(FloatDType::F32);
            dw = Some(match dw {
                Some(acc) => acc + g,
                None => g,
            });
        }
    }
    super::count_kernel_call();
    let wdtype = w.dtype();
    Some(HeadCe {
        loss: Tensor::cat(loss, 0).sum(),
        dh: (!dhs.is_empty()).then(|| Tensor::cat(dhs, 0)),
        dw: dw.map(|g| g.cast(FloatDType::from(wdtype))),
    })
}

/// The shape of one packed document of `len` tokens.
fn doc_shape(shape: AttentionShape, len: usize) -> AttentionShape {
    AttentionShape {
        batch: 1,
        seq: len,
        ..shape
    }
}

pub(super) fn fp<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

pub(super) fn tp<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

// ---- autodiff: one backward step per kernel ---------------------------------------------------

type Ad<B, C> = Autodiff<B, C>;

/// Register `out` (computed by an inner kernel from `parents`) with its backward step.
fn record<B, C, BO, const N: usize>(
    step: BO,
    parents: [&FloatTensor<Ad<B, C>>; N],
    state: BO::State,
    out: FloatTensor<B>,
) -> FloatTensor<Ad<B, C>>
where
    B: KernelBackend,
    C: CheckpointStrategy,
    BO: Backward<B, N>,
{
    super::count_kernel_call();
    match step
        .prepare::<C>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

fn give<B: Backend>(grads: &mut Gradients, parent: Option<NodeId>, g: Option<FloatTensor<B>>) {
    if let (Some(id), Some(g)) = (parent, g) {
        grads.register::<B>(id, g);
    }
}

#[derive(Debug)]
struct LinearStep;
impl<B: KernelBackend> Backward<B, 2> for LinearStep {
    /// The input (kept only when the weight trains: a frozen layer's backward needs just the
    /// weight) and the weight.
    type State = (Option<FloatTensor<B>>, FloatTensor<B>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let need = [px.is_some(), pw.is_some() && x.is_some()];
        let [dx, dw] = B::linear_backward_kernel(x, w, dy, need);
        give::<B>(grads, px.as_ref().map(|n| n.id), dx);
        give::<B>(grads, pw.as_ref().map(|n| n.id), dw);
    }
}

#[derive(Debug)]
struct RmsNormStep;
impl<B: KernelBackend> Backward<B, 2> for RmsNormStep {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, rstd) = ops.state;
        let [dx, dw] = B::rms_norm_backward_kernel(x, w, rstd, dy, [px.is_some(), pw.is_some()]);
        give::<B>(grads, px.as_ref().map(|n| n.id), dx);
        give::<B>(grads, pw.as_ref().map(|n| n.id), dw);
    }
}

#[derive(Debug)]
struct SwigluStep;
impl<B: KernelBackend> Backward<B, 2> for SwigluStep {
    type State = (FloatTensor<B>, FloatTensor<B>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pg, pu] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (g, u) = ops.state;
        let [dg, du] = B::swiglu_backward_kernel(g, u, dy, [pg.is_some(), pu.is_some()]);
        give::<B>(grads, pg.as_ref().map(|n| n.id), dg);
        give::<B>(grads, pu.as_ref().map(|n| n.id), du);
    }
}

#[derive(Debug)]
struct AttentionStep;
type AttentionState<B> = (
    [FloatTensor<B>; 7], // q, k, v, cos, sin, out, lse
    AttentionShape,
);
impl<B: KernelBackend> Backward<B, 3> for AttentionStep {
    type State = AttentionState<B>;
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let ([q, k, v, cos, sin, out, lse], shape) = ops.state;
        let [dq, dk, dv] = B::attention_backward_kernel(q, k, v, cos, sin, out, lse, dout, shape);
        give::<B>(grads, pq.as_ref().map(|n| n.id), Some(dq));
        give::<B>(grads, pk.as_ref().map(|n| n.id), Some(dk));
        give::<B>(grads, pv.as_ref().map(|n| n.id), Some(dv));
    }
}

#[derive(Debug)]
struct PackedAttentionStep;
/// q, k, v, cos, sin and the output (all rows); each document's log-sum-exp; the shape; the
/// documents.
type PackedAttentionState<B> = (
    [FloatTensor<B>; 6],
    Vec<FloatTensor<B>>,
    AttentionShape,
    Vec<(usize, usize)>,
);
impl<B: KernelBackend> Backward<B, 3> for PackedAttentionStep {
    type State = PackedAttentionState<B>;
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let dout = tp::<B, 2>(grads.consume::<B>(&ops.node));
        let (tensors, lses, shape, spans) = ops.state;
        let [q, k, v, cos, sin, out] = tensors.map(tp::<B, 2>);
        let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
        for (&(start, len), lse) in spans.iter().zip(lses) {
            let rows = |t: &Tensor<B, 2>| fp(t.clone().narrow(0, start, len));
            let head = |t: &Tensor<B, 2>| fp(t.clone().narrow(0, 0, len));
            let [dq, dk, dv] = B::attention_backward_kernel(
                rows(&q),
                rows(&k),
                rows(&v),
                head(&cos),
                head(&sin),
                rows(&out),
                lse,
                rows(&dout),
                doc_shape(shape, len),
            );
            dqs.push(tp::<B, 2>(dq));
            dks.push(tp::<B, 2>(dk));
            dvs.push(tp::<B, 2>(dv));
        }
        let cat = |parts: Vec<Tensor<B, 2>>| Some(fp(Tensor::cat(parts, 0)));
        give::<B>(grads, pq.as_ref().map(|n| n.id), cat(dqs));
        give::<B>(grads, pk.as_ref().map(|n| n.id), cat(dks));
        give::<B>(grads, pv.as_ref().map(|n| n.id), cat(dvs));
    }
}

#[derive(Debug)]
struct CeStep;
impl<B: KernelBackend> Backward<B, 1> for CeStep {
    /// Logits `[rows, vocab]`, targets, weights and each row's log-sum-exp.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, FloatTensor<B>);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pl] = ops.parents;
        let dloss = grads.consume::<B>(&ops.node);
        let (logits, targets, weights, lse) = ops.state;
        let d = B::ce_backward_kernel(logits, targets, weights, lse, dloss);
        give::<B>(grads, pl.as_ref().map(|n| n.id), Some(d));
    }
}

#[derive(Debug)]
struct HeadCeStep;
impl<B: KernelBackend> Backward<B, 2> for HeadCeStep {
    /// `dh` (`[rows, hidden]`) and `dw` (`[vocab, hidden]`) for an upstream gradient of 1,
    /// computed in the forward pass by [`head_ce_chunks`].
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [ph, pw] = ops.parents;
        let dloss = tp::<B, 1>(grads.consume::<B>(&ops.node)).cast(FloatDType::F32);
        let (dh, dw) = ops.state;
        // f32 arithmetic, one rounding to the gradient's dtype; exact when the upstream gradient
        // is 1, as in training, where the loss's weights carry the mean's scale
        // (`LlamaForCausalLM::loss_scaled`).
        let scale = dloss;
        let rescale = |g: FloatTensor<B>| {
            let g = tp::<B, 2>(g);
            let dtype = g.dtype();
            let scaled = g.cast(FloatDType::F32) * scale.clone().reshape([1, 1]);
            scaled.cast(FloatDType::from(dtype))
        };
        give::<B>(grads, ph.as_ref().map(|n| n.id), dh.map(|g| fp(rescale(g))));
        give::<B>(grads, pw.as_ref().map(|n| n.id), dw.map(|g| fp(rescale(g))));
    }
}

impl<B: KernelBackend, C: CheckpointStrategy> KernelBackend for Ad<B, C> {
    fn lp_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let (xa, wa) = (fp(x.clone()), fp(w.clone()));
        match B::linear_kernel(xa.primitive.clone(), wa.primitive.clone()) {
            Some(y) => {
                let keep_x = (!wa.node.requirement.is_none()).then(|| xa.primitive.clone());
                let state = (keep_x, wa.primitive.clone());
                tp(record::<B, C, _, 2>(LinearStep, [&xa, &wa], state, y))
            }
            None => composed::linear(x, w),
        }
    }

    fn lp_rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let (xa, wa) = (fp(x.clone()), fp(w.clone()));
        match B::rms_norm_kernel(xa.primitive.clone(), wa.primitive.clone(), eps) {
            Some((y, rstd)) => tp(record::<B, C, _, 2>(
                RmsNormStep,
                [&xa, &wa],
                (xa.primitive.clone(), wa.primitive.clone(), rstd),
                y,
            )),
            None => composed::rms_norm(x, w, eps),
        }
    }

    fn lp_swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let (ga, ua) = (fp(gate.clone()), fp(up.clone()));
        match B::swiglu_kernel(ga.primitive.clone(), ua.primitive.clone()) {
            Some(y) => tp(record::<B, C, _, 2>(
                SwigluStep,
                [&ga, &ua],
                (ga.primitive.clone(), ua.primitive.clone()),
                y,
            )),
            None => composed::swiglu(gate, up),
        }
    }

    fn lp_attention(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        shape: AttentionShape,
    ) -> Tensor<Self, 2> {
        let (qa, ka, va) = (fp(q.clone()), fp(k.clone()), fp(v.clone()));
        let (ca, sa) = (fp(cos.clone()), fp(sin.clone()));
        let kernel = B::attention_kernel(
            qa.primitive.clone(),
            ka.primitive.clone(),
            va.primitive.clone(),
            ca.primitive.clone(),
            sa.primitive.clone(),
            shape,
        );
        match kernel {
            Some((out, lse)) => {
                let state = (
                    [
                        qa.primitive.clone(),
                        ka.primitive.clone(),
                        va.primitive.clone(),
                        ca.primitive,
                        sa.primitive,
                        out.clone(),
                        lse,
                    ],
                    shape,
                );
                tp(record::<B, C, _, 3>(
                    AttentionStep,
                    [&qa, &ka, &va],
                    state,
                    out,
                ))
            }
            None => composed::attention(q, k, v, cos, sin, shape),
        }
    }

    fn lp_attention_packed(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        shape: AttentionShape,
        spans: &[(usize, usize)],
    ) -> Tensor<Self, 2> {
        let (qa, ka, va) = (fp(q.clone()), fp(k.clone()), fp(v.clone()));
        let (ca, sa) = (fp(cos.clone()), fp(sin.clone()));
        let inner = |t: &FloatTensor<B>| tp::<B, 2>(t.clone());
        let (qi, ki, vi, ci, si) = (
            inner(&qa.primitive),
            inner(&ka.primitive),
            inner(&va.primitive),
            inner(&ca.primitive),
            inner(&sa.primitive),
        );
        // The kernel per document on the inner backend; one autodiff step for all of them.
        let (mut outs, mut lses) = (Vec::with_capacity(spans.len()), Vec::new());
        for &(start, len) in spans {
            let rows = |t: &Tensor<B, 2>| fp(t.clone().narrow(0, start, len));
            let head = |t: &Tensor<B, 2>| fp(t.clone().narrow(0, 0, len));
            match B::attention_kernel(
                rows(&qi),
                rows(&ki),
                rows(&vi),
                head(&ci),
                head(&si),
                doc_shape(shape, len),
            ) {
                Some((o, l)) => {
                    outs.push(tp::<B, 2>(o));
                    lses.push(l);
                }
                None => return composed::attention_packed(q, k, v, cos, sin, shape, spans),
            }
        }
        let out = fp(Tensor::cat(outs, 0));
        let state = (
            [
                qa.primitive.clone(),
                ka.primitive.clone(),
                va.primitive.clone(),
                ca.primitive,
                sa.primitive,
                out.clone(),
            ],
            lses,
            shape,
            spans.to_vec(),
        );
        tp(record::<B, C, _, 3>(
            PackedAttentionStep,
            [&qa, &ka, &va],
            state,
            out,
        ))
    }

    fn lp_causal_ce(
        logits: Tensor<Self, 3>,
        ids: Tensor<Self, 2, Int>,
        mask: Tensor<Self, 2>,
    ) -> Tensor<Self, 1> {
        let [b, s, vocab] = logits.dims();
        let la = fp(logits.clone().reshape([b * s, vocab]));
        let (targets, weights) = tiled::ce_targets(inner_int(ids.clone()), inner(mask.clone()));
        let (tgt, wp) = (targets.into_primitive(), fp(weights));
        match B::ce_kernel(la.primitive.clone(), tgt.clone(), wp.clone()) {
            Some((loss, lse)) => {
                let state = (la.primitive.clone(), tgt, wp, lse);
                tp(record::<B, C, _, 1>(CeStep, [&la], state, loss))
            }
            None => composed::causal_ce(logits, ids, mask),
        }
    }

    fn lp_head_ce(
        h: Tensor<Self, 3>,
        w: Tensor<Self, 2>,
        ids: Tensor<Self, 2, Int>,
        mask: Tensor<Self, 2>,
    ) -> Tensor<Self, 1> {
        let [b, s, d] = h.dims();
        let (ha, wa) = (fp(h.clone().reshape([b * s, d])), fp(w.clone()));
        let need = [
            !ha.node.requirement.is_none(),
            !wa.node.requirement.is_none(),
        ];
        let (targets, weights) = tiled::ce_targets(inner_int(ids.clone()), inner(mask.clone()));
        let (hi, wi) = (tp(ha.primitive.clone()), tp(wa.primitive.clone()));
        match head_ce_chunks::<B>(hi, wi, targets, weights, need) {
            Some(f) => {
                let state = (f.dh.map(fp), f.dw.map(fp));
                tp(record::<B, C, _, 2>(
                    HeadCeStep,
                    [&ha, &wa],
                    state,
                    fp(f.loss),
                ))
            }
            None => composed::causal_ce(head_logits(h, w), ids, mask),
        }
    }
}

/// The inner backend's tensor of an autodiff float tensor (no graph).
fn inner<B: Backend, C: CheckpointStrategy, const D: usize>(
    t: Tensor<Ad<B, C>, D>,
) -> Tensor<B, D> {
    tp(fp(t).primitive)
}

/// The inner backend's tensor of an autodiff int tensor.
fn inner_int<B: Backend, C: CheckpointStrategy, const D: usize>(
    t: Tensor<Ad<B, C>, D, Int>,
) -> Tensor<B, D, Int> {
    Tensor::from_primitive(t.into_primitive())
}
