//! The kernels of `llama-pro-core/src/ops` against the same operations composed from burn
//! tensor ops and differentiated by burn's autodiff: outputs and every input gradient, on shapes
//! that exercise the edge cases (GQA, a sliding window, a sequence that is not a multiple of the
//! attention block, masked loss positions). The CPU kernels (`cpu.rs`) on `Flex`; the block-wise
//! forward/backward of the GPU backends (`tiled.rs`) on the CPU with small blocks, and through
//! `Autodiff<WgpuBackend>` on wgpu (lavapipe in CI). End-to-end agreement with transformers
//! (forward and first-step gradients) is checked in `parity.rs`/`expansion.rs`, which run through
//! the kernels too.

use burn::backend::{Autodiff, Flex};
#[cfg(feature = "wgpu")]
use burn::tensor::FloatDType;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use llama_pro::core::ops::{self, AttentionShape, tiled, without_kernels};
use llama_pro::core::rope::RotaryEmbedding;
use llama_pro::core::{DType, LlamaConfig};

use crate::common::{max_abs_diff, to_vec};

type A = Autodiff<Flex>;

/// Deterministic values in [-amp, amp).
fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

fn leaf<const D: usize>(shape: [usize; D], seed: u64, amp: f32) -> Tensor<A, D> {
    leaf_on::<A, D>(shape, seed, amp, &Default::default())
}

fn leaf_on<B: AutodiffBackend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    amp: f32,
    dev: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::<B, D>::from_data(TensorData::new(values(n, seed, amp), shape), dev).require_grad()
}

/// The upstream gradient `R` the checks differentiate `Σ out ⊙ R` with.
fn upstream<B: Backend, const O: usize>(dims: [usize; O], dev: &B::Device) -> Tensor<B, O> {
    let n = dims.iter().product();
    Tensor::<B, O>::from_data(TensorData::new(values(n, 99, 1.0), dims), dev)
}

/// Output and input gradients of `f` at fixed inputs, for the loss `Σ out ⊙ R` (R random).
fn run<B: AutodiffBackend, const D: usize, const O: usize>(
    inputs: &[Tensor<B, D>],
    f: &dyn Fn(Vec<Tensor<B, D>>) -> Tensor<B, O>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let xs: Vec<Tensor<B, D>> = inputs
        .iter()
        .map(|t| Tensor::from_data(t.to_data(), &t.device()).require_grad())
        .collect();
    let out = f(xs.clone());
    let r = upstream::<B, O>(out.dims(), &out.device());
    let grads = (out.clone() * r).sum().backward();
    let gs = xs
        .iter()
        .map(|x| to_vec(x.grad(&grads).expect("input gradient")).0)
        .collect();
    (to_vec(out).0, gs)
}

/// Largest difference relative to the largest reference value.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    max_abs_diff(a, b) / scale
}

/// Results `(output, gradients)` agree with the reference to `tol` relative to the largest
/// reference value.
fn compare(label: &str, got: (Vec<f32>, Vec<Vec<f32>>), want: (Vec<f32>, Vec<Vec<f32>>), tol: f32) {
    let d = rel(&got.0, &want.0);
    println!("{label:<28} output rel max|Δ| = {d:.2e}");
    assert!(d <= tol, "{label}: output differs by {d}");
    for (i, (k, c)) in got.1.iter().zip(&want.1).enumerate() {
        let d = rel(k, c);
        println!("{label:<28} grad[{i}] rel max|Δ| = {d:.2e}");
        assert!(d <= tol, "{label}: gradient {i} differs by {d}");
    }
    assert_eq!(got.1.len(), want.1.len());
}

/// Kernel and composed results agree to `tol` relative to the largest reference value.
fn check<B: AutodiffBackend, const D: usize, const O: usize>(
    label: &str,
    inputs: &[Tensor<B, D>],
    f: &dyn Fn(Vec<Tensor<B, D>>) -> Tensor<B, O>,
    tol: f32,
) {
    let kernel = run(inputs, f);
    let composed = without_kernels(|| run(inputs, f));
    compare(label, kernel, composed, tol);
}

/// Runs `f` and checks that a fused kernel computed it.
fn used_kernel<R>(f: impl FnOnce() -> R) -> R {
    let before = ops::kernel_calls();
    let r = f();
    assert!(ops::kernel_calls() > before, "kernel not used");
    r
}

/// The attention cases: (seq, window); 130 is not a multiple of any block size used.
const ATTENTION_CASES: [(usize, Option<usize>); 3] = [(130, None), (130, Some(50)), (7, None)];

fn attention_shape(seq: usize, window: Option<usize>) -> AttentionShape {
    AttentionShape {
        batch: 2,
        seq,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        scale: 0.25,
        window,
    }
}

fn rope_tables<B: Backend>(seq: usize, dev: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let mut c = LlamaConfig::tiny(32);
    c.head_dim = 16;
    RotaryEmbedding::new(&c).tables::<B>(0, seq, DType::F32, dev)
}

/// Token ids and a loss mask with padding at the end of the second sequence and a hole in the
/// third.
fn ce_inputs<B: Backend>(
    b: usize,
    s: usize,
    v: usize,
    dev: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let ids: Vec<i64> = values(b * s, 11, 1.0)
        .iter()
        .map(|x| ((x + 1.0) * 0.5 * v as f32) as i64 % v as i64)
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), dev);
    let mut m = vec![1f32; b * s];
    for t in 20..30 {
        m[s + t] = 0.0;
    }
    m[2 * s + 5] = 0.0;
    (
        ids,
        Tensor::<B, 2>::from_data(TensorData::new(m, [b, s]), dev),
    )
}

/// Every operation with a kernel on backend `B` against its composition on `B`: outputs and all
/// input gradients to `tol` (relative).
fn op_suite<B: AutodiffBackend>(dev: &B::Device, tol: f32) {
    let (x, w) = (
        leaf_on::<B, 2>([37, 48], 1, 1.0, dev),
        leaf_on::<B, 2>([20, 48], 2, 0.3, dev),
    );
    used_kernel(|| ops::linear(x.clone(), w.clone()));
    check(
        "linear",
        &[x, w],
        &|v| ops::linear(v[0].clone(), v[1].clone()),
        tol,
    );

    let x = leaf_on::<B, 2>([37, 48], 3, 2.0, dev);
    let w = Tensor::<B, 2>::from_data(
        TensorData::new(
            values(48, 4, 0.5).iter().map(|v| 1.0 + v).collect(),
            [1, 48],
        ),
        dev,
    )
    .require_grad();
    used_kernel(|| ops::rms_norm(x.clone(), w.clone().reshape([48]), 1e-5));
    check(
        "rms_norm",
        &[x, w],
        &|v| ops::rms_norm(v[0].clone(), v[1].clone().reshape([48]), 1e-5),
        tol,
    );

    let (g, u) = (
        leaf_on::<B, 2>([37, 70], 5, 4.0, dev),
        leaf_on::<B, 2>([37, 70], 6, 1.0, dev),
    );
    used_kernel(|| ops::swiglu(g.clone(), u.clone()));
    check(
        "swiglu",
        &[g, u],
        &|v| ops::swiglu(v[0].clone(), v[1].clone()),
        tol,
    );

    for (seq, window) in ATTENTION_CASES {
        let shape = attention_shape(seq, window);
        let (cos, sin) = rope_tables::<B>(seq, dev);
        let rows = 2 * seq;
        let q = leaf_on::<B, 2>([rows, 64], 7, 1.0, dev);
        let k = leaf_on::<B, 2>([rows, 32], 8, 1.0, dev);
        let v = leaf_on::<B, 2>([rows, 32], 9, 1.0, dev);
        used_kernel(|| {
            let (q, k, v) = (q.clone(), k.clone(), v.clone());
            ops::attention(q, k, v, cos.clone(), sin.clone(), shape)
        });
        let f = |t: Vec<Tensor<B, 2>>| {
            ops::attention(
                t[0].clone(),
                t[1].clone(),
                t[2].clone(),
                cos.clone(),
                sin.clone(),
                shape,
            )
        };
        check(
            &format!("attention s={seq} w={window:?}"),
            &[q, k, v],
            &f,
            tol,
        );
    }

    let (b, s, v) = (3, 30, 50);
    let logits = leaf_on::<B, 2>([b * s, v], 10, 5.0, dev);
    let (ids, mask) = ce_inputs::<B>(b, s, v, dev);
    used_kernel(|| {
        let logits = logits.clone().reshape([b, s, v]);
        ops::causal_ce(logits, ids.clone(), mask.clone())
    });
    check(
        "causal cross-entropy",
        &[logits.clone()],
        &|t| ops::causal_ce(t[0].clone().reshape([b, s, v]), ids.clone(), mask.clone()),
        tol,
    );
    // Logits that only the loss holds (as the LM head's output in the model): the GPU kernel
    // writes the gradient over them.
    check(
        "causal cross-entropy, logits owned by the loss",
        &[logits],
        &|t| {
            ops::causal_ce(
                (t[0].clone() * 0.5).reshape([b, s, v]),
                ids.clone(),
                mask.clone(),
            )
        },
        tol,
    );

    // The LM head fused with the loss, over chunks of 16 rows (6 chunks, a ragged last one):
    // gradients of the hidden states and of a trainable head; then a frozen head (the LLaMA Pro
    // case), where only the hidden states' gradient is computed.
    let d = 24;
    let h = leaf_on::<B, 2>([b * s, d], 12, 2.0, dev);
    let head = leaf_on::<B, 2>([v, d], 13, 0.5, dev);
    let weights = ops::pair_weights(mask.clone());
    let fused = |h: Tensor<B, 2>, w: Tensor<B, 2>| {
        let h = h.reshape([b, s, d]);
        tiled::with_block_rows(16, || {
            ops::causal_head_ce_weighted(h, w, ids.clone(), weights.clone())
        })
    };
    used_kernel(|| fused(h.clone(), head.clone()));
    check(
        "LM head + cross-entropy",
        &[h.clone(), head.clone()],
        &|t| fused(t[0].clone(), t[1].clone()),
        tol,
    );
    let frozen = Tensor::<B, 2>::from_data(head.to_data(), dev);
    check(
        "LM head (frozen) + cross-entropy",
        &[h],
        &|t| fused(t[0].clone(), frozen.clone()),
        tol,
    );
}

#[test]
fn cpu_kernels_match_composition() {
    op_suite::<A>(&Default::default(), 2e-5);
}

/// The block-wise forward/backward the GPU backends run (`ops::tiled`), computed on the CPU
/// backend without autodiff, against the composition differentiated by burn's autodiff: with
/// blocks of 16 and 40 rows (several blocks, a ragged last one, a window reaching back over a
/// block boundary) and one block.
#[test]
fn tiled_forward_backward_match_composition() {
    use llama_pro::core::ops::tiled;
    let dev = Default::default();
    let inner = |t: &Tensor<A, 2>| t.clone().inner();
    for rows in [16, 40, 1 << 20] {
        tiled::with_block_rows(rows, || {
            for (seq, window) in ATTENTION_CASES {
                let shape = attention_shape(seq, window);
                let (cos, sin) = rope_tables::<A>(seq, &dev);
                let n = 2 * seq;
                let inputs = [
                    leaf([n, 64], 7, 1.0),
                    leaf([n, 32], 8, 1.0),
                    leaf([n, 32], 9, 1.0),
                ];
                let composed = without_kernels(|| {
                    run(&inputs, &|t| {
                        let (q, k, v) = (t[0].clone(), t[1].clone(), t[2].clone());
                        ops::attention(q, k, v, cos.clone(), sin.clone(), shape)
                    })
                });
                let [q, k, v] = inputs.each_ref().map(inner);
                let (cos, sin) = (cos.clone().inner(), sin.clone().inner());
                let (out, lse) = tiled::attention_fwd(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    cos.clone(),
                    sin.clone(),
                    shape,
                );
                let dout = upstream::<Flex, 2>(out.dims(), &dev);
                let grads = tiled::attention_bwd(q, k, v, cos, sin, out.clone(), lse, dout, shape);
                let got = (
                    to_vec(out).0,
                    grads.into_iter().map(|g| to_vec(g).0).collect(),
                );
                compare(
                    &format!("tiled attention s={seq} w={window:?} b={rows}"),
                    got,
                    composed,
                    2e-5,
                );
            }

            let (b, s, v) = (3, 30, 50);
            let logits = leaf([b * s, v], 10, 5.0);
            let (ids, mask) = ce_inputs::<A>(b, s, v, &dev);
            let composed = without_kernels(|| {
                run(std::slice::from_ref(&logits), &|t| {
                    ops::causal_ce(t[0].clone().reshape([b, s, v]), ids.clone(), mask.clone())
                })
            });
            let (li, ii, mi) = (
                logits.clone().inner().reshape([b, s, v]),
                ids.clone().inner(),
                ops::pair_weights(mask.clone().inner()),
            );
            let (loss, lse) = tiled::causal_ce_fwd(li.clone(), ii.clone(), mi.clone());
            let dl = upstream::<Flex, 1>([1], &dev);
            let g = tiled::causal_ce_bwd(li, ii, mi, lse, dl).reshape([b * s, v]);
            compare(
                &format!("tiled cross-entropy b={rows}"),
                (to_vec(loss).0, vec![to_vec(g).0]),
                composed,
                2e-5,
            );
        });
    }

    let x = leaf([37, 48], 3, 2.0);
    let w = leaf([48], 4, 0.5) + 1.0;
    let composed = without_kernels(|| {
        run(std::slice::from_ref(&x), &|t| {
            ops::rms_norm(t[0].clone(), w.clone(), 1e-5)
        })
    });
    let composed_w = without_kernels(|| {
        run(std::slice::from_ref(&w), &|t| {
            ops::rms_norm(x.clone(), t[0].clone(), 1e-5)
        })
    });
    let (xi, wi) = (x.inner(), w.inner());
    let (y, rstd) = tiled::rms_norm_fwd(xi.clone(), wi.clone(), 1e-5);
    let dy = upstream::<Flex, 2>(y.dims(), &dev);
    let (dx, dw) = tiled::rms_norm_bwd(xi, wi, rstd, dy, [true, true]);
    compare(
        "tiled rms_norm (x)",
        (to_vec(y.clone()).0, vec![to_vec(dx.unwrap()).0]),
        composed,
        2e-5,
    );
    compare(
        "tiled rms_norm (w)",
        (to_vec(y).0, vec![to_vec(dw.unwrap()).0]),
        composed_w,
        2e-5,
    );

    let (g, u) = (leaf([37, 70], 5, 4.0), leaf([37, 70], 6, 1.0));
    let composed = without_kernels(|| {
        run(&[g.clone(), u.clone()], &|t| {
            ops::swiglu(t[0].clone(), t[1].clone())
        })
    });
    let (gi, ui) = (g.inner(), u.inner());
    let y = tiled::swiglu_fwd(gi.clone(), ui.clone());
    let dy = upstream::<Flex, 2>(y.dims(), &dev);
    let [dg, du] = tiled::swiglu_bwd(gi, ui, dy, [true, true]);
    compare(
        "tiled swiglu",
        (
            to_vec(y).0,
            vec![to_vec(dg.unwrap()).0, to_vec(du.unwrap()).0],
        ),
        composed,
        2e-5,
    );
}

/// The same suite on wgpu (lavapipe in CI): the GPU backend's kernels (`ops::tiled` through
/// `Autodiff<WgpuBackend>`) against burn's composition on the same device, in f32.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_kernels_match_composition() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    type W = Autodiff<llama_pro::core::device::WgpuBackend>;
    let dev = llama_pro::core::device::wgpu_device(None).expect("a wgpu adapter");
    assert!(ops::has_kernels::<W>(), "the wgpu backend has no kernels");
    tiled_blocks_on_gpu(|| op_suite::<W>(&dev, 1e-4));
}

/// The GPU kernels in f16 (inputs rounded to f16, every kernel computing in f16 storage with f32
/// arithmetic) against the f32 composition: outputs and gradients within 2e-2 of the largest
/// reference value (f16 keeps 11 significant bits; the attention's probabilities and the
/// gradients pass through f16 matmuls). Skipped with a message where the adapter has no f16.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_kernels_f16_match_f32_composition() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    type W = Autodiff<llama_pro::core::device::WgpuBackend>;
    let dev = llama_pro::core::device::wgpu_device(None).expect("a wgpu adapter");
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<W, 2>::ones([4, 4], &dev).cast(FloatDType::F16);
        to_vec(t.clone().matmul(t).exp()).0
    });
    if !probe.is_ok_and(|v| v.iter().all(|x| (x - 54.598).abs() < 0.1)) {
        eprintln!("skipped: this wgpu adapter does not compute in f16");
        return;
    }
    tiled_blocks_on_gpu(|| lowp_suite::<W>(&dev, FloatDType::F16, 2e-2));
}

/// [`op_suite`]'s operations computed in `dtype` against the f32 composition.
#[cfg(feature = "wgpu")]
fn lowp_suite<B: AutodiffBackend>(dev: &B::Device, dtype: FloatDType, tol: f32) {
    let low = |t: &Tensor<B, 2>| t.clone().cast(dtype);
    let check_low = |label: &str,
                     inputs: &[Tensor<B, 2>],
                     f: &dyn Fn(Vec<Tensor<B, 2>>, bool) -> Tensor<B, 2>| {
        let kernel = used_kernel(|| {
            run(inputs, &|v| {
                f(v.iter().map(low).collect(), true).cast(FloatDType::F32)
            })
        });
        let reference = without_kernels(|| run(inputs, &|v| f(v, false)));
        compare(&format!("{label} ({dtype:?})"), kernel, reference, tol);
    };
    let (x, w) = (
        leaf_on::<B, 2>([37, 48], 1, 1.0, dev),
        leaf_on::<B, 2>([20, 48], 2, 0.3, dev),
    );
    check_low("linear", &[x, w], &|v, _| {
        ops::linear(v[0].clone(), v[1].clone())
    });
    let x = leaf_on::<B, 2>([37, 48], 3, 2.0, dev);
    let w = Tensor::<B, 2>::from_data(
        TensorData::new(
            values(48, 4, 0.5).iter().map(|v| 1.0 + v).collect(),
            [1, 48],
        ),
        dev,
    )
    .require_grad();
    check_low("rms_norm", &[x, w], &|v, _| {
        ops::rms_norm(v[0].clone(), v[1].clone().reshape([48]), 1e-5)
    });
    let (g, u) = (
        leaf_on::<B, 2>([37, 70], 5, 4.0, dev),
        leaf_on::<B, 2>([37, 70], 6, 1.0, dev),
    );
    check_low("swiglu", &[g, u], &|v, _| {
        ops::swiglu(v[0].clone(), v[1].clone())
    });
    for (seq, window) in ATTENTION_CASES {
        let shape = attention_shape(seq, window);
        let (cos, sin) = rope_tables::<B>(seq, dev);
        let rows = 2 * seq;
        let q = leaf_on::<B, 2>([rows, 64], 7, 1.0, dev);
        let k = leaf_on::<B, 2>([rows, 32], 8, 1.0, dev);
        let v = leaf_on::<B, 2>([rows, 32], 9, 1.0, dev);
        let f = |t: Vec<Tensor<B, 2>>, lowp: bool| {
            let (c, s) = match lowp {
                true => (low(&cos), low(&sin)),
                false => (cos.clone(), sin.clone()),
            };
            ops::attention(t[0].clone(), t[1].clone(), t[2].clone(), c, s, shape)
        };
        check_low(&format!("attention s={seq} w={window:?}"), &[q, k, v], &f);
    }
    let (b, s, v) = (3, 30, 50);
    let logits = leaf_on::<B, 2>([b * s, v], 10, 5.0, dev);
    let (ids, mask) = ce_inputs::<B>(b, s, v, dev);
    check_low("causal cross-entropy", &[logits.clone()], &|t, _| {
        ops::causal_ce(t[0].clone().reshape([b, s, v]), ids.clone(), mask.clone()).reshape([1, 1])
    });
    check_low("causal cross-entropy, logits owned", &[logits], &|t, _| {
        let logits = (t[0].clone() * 0.5).reshape([b, s, v]);
        ops::causal_ce(logits, ids.clone(), mask.clone()).reshape([1, 1])
    });
    let d = 24;
    let h = leaf_on::<B, 2>([b * s, d], 12, 2.0, dev);
    let head = leaf_on::<B, 2>([v, d], 13, 0.5, dev);
    let weights = ops::pair_weights(mask.clone());
    check_low("LM head + cross-entropy", &[h, head], &|t, _| {
        let h = t[0].clone().reshape([b, s, d]);
        let loss = ops::causal_head_ce_weighted(h, t[1].clone(), ids.clone(), weights.clone());
        loss.reshape([1, 1])
    });
}

#[cfg(feature = "wgpu")]
fn tiled_blocks_on_gpu(f: impl FnOnce()) {
    // Several query blocks (and loss chunks) on the small shapes, as on long sequences.
    llama_pro::core::ops::tiled::with_block_rows(40, f)
}

#[test]
fn fused_adamw_matches_burn_adamw() {
    use burn::module::{Module, Param};
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use llama_pro::train::optim::FusedAdamW;

    #[derive(Module, Debug)]
    struct M<B: burn::tensor::backend::Backend> {
        w: Param<Tensor<B, 2>>,
    }
    let dev = Default::default();
    let init = || M::<A> {
        w: Param::from_tensor(Tensor::from_data(
            TensorData::new(values(40 * 30, 12, 1.0), [40, 30]),
            &dev,
        )),
    };
    let (mut a, mut b) = (init(), init());
    let mut fused = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1).init::<A, M<A>>();
    let mut plain = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init::<A, M<A>>();
    for step in 0..3 {
        let loss = |m: &M<A>| (m.w.val() * m.w.val()).sum() * (step as f32 + 1.0);
        let ga = GradientsParams::from_grads(loss(&a).backward(), &a);
        let gb = GradientsParams::from_grads(loss(&b).backward(), &b);
        a = fused.step(1e-2, a, ga);
        b = plain.step(1e-2, b, gb);
    }
    let p = leaf([4, 3], 13, 1.0);
    let step = ops::AdamWStep {
        lr: 1e-2,
        beta_1: 0.9,
        beta_2: 0.95,
        epsilon: 1e-8,
        weight_decay: 0.1,
        time: 1,
    };
    used_kernel(|| assert!(ops::adamw(p.clone().inner(), p.inner(), None, step).is_some()));
    let (va, vb) = (to_vec(a.w.val()).0, to_vec(b.w.val()).0);
    let d = max_abs_diff(&va, &vb);
    println!("fused AdamW vs burn AdamW after 3 steps: max|Δ| = {d:.2e}");
    assert!(d <= 1e-6, "fused AdamW differs from burn's by {d}");
    assert!(va != values(40 * 30, 12, 1.0), "parameters did not move");
}
