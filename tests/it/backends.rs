//! Any burn backend: the model runs, trains and evaluates on `NdArray`, a backend this project
//! knows nothing about (no kernels, no `impl` of ours), through the composed operations.

use burn::backend::Autodiff;
use burn_ndarray::NdArray;
use llama_pro::core::ops;
use llama_pro::train::config::{DataSource, EvalSet, TrainConfig};
use llama_pro::train::schedule::ScheduleKind;

use crate::common::*;

#[test]
fn kernels_are_found_by_type() {
    assert!(ops::has_kernels::<Cpu>());
    assert!(ops::has_kernels::<Autodiff<Cpu>>());
    assert!(!ops::has_kernels::<NdArray>());
    assert!(!ops::has_kernels::<Autodiff<NdArray>>());
    assert!(!ops::without_kernels(ops::has_kernels::<Cpu>));
}

/// transformers' logits, block outputs, losses and KV-cache logits on NdArray. NdArray's own f32
/// arithmetic is looser than Flex's (1.2e-4 on a final hidden state of magnitude ~3, where Flex
/// stays under 2e-6), hence 5e-4; a wrong operation is off by 1e-1 or more.
#[test]
fn ndarray_matches_transformers() {
    crate::parity::parity_within::<NdArray>(&Default::default(), 5e-4);
}

/// The same training run (expanded model, new blocks only, accumulation, clipping, decay, an
/// evaluation set) on `Autodiff<NdArray>` and on the CPU backend with its kernels: the same
/// losses, evaluations and exported weights up to f32 rounding.
#[test]
fn ndarray_trains_like_flex() {
    let model = expanded_fixture("llama-gqa-tied-sharded-f32", "ndarray");
    let dir = model.parent().unwrap().to_path_buf();
    let data = fixtures().join("train/seqs.jsonl");
    let cfg = |out: &str| TrainConfig {
        model: model.clone(),
        data: vec![DataSource::new(&data)],
        eval: vec![EvalSet {
            name: "train".into(),
            path: data.clone(),
        }],
        output: dir.join(out),
        max_steps: Some(4),
        batch_size: 1,
        grad_accum: 2,
        seq_len: 64,
        packing: llama_pro::train::config::PackMode::None,
        token_cache: false,
        lr: 3e-3,
        lr_schedule: ScheduleKind::Cosine,
        warmup_ratio: 0.25,
        weight_decay: 0.1,
        clip_grad_norm: 0.5,
        log_every: 0,
        ..Default::default()
    };
    let flex = train_cpu(&cfg("flex"), |_| true).unwrap();
    let nd = train_on::<Autodiff<NdArray>>(&cfg("ndarray"), &Default::default(), |_| true).unwrap();
    println!("flex    {:?}\nndarray {:?}", flex.losses, nd.losses);
    assert_eq!(nd.losses.len(), 4);
    for (a, b) in flex.losses.iter().zip(&nd.losses) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "loss {a} vs {b}");
    }
    let (a, b) = (flex.eval_after["train"].loss, nd.eval_after["train"].loss);
    println!("eval after: flex {a:.7} ndarray {b:.7}");
    assert!((a - b).abs() <= 1e-5 * a.abs(), "eval {a} vs {b}");
    assert!(b < nd.eval_before["train"].loss, "ndarray did not learn");
    let (fa, fb) = (
        llama_pro::core::weights::Checkpoint::open(dir.join("flex/model")).unwrap(),
        llama_pro::core::weights::Checkpoint::open(dir.join("ndarray/model")).unwrap(),
    );
    let mut worst = 0f32;
    for n in fa.names() {
        let shape = fa.meta(n).unwrap().shape;
        let d = max_abs_diff(
            &fa.read_f32(n, &shape).unwrap(),
            &fb.read_f32(n, &shape).unwrap(),
        );
        worst = worst.max(d);
    }
    // AdamW's first updates of the zero-initialised o_proj/down_proj divide by sqrt(v̂) of tiny
    // gradients, which turns f32 rounding differences between backends into update differences
    // of up to a fraction of one lr step (3e-3) on a few elements; a wrong gradient would change
    // the losses above instead.
    println!("exported weights: max |Δ| = {worst:.3e}");
    assert!(worst <= 1.5e-3, "{worst}");
}
