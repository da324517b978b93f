//! f32 kernels for burn's `Flex` CPU backend (see the module above for why they exist).
//!
//! Written by hand because burn 0.21 has no fused CPU ops for these, and what the composed form
//! costs on Flex was measured (`benches/compare_torch.py`, README "Performance"). Conventions:
//! tensors are read as contiguous row-major f32 (made contiguous first when they are views);
//! matrix products go through the `gemm` crate (the library burn-flex itself uses, here with its
//! AVX-512 kernels enabled), with strides instead of copies where a head or a transpose is a
//! strided view; work is split over rayon's pool (burn-flex's); every other dtype returns `None`
//! so that the composed form runs.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use super::kernel::KernelBackend;
use super::{AdamWStep, AttentionShape};

/// Rows per parallel chunk for row-wise kernels: a few chunks per thread.
fn rows_per_chunk(rows: usize) -> usize {
    let parts = rayon::current_num_threads() * 4;
    rows.div_ceil(parts).max(1)
}

/// Whether a forward kernel applies: kernels on, every input f32.
fn is_f32(ts: &[&FlexTensor]) -> bool {
    super::kernels_enabled() && ts.iter().all(|t| t.dtype() == DType::F32)
}

/// The tensor itself when it is a contiguous f32 buffer, else a contiguous copy.
fn contig(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn vals(t: &FlexTensor) -> &[f32] {
    // `contig` guarantees this.
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    let s = t.layout().shape();
    (0..s.num_dims()).map(|i| s[i]).collect()
}

fn tensor(v: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// A zero-free buffer for an output that `fill` writes completely (through the pointer): skips
/// the memset of `vec![0.0; n]` for gemm outputs (2.5% of a step).
fn written(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(n);
    fill(v.spare_capacity_mut().as_mut_ptr().cast());
    // SAFETY: `fill` initialised all `n` elements (every caller writes each output element).
    unsafe { v.set_len(n) };
    v
}

/// Defines `fn name(args) -> ret` whose body is compiled three times, for AVX-512, for AVX2+FMA
/// and for the baseline, and picked at run time: the crate is built for baseline x86-64 (SSE2)
/// so that one binary runs everywhere, which leaves the element-wise loops (exp, RoPE, norms)
/// 4 lanes wide unless a function is compiled with wider target features. The body must only
/// call `#[inline(always)]` helpers for them to be compiled with the same features.
macro_rules! simd_fn {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// A pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `c[m×n] (+)= a[m×k] · b[k×n]`, each matrix given by its first element and its (row, column)
/// strides in elements; `acc` adds to `c` instead of overwriting it; `par` lets gemm use the
/// thread pool (for large products called from one thread).
///
/// # Safety
/// The pointers must be valid for the extents the strides describe, and `c` must not alias
/// `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: gemm might not touch `c`, which callers may pass uninitialised.
        if !acc {
            for i in 0..m {
                for j in 0..n {
                    unsafe { *c.add(i * c_rs + j) = 0.0 };
                }
            }
        }
        return;
    }
    let parallelism = if par && m * n * k >= 1 << 22 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            acc,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Rows up to which a decoding step's linear layers use [`skinny_linear`].
const DECODE_ROWS: usize = 4;

/// `y[n, m] = x[n, k] · wᵀ` for a few rows `n` (decoding steps): each weight row is read once
/// and dotted with every input row while it is in L1, weight rows split across threads.
/// Decoding one sequence reads every weight at every step, so this is bound by memory
/// bandwidth, where gemm first packs the weight panels (an extra pass over them). Measured on
/// SmolLM2-135M, 2-core Xeon: a one-row decoding step 80 → 60 ms (generate 15 → 17 tokens/s);
/// from ~8 rows on gemm is faster (16 rows: 0.30 s with gemm, 0.35 s here), hence `DECODE_ROWS`.
fn skinny_linear(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    simd_fn! {
        fn rows(x: &[f32], w: &[f32], n: usize, k: usize, lo: usize, out: &mut [f32]) {
            // `out` holds weight rows lo.. for every input row: [rows, n].
            for (j, wr) in w[lo * k..].chunks_exact(k).take(out.len() / n).enumerate() {
                for r in 0..n {
                    out[j * n + r] = dot(&x[r * k..(r + 1) * k], wr);
                }
            }
        }
    }
    // Weight rows per task: about 64 KB of weights.
    let block = (16_384 / k.max(1)).clamp(1, m.max(1));
    let mut t = vec![0f32; m * n];
    t.par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(b, out)| rows(x, w, n, k, b * block, out));
    if n == 1 {
        return t;
    }
    // [m, n] → [n, m]
    let mut y = vec![0f32; n * m];
    for j in 0..m {
        for r in 0..n {
            y[r * m + j] = t[j * n + r];
        }
    }
    y
}

/// `e^x` to about 2 ulp, written so that loops over it vectorise (glibc's `expf` is a scalar
/// call): `2^k · p(r)` with `k = round(x·log₂e)` by the 1.5·2²³ trick, `r = x − k·ln2` in two
/// parts (Cody–Waite) and a degree-6 Taylor polynomial on `|r| ≤ ln2/2`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ki = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((ki.wrapping_add(127) << 23) as u32)
}

/// `Σ a_i b_i` with 16 independent accumulators (vectorises; also more accurate than one).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y = rope(x)` for one row (rotate-half form, see `crate::rope`).
#[inline(always)]
fn rope_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
    let h = x.len() / 2;
    for i in 0..h {
        y[i] = x[i] * c[i] - x[i + h] * s[i];
        y[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
}

/// `dx = ropeᵀ(dy)` for one row (the transposed rotation).
#[inline(always)]
fn rope_t_row(dy: &[f32], c: &[f32], s: &[f32], dx: &mut [f32]) {
    let h = dy.len() / 2;
    for i in 0..h {
        dx[i] = dy[i] * c[i] + dy[i + h] * s[i + h];
        dx[i + h] = dy[i + h] * c[i + h] - dy[i] * s[i];
    }
}

/// Query rows per block in attention: keys past the block's last row are never computed.
const ATT_BLOCK: usize = 64;

/// The keys `[lo, hi)` that queries `i0..i1` may see (causal, optional window).
fn key_range(i0: usize, i1: usize, window: Option<usize>) -> (usize, usize) {
    let lo = window.map_or(0, |w| (i0 + 1).saturating_sub(w));
    (lo, i1)
}

/// Largest element (16 lanes, vectorises).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let c = x.chunks_exact(16);
    let rest = c.remainder();
    for ch in c {
        for i in 0..16 {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

/// `x ← exp(x − m)`, returning the sum (16 lanes).
#[inline(always)]
fn exp_in_place(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut c = x.chunks_exact_mut(16);
    for ch in &mut c {
        for i in 0..16 {
            ch[i] = exp(ch[i] - m);
            acc[i] += ch[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in c.into_remainder() {
        *v = exp(*v - m);
        s += *v;
    }
    s
}

/// `Σ exp(x − m)` (16 lanes).
#[inline(always)]
fn sum_exp(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let c = x.chunks_exact(16);
    let rest = c.remainder();
    for ch in c {
        for i in 0..16 {
            acc[i] += exp(ch[i] - m);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&a| exp(a - m)).sum::<f32>()
}

/// Columns `[a, b)` (relative to key `lo`) that query `i` sees.
#[inline(always)]
fn visible_cols(i: usize, lo: usize, window: Option<usize>) -> (usize, usize) {
    let first = window.map_or(0, |w| (i + 1).saturating_sub(w)).max(lo);
    (first - lo, i + 1 - lo)
}

simd_fn! {
    /// `dst[t] = rope(src[t·stride..][..hd])` for every `hd`-row `t` of `dst`.
    fn rope_rows(src: &[f32], stride: usize, hd: usize, cos: &[f32], sin: &[f32], dst: &mut [f32]) {
        for (t, y) in dst.chunks_exact_mut(hd).enumerate() {
            rope_row(&src[t * stride..][..hd], &cos[t * hd..][..hd], &sin[t * hd..][..hd], y);
        }
    }
}

simd_fn! {
    /// Row `t` of `dst` (row stride `stride`, a shared output) `= ropeᵀ(src[t])`.
    fn rope_t_rows(src: &[f32], hd: usize, cos: &[f32], sin: &[f32], dst: Shared, stride: usize) {
        for (t, x) in src.chunks_exact(hd).enumerate() {
            // SAFETY: the caller owns these `hd` elements of every row.
            let y = unsafe { std::slice::from_raw_parts_mut(dst.0.add(t * stride), hd) };
            rope_t_row(x, &cos[t * hd..][..hd], &sin[t * hd..][..hd], y);
        }
    }
}

simd_fn! {
    /// Scores of queries `i0..` (rows of `p`, `nk` keys from `lo`) → softmax probabilities of
    /// `scale ·` scores over the visible keys (others 0); `lse[r]` gets each row's
    /// log-sum-exp.
    fn softmax_block(p: &mut [f32], nk: usize, i0: usize, lo: usize, window: Option<usize>, scale: f32, lse: &mut [f32]) {
        for (r, row) in p.chunks_exact_mut(nk).enumerate() {
            let (a, b) = visible_cols(i0 + r, lo, window);
            let vis = &mut row[a..b];
            for x in vis.iter_mut() {
                *x *= scale;
            }
            let m = max_of(vis);
            let sum = exp_in_place(vis, m);
            let inv = 1.0 / sum;
            for x in vis.iter_mut() {
                *x *= inv;
            }
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            lse[r] = m + sum.ln();
        }
    }
}

simd_fn! {
    /// Recomputed scores `p` and `dp = dO·vᵀ` of queries `i0..` → `p = P` and `dp = dS =
    /// P ⊙ (dP − rowsum(dO ⊙ O)) · scale` (0 outside the visible keys). `o`, `d_o`: the head's
    /// output and its gradient from row `i0`, rows `stride` apart.
    fn ds_block(p: &mut [f32], dp: &mut [f32], nk: usize, i0: usize, lo: usize, window: Option<usize>, scale: f32, lse: &[f32], o: &[f32], d_o: &[f32], stride: usize, hd: usize) {
        for (r, (pr, dpr)) in p.chunks_exact_mut(nk).zip(dp.chunks_exact_mut(nk)).enumerate() {
            let (a, b) = visible_cols(i0 + r, lo, window);
            let di = dot(&o[r * stride..][..hd], &d_o[r * stride..][..hd]);
            let l = lse[r];
            let (pv, dpv) = (&mut pr[a..b], &mut dpr[a..b]);
            for j in 0..pv.len() {
                let pij = exp(pv[j] * scale - l);
                pv[j] = pij;
                dpv[j] = pij * (dpv[j] - di) * scale;
            }
            pr[..a].fill(0.0);
            pr[b..].fill(0.0);
            dpr[..a].fill(0.0);
            dpr[b..].fill(0.0);
        }
    }
}

simd_fn! {
    /// RMSNorm of the rows of `x` (width `w.len()`) into `y`, `1/rms` into `rstd`.
    fn rms_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), rr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(rstd.iter_mut()) {
            let inv = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
            *rr = inv;
            for j in 0..d {
                yr[j] = w[j] * (xr[j] * inv);
            }
        }
    }
}

simd_fn! {
    /// RMSNorm backward over rows: with `x̂ = x·r`, `g = dy ⊙ w`:
    /// `dx = r·(g − x̂·mean(g ⊙ x̂))` (when `dx` is given) and `dw += Σ_rows dy ⊙ x̂` (when
    /// `dw` is not empty).
    fn rms_back_rows(x: &[f32], dy: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], dw: &mut [f32], g: &mut [f32]) {
        let d = w.len();
        for (r, (xr, dyr)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
            let inv = rstd[r];
            if !dw.is_empty() {
                for j in 0..d {
                    dw[j] += dyr[j] * (xr[j] * inv);
                }
            }
            if !dx.is_empty() {
                for j in 0..d {
                    g[j] = dyr[j] * w[j];
                }
                let mean = dot(g, xr) * inv / d as f32;
                let out = &mut dx[r * d..][..d];
                for j in 0..d {
                    out[j] = inv * (g[j] - xr[j] * inv * mean);
                }
            }
        }
    }
}

simd_fn! {
    /// `y = silu(g) ⊙ u`.
    fn swiglu_rows(g: &[f32], u: &[f32], y: &mut [f32]) {
        let (g, u) = (&g[..y.len()], &u[..y.len()]);
        for i in 0..y.len() {
            let x = g[i];
            y[i] = x / (1.0 + exp(-x)) * u[i];
        }
    }
}

simd_fn! {
    /// SwiGLU backward: `du = dy·silu(g)`, `dg = dy·u·σ(g)(1 + g(1 − σ(g)))`.
    fn swiglu_back_rows(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let n = dg.len();
        let (g, u, dy, du) = (&g[..n], &u[..n], &dy[..n], &mut du[..n]);
        for i in 0..n {
            let (x, up, d) = (g[i], u[i], dy[i]);
            let s = 1.0 / (1.0 + exp(-x));
            du[i] = d * x * s;
            dg[i] = d * up * s * (1.0 + x * (1.0 - s));
        }
    }
}

simd_fn! {
    /// AdamW on a chunk (see `KernelBackend::adamw_kernel`); `first`: no moments yet.
    fn adamw_chunk(p: &[f32], g: &[f32], m: &[f32], v: &[f32], first: bool, h: AdamWStep, po: &mut [f32], mo: &mut [f32], vo: &mut [f32]) {
        let n = po.len();
        let (p, g, mo, vo) = (&p[..n], &g[..n], &mut mo[..n], &mut vo[..n]);
        let (f1, f2) = (1.0 - h.beta_1, 1.0 - h.beta_2);
        let c1 = 1f32 - h.beta_1.powi(h.time as i32);
        let c2 = 1f32 - h.beta_2.powi(h.time as i32);
        let decay_rate = h.lr * h.weight_decay as f64;
        let (keep, lr) = ((1.0 - decay_rate) as f32, h.lr as f32);
        let update = |p: f32, mi: f32, vi: f32| {
            let delta = (mi / c1) / ((vi / c2).sqrt() + h.epsilon);
            let decayed = if decay_rate == 0.0 { p } else { p * keep };
            decayed - delta * lr
        };
        if first {
            for i in 0..n {
                let gi = g[i];
                (mo[i], vo[i]) = (gi * f1, gi * gi * f2);
                po[i] = update(p[i], mo[i], vo[i]);
            }
        } else {
            let (m, v) = (&m[..n], &v[..n]);
            for i in 0..n {
                let gi = g[i];
                (mo[i], vo[i]) = (m[i] * h.beta_1 + gi * f1, v[i] * h.beta_2 + gi * gi * f2);
                po[i] = update(p[i], mo[i], vo[i]);
            }
        }
    }
}

simd_fn! {
    /// `x ← w · softmax(x)` from the row's log-sum-exp `l`.
    fn softmax_scaled_in_place(x: &mut [f32], l: f32, w: f32) {
        for v in x.iter_mut() {
            *v = w * exp(*v - l);
        }
    }
}

simd_fn! {
    /// log-sum-exp of a row.
    fn lse_row(x: &[f32]) -> f32 {
        let m = max_of(x);
        m + sum_exp(x, m).ln()
    }
}

simd_fn! {
    /// `d = w · softmax(x)` from the row's log-sum-exp `l`.
    fn softmax_scaled_row(x: &[f32], l: f32, w: f32, d: &mut [f32]) {
        let x = &x[..d.len()];
        for j in 0..d.len() {
            d[j] = w * exp(x[j] - l);
        }
    }
}

impl KernelBackend for Flex {
    fn linear_kernel(x: FlexTensor, w: FlexTensor) -> Option<FlexTensor> {
        if !is_f32(&[&x, &w]) {
            return None;
        }
        let (x, w) = (contig(x), contig(w));
        let ([n, k], [m, k2]) = (dims(&x)[..].try_into().ok()?, dims(&w)[..].try_into().ok()?);
        assert_eq!(k, k2, "linear: input width {k} vs weight [{m}, {k2}]");
        if n <= DECODE_ROWS && super::is_decoding() {
            return Some(tensor(
                skinny_linear(vals(&x), vals(&w), n, m, k),
                vec![n, m],
            ));
        }
        // y[n, m] = x[n, k] · wᵀ: wᵀ is w read with swapped strides (no copy).
        let y = written(n * m, |y| unsafe {
            mm(
                (n, m, k),
                y,
                m,
                false,
                vals(&x).as_ptr(),
                (k, 1),
                vals(&w).as_ptr(),
                (1, k),
                true,
            )
        });
        Some(tensor(y, vec![n, m]))
    }

    fn linear_backward_kernel(
        x: Option<FlexTensor>,
        w: FlexTensor,
        dy: FlexTensor,
        need: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let (w, dy) = (contig(w), contig(dy));
        let (n, m, k) = (dims(&dy)[0], dims(&w)[0], dims(&w)[1]);
        let dx = need[0].then(|| {
            // dx[n, k] = dy[n, m] · w[m, k]
            let dx = written(n * k, |dx| unsafe {
                mm(
                    (n, k, m),
                    dx,
                    k,
                    false,
                    vals(&dy).as_ptr(),
                    (m, 1),
                    vals(&w).as_ptr(),
                    (k, 1),
                    true,
                )
            });
            tensor(dx, vec![n, k])
        });
        let dw = x.filter(|_| need[1]).map(|x| {
            // dw[m, k] = dyᵀ[m, n] · x[n, k], in HF's [out, in] layout directly.
            let x = contig(x);
            let dw = written(m * k, |dw| unsafe {
                mm(
                    (m, k, n),
                    dw,
                    k,
                    false,
                    vals(&dy).as_ptr(),
                    (1, m),
                    vals(&x).as_ptr(),
                    (k, 1),
                    true,
                )
            });
            tensor(dw, vec![m, k])
        });
        [dx, dw]
    }

    fn rms_norm_kernel(x: FlexTensor, w: FlexTensor, eps: f64) -> Option<(FlexTensor, FlexTensor)> {
        if !is_f32(&[&x, &w]) {
            return None;
        }
        let (x, w) = (contig(x), contig(w));
        let [n, d]: [usize; 2] = dims(&x)[..].try_into().ok()?;
        let (xv, wv) = (vals(&x), vals(&w));
        let mut y = vec![0f32; n * d];
        let mut rstd = vec![0f32; n];
        let rows = rows_per_chunk(n);
        y.par_chunks_mut(rows * d)
            .zip(rstd.par_chunks_mut(rows))
            .enumerate()
            .for_each(|(c, (yc, rc))| {
                rms_rows(&xv[c * rows * d..][..yc.len()], wv, eps as f32, yc, rc);
            });
        Some((tensor(y, vec![n, d]), tensor(rstd, vec![n])))
    }

    fn rms_norm_backward_kernel(
        x: FlexTensor,
        w: FlexTensor,
        rstd: FlexTensor,
        dy: FlexTensor,
        need: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let (x, w, rstd, dy) = (contig(x), contig(w), contig(rstd), contig(dy));
        let (n, d) = (dims(&x)[0], dims(&x)[1]);
        let (xv, wv, rv, dyv) = (vals(&x), vals(&w), vals(&rstd), vals(&dy));
        let rows = rows_per_chunk(n);
        let chunks = n.div_ceil(rows);
        let mut dx = vec![0f32; if need[0] { n * d } else { 0 }];
        let dx_len = if need[0] { rows * d } else { 0 };
        let dxp = Shared(dx.as_mut_ptr());
        // One partial dw per chunk, summed after.
        let partials: Vec<Vec<f32>> = (0..chunks)
            .into_par_iter()
            .map(|c| {
                // Capture the whole `Shared` (Sync), not its raw-pointer field.
                #[allow(clippy::redundant_locals)]
                let dxp = dxp;
                let (r0, r1) = (c * rows, ((c + 1) * rows).min(n));
                let mut dw = vec![0f32; if need[1] { d } else { 0 }];
                let mut g = vec![0f32; d];
                let dxc = if dx_len > 0 {
                    // SAFETY: chunk `c` owns rows r0..r1 of dx.
                    unsafe { std::slice::from_raw_parts_mut(dxp.0.add(r0 * d), (r1 - r0) * d) }
                } else {
                    &mut []
                };
                let (xs, dys) = (&xv[r0 * d..r1 * d], &dyv[r0 * d..r1 * d]);
                rms_back_rows(xs, dys, wv, &rv[r0..r1], dxc, &mut dw, &mut g);
                dw
            })
            .collect();
        let dw = need[1].then(|| {
            let mut dw = vec![0f32; d];
            for p in &partials {
                for j in 0..d {
                    dw[j] += p[j];
                }
            }
            tensor(dw, vec![d])
        });
        [need[0].then(|| tensor(dx, vec![n, d])), dw]
    }

    fn swiglu_kernel(gate: FlexTensor, up: FlexTensor) -> Option<FlexTensor> {
        if !is_f32(&[&gate, &up]) {
            return None;
        }
        let (g, u) = (contig(gate), contig(up));
        let shape = dims(&g);
        let (gv, uv) = (vals(&g), vals(&u));
        let mut y = vec![0f32; gv.len()];
        const C: usize = 1 << 14;
        y.par_chunks_mut(C).enumerate().for_each(|(c, yc)| {
            swiglu_rows(&gv[c * C..], &uv[c * C..], yc);
        });
        Some(tensor(y, shape))
    }

    fn swiglu_backward_kernel(
        gate: FlexTensor,
        up: FlexTensor,
        dy: FlexTensor,
        need: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let (g, u, dy) = (contig(gate), contig(up), contig(dy));
        let shape = dims(&g);
        let (gv, uv, dyv) = (vals(&g), vals(&u), vals(&dy));
        let len = gv.len();
        let mut dg = vec![0f32; len];
        let mut du = vec![0f32; len];
        const C: usize = 1 << 14;
        dg.par_chunks_mut(C)
            .zip(du.par_chunks_mut(C))
            .enumerate()
            .for_each(|(c, (dgc, duc))| {
                swiglu_back_rows(&gv[c * C..], &uv[c * C..], &dyv[c * C..], dgc, duc);
            });
        [
            need[0].then(|| tensor(dg, shape.clone())),
            need[1].then(|| tensor(du, shape)),
        ]
    }

    fn attention_kernel(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        sh: AttentionShape,
    ) -> Option<(FlexTensor, FlexTensor)> {
        if !is_f32(&[&q, &k, &v, &cos, &sin]) || !sh.head_dim.is_multiple_of(2) {
            return None;
        }
        let (q, k, v, cos, sin) = (contig(q), contig(k), contig(v), contig(cos), contig(sin));
        let (b, s, h, kvh, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
        let (qs, ks, rep) = (h * hd, kvh * hd, h / kvh);
        let scale = sh.scale as f32;
        let (qv, kv, vv, cv, sv) = (vals(&q), vals(&k), vals(&v), vals(&cos), vals(&sin));
        let mut out = vec![0f32; b * s * qs];
        let mut lse = vec![0f32; b * h * s];
        let (op, lp) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
        // One task per (sequence, K/V head): it owns the output columns of its query heads.
        (0..b * kvh).into_par_iter().for_each(|task| {
            // Capture the whole `Shared`s (Sync), not their raw-pointer fields.
            let (op, lp) = (op, lp);
            let (bi, g) = (task / kvh, task % kvh);
            let row0 = bi * s;
            let mut kr = vec![0f32; s * hd];
            rope_rows(&kv[row0 * ks + g * hd..], ks, hd, cv, sv, &mut kr);
            let mut qr = vec![0f32; s * hd];
            let mut p = vec![0f32; ATT_BLOCK * s];
            for hi in g * rep..(g + 1) * rep {
                rope_rows(&qv[row0 * qs + hi * hd..], qs, hd, cv, sv, &mut qr);
                for i0 in (0..s).step_by(ATT_BLOCK) {
                    let i1 = (i0 + ATT_BLOCK).min(s);
                    let (lo, hi_k) = key_range(i0, i1, sh.window);
                    let (nq, nk) = (i1 - i0, hi_k - lo);
                    let pb = &mut p[..nq * nk];
                    // scores[i0..i1, lo..hi_k] = qr · krᵀ
                    unsafe {
                        mm(
                            (nq, nk, hd),
                            pb.as_mut_ptr(),
                            nk,
                            false,
                            qr[i0 * hd..].as_ptr(),
                            (hd, 1),
                            kr[lo * hd..].as_ptr(),
                            (1, hd),
                            false,
                        )
                    };
                    // SAFETY: this task owns the lse rows of head hi.
                    let lse_rows = unsafe {
                        std::slice::from_raw_parts_mut(lp.0.add((bi * h + hi) * s + i0), nq)
                    };
                    softmax_block(pb, nk, i0, lo, sh.window, scale, lse_rows);
                    // out[i0..i1, head hi] = P · v[lo..hi_k, head g]
                    unsafe {
                        mm(
                            (nq, hd, nk),
                            op.0.add((row0 + i0) * qs + hi * hd),
                            qs,
                            false,
                            pb.as_ptr(),
                            (nk, 1),
                            vv[(row0 + lo) * ks + g * hd..].as_ptr(),
                            (ks, 1),
                            false,
                        )
                    };
                }
            }
        });
        Some((tensor(out, vec![b * s, qs]), tensor(lse, vec![b, h, s])))
    }

    fn attention_backward_kernel(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        dout: FlexTensor,
        sh: AttentionShape,
    ) -> [FlexTensor; 3] {
        let (q, k, v, cos, sin) = (contig(q), contig(k), contig(v), contig(cos), contig(sin));
        let (out, lse, dout) = (contig(out), contig(lse), contig(dout));
        let (b, s, h, kvh, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
        let (qs, ks, rep) = (h * hd, kvh * hd, h / kvh);
        let scale = sh.scale as f32;
        let (qv, kv, vv, cv, sv) = (vals(&q), vals(&k), vals(&v), vals(&cos), vals(&sin));
        let (ov, lv, dov) = (vals(&out), vals(&lse), vals(&dout));
        let mut dq = Vec::<f32>::with_capacity(b * s * qs);
        let mut dk = Vec::<f32>::with_capacity(b * s * ks);
        let mut dv = Vec::<f32>::with_capacity(b * s * ks);
        let ptrs = (
            Shared(dq.spare_capacity_mut().as_mut_ptr().cast()),
            Shared(dk.spare_capacity_mut().as_mut_ptr().cast()),
            Shared(dv.spare_capacity_mut().as_mut_ptr().cast()),
        );
        // Tasks as in the forward; each writes its heads' columns of dq and its K/V head's
        // columns of dk and dv, every row.
        (0..b * kvh).into_par_iter().for_each(|task| {
            let (dqp, dkp, dvp) = ptrs;
            let (bi, g) = (task / kvh, task % kvh);
            let row0 = bi * s;
            let mut kr = vec![0f32; s * hd];
            rope_rows(&kv[row0 * ks + g * hd..], ks, hd, cv, sv, &mut kr);
            let mut qr = vec![0f32; s * hd];
            let mut dkr = vec![0f32; s * hd];
            let mut dvg = vec![0f32; s * hd];
            let mut dqr = vec![0f32; s * hd];
            let mut p = vec![0f32; ATT_BLOCK * s];
            let mut dp = vec![0f32; ATT_BLOCK * s];
            let vg = vv[row0 * ks + g * hd..].as_ptr();
            for hi in g * rep..(g + 1) * rep {
                rope_rows(&qv[row0 * qs + hi * hd..], qs, hd, cv, sv, &mut qr);
                let dog = dov[row0 * qs + hi * hd..].as_ptr();
                for i0 in (0..s).step_by(ATT_BLOCK) {
                    let i1 = (i0 + ATT_BLOCK).min(s);
                    let (lo, hi_k) = key_range(i0, i1, sh.window);
                    let (nq, nk) = (i1 - i0, hi_k - lo);
                    let (pb, dpb) = (&mut p[..nq * nk], &mut dp[..nq * nk]);
                    unsafe {
                        // scores again (P is recomputed from them and the saved lse)
                        mm(
                            (nq, nk, hd),
                            pb.as_mut_ptr(),
                            nk,
                            false,
                            qr[i0 * hd..].as_ptr(),
                            (hd, 1),
                            kr[lo * hd..].as_ptr(),
                            (1, hd),
                            false,
                        );
                        // dP = dO · vᵀ
                        mm(
                            (nq, nk, hd),
                            dpb.as_mut_ptr(),
                            nk,
                            false,
                            dog.add(i0 * qs),
                            (qs, 1),
                            vg.add(lo * ks),
                            (1, ks),
                            false,
                        );
                    }
                    let head = (row0 + i0) * qs + hi * hd;
                    ds_block(
                        pb,
                        dpb,
                        nk,
                        i0,
                        lo,
                        sh.window,
                        scale,
                        &lv[(bi * h + hi) * s + i0..],
                        &ov[head..],
                        &dov[head..],
                        qs,
                        hd,
                    );
                    unsafe {
                        // dqr[i0..i1] = dS · kr
                        mm(
                            (nq, hd, nk),
                            dqr[i0 * hd..].as_mut_ptr(),
                            hd,
                            false,
                            dpb.as_ptr(),
                            (nk, 1),
                            kr[lo * hd..].as_ptr(),
                            (hd, 1),
                            false,
                        );
                        // dkr[lo..hi_k] += dSᵀ · qr[i0..i1]
                        mm(
                            (nk, hd, nq),
                            dkr[lo * hd..].as_mut_ptr(),
                            hd,
                            true,
                            dpb.as_ptr(),
                            (1, nk),
                            qr[i0 * hd..].as_ptr(),
                            (hd, 1),
                            false,
                        );
                        // dv[lo..hi_k] += Pᵀ · dO[i0..i1]
                        mm(
                            (nk, hd, nq),
                            dvg[lo * hd..].as_mut_ptr(),
                            hd,
                            true,
                            pb.as_ptr(),
                            (1, nk),
                            dog.add(i0 * qs),
                            (qs, 1),
                            false,
                        );
                    }
                }
                let dst = Shared(unsafe { dqp.0.add(row0 * qs + hi * hd) });
                rope_t_rows(&dqr, hd, cv, sv, dst, qs);
            }
            let off = row0 * ks + g * hd;
            rope_t_rows(&dkr, hd, cv, sv, Shared(unsafe { dkp.0.add(off) }), ks);
            for t in 0..s {
                // SAFETY: this task owns these hd elements of row t of dv.
                let dvd = unsafe { std::slice::from_raw_parts_mut(dvp.0.add(off + t * ks), hd) };
                dvd.copy_from_slice(&dvg[t * hd..][..hd]);
            }
        });
        // SAFETY: the tasks wrote every element (all rows × all head columns).
        unsafe {
            dq.set_len(b * s * qs);
            dk.set_len(b * s * ks);
            dv.set_len(b * s * ks);
        }
        [
            tensor(dq, vec![b * s, qs]),
            tensor(dk, vec![b * s, ks]),
            tensor(dv, vec![b * s, ks]),
        ]
    }

    fn adamw_kernel(
        param: FlexTensor,
        grad: FlexTensor,
        moments: Option<(FlexTensor, FlexTensor)>,
        step: AdamWStep,
    ) -> Option<[FlexTensor; 3]> {
        let mut inputs = vec![&param, &grad];
        if let Some((m, v)) = &moments {
            inputs.extend([m, v]);
        }
        if !is_f32(&inputs) {
            return None;
        }
        let shape = dims(&param);
        let (p, g) = (contig(param), contig(grad));
        let (m, v) = match moments {
            Some((m, v)) => (Some(contig(m)), Some(contig(v))),
            None => (None, None),
        };
        let (pv, gv) = (vals(&p), vals(&g));
        let (mv, vv) = (
            m.as_ref().map_or(&[][..], vals),
            v.as_ref().map_or(&[][..], vals),
        );
        let n = pv.len();
        let (mut po, mut mo, mut vo) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        const C: usize = 1 << 14;
        let first = m.is_none();
        po.par_chunks_mut(C)
            .zip(mo.par_chunks_mut(C))
            .zip(vo.par_chunks_mut(C))
            .enumerate()
            .for_each(|(c, ((pc, mc), vc))| {
                let o = c * C;
                let (ms, vs) = if first {
                    (&[][..], &[][..])
                } else {
                    (&mv[o..], &vv[o..])
                };
                adamw_chunk(&pv[o..], &gv[o..], ms, vs, first, step, pc, mc, vc);
            });
        Some([
            tensor(po, shape.clone()),
            tensor(mo, shape.clone()),
            tensor(vo, shape),
        ])
    }

    fn ce_kernel(
        logits: FlexTensor,
        targets: FlexTensor,
        weights: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        if !is_f32(&[&logits, &weights]) {
            return None;
        }
        let (logits, weights) = (contig(logits), contig(weights));
        let [n, v]: [usize; 2] = dims(&logits)[..].try_into().ok()?;
        let targets = int_values(targets);
        let (lv, wv) = (vals(&logits), vals(&weights));
        let mut lse = vec![0f32; n];
        let rows = rows_per_chunk(n);
        let loss: f64 = lse
            .par_chunks_mut(rows)
            .enumerate()
            .map(|(c, lc)| {
                let mut loss = 0f64;
                for (r, l) in lc.iter_mut().enumerate() {
                    let row = c * rows + r;
                    let w = wv[row];
                    if w == 0.0 {
                        continue;
                    }
                    let x = &lv[row * v..][..v];
                    *l = lse_row(x);
                    loss += (w * (*l - x[target_of(&targets, row, v)])) as f64;
                }
                loss
            })
            .sum();
        Some((tensor(vec![loss as f32], vec![1]), tensor(lse, vec![n])))
    }

    fn ce_backward_kernel(
        logits: FlexTensor,
        targets: FlexTensor,
        weights: FlexTensor,
        lse: FlexTensor,
        dloss: FlexTensor,
    ) -> FlexTensor {
        let (mut logits, weights, lse, dloss) =
            (contig(logits), contig(weights), contig(lse), contig(dloss));
        let shape = dims(&logits);
        let v = shape[1];
        let targets = int_values(targets);
        let (wv, lsev, g) = (vals(&weights), vals(&lse), vals(&dloss)[0]);
        let weight = |row: usize| wv[row] * g;
        // The logits are usually referenced only by this backward step: overwrite them with
        // their gradient instead of allocating another `[tokens, vocab]` buffer (the largest
        // activation of a small model: 32 MiB for the M benchmark).
        let n = shape.iter().product::<usize>();
        let whole = logits.layout().start_offset() == 0;
        if let Some(buf) = logits
            .try_storage_mut::<f32>()
            .filter(|b| whole && b.len() == n)
        {
            buf.par_chunks_mut(v).enumerate().for_each(|(row, xr)| {
                let w = weight(row);
                if w == 0.0 {
                    xr.fill(0.0);
                } else {
                    softmax_scaled_in_place(xr, lsev[row], w);
                    xr[target_of(&targets, row, v)] -= w;
                }
            });
            return logits;
        }
        let lv = vals(&logits);
        let mut d = vec![0f32; lv.len()];
        d.par_chunks_mut(v).enumerate().for_each(|(row, dr)| {
            let w = weight(row);
            if w != 0.0 {
                softmax_scaled_row(&lv[row * v..][..v], lsev[row], w, dr);
                dr[target_of(&targets, row, v)] -= w;
            }
        });
        tensor(d, shape)
    }
}

/// The token row `row` predicts (its target).
fn target_of(targets: &[i64], row: usize, vocab: usize) -> usize {
    let t = targets[row];
    assert!(
        (0..vocab as i64).contains(&t),
        "token id {t} outside the vocabulary (0..{vocab})"
    );
    t as usize
}

fn int_values(ids: FlexTensor) -> Vec<i64> {
    match ids.into_data().convert::<i64>().into_vec::<i64>() {
        Ok(v) => v,
        Err(e) => panic!("token ids: {e:?}"),
    }
}
