//! The CPU kernels (`llama-pro-core/src/ops/cpu.rs`) against the same operations composed
//! from burn tensor ops and differentiated by burn's autodiff: outputs and every input
//! gradient, on shapes that exercise the edge cases (GQA, a sliding window, a sequence that is
//! not a multiple of the attention block, masked loss positions). End-to-end agreement with
//! transformers (forward and first-step gradients) is checked in `parity.rs`/`expansion.rs`,
//! which run through the kernels too.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use llama_pro::core::ops::{self, AttentionShape, without_kernels};
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
    let n = shape.iter().product();
    Tensor::<A, D>::from_data(
        TensorData::new(values(n, seed, amp), shape),
        &Default::default(),
    )
    .require_grad()
}

/// Output and input gradients of `f` at fixed inputs, for the loss `Σ out ⊙ R` (R random).
fn run<const D: usize, const O: usize>(
    inputs: &[Tensor<A, D>],
    f: &dyn Fn(Vec<Tensor<A, D>>) -> Tensor<A, O>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let xs: Vec<Tensor<A, D>> = inputs
        .iter()
        .map(|t| Tensor::from_data(t.to_data(), &Default::default()).require_grad())
        .collect();
    let out = f(xs.clone());
    let r = Tensor::<A, O>::from_data(
        TensorData::new(values(out.shape().num_elements(), 99, 1.0), out.dims()),
        &Default::default(),
    );
    let grads = (out.clone() * r).sum().backward();
    let gs = xs
        .iter()
        .map(|x| to_vec(x.grad(&grads).expect("input gradient")).0)
        .collect();
    (to_vec(out).0, gs)
}

/// Kernel and composed results agree to `tol` relative to the largest reference value.
fn check<const D: usize, const O: usize>(
    label: &str,
    inputs: &[Tensor<A, D>],
    f: &dyn Fn(Vec<Tensor<A, D>>) -> Tensor<A, O>,
    tol: f32,
) {
    let (ko, kg) = run(inputs, f);
    let (co, cg) = without_kernels(|| run(inputs, f));
    let rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        max_abs_diff(a, b) / scale
    };
    let d = rel(&ko, &co);
    println!("{label:<24} output rel max|Δ| = {d:.2e}");
    assert!(d <= tol, "{label}: output differs by {d}");
    for (i, (k, c)) in kg.iter().zip(&cg).enumerate() {
        let d = rel(k, c);
        println!("{label:<24} grad[{i}] rel max|Δ| = {d:.2e}");
        assert!(d <= tol, "{label}: gradient {i} differs by {d}");
    }
}

/// Runs `f` and checks that a fused kernel computed it.
fn used_kernel<R>(f: impl FnOnce() -> R) -> R {
    let before = ops::kernel_calls();
    let r = f();
    assert!(ops::kernel_calls() > before, "kernel not used");
    r
}

#[test]
fn linear_norm_swiglu_kernels_match_composition() {
    let (x, w) = (leaf([37, 48], 1, 1.0), leaf([20, 48], 2, 0.3));
    used_kernel(|| ops::linear(x.clone(), w.clone()));
    check(
        "linear",
        &[x, w],
        &|v| ops::linear(v[0].clone(), v[1].clone()),
        1e-5,
    );

    let x = leaf([37, 48], 3, 2.0);
    let w = Tensor::<A, 2>::from_data(
        TensorData::new(
            values(48, 4, 0.5).iter().map(|v| 1.0 + v).collect(),
            [1, 48],
        ),
        &Default::default(),
    )
    .require_grad();
    check(
        "rms_norm",
        &[x, w],
        &|v| ops::rms_norm(v[0].clone(), v[1].clone().reshape([48]), 1e-5),
        1e-5,
    );

    let (g, u) = (leaf([37, 70], 5, 4.0), leaf([37, 70], 6, 1.0));
    check(
        "swiglu",
        &[g, u],
        &|v| ops::swiglu(v[0].clone(), v[1].clone()),
        1e-5,
    );
}

#[test]
fn attention_kernel_matches_composition() {
    let mut c = LlamaConfig::tiny(32);
    c.head_dim = 16;
    let rope = RotaryEmbedding::new(&c);
    for (seq, window) in [(130, None), (130, Some(50)), (7, None)] {
        let shape = AttentionShape {
            batch: 2,
            seq,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
            window,
        };
        let (cos, sin) = rope.tables::<A>(0, seq, DType::F32, &Default::default());
        let rows = 2 * seq;
        let q = leaf([rows, 64], 7, 1.0);
        let k = leaf([rows, 32], 8, 1.0);
        let v = leaf([rows, 32], 9, 1.0);
        used_kernel(|| {
            let (q, k, v) = (q.clone(), k.clone(), v.clone());
            ops::attention(q, k, v, cos.clone(), sin.clone(), shape)
        });
        check(
            &format!("attention s={seq} w={window:?}"),
            &[q, k, v],
            &|t| {
                ops::attention(
                    t[0].clone(),
                    t[1].clone(),
                    t[2].clone(),
                    cos.clone(),
                    sin.clone(),
                    shape,
                )
            },
            2e-5,
        );
    }
}

#[test]
fn cross_entropy_kernel_matches_composition() {
    let (b, s, v) = (3, 30, 50);
    let logits = leaf([b * s, v], 10, 5.0);
    let ids: Vec<i64> = values(b * s, 11, 1.0)
        .iter()
        .map(|x| ((x + 1.0) * 0.5 * v as f32) as i64 % v as i64)
        .collect();
    let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [b, s]), &Default::default());
    // Padding at the end of the second sequence, and a hole in the third.
    let mut m = vec![1f32; b * s];
    for t in 20..30 {
        m[s + t] = 0.0;
    }
    m[2 * s + 5] = 0.0;
    let mask = Tensor::<A, 2>::from_data(TensorData::new(m, [b, s]), &Default::default());
    used_kernel(|| {
        let logits = logits.clone().reshape([b, s, v]);
        ops::causal_ce(logits, ids.clone(), mask.clone())
    });
    check(
        "causal cross-entropy",
        &[logits],
        &|t| ops::causal_ce(t[0].clone().reshape([b, s, v]), ids.clone(), mask.clone()),
        1e-5,
    );
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
