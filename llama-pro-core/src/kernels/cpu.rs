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

use super::{AttentionShape, LlamaBackend};

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
#[inline]
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
#[inline]
fn rope_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
    let h = x.len() / 2;
    for i in 0..h {
        y[i] = x[i] * c[i] - x[i + h] * s[i];
        y[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
}

/// `dx = ropeᵀ(dy)` for one row (the transposed rotation).
#[inline]
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

/// Whether query `i` sees key `j`.
#[inline]
fn visible(i: usize, j: usize, window: Option<usize>) -> bool {
    j <= i && window.is_none_or(|w| j + w > i)
}

impl LlamaBackend for Flex {
    fn linear_kernel(x: FlexTensor, w: FlexTensor) -> Option<FlexTensor> {
        if !is_f32(&[&x, &w]) {
            return None;
        }
        let (x, w) = (contig(x), contig(w));
        let ([n, k], [m, k2]) = (dims(&x)[..].try_into().ok()?, dims(&w)[..].try_into().ok()?);
        assert_eq!(k, k2, "linear: input width {k} vs weight [{m}, {k2}]");
        let mut y = vec![0f32; n * m];
        // y[n, m] = x[n, k] · wᵀ: wᵀ is w read with swapped strides (no copy).
        unsafe {
            mm(
                (n, m, k),
                y.as_mut_ptr(),
                m,
                false,
                vals(&x).as_ptr(),
                (k, 1),
                vals(&w).as_ptr(),
                (1, k),
                true,
            )
        };
        Some(tensor(y, vec![n, m]))
    }

    fn linear_backward_kernel(
        x: FlexTensor,
        w: FlexTensor,
        dy: FlexTensor,
        need: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let (x, w, dy) = (contig(x), contig(w), contig(dy));
        let (n, k, m) = (dims(&x)[0], dims(&x)[1], dims(&w)[0]);
        let dx = need[0].then(|| {
            // dx[n, k] = dy[n, m] · w[m, k]
            let mut dx = vec![0f32; n * k];
            unsafe {
                mm(
                    (n, k, m),
                    dx.as_mut_ptr(),
                    k,
                    false,
                    vals(&dy).as_ptr(),
                    (m, 1),
                    vals(&w).as_ptr(),
                    (k, 1),
                    true,
                )
            };
            tensor(dx, vec![n, k])
        });
        let dw = need[1].then(|| {
            // dw[m, k] = dyᵀ[m, n] · x[n, k], in HF's [out, in] layout directly.
            let mut dw = vec![0f32; m * k];
            unsafe {
                mm(
                    (m, k, n),
                    dw.as_mut_ptr(),
                    k,
                    false,
                    vals(&dy).as_ptr(),
                    (1, m),
                    vals(&x).as_ptr(),
                    (k, 1),
                    true,
                )
            };
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
                for (r, (yr, rr)) in yc.chunks_mut(d).zip(rc.iter_mut()).enumerate() {
                    let xr = &xv[(c * rows + r) * d..][..d];
                    let inv = 1.0 / (dot(xr, xr) / d as f32 + eps as f32).sqrt();
                    *rr = inv;
                    for j in 0..d {
                        yr[j] = wv[j] * (xr[j] * inv);
                    }
                }
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
        let mut dx = vec![0f32; if need[0] { n * d } else { 0 }];
        // x̂ = x·r, g = dy ⊙ w: dx = r·(g − x̂·mean(g ⊙ x̂)), dw = Σ_rows dy ⊙ x̂.
        let chunk = |c: usize, dxc: Option<&mut [f32]>| -> Vec<f32> {
            let mut dw = vec![0f32; if need[1] { d } else { 0 }];
            let mut g = vec![0f32; d];
            let r0 = c * rows;
            let r1 = (r0 + rows).min(n);
            let mut dxc = dxc;
            for row in r0..r1 {
                let (xr, dyr, inv) = (&xv[row * d..][..d], &dyv[row * d..][..d], rv[row]);
                if need[1] {
                    for j in 0..d {
                        dw[j] += dyr[j] * (xr[j] * inv);
                    }
                }
                if let Some(dxc) = dxc.as_deref_mut() {
                    for j in 0..d {
                        g[j] = dyr[j] * wv[j];
                    }
                    let mean = dot(&g, xr) * inv / d as f32;
                    let out = &mut dxc[(row - r0) * d..][..d];
                    for j in 0..d {
                        out[j] = inv * (g[j] - xr[j] * inv * mean);
                    }
                }
            }
            dw
        };
        let partials: Vec<Vec<f32>> = if need[0] {
            dx.par_chunks_mut(rows * d)
                .enumerate()
                .map(|(c, dxc)| chunk(c, Some(dxc)))
                .collect()
        } else {
            (0..n.div_ceil(rows))
                .into_par_iter()
                .map(|c| chunk(c, None))
                .collect()
        };
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
            let (gc, uc) = (&gv[c * C..][..yc.len()], &uv[c * C..][..yc.len()]);
            for i in 0..yc.len() {
                let x = gc[i];
                yc[i] = x / (1.0 + exp(-x)) * uc[i];
            }
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
                let o = c * C;
                for i in 0..dgc.len() {
                    let (x, up, d) = (gv[o + i], uv[o + i], dyv[o + i]);
                    let s = 1.0 / (1.0 + exp(-x));
                    duc[i] = d * x * s;
                    dgc[i] = d * up * s * (1.0 + x * (1.0 - s));
                }
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
        if !is_f32(&[&q, &k, &v, &cos, &sin]) || sh.head_dim % 2 != 0 {
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
            let (op, lp) = (op, lp);
            let (bi, g) = (task / kvh, task % kvh);
            let row0 = bi * s;
            let mut kr = vec![0f32; s * hd];
            for t in 0..s {
                let src = &kv[(row0 + t) * ks + g * hd..][..hd];
                rope_row(
                    src,
                    &cv[t * hd..][..hd],
                    &sv[t * hd..][..hd],
                    &mut kr[t * hd..][..hd],
                );
            }
            let mut qr = vec![0f32; s * hd];
            let mut p = vec![0f32; ATT_BLOCK * s];
            for hi in g * rep..(g + 1) * rep {
                for t in 0..s {
                    let src = &qv[(row0 + t) * qs + hi * hd..][..hd];
                    let (c, sn) = (&cv[t * hd..][..hd], &sv[t * hd..][..hd]);
                    rope_row(src, c, sn, &mut qr[t * hd..][..hd]);
                }
                for i0 in (0..s).step_by(ATT_BLOCK) {
                    let i1 = (i0 + ATT_BLOCK).min(s);
                    let (lo, hi_k) = key_range(i0, i1, sh.window);
                    let nk = hi_k - lo;
                    // scores[i0..i1, lo..hi_k] = qr · krᵀ
                    unsafe {
                        mm(
                            (i1 - i0, nk, hd),
                            p.as_mut_ptr(),
                            nk,
                            false,
                            qr[i0 * hd..].as_ptr(),
                            (hd, 1),
                            kr[lo * hd..].as_ptr(),
                            (1, hd),
                            false,
                        )
                    };
                    for i in i0..i1 {
                        let row = &mut p[(i - i0) * nk..][..nk];
                        let mut m = f32::NEG_INFINITY;
                        for (jj, x) in row.iter_mut().enumerate() {
                            *x *= scale;
                            if visible(i, lo + jj, sh.window) && *x > m {
                                m = *x;
                            }
                        }
                        let mut sum = 0f32;
                        for (jj, x) in row.iter_mut().enumerate() {
                            let e = if visible(i, lo + jj, sh.window) {
                                exp(*x - m)
                            } else {
                                0.0
                            };
                            *x = e;
                            sum += e;
                        }
                        let inv = 1.0 / sum;
                        for x in row.iter_mut() {
                            *x *= inv;
                        }
                        unsafe { *lp.0.add((bi * h + hi) * s + i) = m + sum.ln() };
                    }
                    // out[i0..i1, head hi] = P · v[lo..hi_k, head g]
                    unsafe {
                        mm(
                            (i1 - i0, hd, nk),
                            op.0.add((row0 + i0) * qs + hi * hd),
                            qs,
                            false,
                            p.as_ptr(),
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
        let mut dq = vec![0f32; b * s * qs];
        let mut dk = vec![0f32; b * s * ks];
        let mut dv = vec![0f32; b * s * ks];
        let ptrs = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..b * kvh).into_par_iter().for_each(|task| {
            let (dqp, dkp, dvp) = ptrs;
            let (bi, g) = (task / kvh, task % kvh);
            let row0 = bi * s;
            let rope_rows = |src: &[f32], stride: usize, col: usize, dst: &mut [f32]| {
                for t in 0..s {
                    let x = &src[(row0 + t) * stride + col..][..hd];
                    let (c, sn) = (&cv[t * hd..][..hd], &sv[t * hd..][..hd]);
                    rope_row(x, c, sn, &mut dst[t * hd..][..hd]);
                }
            };
            let mut kr = vec![0f32; s * hd];
            rope_rows(kv, ks, g * hd, &mut kr);
            let mut qr = vec![0f32; s * hd];
            let mut dkr = vec![0f32; s * hd];
            let mut dvg = vec![0f32; s * hd];
            let mut dqr = vec![0f32; s * hd];
            let mut p = vec![0f32; ATT_BLOCK * s];
            let mut dp = vec![0f32; ATT_BLOCK * s];
            let vg = vv[row0 * ks + g * hd..].as_ptr();
            for hi in g * rep..(g + 1) * rep {
                rope_rows(qv, qs, hi * hd, &mut qr);
                let dog = dov[row0 * qs + hi * hd..].as_ptr();
                for i0 in (0..s).step_by(ATT_BLOCK) {
                    let i1 = (i0 + ATT_BLOCK).min(s);
                    let (lo, hi_k) = key_range(i0, i1, sh.window);
                    let (nq, nk) = (i1 - i0, hi_k - lo);
                    unsafe {
                        // P = exp(scale · qr krᵀ − lse), recomputed.
                        mm(
                            (nq, nk, hd),
                            p.as_mut_ptr(),
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
                            dp.as_mut_ptr(),
                            nk,
                            false,
                            dog.add(i0 * qs),
                            (qs, 1),
                            vg.add(lo * ks),
                            (1, ks),
                            false,
                        );
                    }
                    for i in i0..i1 {
                        let l = lv[(bi * h + hi) * s + i];
                        let o = &ov[(row0 + i) * qs + hi * hd..][..hd];
                        let d_o = &dov[(row0 + i) * qs + hi * hd..][..hd];
                        let di = dot(o, d_o);
                        let pr = &mut p[(i - i0) * nk..][..nk];
                        let dpr = &mut dp[(i - i0) * nk..][..nk];
                        for jj in 0..nk {
                            let pij = if visible(i, lo + jj, sh.window) {
                                exp(pr[jj] * scale - l)
                            } else {
                                0.0
                            };
                            pr[jj] = pij;
                            dpr[jj] = pij * (dpr[jj] - di) * scale; // dS
                        }
                    }
                    unsafe {
                        // dqr[i0..i1] = dS · kr
                        mm(
                            (nq, hd, nk),
                            dqr[i0 * hd..].as_mut_ptr(),
                            hd,
                            false,
                            dp.as_ptr(),
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
                            dp.as_ptr(),
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
                            p.as_ptr(),
                            (1, nk),
                            dog.add(i0 * qs),
                            (qs, 1),
                            false,
                        );
                    }
                }
                for t in 0..s {
                    let (c, sn) = (&cv[t * hd..][..hd], &sv[t * hd..][..hd]);
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(dqp.0.add((row0 + t) * qs + hi * hd), hd)
                    };
                    rope_t_row(&dqr[t * hd..][..hd], c, sn, dst);
                }
            }
            for t in 0..s {
                let (c, sn) = (&cv[t * hd..][..hd], &sv[t * hd..][..hd]);
                let off = (row0 + t) * ks + g * hd;
                let dkd = unsafe { std::slice::from_raw_parts_mut(dkp.0.add(off), hd) };
                rope_t_row(&dkr[t * hd..][..hd], c, sn, dkd);
                let dvd = unsafe { std::slice::from_raw_parts_mut(dvp.0.add(off), hd) };
                dvd.copy_from_slice(&dvg[t * hd..][..hd]);
            }
        });
        [
            tensor(dq, vec![b * s, qs]),
            tensor(dk, vec![b * s, ks]),
            tensor(dv, vec![b * s, ks]),
        ]
    }

    fn causal_ce_kernel(
        logits: FlexTensor,
        ids: FlexTensor,
        mask: FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        if !is_f32(&[&logits, &mask]) {
            return None;
        }
        let (logits, mask) = (contig(logits), contig(mask));
        let [b, s, v]: [usize; 3] = dims(&logits)[..].try_into().ok()?;
        let ids = int_values(ids);
        let (lv, mv) = (vals(&logits), vals(&mask));
        let mut lse = vec![0f32; b * s];
        let rows = rows_per_chunk(b * s);
        let loss: f64 = lse
            .par_chunks_mut(rows)
            .enumerate()
            .map(|(c, lc)| {
                let mut loss = 0f64;
                for (r, l) in lc.iter_mut().enumerate() {
                    let row = c * rows + r;
                    let w = pair_weight(mv, row, s);
                    if w == 0.0 {
                        continue;
                    }
                    let x = &lv[row * v..][..v];
                    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let sum: f32 = sum_exp(x, m);
                    *l = m + sum.ln();
                    let target = target_of(&ids, row, v);
                    loss += (w * (*l - x[target])) as f64;
                }
                loss
            })
            .sum();
        Some((tensor(vec![loss as f32], vec![1]), tensor(lse, vec![b * s])))
    }

    fn causal_ce_backward_kernel(
        logits: FlexTensor,
        ids: FlexTensor,
        mask: FlexTensor,
        lse: FlexTensor,
        dloss: FlexTensor,
    ) -> FlexTensor {
        let (logits, mask, lse, dloss) = (contig(logits), contig(mask), contig(lse), contig(dloss));
        let shape = dims(&logits);
        let (s, v) = (shape[1], shape[2]);
        let ids = int_values(ids);
        let (lv, mv, lsev, g) = (vals(&logits), vals(&mask), vals(&lse), vals(&dloss)[0]);
        let mut d = vec![0f32; lv.len()];
        d.par_chunks_mut(v).enumerate().for_each(|(row, dr)| {
            let w = pair_weight(mv, row, s) * g;
            if w == 0.0 {
                return;
            }
            let (x, l) = (&lv[row * v..][..v], lsev[row]);
            for j in 0..v {
                dr[j] = w * exp(x[j] - l);
            }
            dr[target_of(&ids, row, v)] -= w;
        });
        tensor(d, shape)
    }
}

/// `Σ exp(x − m)` with independent lanes (vectorises).
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

/// Weight of row `row` (position `t` of its sequence) in the causal-LM loss:
/// `mask[t] · mask[t+1]`, and 0 for the last position.
fn pair_weight(mask: &[f32], row: usize, s: usize) -> f32 {
    if row % s == s - 1 {
        0.0
    } else {
        mask[row] * mask[row + 1]
    }
}

/// The token position `row` predicts (the next one in its sequence).
fn target_of(ids: &[i64], row: usize, vocab: usize) -> usize {
    let t = ids[row + 1];
    assert!(
        (0..vocab as i64).contains(&t),
        "token id {t} outside the vocabulary (0..{vocab})"
    );
    t as usize
}

fn int_values(ids: FlexTensor) -> Vec<i64> {
    let data = ids.into_data();
    match data.clone().convert::<i64>().into_vec::<i64>() {
        Ok(v) => v,
        Err(e) => panic!("token ids: {e:?}"),
    }
}
