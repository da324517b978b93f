//! Fused kernels written in CubeCL: one source compiled at run time to CUDA C (NVRTC) and to
//! WGSL/SPIR-V (wgpu), so the kernel tested on Mesa's lavapipe in CI is the one that runs on an
//! NVIDIA GPU.
//!
//! What they replace, and why it is faster: the unfused CubeCL backend runs each burn op as its
//! own kernel with a full read and write of the tensor. RMSNorm composed is 8 kernels forward and
//! as many backward with f32 temporaries of the whole activation; SwiGLU forward/backward 4 and 8;
//! AdamW about 15 per parameter. Each kernel here reads its inputs once and writes its outputs
//! once, with the arithmetic in f32 whatever the storage dtype (f32, bf16, f16). The same holds
//! for RoPE (six kernels and a transpose copy composed), the cross-entropy (an f32 copy of the
//! logits and five passes composed) and the softmax of an attention block (about ten passes over
//! an f32 copy of the scores composed).
//!
//! Layout: inputs are made contiguous first (a no-op for the projections' outputs); RMSNorm runs
//! one cube per row with a shared-memory tree reduction (no subgroup operations, which not every
//! wgpu adapter has).

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

use super::AdamWStep;

// ---- SwiGLU ----------------------------------------------------------------------------------

#[cube(launch_unchecked)]
fn swiglu_fwd_kernel<E: Float>(
    gate: &Tensor<E>,
    up: &Tensor<E>,
    out: &mut Tensor<E>,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    let u = f32::cast_from(up[i]);
    let s = f32::new(1.0) / (f32::new(1.0) + (f32::new(0.0) - g).exp());
    out[i] = E::cast_from(g * s * u);
}

#[cube(launch_unchecked)]
fn swiglu_bwd_kernel<E: Float>(
    gate: &Tensor<E>,
    up: &Tensor<E>,
    dy: &Tensor<E>,
    dgate: &mut Tensor<E>,
    dup: &mut Tensor<E>,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= dgate.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    let u = f32::cast_from(up[i]);
    let d = f32::cast_from(dy[i]);
    let s = f32::new(1.0) / (f32::new(1.0) + (f32::new(0.0) - g).exp());
    // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
    dgate[i] = E::cast_from(d * u * s * (f32::new(1.0) + g * (f32::new(1.0) - s)));
    dup[i] = E::cast_from(d * g * s);
}

fn elementwise_dims<R: CubeRuntime>(t: &CubeTensor<R>) -> (CubeCount, CubeDim) {
    let n = t.shape().num_elements();
    let dim = CubeDim::new(&t.client, n);
    (calculate_cube_count_elemwise(&t.client, n, dim), dim)
}

fn empty_like<R: CubeRuntime>(t: &CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    empty_device_dtype(t.client.clone(), t.device.clone(), t.shape(), dtype)
}

fn empty<R: CubeRuntime>(t: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_dtype(t.client.clone(), t.device.clone(), shape, dtype)
}

/// `silu(gate) ⊙ up` (same shape and dtype).
pub(super) fn swiglu_fwd<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let (gate, up) = (into_contiguous(gate), into_contiguous(up));
    let out = empty_like(&gate, gate.dtype);
    let (count, dim) = elementwise_dims(&out);
    let dtype = gate.dtype;
    unsafe {
        swiglu_fwd_kernel::launch_unchecked::<R>(
            &out.client.clone(),
            count,
            dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    out
}

/// `[dgate, dup]` of [`swiglu_fwd`].
pub(super) fn swiglu_bwd<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    dy: CubeTensor<R>,
) -> [CubeTensor<R>; 2] {
    let (gate, up, dy) = (
        into_contiguous(gate),
        into_contiguous(up),
        into_contiguous(dy),
    );
    let dtype = gate.dtype;
    let (dg, du) = (empty_like(&gate, dtype), empty_like(&gate, dtype));
    let (count, dim) = elementwise_dims(&dg);
    unsafe {
        swiglu_bwd_kernel::launch_unchecked::<R>(
            &dg.client.clone(),
            count,
            dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            dy.into_tensor_arg(),
            dg.clone().into_tensor_arg(),
            du.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    [dg, du]
}

// ---- RMSNorm ---------------------------------------------------------------------------------

/// Threads per row of the RMSNorm kernels (a power of two, for the tree reduction).
const NORM_THREADS: u32 = 256;
/// Cubes along x at most (wgpu's limit per dimension is 65535); rows beyond go to y.
const MAX_CUBES_X: u32 = 32768;

/// Sum (or with `max`, the maximum) of `partial` over the cube's units (shared-memory tree),
/// returned to every unit.
#[cube]
fn cube_reduce(partial: f32, #[comptime] threads: u32, #[comptime] max: bool) -> f32 {
    let t = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(threads as usize);
    shared[t] = partial;
    sync_cube();
    // A runtime variable (the cube's width, = `threads`): a comptime value cannot be mutated.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if t < stride {
            if max {
                shared[t] = f32::max(shared[t], shared[t + stride]);
            } else {
                shared[t] = shared[t] + shared[t + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

#[cube]
fn cube_sum(partial: f32, #[comptime] threads: u32) -> f32 {
    cube_reduce(partial, threads, false)
}

#[cube]
fn cube_max(partial: f32, #[comptime] threads: u32) -> f32 {
    cube_reduce(partial, threads, true)
}

#[cube(launch_unchecked)]
fn rms_norm_fwd_kernel<E: Float, W: Float>(
    x: &Tensor<E>,
    w: &Tensor<W>,
    y: &mut Tensor<E>,
    rstd: &mut Tensor<f32>,
    rows: u32,
    eps: f32,
    inv_d: f32,
    #[comptime] threads: u32,
    #[define(E, W)] _dtypes: [StorageType; 2],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let d = w.len();
    let base = row * d;
    let t = UNIT_POS_X as usize;
    let mut acc = f32::new(0.0);
    let mut j = t;
    while j < d {
        let v = f32::cast_from(x[base + j]);
        acc += v * v;
        j += threads as usize;
    }
    let r = f32::new(1.0) / (cube_sum(acc, threads) * inv_d + eps).sqrt();
    if t == 0 {
        rstd[row] = r;
    }
    let mut j = t;
    while j < d {
        // The normalised value is rounded to the activations' dtype before the weight, as in
        // transformers' LlamaRMSNorm (`weight * hidden.to(input_dtype)`).
        let normed = f32::cast_from(E::cast_from(f32::cast_from(x[base + j]) * r));
        y[base + j] = E::cast_from(f32::cast_from(w[j]) * normed);
        j += threads as usize;
    }
}

#[cube(launch_unchecked)]
fn rms_norm_bwd_kernel<E: Float, W: Float>(
    x: &Tensor<E>,
    w: &Tensor<W>,
    rstd: &Tensor<f32>,
    dy: &Tensor<E>,
    dx: &mut Tensor<E>,
    rows: u32,
    inv_d: f32,
    #[comptime] threads: u32,
    #[define(E, W)] _dtypes: [StorageType; 2],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let d = w.len();
    let base = row * d;
    let t = UNIT_POS_X as usize;
    let r = rstd[row];
    let mut acc = f32::new(0.0);
    let mut j = t;
    while j < d {
        let g = f32::cast_from(dy[base + j]) * f32::cast_from(w[j]);
        acc += g * f32::cast_from(x[base + j]) * r;
        j += threads as usize;
    }
    let dot = cube_sum(acc, threads) * inv_d;
    let mut j = t;
    while j < d {
        let g = f32::cast_from(dy[base + j]) * f32::cast_from(w[j]);
        let xhat = f32::cast_from(x[base + j]) * r;
        dx[base + j] = E::cast_from((g - xhat * dot) * r);
        j += threads as usize;
    }
}

fn row_cubes(rows: usize) -> CubeCount {
    let rows = rows as u32;
    let x = rows.clamp(1, MAX_CUBES_X);
    CubeCount::Static(x, rows.div_ceil(x).max(1), 1)
}

/// RMSNorm of the rows of `x` `[n, d]` with weight `w` `[d]`: the output (x's dtype) and each
/// row's `1/rms` (`[n]`, f32).
pub(super) fn rms_norm_fwd<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    let [n, d] = x.shape().dims::<2>();
    let y = empty_like(&x, x.dtype);
    let rstd = empty(&x, Shape::new([n]), DType::F32);
    let (xd, wd) = (x.dtype, w.dtype);
    unsafe {
        rms_norm_fwd_kernel::launch_unchecked::<R>(
            &x.client.clone(),
            row_cubes(n),
            CubeDim::new_1d(NORM_THREADS),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            n as u32,
            eps as f32,
            1.0 / d as f32,
            NORM_THREADS,
            [xd.into(), wd.into()],
        );
    }
    (y, rstd)
}

/// The input gradient of [`rms_norm_fwd`] (the weight's gradient, a column sum, is left to the
/// backend's reduction).
pub(super) fn rms_norm_bwd_x<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    rstd: CubeTensor<R>,
    dy: CubeTensor<R>,
) -> CubeTensor<R> {
    let (x, w, rstd, dy) = (
        into_contiguous(x),
        into_contiguous(w),
        into_contiguous(rstd),
        into_contiguous(dy),
    );
    let [n, d] = x.shape().dims::<2>();
    let dx = empty_like(&x, x.dtype);
    let (xd, wd) = (x.dtype, w.dtype);
    unsafe {
        rms_norm_bwd_kernel::launch_unchecked::<R>(
            &x.client.clone(),
            row_cubes(n),
            CubeDim::new_1d(NORM_THREADS),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            rstd.into_tensor_arg(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            n as u32,
            1.0 / d as f32,
            NORM_THREADS,
            [xd.into(), wd.into()],
        );
    }
    dx
}

// ---- AdamW -----------------------------------------------------------------------------------

#[derive(CubeLaunch, CubeType, Clone, Copy)]
struct AdamWArgs {
    beta_1: f32,
    beta_2: f32,
    one_minus_beta_1: f32,
    one_minus_beta_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    keep: f32,
    lr: f32,
}

#[cube(launch_unchecked)]
fn adamw_kernel(
    param: &Tensor<f32>,
    grad: &Tensor<f32>,
    m: &Tensor<f32>,
    v: &Tensor<f32>,
    param_out: &mut Tensor<f32>,
    m_out: &mut Tensor<f32>,
    v_out: &mut Tensor<f32>,
    args: &AdamWArgs,
    #[comptime] first: bool,
    #[comptime] decay: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= param_out.len() {
        terminate!();
    }
    let g = grad[i];
    let mut mi = g * args.one_minus_beta_1;
    let mut vi = g * g * args.one_minus_beta_2;
    if !first {
        mi = m[i] * args.beta_1 + mi;
        vi = v[i] * args.beta_2 + vi;
    }
    let delta = (mi / args.correction_1) / ((vi / args.correction_2).sqrt() + args.epsilon);
    let mut p = param[i];
    if decay {
        p *= args.keep;
    }
    param_out[i] = p - delta * args.lr;
    m_out[i] = mi;
    v_out[i] = vi;
}

/// One AdamW update in one pass (f32 tensors only: the parameter, gradient and moments); the
/// arithmetic of burn's `AdamW`, as the CPU kernel (`cpu.rs`).
pub(super) fn adamw<R: CubeRuntime>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    moments: Option<(CubeTensor<R>, CubeTensor<R>)>,
    h: AdamWStep,
) -> Option<[CubeTensor<R>; 3]> {
    let f32_only = [&param, &grad]
        .into_iter()
        .chain(moments.iter().flat_map(|(m, v)| [m, v]))
        .all(|t| t.dtype == DType::F32);
    if !f32_only {
        return None;
    }
    let (param, grad) = (into_contiguous(param), into_contiguous(grad));
    let first = moments.is_none();
    // On the first step the kernel does not read the moments: pass the gradient in their place.
    let (m, v) = match moments {
        Some((m, v)) => (into_contiguous(m), into_contiguous(v)),
        None => (grad.clone(), grad.clone()),
    };
    let out = || empty_like(&param, DType::F32);
    let (po, mo, vo) = (out(), out(), out());
    let decay_rate = h.lr * h.weight_decay as f64;
    let (count, dim) = elementwise_dims(&po);
    unsafe {
        adamw_kernel::launch_unchecked::<R>(
            &po.client.clone(),
            count,
            dim,
            param.into_tensor_arg(),
            grad.into_tensor_arg(),
            m.into_tensor_arg(),
            v.into_tensor_arg(),
            po.clone().into_tensor_arg(),
            mo.clone().into_tensor_arg(),
            vo.clone().into_tensor_arg(),
            AdamWArgsLaunch::new(
                h.beta_1,
                h.beta_2,
                1.0 - h.beta_1,
                1.0 - h.beta_2,
                1f32 - h.beta_1.powi(h.time as i32),
                1f32 - h.beta_2.powi(h.time as i32),
                h.epsilon,
                (1.0 - decay_rate) as f32,
                h.lr as f32,
            ),
            first,
            decay_rate != 0.0,
        );
    }
    Some([po, mo, vo])
}

// ---- RoPE and the head layout ----------------------------------------------------------------

/// The token ↔ head layout change of attention's inputs, with RoPE when `rotate`; `cos`/`sin`
/// `[s, hd]` give each position's rotation in its sequence.
///
/// - `to_heads`: token rows `x` `[b·s, n·hd]` → heads `out` `[b, n, s, hd]`, RoPE
///   `x·cos + rotate_half(x)·sin`;
/// - otherwise: heads `x` `[b, n, s, hd]` → token rows `out` `[b·s, n·hd]`, RoPE's transpose (the
///   gradient of the input): `dx₁ = dy₁·cos₁ + dy₂·sin₂`, `dx₂ = dy₂·cos₂ − dy₁·sin₁`.
///
/// In f32, rounded once to out's dtype.
#[cube(launch_unchecked)]
fn layout_kernel<E: Float, C: Float, O: Float>(
    x: &Tensor<E>,
    cos: &Tensor<C>,
    sin: &Tensor<C>,
    out: &mut Tensor<O>,
    seq: u32,
    heads: u32,
    head_dim: u32,
    #[comptime] rotate: bool,
    #[comptime] to_heads: bool,
    #[define(E, C, O)] _dtypes: [StorageType; 3],
) {
    let o = ABSOLUTE_POS;
    if o >= out.len() {
        terminate!();
    }
    let (s, n, hd) = (seq as usize, heads as usize, head_dim as usize);
    let d = o % hd;
    let t = o / hd;
    // The element's position in its sequence, and where its head's row starts in `x`.
    let pos = if to_heads { t % s } else { (t / n) % s };
    let src = if to_heads {
        let bh = t / s;
        ((bh / n) * s + pos) * (n * hd) + (bh % n) * hd
    } else {
        (((t / n / s) * n + t % n) * s + pos) * hd
    };
    let v = f32::cast_from(x[src + d]);
    if rotate {
        let half = hd / 2;
        let row = pos * hd;
        // The partner element (the other half) and its sign; forward, the partner's term takes
        // sin at d, transposed at the partner's index and with the opposite sign.
        let mut pd = d + half;
        let mut sign = f32::new(-1.0);
        if d >= half {
            pd = d - half;
            sign = f32::new(1.0);
        }
        let sd = if to_heads { d } else { pd };
        if !to_heads {
            sign = f32::new(0.0) - sign;
        }
        let partner = f32::cast_from(x[src + pd]) * f32::cast_from(sin[row + sd]);
        out[o] = O::cast_from(v * f32::cast_from(cos[row + d]) + sign * partner);
    } else {
        out[o] = O::cast_from(v);
    }
}

/// [`layout_kernel`]'s launch: `x` to `shape` in `dtype`.
fn layout<R: CubeRuntime>(
    x: CubeTensor<R>,
    tables: Option<(&CubeTensor<R>, &CubeTensor<R>)>,
    [b, n, s, hd]: [usize; 4],
    dtype: DType,
    to_heads: bool,
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let shape = match to_heads {
        true => Shape::new([b, n, s, hd]),
        false => Shape::new([b * s, n * hd]),
    };
    let out = empty(&x, shape, dtype);
    let (cos, sin) = match tables {
        Some((c, s)) => (into_contiguous(c.clone()), into_contiguous(s.clone())),
        // Not read: any tensor of the kernel's arity.
        None => (x.clone(), x.clone()),
    };
    let (count, dim) = elementwise_dims(&out);
    let dtypes = [x.dtype.into(), cos.dtype.into(), dtype.into()];
    unsafe {
        layout_kernel::launch_unchecked::<R>(
            &out.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            s as u32,
            n as u32,
            hd as u32,
            tables.is_some(),
            to_heads,
            dtypes,
        );
    }
    out
}

/// Token rows `[b·s, n·hd]` → heads `[b, n, s, hd]` (same dtype), roped with `tables`
/// (`cos`, `sin` `[s, hd]`) when given: one read and one write instead of burn's copy for the
/// transpose and six kernels for RoPE.
pub(super) fn to_heads<R: CubeRuntime>(
    x: CubeTensor<R>,
    tables: Option<(&CubeTensor<R>, &CubeTensor<R>)>,
    dims: [usize; 4],
) -> CubeTensor<R> {
    let dtype = x.dtype;
    layout(x, tables, dims, dtype, true)
}

/// Heads `[b, n, s, hd]` → token rows `[b·s, n·hd]` in `dtype`, through RoPE's transpose when
/// `tables` are given (the inverse layout of [`to_heads`], for the gradients).
pub(super) fn to_tokens<R: CubeRuntime>(
    x: CubeTensor<R>,
    tables: Option<(&CubeTensor<R>, &CubeTensor<R>)>,
    dtype: DType,
) -> CubeTensor<R> {
    let dims = x.shape().dims::<4>();
    layout(x, tables, dims, dtype, false)
}

// ---- Cross-entropy ---------------------------------------------------------------------------

/// A finite stand-in for −∞ (WGSL has no infinite literals): below any logit.
const LOWEST: f32 = -3.0e38;

/// One cube per row of `logits` `[rows, vocab]`: the row's log-sum-exp (f32, one pass with a
/// running max per unit) and its weighted loss `(lse − logits[target])·weight`.
#[cube(launch_unchecked)]
fn ce_fwd_kernel<E: Float, I: Numeric>(
    logits: &Tensor<E>,
    targets: &Tensor<I>,
    weights: &Tensor<f32>,
    lse: &mut Tensor<f32>,
    loss: &mut Tensor<f32>,
    rows: u32,
    vocab: u32,
    #[comptime] threads: u32,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let v = vocab as usize;
    let base = row * v;
    let t = UNIT_POS_X as usize;
    let mut m = f32::new(LOWEST);
    let mut sum = f32::new(0.0);
    let mut j = t;
    while j < v {
        let x = f32::cast_from(logits[base + j]);
        if x > m {
            sum = sum * (m - x).exp() + f32::new(1.0);
            m = x;
        } else {
            sum += (x - m).exp();
        }
        j += threads as usize;
    }
    let top = cube_max(m, threads);
    let total = cube_sum(sum * (m - top).exp(), threads);
    if t == 0 {
        let l = top + total.ln();
        let picked = f32::cast_from(logits[base + usize::cast_from(targets[row])]);
        lse[row] = l;
        loss[row] = (l - picked) * weights[row];
    }
}

/// The logits' gradient `(exp(x − lse) − [j = target])·weight·dloss`, one element per unit,
/// written over the logits in their dtype (each unit reads its element, then overwrites it).
#[cube(launch_unchecked)]
fn ce_bwd_kernel<E: Float, I: Numeric>(
    logits: &mut Tensor<E>,
    targets: &Tensor<I>,
    weights: &Tensor<f32>,
    lse: &Tensor<f32>,
    dloss: &Tensor<f32>,
    vocab: u32,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    if i >= logits.len() {
        terminate!();
    }
    let v = vocab as usize;
    let row = i / v;
    let w = weights[row] * dloss[0];
    let mut g = (f32::cast_from(logits[i]) - lse[row]).exp();
    if i % v == usize::cast_from(targets[row]) {
        g -= f32::new(1.0);
    }
    logits[i] = E::cast_from(g * w);
}

/// Threads per row of the cross-entropy forward (a power of two).
const CE_THREADS: u32 = 256;

/// Cross-entropy forward over the rows of `logits` `[rows, vocab]` (any float dtype, read once,
/// never copied to f32): each row's weighted loss and log-sum-exp (`[rows]`, f32). `targets`
/// `[rows]` (int), `weights` `[rows]` (f32).
pub(super) fn ce_fwd<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    weights: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (logits, targets, weights) = (
        into_contiguous(logits),
        into_contiguous(targets),
        into_contiguous(weights),
    );
    let [rows, vocab] = logits.shape().dims::<2>();
    let lse = empty(&logits, Shape::new([rows]), DType::F32);
    let loss = empty(&logits, Shape::new([rows]), DType::F32);
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    unsafe {
        ce_fwd_kernel::launch_unchecked::<R>(
            &logits.client.clone(),
            row_cubes(rows),
            CubeDim::new_1d(CE_THREADS),
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            weights.into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            loss.clone().into_tensor_arg(),
            rows as u32,
            vocab as u32,
            CE_THREADS,
            dtypes,
        );
    }
    (loss, lse)
}

/// The gradient of [`ce_fwd`]'s summed loss for an upstream gradient `dloss` (`[1]`, f32),
/// written once in the logits' dtype (no f32 copy, no one-hot, no scatter), over the logits
/// themselves when nothing else holds them.
pub(super) fn ce_bwd<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    weights: CubeTensor<R>,
    lse: CubeTensor<R>,
    dloss: CubeTensor<R>,
) -> CubeTensor<R> {
    let [logits, targets, weights, lse, dloss] =
        [logits, targets, weights, lse, dloss].map(into_contiguous);
    let vocab = logits.shape().dims::<2>()[1];
    // Nothing else holds the logits in the model (the loss's backward is their last use): the
    // gradient takes their place, so the loss's backward needs no second `[tokens, vocab]`.
    // Otherwise it goes to a copy.
    let grad = match logits.can_mut() {
        true => logits,
        false => logits.copy(),
    };
    let dtypes = [grad.dtype.into(), targets.dtype.into()];
    let (count, dim) = elementwise_dims(&grad);
    unsafe {
        ce_bwd_kernel::launch_unchecked::<R>(
            &grad.client.clone(),
            count,
            dim,
            grad.clone().into_tensor_arg(),
            targets.into_tensor_arg(),
            weights.into_tensor_arg(),
            lse.into_tensor_arg(),
            dloss.into_tensor_arg(),
            vocab as u32,
            dtypes,
        );
    }
    grad
}

// ---- Attention: the softmax of a block of scores ---------------------------------------------

/// Where a block of attention scores lies (see `tiled::Block`): rows are the block's query
/// positions `i0 + row mod n` (`rows` in all: batch × K/V heads × `rep·n`), columns the keys
/// `k0..k0+kl`; `window` 0 means none.
#[derive(CubeLaunch, CubeType, Clone, Copy)]
struct BlockArgs {
    rows: u32,
    i0: u32,
    n: u32,
    k0: u32,
    kl: u32,
    window: u32,
    scale: f32,
}

/// Whether query position `i` sees key position `j` (causal, sliding window).
// Nested `if`s: a branch in the kernel, not a short-circuit `&&` the kernel compiler would lower.
#[allow(clippy::collapsible_if)]
#[cube]
fn visible(i: usize, j: usize, window: usize) -> bool {
    let mut seen = j <= i;
    if window > 0 {
        if j + window <= i {
            seen = false;
        }
    }
    seen
}

/// One cube per row of scores: the row's log-sum-exp over the visible keys (running max per
/// unit, then a max and a sum across the cube) and the probabilities `exp(scale·s − lse)` (0 where
/// masked) in the scores' dtype.
#[cube(launch_unchecked)]
fn block_softmax_fwd_kernel<E: Float>(
    scores: &Tensor<E>,
    p: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    args: &BlockArgs,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= args.rows as usize {
        terminate!();
    }
    let kl = args.kl as usize;
    let (k0, window) = (args.k0 as usize, args.window as usize);
    let i = args.i0 as usize + row % args.n as usize;
    let base = row * kl;
    let t = UNIT_POS_X as usize;
    let mut m = f32::new(LOWEST);
    let mut sum = f32::new(0.0);
    let mut jj = t;
    while jj < kl {
        if visible(i, k0 + jj, window) {
            let x = f32::cast_from(scores[base + jj]) * args.scale;
            if x > m {
                sum = sum * (m - x).exp() + f32::new(1.0);
                m = x;
            } else {
                sum += (x - m).exp();
            }
        }
        jj += threads as usize;
    }
    let top = cube_max(m, threads);
    let l = top + cube_sum(sum * (m - top).exp(), threads).ln();
    if t == 0 {
        lse[row] = l;
    }
    let mut jj = t;
    while jj < kl {
        let mut v = f32::new(0.0);
        if visible(i, k0 + jj, window) {
            v = (f32::cast_from(scores[base + jj]) * args.scale - l).exp();
        }
        p[base + jj] = E::cast_from(v);
        jj += threads as usize;
    }
}

/// One element per unit: the probability recomputed from the score and the row's log-sum-exp,
/// and the score's gradient `p·(dp − D)·scale` (0 where masked), both in the scores' dtype.
#[cube(launch_unchecked)]
fn block_softmax_bwd_kernel<E: Float>(
    scores: &Tensor<E>,
    dp: &Tensor<E>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    p: &mut Tensor<E>,
    ds: &mut Tensor<E>,
    args: &BlockArgs,
    #[define(E)] _dtype: StorageType,
) {
    let idx = ABSOLUTE_POS;
    if idx >= p.len() {
        terminate!();
    }
    let kl = args.kl as usize;
    let row = idx / kl;
    let i = args.i0 as usize + row % args.n as usize;
    let j = args.k0 as usize + idx % kl;
    let mut pv = f32::new(0.0);
    let mut dv = f32::new(0.0);
    if visible(i, j, args.window as usize) {
        pv = (f32::cast_from(scores[idx]) * args.scale - lse[row]).exp();
        dv = pv * (f32::cast_from(dp[idx]) - delta[row]) * args.scale;
    }
    p[idx] = E::cast_from(pv);
    ds[idx] = E::cast_from(dv);
}

/// Threads per row of the attention block softmax (a power of two; rows are at most a sequence
/// long).
const SOFTMAX_THREADS: u32 = 128;

fn block_args<R: CubeRuntime>(
    scores: &CubeTensor<R>,
    (i0, n, k0): (usize, usize, usize),
    window: Option<usize>,
    scale: f64,
) -> BlockArgsLaunch<R> {
    let dims = scores.shape();
    let kl = dims[dims.num_dims() - 1];
    let rows = dims.num_elements() / kl.max(1);
    BlockArgsLaunch::new(
        rows as u32,
        i0 as u32,
        n as u32,
        k0 as u32,
        kl as u32,
        window.unwrap_or(0) as u32,
        scale as f32,
    )
}

/// The forward of `tiled::BlockSoftmax` in one kernel: probabilities (scores' dtype, scores'
/// shape `[.., kl]`) and each row's log-sum-exp (`[.., 1]`, f32).
pub(super) fn block_softmax_fwd<R: CubeRuntime>(
    scores: CubeTensor<R>,
    block: (usize, usize, usize),
    window: Option<usize>,
    scale: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let scores = into_contiguous(scores);
    let shape = scores.shape();
    let args = block_args(&scores, block, window, scale);
    let rows = shape.num_elements() / shape[shape.num_dims() - 1].max(1);
    let mut lse_shape = shape.clone();
    let last = lse_shape.num_dims() - 1;
    lse_shape[last] = 1;
    let p = empty_like(&scores, scores.dtype);
    let lse = empty(&scores, lse_shape, DType::F32);
    let dtype = scores.dtype;
    unsafe {
        block_softmax_fwd_kernel::launch_unchecked::<R>(
            &p.client.clone(),
            row_cubes(rows),
            CubeDim::new_1d(SOFTMAX_THREADS),
            scores.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            args,
            SOFTMAX_THREADS,
            dtype.into(),
        );
    }
    (p, lse)
}

/// The backward of `tiled::BlockSoftmax` in one kernel: `[p, ds]` in the scores' dtype.
pub(super) fn block_softmax_bwd<R: CubeRuntime>(
    scores: CubeTensor<R>,
    dp: CubeTensor<R>,
    lse: CubeTensor<R>,
    delta: CubeTensor<R>,
    block: (usize, usize, usize),
    window: Option<usize>,
    scale: f64,
) -> [CubeTensor<R>; 2] {
    let [scores, dp, lse, delta] = [scores, dp, lse, delta].map(into_contiguous);
    let args = block_args(&scores, block, window, scale);
    let dtype = scores.dtype;
    let (p, ds) = (empty_like(&scores, dtype), empty_like(&scores, dtype));
    let (count, dim) = elementwise_dims(&p);
    unsafe {
        block_softmax_bwd_kernel::launch_unchecked::<R>(
            &p.client.clone(),
            count,
            dim,
            scores.into_tensor_arg(),
            dp.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            args,
            dtype.into(),
        );
    }
    [p, ds]
}
