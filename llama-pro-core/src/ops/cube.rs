//! The kernel hooks of burn's CubeCL backends (wgpu and CUDA: `CubeBackend<R, ..>` for any
//! runtime `R`), so that `Autodiff` over them records one backward step per operation with the
//! block-wise forward/backward of `tiled.rs` instead of differentiating burn's composed ops
//! (which keep the O(seq²) attention probabilities and the f32 logits; see `tiled.rs`).
//!
//! RMSNorm, SwiGLU and AdamW run the fused CubeCL kernels of `cube_kernels.rs`; attention and the
//! loss run block-wise in burn ops, whose matmuls are the backend's (`cubek-matmul`).
//!
//! Every dtype is handled (f32, bf16, f16: the matmuls in the dtype, reductions and softmax in
//! f32); mixed dtypes (an f32 master weight with bf16 activations) fall back to the composition
//! where an operation's hook does not support them.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::kernel::{KernelBackend, fp, tp};
use super::{AdamWStep, AttentionShape, cube_kernels, tiled};

/// Whether the CubeCL kernels run (`cube_kernels.rs`); `LLAMA_PRO_CUBE_KERNELS=0` keeps the
/// block-wise operations but composes RMSNorm, SwiGLU and AdamW from burn ops instead (to rule
/// a kernel out when a driver miscompiles it; the results are the same to rounding).
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
        ok.then(|| {
            let (out, lse) =
                tiled::attention_fwd(t2::<Self>(q), t2(k), t2(v), t2(cos), t2(sin), shape);
            (fp(out), fp(lse))
        })
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
        tiled::attention_bwd(
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
        .map(fp)
    }

    fn causal_ce_kernel(
        logits: FloatTensor<Self>,
        ids: IntTensor<Self>,
        mask: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let ids = Tensor::<Self, 2, Int>::from_primitive(ids);
        let (loss, lse) = tiled::causal_ce_fwd(tp::<Self, 3>(logits), ids, t2(mask));
        Some((fp(loss), fp(lse)))
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

    fn causal_ce_backward_kernel(
        logits: FloatTensor<Self>,
        ids: IntTensor<Self>,
        mask: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let ids = Tensor::<Self, 2, Int>::from_primitive(ids);
        fp(tiled::causal_ce_bwd(
            tp::<Self, 3>(logits),
            ids,
            t2(mask),
            tp(lse),
            tp(dloss),
        ))
    }
}
