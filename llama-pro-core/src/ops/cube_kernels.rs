//! Fused kernels written in CubeCL: one source compiled at run time to CUDA C (NVRTC) and to
//! WGSL/SPIR-V (wgpu), so the kernel tested on Mesa's lavapipe in CI is the one that runs on an
//! NVIDIA GPU.
//!
//! What they replace, and why it is faster: the unfused CubeCL backend runs each burn op as its
//! own kernel with a full read and write of the tensor. RMSNorm composed is 8 kernels forward and
//! as many backward with f32 temporaries of the whole activation; SwiGLU forward/backward 4 and 8;
//! AdamW about 15 per parameter. Each kernel here reads its inputs once and writes its outputs
//! once, with the arithmetic in f32 whatever the storage dtype (f32, bf16, f16).
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

/// Sum of `partial` over the cube's units (shared-memory tree), returned to every unit.
#[cube]
fn cube_sum(partial: f32, #[comptime] threads: u32) -> f32 {
    let t = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(threads as usize);
    shared[t] = partial;
    sync_cube();
    // A runtime variable (the cube's width, = `threads`): a comptime value cannot be mutated.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if t < stride {
            shared[t] = shared[t] + shared[t + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
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
