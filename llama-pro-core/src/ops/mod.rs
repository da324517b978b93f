//! The model's compute-heavy operations, for any burn backend, with fused kernels where a
//! backend has them.
//!
//! Every module calls these functions ([`linear`], [`rms_norm`], [`swiglu`], [`attention`],
//! [`causal_ce`], [`causal_head_ce_weighted`]; the optimizer calls [`adamw`]) instead of
//! composing burn tensor ops itself.
//! Each is generic over `B: Backend` and picks its implementation at run time:
//!
//! - on a backend with kernels (found by type: `Flex`, and the unfused CubeCL backends that
//!   `--device wgpu|cuda` run, [`crate::device::WgpuBackend`] and [`crate::device::CudaBackend`],
//!   each also under `Autodiff`), the backend's kernel, forward and backward: the CPU kernels of
//!   `cpu.rs`, and on the GPU backends the block-wise forward/backward of [`tiled`] (attention
//!   and loss memory O(seq) instead of O(seq²) and O(tokens·vocab) in f32);
//! - on every other backend (burn's fused `Wgpu`/`Cuda`, NdArray, a user's own), and for inputs a
//!   kernel does not handle (bf16/f16 on the CPU), the operation composed from burn tensor ops
//!   exactly as a plain port would write it (`composed.rs`), differentiated by burn's autodiff.
//!
//! So the model runs on any `B: Backend` and trains on any `B: AutodiffBackend`; the kernels are
//! an acceleration that never closes the set of backends.
//!
//! Why the CPU kernels exist: a profile of the composed training step on `Flex` showed 40% of
//! the time in gemm and the rest in layout copies (`swap_dims`/`reshape` of attention heads,
//! transposed weights made contiguous by `linear`, broadcasts through burn-flex's strided
//! iterator), unfused element-wise chains (RMSNorm: 8 ops and as many in backward; RoPE:
//! narrow/neg/cat/mul/add; softmax; log-softmax) and a fresh allocation per op. The kernels
//! (`cpu.rs`) work on contiguous `[tokens, features]` rows, read attention heads with strides
//! instead of copying them, apply RoPE inside attention, recompute the attention probabilities in
//! backward from the saved log-sum-exp (memory O(seq), not O(seq²)), and compute weight gradients
//! directly in HF's `[out, in]` layout.
//!
//! Module tree (no module here depends on the model's modules): `composed` (burn tensor ops),
//! `kernel` (the kernel interface and its autodiff steps), `cpu` (the Flex kernels), [`tiled`]
//! (block-wise forward/backward in burn ops, any backend), `cube` (the CubeCL backends' hooks).

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

mod composed;
#[cfg(feature = "cpu")]
mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube_kernels;
mod kernel;
pub mod tiled;

pub use composed::{apply_rope, causal_attention, causal_attention_padded, pair_mask, repeat_kv};
use kernel::{KernelBackend, fp, tp};

thread_local! {
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static KERNELS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static KERNEL_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many fused kernels (forward kernels and AdamW updates) ran on this thread so far: tests
/// and benchmarks check with it that a kernel, not the composition, computed an operation.
pub fn kernel_calls() -> u64 {
    KERNEL_CALLS.with(|c| c.get())
}

fn count_kernel_call() {
    KERNEL_CALLS.with(|c| c.set(c.get() + 1));
}

/// Whether backends may use their kernels on this thread: yes unless inside [`without_kernels`]
/// or the environment sets `LLAMA_PRO_KERNELS=0` (for A/B comparisons and benchmarks).
pub fn kernels_enabled() -> bool {
    static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env_off = *ENV_OFF.get_or_init(|| {
        std::env::var("LLAMA_PRO_KERNELS")
            .is_ok_and(|v| matches!(v.as_str(), "0" | "off" | "false"))
    });
    !env_off && !KERNELS_OFF.with(|k| k.get())
}

/// Run `f` with every operation composed from burn tensor ops on this thread (no backend
/// kernels), e.g. to check a kernel against the composition or to measure what it gains. The
/// backward pass of a graph built inside `f` follows the forward: composed ops differentiate
/// through burn's autodiff wherever `backward()` is called.
pub fn without_kernels<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&KERNELS_OFF, f)
}

/// Run `f` with the thread-local `flag` set, restoring it afterwards (also on panic).
fn with_flag<R>(
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(&'static std::thread::LocalKey<std::cell::Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|k| k.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|k| k.replace(true)));
    f()
}

/// Run `f` as a decoding step (one new token per sequence): linear layers with few rows may
/// use a kernel that reads each weight row once for all rows (CPU: 1.6–2x faster than gemm for
/// one sequence, which packs the weights first). Only decoding steps use it; scoring and
/// prefill are untouched by it.
pub fn decoding<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&DECODING, f)
}

/// Whether this thread is inside [`decoding`].
pub fn is_decoding() -> bool {
    DECODING.with(|k| k.get())
}

/// Whether backend `B` has fused kernels (and they are enabled on this thread). Inputs a kernel
/// does not handle (other dtypes) still run composed.
pub fn has_kernels<B: Backend>() -> bool {
    struct Probe;
    impl Op for Probe {
        type Output = bool;
        fn with_kernels<K: KernelBackend>(self) -> bool {
            true
        }
        fn composed(self) -> bool {
            false
        }
    }
    dispatch::<B, _>(Probe)
}

/// Geometry of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence (queries = keys: no cache).
    pub seq: usize,
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads H_kv (divides H).
    pub kv_heads: usize,
    /// Per-head width (even).
    pub head_dim: usize,
    /// Multiplier of q·k (usually `1/sqrt(head_dim)`).
    pub scale: f64,
    /// Sliding window: query `i` sees keys `j` with `i - window < j <= i`.
    pub window: Option<usize>,
}

/// Hyper-parameters of one AdamW update ([`adamw`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β₁.
    pub beta_1: f32,
    /// β₂.
    pub beta_2: f32,
    /// ε (added to `sqrt(v̂)`).
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Step number after this update (1 on the first).
    pub time: usize,
}

/// `x · wᵀ`.
///
/// # Shapes
/// - x: `[n, in]`; w: `[out, in]` (HF layout)
/// - output: `[n, out]`
pub fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    struct Linear<B: Backend>(Tensor<B, 2>, Tensor<B, 2>);
    impl<B: Backend> Op for Linear<B> {
        type Output = Tensor<B, 2>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            same(K::lp_linear(same(self.0), same(self.1)))
        }
        fn composed(self) -> Self::Output {
            composed::linear(self.0, self.1)
        }
    }
    dispatch::<B, _>(Linear(x, w))
}

/// RMSNorm of each row (statistics in f32, result in x's dtype, then scaled by `w`).
///
/// # Shapes
/// - x: `[n, d]`; w: `[d]`
/// - output: `[n, d]`
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    struct RmsNorm<B: Backend>(Tensor<B, 2>, Tensor<B, 1>, f64);
    impl<B: Backend> Op for RmsNorm<B> {
        type Output = Tensor<B, 2>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            same(K::lp_rms_norm(same(self.0), same(self.1), self.2))
        }
        fn composed(self) -> Self::Output {
            composed::rms_norm(self.0, self.1, self.2)
        }
    }
    dispatch::<B, _>(RmsNorm(x, w, eps))
}

/// `silu(gate) ⊙ up`.
///
/// # Shapes
/// - gate, up, output: `[n, f]`
pub fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    struct Swiglu<B: Backend>(Tensor<B, 2>, Tensor<B, 2>);
    impl<B: Backend> Op for Swiglu<B> {
        type Output = Tensor<B, 2>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            same(K::lp_swiglu(same(self.0), same(self.1)))
        }
        fn composed(self) -> Self::Output {
            composed::swiglu(self.0, self.1)
        }
    }
    dispatch::<B, _>(Swiglu(gate, up))
}

/// Causal self-attention with RoPE on q and k and grouped K/V heads:
/// `softmax(rope(q) rope(k)ᵀ · scale + causal) v` per head.
///
/// # Shapes
/// - q: `[batch·seq, H·hd]`; k, v: `[batch·seq, H_kv·hd]` (projection outputs, token-major)
/// - cos, sin: `[seq, hd]` RoPE tables for positions `0..seq`
/// - output: `[batch·seq, H·hd]` (the input of `o_proj`)
pub fn attention<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    shape: AttentionShape,
) -> Tensor<B, 2> {
    struct Attention<B: Backend>([Tensor<B, 2>; 5], AttentionShape);
    impl<B: Backend> Op for Attention<B> {
        type Output = Tensor<B, 2>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            let [q, k, v, cos, sin] = same::<_, [Tensor<K, 2>; 5]>(self.0);
            same(K::lp_attention(q, k, v, cos, sin, self.1))
        }
        fn composed(self) -> Self::Output {
            let [q, k, v, cos, sin] = self.0;
            composed::attention(q, k, v, cos, sin, self.1)
        }
    }
    dispatch::<B, _>(Attention([q, k, v, cos, sin], shape))
}

/// [`attention`] over documents packed in the rows of a batch: `spans` lists every document as
/// (first token row in `q`/`k`/`v`, length), in order, covering all rows; each attends only to
/// itself with positions from 0 (`cos`/`sin` cover the longest). `shape.batch` and `shape.seq`
/// are ignored. On a backend with kernels, one autodiff step runs the kernel per document
/// (no per-document slicing in the graph); elsewhere, the composition per document.
///
/// # Shapes
/// - q: `[rows, H·hd]`; k, v: `[rows, H_kv·hd]`; cos, sin: `[≥ longest, hd]`
/// - output: `[rows, H·hd]`
pub fn attention_packed<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    shape: AttentionShape,
    spans: &[(usize, usize)],
) -> Tensor<B, 2> {
    struct Packed<'a, B: Backend>([Tensor<B, 2>; 5], AttentionShape, &'a [(usize, usize)]);
    impl<B: Backend> Op for Packed<'_, B> {
        type Output = Tensor<B, 2>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            let [q, k, v, cos, sin] = same::<_, [Tensor<K, 2>; 5]>(self.0);
            same(K::lp_attention_packed(q, k, v, cos, sin, self.1, self.2))
        }
        fn composed(self) -> Self::Output {
            let [q, k, v, cos, sin] = self.0;
            composed::attention_packed(q, k, v, cos, sin, self.1, self.2)
        }
    }
    let rows = q.dims()[0];
    assert_eq!(
        spans.iter().map(|s| s.1).sum::<usize>(),
        rows,
        "attention_packed: the documents must cover the {rows} rows"
    );
    dispatch::<B, _>(Packed([q, k, v, cos, sin], shape, spans))
}

/// Sum of the causal-LM cross-entropy (position `t` predicts token `t+1`, in f32) over the
/// positions where both `mask[t]` and `mask[t+1]` are set, weighted by their product.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`; ids: `[batch, seq]`; mask: `[batch, seq]`
/// - output: `[1]`
pub fn causal_ce<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    causal_ce_weighted(logits, ids, pair_weights(mask))
}

/// Sum of the causal-LM cross-entropy (position `t` predicts token `t+1`, in f32) weighted by
/// `weights[t]` (the last column is ignored: the last position has no target). Supervised
/// fine-tuning sets `weights[t] = 1` where token `t+1` is a trained label (labels ≠ −100) and
/// `t+1` starts no new packed document.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`; ids: `[batch, seq]`; weights: `[batch, seq]`
/// - output: `[1]`
pub fn causal_ce_weighted<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    struct CausalCe<B: Backend>(Tensor<B, 3>, Tensor<B, 2, Int>, Tensor<B, 2>);
    impl<B: Backend> Op for CausalCe<B> {
        type Output = Tensor<B, 1>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            same(K::lp_causal_ce(same(self.0), same(self.1), same(self.2)))
        }
        fn composed(self) -> Self::Output {
            composed::causal_ce(self.0, self.1, self.2)
        }
    }
    dispatch::<B, _>(CausalCe(logits, ids, weights))
}

/// [`causal_ce_weighted`] of the logits `h · wᵀ` of a language-model head, without holding
/// the logits: on a backend with kernels, the head's matmul and the loss run over chunks of rows
/// and, when the loss will be differentiated, each chunk's gradients of `h` and `w` are computed
/// right away, so no `[tokens, vocab]` tensor outlives its chunk (Liger-Kernel's fused linear
/// cross-entropy; the matmuls run once each, nothing is recomputed). Elsewhere, the head and
/// the loss composed. The sum and its gradients equal the unfused ones up to rounding.
///
/// # Shapes
/// - h: `[batch, seq, hidden]`; w: `[vocab, hidden]` (HF layout); ids, weights: `[batch, seq]`
/// - output: `[1]`
pub fn causal_head_ce_weighted<B: Backend>(
    h: Tensor<B, 3>,
    w: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    struct HeadCe<B: Backend>(Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 2, Int>, Tensor<B, 2>);
    impl<B: Backend> Op for HeadCe<B> {
        type Output = Tensor<B, 1>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            let (h, w, ids, weights) = same((self.0, self.1, self.2, self.3));
            same(K::lp_head_ce(h, w, ids, weights))
        }
        fn composed(self) -> Self::Output {
            let [b, s, d] = self.0.dims();
            let vocab = self.1.dims()[0];
            let logits = composed::linear(self.0.reshape([b * s, d]), self.1);
            composed::causal_ce(logits.reshape([b, s, vocab]), self.2, self.3)
        }
    }
    dispatch::<B, _>(HeadCe(h, w, ids, weights))
}

/// The per-position weights of [`causal_ce`]'s padding mask: `mask[t] · mask[t+1]` in f32, 0 in
/// the last column.
///
/// # Shapes
/// - mask: `[batch, seq]`
/// - output: `[batch, seq]`
pub fn pair_weights<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [b, _] = mask.dims();
    let device = mask.device();
    Tensor::cat(
        vec![
            pair_mask(mask),
            Tensor::<B, 2>::zeros([b, 1], (&device, burn::tensor::DType::F32)),
        ],
        1,
    )
}

/// One AdamW update of a parameter in a single fused pass, where backend `B` has a kernel for
/// it: returns the new parameter, first and second moments (`moments` is `None` on the first
/// step). `None`: no kernel for this backend or dtype; the caller runs burn's composed `AdamW`.
/// The arithmetic is burn's `AdamW` (decoupled weight decay `p·(1 − lr·wd)`, bias corrections
/// `1 − βᵗ` in f32), bit for bit.
pub fn adamw<B: Backend, const D: usize>(
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    step: AdamWStep,
) -> Option<[Tensor<B, D>; 3]> {
    type Moments<B, const D: usize> = Option<(Tensor<B, D>, Tensor<B, D>)>;
    struct AdamW<B: Backend, const D: usize>(Tensor<B, D>, Tensor<B, D>, Moments<B, D>, AdamWStep);
    impl<B: Backend, const D: usize> Op for AdamW<B, D> {
        type Output = Option<[Tensor<B, D>; 3]>;
        fn with_kernels<K: KernelBackend>(self) -> Self::Output {
            let (p, g): (Tensor<K, D>, Tensor<K, D>) = same((self.0, self.1));
            let m: Moments<K, D> = same(self.2);
            let [p, m, v] = K::adamw_kernel(fp(p), fp(g), m.map(|(m, v)| (fp(m), fp(v))), self.3)?;
            count_kernel_call();
            Some(same([tp::<K, D>(p), tp(m), tp(v)]))
        }
        fn composed(self) -> Self::Output {
            None
        }
    }
    dispatch::<B, _>(AdamW(param, grad, moments, step))
}

// ---- run-time dispatch -------------------------------------------------------------------------

/// An operation with a fused kernel on some backends.
trait Op {
    type Output;
    /// Run with the kernels of `K`, which [`dispatch`] has checked to be the caller's backend.
    fn with_kernels<K: KernelBackend>(self) -> Self::Output;
    /// Run composed from burn tensor ops (any backend).
    fn composed(self) -> Self::Output;
}

/// Run `op` with the kernels of backend `B` if `B` is one of the backends that have kernels,
/// composed otherwise. Rust has no specialisation, so the kernel backends are recognised by type
/// at run time; the comparison costs a few nanoseconds per operation.
fn dispatch<B: Backend, O: Op>(op: O) -> O::Output {
    if !kernels_enabled() {
        return op.composed();
    }
    let b = TypeId::of::<B>();
    /// Return `op` run with the kernels of the first of the backends (each also under
    /// `Autodiff`, with and without checkpointing) that is `B`.
    #[allow(unused_macros)]
    macro_rules! try_backends {
        ($($k:ty),*) => {$(
            {
                use burn::backend::Autodiff;
                use burn::backend::autodiff::checkpoint::strategy::{
                    BalancedCheckpointing, NoCheckpointing,
                };
                if b == TypeId::of::<$k>() {
                    return op.with_kernels::<$k>();
                }
                if b == TypeId::of::<Autodiff<$k, NoCheckpointing>>() {
                    return op.with_kernels::<Autodiff<$k, NoCheckpointing>>();
                }
                if b == TypeId::of::<Autodiff<$k, BalancedCheckpointing>>() {
                    return op.with_kernels::<Autodiff<$k, BalancedCheckpointing>>();
                }
            }
        )*};
    }
    #[cfg(feature = "cpu")]
    try_backends!(burn::backend::Flex);
    #[cfg(feature = "wgpu")]
    try_backends!(crate::device::WgpuBackend);
    #[cfg(feature = "cuda")]
    try_backends!(crate::device::CudaBackend);
    let _ = b;
    op.composed()
}

/// `value` as type `T`, which is the type of `value` ([`dispatch`] compared the backends' type
/// ids before calling, and a type built from the same backend is then the same type).
///
/// # Panics
/// If `A` and `T` differ: a bug in this module, never a user error.
fn same<A: 'static, T: 'static>(value: A) -> T {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(t) => match t.take() {
            Some(t) => t,
            None => unreachable!("value taken twice"),
        },
        None => unreachable!(
            "ops::dispatch: {} is not {}",
            std::any::type_name::<A>(),
            std::any::type_name::<T>()
        ),
    }
}
