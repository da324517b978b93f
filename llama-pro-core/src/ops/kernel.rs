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
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::composed;
use super::{AdamWStep, AttentionShape};

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
        let kernel = Self::causal_ce_kernel(
            fp(logits.clone()),
            ids.clone().into_primitive(),
            fp(mask.clone()),
        );
        match kernel {
            Some((loss, _)) => {
                super::count_kernel_call();
                tp(loss)
            }
            None => composed::causal_ce(logits, ids, mask),
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
    /// Forward of [`Self::lp_causal_ce`]: the loss sum (`[1]`) and each row's log-sum-exp.
    fn causal_ce_kernel(
        _logits: FloatTensor<Self>,
        _ids: IntTensor<Self>,
        _mask: FloatTensor<Self>,
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

    /// Gradient of the logits of [`Self::lp_causal_ce`] for an upstream gradient `dloss` (`[1]`).
    fn causal_ce_backward_kernel(
        _logits: FloatTensor<Self>,
        _ids: IntTensor<Self>,
        _mask: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("causal_ce_backward_kernel without causal_ce_kernel")
    }
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
struct CausalCeStep;
impl<B: KernelBackend> Backward<B, 1> for CausalCeStep {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, FloatTensor<B>);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pl] = ops.parents;
        let dloss = grads.consume::<B>(&ops.node);
        let (logits, ids, mask, lse) = ops.state;
        let d = B::causal_ce_backward_kernel(logits, ids, mask, lse, dloss);
        give::<B>(grads, pl.as_ref().map(|n| n.id), Some(d));
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
        let (la, ma) = (fp(logits.clone()), fp(mask.clone()));
        let ip: IntTensor<B> = ids.clone().into_primitive();
        match B::causal_ce_kernel(la.primitive.clone(), ip.clone(), ma.primitive.clone()) {
            Some((loss, lse)) => tp(record::<B, C, _, 1>(
                CausalCeStep,
                [&la],
                (la.primitive.clone(), ip, ma.primitive, lse),
                loss,
            )),
            None => composed::causal_ce(logits, ids, mask),
        }
    }
}
