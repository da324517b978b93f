//! The kernel hooks of burn's CubeCL backends (wgpu and CUDA: `CubeBackend<R, ..>` for any
//! runtime `R`), so that `Autodiff` over them records one backward step per operation with the
//! block-wise forward/backward of `tiled.rs` instead of differentiating burn's composed ops
//! (which keep the O(seq²) attention probabilities and the f32 logits; see `tiled.rs`).
//!
//! RMSNorm, SwiGLU, AdamW and the loss run the fused CubeCL kernels of `cube_kernels.rs`;
//! attention runs block-wise (`tiled.rs`) with the backend's matmuls (`cubek-matmul`) and fused
//! kernels for everything between them: RoPE with the token↔head layout change, and each block's
//! softmax (forward) and softmax gradient (backward).
//!
//! Every dtype is handled (f32, bf16, f16: the matmuls in the dtype, reductions and softmax in
//! f32); mixed dtypes (an f32 master weight with bf16 activations) fall back to the composition
//! where an operation's hook does not support them.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, Int, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::kernel::{KernelBackend, fp, tp};
use super::{AdamWStep, AttentionShape, cube_kernels, tiled};

/// Whether the CubeCL kernels run (`cube_kernels.rs`); `LLAMA_PRO_CUBE_KERNELS=0` keeps the
/// block-wise operations but runs them entirely in burn ops (`tiled.rs`) instead (to rule a
/// kernel out when a driver miscompiles it; the results are the same to rounding).
fn cube_kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !std::env::var("LLAMA_PRO_CUBE_KERNELS")
            .is_ok_and(|v| matches!(v.as_str(), "0" | "off" | "false"))
    })
}

fn t2<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 2> {
    tp(p)
}

fn same_dtype<B: Backend>(a: &FloatTensor<B>, b: &FloatTensor<B>) -> bool {
    use burn::tensor::TensorMetadata;
    a.dtype() == b.dtype()
}

impl<R, F, I, BT> KernelBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn linear_kernel(x: FloatTensor<Self>, w: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        same_dtype::<Self>(&x, &w).then(|| fp(tiled::linear_fwd(t2::<Self>(x), t2(w))))
    }

    fn linear_backward_kernel(
        x: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        need: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        tiled::linear_bwd(x.map(t2::<Self>), t2(w), t2(dy), need).map(|g| g.map(fp))
    }

    fn rms_norm_kernel(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        Some(match cube_kernels_on() {
            true => cube_kernels::rms_norm_fwd(x, w, eps),
            false => {
                let (y, rstd) = tiled::rms_norm_fwd(t2::<Self>(x), tp::<Self, 1>(w), eps);
                (fp(y), fp(rstd))
            }
        })
    }

    fn rms_norm_backward_kernel(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        need: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        if !cube_kernels_on() {
            let (dx, dw) = tiled::rms_norm_bwd(t2::<Self>(x), tp(w), tp(rstd), t2(dy), need);
            return [dx.map(fp), dw.map(fp)];
        }
        // dw (a sum over rows) by the backend's reduction, dx by the fused kernel.
        let (_, dw) = match need[1] {
            true => tiled::rms_norm_bwd(
                t2::<Self>(x.clone()),
                tp(w.clone()),
                tp(rstd.clone()),
                t2(dy.clone()),
                [false, true],
            ),
            false => (None, None),
        };
        let dx = need[0].then(|| cube_kernels::rms_norm_bwd_x(x, w, rstd, dy));
        [dx, dw.map(fp)]
    }

    fn swiglu_kernel(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        if !same_dtype::<Self>(&gate, &up) {
            return None;
        }
        Some(match cube_kernels_on() {
            true => cube_kernels::swiglu_fwd(gate, up),
            false => fp(tiled::swiglu_fwd(t2::<Self>(gate), t2(up))),
        })
    }

    fn swiglu_backward_kernel(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        need: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        match cube_kernels_on() {
            true => {
                let [dg, du] = cube_kernels::swiglu_bwd(gate, up, dy);
                [need[0].then_some(dg), need[1].then_some(du)]
            }
            false => tiled::swiglu_bwd(t2::<Self>(gate), t2(up), t2(dy), need).map(|g| g.map(fp)),
        }
    }

    fn attention_kernel(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let ok = same_dtype::<Self>(&q, &k) && same_dtype::<Self>(&q, &v);
        if !ok {
            return None;
        }
        if !cube_kernels_on() {
            let (out, lse) =
                tiled::attention_fwd(t2::<Self>(q), t2(k), t2(v), t2(cos), t2(sin), shape);
            return Some((fp(out), fp(lse)));
        }
        let dtype = q.dtype;
        let [qh, kh, vh] = heads::<R>(q, k, v, &cos, &sin, &shape);
        let (out, lse) =
            tiled::attention_fwd_heads(tp::<Self, 4>(qh), tp(kh), tp(vh), shape, &FusedSoftmax);
        Some((cube_kernels::to_tokens(fp(out), None, dtype), fp(lse)))
    }

    fn attention_backward_kernel(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> [FloatTensor<Self>; 3] {
        if !cube_kernels_on() {
            return tiled::attention_bwd(
                t2::<Self>(q),
                t2(k),
                t2(v),
                t2(cos),
                t2(sin),
                t2(out),
                tp(lse),
                t2(dout),
                shape,
            )
            .map(fp);
        }
        let dtype = q.dtype;
        let dout = match dout.dtype == dtype {
            true => dout,
            false => fp(t2::<Self>(dout).cast(FloatDType::from(dtype))),
        };
        let [qh, kh, vh] = heads::<R>(q, k, v, &cos, &sin, &shape);
        let dims = [shape.batch, shape.heads, shape.seq, shape.head_dim];
        let (out, dout) = (
            cube_kernels::to_heads(out, None, dims),
            cube_kernels::to_heads(dout, None, dims),
        );
        let grads = tiled::attention_bwd_heads(
            tp::<Self, 4>(qh),
            tp(kh),
            tp(vh),
            tp(out),
            tp(dout),
            tp(lse),
            shape,
            &FusedSoftmax,
        );
        let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
        let [dq, dk, dv] = grads.map(fp);
        [
            cube_kernels::to_tokens(dq, Some((&cos, &sin)), dtype),
            cube_kernels::to_tokens(dk, Some((&cos, &sin)), dtype),
            cube_kernels::to_tokens(dv, None, dtype),
        ]
    }

    fn ce_kernel(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        if !cube_kernels_on() {
            let targets = Tensor::<Self, 1, Int>::from_primitive(targets);
            let (loss, lse) = tiled::ce_fwd(t2(logits), targets, tp(weights));
            return Some((fp(loss), fp(lse)));
        }
        let (loss, lse) = cube_kernels::ce_fwd(logits, targets, weights);
        Some((fp(tp::<Self, 1>(loss).sum()), lse))
    }

    fn adamw_kernel(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: AdamWStep,
    ) -> Option<[FloatTensor<Self>; 3]> {
        cube_kernels_on()
            .then(|| cube_kernels::adamw(param, grad, moments, step))
            .flatten()
    }

    fn ce_backward_kernel(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !cube_kernels_on() {
            let targets = Tensor::<Self, 1, Int>::from_primitive(targets);
            return fp(tiled::ce_bwd(
                t2(logits),
                targets,
                tp(weights),
                tp(lse),
                tp(dloss),
            ));
        }
        let dloss = fp(tp::<Self, 1>(dloss).cast(FloatDType::F32));
        cube_kernels::ce_bwd(logits, targets, weights, lse, dloss)
    }
}

/// The softmax of attention's blocks by the fused CubeCL kernels: one read of the raw scores and
/// one write of the probabilities forward; one pass writing the probabilities and the scores'
/// gradient backward (burn ops would take about ten passes over an f32 copy of the block).
struct FusedSoftmax;

/// A 4-d float tensor of the CubeCL backend.
type T4<R, F, I, BT> = Tensor<CubeBackend<R, F, I, BT>, 4>;

impl<R, F, I, BT> tiled::BlockSoftmax<CubeBackend<R, F, I, BT>> for FusedSoftmax
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn forward(
        &self,
        scores: T4<R, F, I, BT>,
        bl: tiled::Block,
        sh: &AttentionShape,
    ) -> (T4<R, F, I, BT>, T4<R, F, I, BT>) {
        let block = (bl.i0, bl.n, bl.k0);
        let (p, lse) = cube_kernels::block_softmax_fwd(fp(scores), block, sh.window, sh.scale);
        (tp(p), tp(lse))
    }

    fn backward(
        &self,
        scores: T4<R, F, I, BT>,
        dp: T4<R, F, I, BT>,
        lse: T4<R, F, I, BT>,
        delta: T4<R, F, I, BT>,
        bl: tiled::Block,
        sh: &AttentionShape,
    ) -> (T4<R, F, I, BT>, T4<R, F, I, BT>) {
        let block = (bl.i0, bl.n, bl.k0);
        let [p, ds] = cube_kernels::block_softmax_bwd(
            fp(scores),
            fp(dp),
            fp(lse),
            fp(delta),
            block,
            sh.window,
            sh.scale,
        );
        (tp(p), tp(ds))
    }
}

/// Roped query and key heads and value heads (`[b, n, s, hd]`) from token rows, by the fused
/// layout kernel.
fn heads<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    cos: &CubeTensor<R>,
    sin: &CubeTensor<R>,
    sh: &AttentionShape,
) -> [CubeTensor<R>; 3] {
    let (cos, sin) = (into_contiguous(cos.clone()), into_contiguous(sin.clone()));
    let dims = |n| [sh.batch, n, sh.seq, sh.head_dim];
    [
        cube_kernels::to_heads(q, Some((&cos, &sin)), dims(sh.heads)),
        cube_kernels::to_heads(k, Some((&cos, &sin)), dims(sh.kv_heads)),
        cube_kernels::to_heads(v, None, dims(sh.kv_heads)),
    ]
}
