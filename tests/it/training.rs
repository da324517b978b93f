//! The training engine: AdamW, clipping and accumulation against torch; exact resume; overfitting;
//! non-finite stops; frozen parameters untouched.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use llama_pro::core::DType;
use llama_pro::core::weights::Checkpoint;
use llama_pro::train::config::{DataSource, EvalSet, TrainConfig};
use llama_pro::train::schedule::ScheduleKind;
use llama_pro::train::trainer::{StepMetrics, TrainReport};

use crate::common::*;

fn expanded(tag: &str) -> PathBuf {
    expanded_fixture("llama-mha-f32", tag)
}

fn base_config(model: &Path, output: &Path) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: vec![DataSource::new(fixtures().join("train/seqs.jsonl"))],
        output: output.to_path_buf(),
        lr: 1e-3,
        lr_schedule: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        clip_grad_norm: 0.0,
        packing: llama_pro::train::config::PackMode::None,
        seq_len: 64,
        val_fraction: 0.0,
        log_every: 0,
        token_cache: false,
        ..Default::default()
    }
}

fn run_with(
    cfg: &TrainConfig,
    on_step: impl FnMut(&StepMetrics) -> bool,
) -> Result<TrainReport, llama_pro::train::TrainError> {
    train_cpu(cfg, on_step)
}

fn run(cfg: &TrainConfig) -> TrainReport {
    run_with(cfg, |_| true).unwrap()
}

/// Trained parameters (from the final checkpoint) against torch's.
fn compare_params(output: &Path, golden: &Golden, tol: f32) -> usize {
    let ck = Checkpoint::open(
        llama_pro::train::trainer::latest_checkpoint(&output.join("checkpoints"))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let mut n = 0;
    let mut worst = 0f32;
    for name in ck.names() {
        let shape = ck.meta(name).unwrap().shape;
        let ours = ck.read_f32(name, &shape).unwrap();
        let (theirs, _) = golden.f32(&format!("param.{name}"));
        let d = max_abs_diff(&ours, &theirs);
        worst = worst.max(d);
        assert!(d <= tol, "{name}: differs from torch by {d}");
        n += 1;
    }
    println!("{n} trained tensors match torch, max |Δ| = {worst:.3e}");
    n
}

#[test]
fn one_adamw_step_matches_torch() {
    let model = expanded("adamw1");
    let out = model.parent().unwrap().join("run");
    let cfg = TrainConfig {
        max_steps: Some(1),
        batch_size: 2,
        weight_decay: 0.1,
        ..base_config(&model, &out)
    };
    let r = run(&cfg);
    let golden = Golden::open("train-adamw-1");
    assert!(
        (r.losses[0] - golden.f32("loss").0[0] as f64).abs() < 1e-6,
        "loss {} vs torch",
        r.losses[0]
    );
    assert_eq!(compare_params(&out, &golden, 1e-6), 18);
    // The loss of the same batch after the step, from the exported model.
    let out_eval =
        crate::cli::cli_eval_loss(&out.join("model"), &fixtures().join("train/seqs.jsonl"));
    let want = golden.f32("loss_after").0[0] as f64;
    println!("loss after one step: ours {out_eval:.7}, torch {want:.7}");
    assert!((out_eval - want).abs() < 1e-6);
}

#[test]
fn clipping_and_accumulation_match_torch() {
    let model = expanded("clip");
    let out = model.parent().unwrap().join("run");
    let cfg = TrainConfig {
        max_steps: Some(2),
        batch_size: 1,
        grad_accum: 2,
        clip_grad_norm: 0.05,
        weight_decay: 0.1,
        ..base_config(&model, &out)
    };
    let r = run(&cfg);
    let golden = Golden::open("train-clip-accum");
    let (want, _) = golden.f32("loss");
    for (a, b) in r.losses.iter().zip(&want) {
        assert!((a - *b as f64).abs() < 1e-6, "step loss {a} vs torch {b}");
    }
    // Parameters: as close to the exact (float64) result as torch's own float32 run is.
    let ck = Checkpoint::open(out.join("checkpoints/step-2")).unwrap();
    let (mut ours64, mut torch64, mut ours_torch) = (0f64, 0f64, 0f64);
    for name in ck.names() {
        let ours = ck.read_f32(name, &ck.meta(name).unwrap().shape).unwrap();
        let (t32, _) = golden.f32(&format!("param.{name}"));
        let exact = golden.f64(&format!("param64.{name}"));
        for ((o, t), e) in ours.iter().zip(&t32).zip(&exact) {
            ours64 = ours64.max((*o as f64 - e).abs());
            torch64 = torch64.max((*t as f64 - e).abs());
            ours_torch = ours_torch.max((*o as f64 - *t as f64).abs());
        }
    }
    println!(
        "clip+accum, max |Δ| vs float64: ours {ours64:.3e}, torch f32 {torch64:.3e}; ours vs torch {ours_torch:.3e}"
    );
    assert!(
        ours64 <= 1.5 * torch64 + 1e-7,
        "ours is further from the exact result ({ours64}) than torch ({torch64})"
    );
    assert!(ours_torch <= 2.5e-5, "ours vs torch {ours_torch}");
}

/// A run interrupted after step 3 and resumed gives bitwise the losses and weights of an
/// uninterrupted run (cosine schedule, warmup, clipping, accumulation, packing, two sources).
#[test]
fn resume_is_bitwise() {
    let model = expanded("resume");
    let dir = model.parent().unwrap().to_path_buf();
    let cfg = |out: &str| TrainConfig {
        data: vec![
            DataSource::new(fixtures().join("train/seqs.jsonl")),
            DataSource {
                path: Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/code.txt"),
                weight: 2.0,
            },
        ],
        max_steps: Some(6),
        batch_size: 2,
        grad_accum: 2,
        seq_len: 16,
        packing: llama_pro::train::config::PackMode::Concat,
        lr: 3e-3,
        lr_schedule: ScheduleKind::Cosine,
        warmup_ratio: 0.2,
        clip_grad_norm: 1.0,
        save_every: 2,
        keep: 10,
        ..base_config(&model, &dir.join(out))
    };
    let full = run(&cfg("full"));
    assert_eq!(full.losses.len(), 6);

    let part = run_with(&cfg("split"), |m| m.step < 3).unwrap();
    assert!(part.interrupted);
    assert_eq!(part.losses, full.losses[..3]);
    assert!(dir.join("split/checkpoints/step-3/state.json").exists());
    let resumed = run(&TrainConfig {
        resume: Some(llama_pro::train::config::Resume::Latest),
        ..cfg("split")
    });
    // The resumed run's report covers the whole run: the losses before the checkpoint too.
    assert_eq!(resumed.losses, full.losses, "losses after resume differ");
    let a = Checkpoint::open(dir.join("full/model")).unwrap();
    let b = Checkpoint::open(dir.join("split/model")).unwrap();
    for n in a.names() {
        assert!(
            a.raw(n).unwrap().0 == b.raw(n).unwrap().0,
            "{n} differs after resume"
        );
    }
}

#[test]
fn tiny_model_overfits_and_frozen_weights_stay() {
    let model = expanded("overfit");
    let out = model.parent().unwrap().join("run");
    let cfg = TrainConfig {
        max_steps: Some(120),
        batch_size: 2,
        lr: 1e-2,
        weight_decay: 0.1,
        clip_grad_norm: 1.0,
        ..base_config(&model, &out)
    };
    let r = run(&cfg);
    let (first, last) = (r.losses[0], *r.losses.last().unwrap());
    println!("overfit (new blocks only): loss {first:.3} -> {last:.3}");
    // The frozen final RMSNorm and random lm_head bound the logit margin the two new blocks can
    // reach: the loss plateaus near 1.14 on this corpus (25 predicted tokens).
    assert!(last < 1.5, "loss only fell from {first} to {last}");
    // Only the expanded blocks changed in the exported model.
    let (a, b) = (
        Checkpoint::open(&model).unwrap(),
        Checkpoint::open(out.join("model")).unwrap(),
    );
    for n in a.names() {
        let new = llama_pro::core::expand::layer_of(n).is_some_and(|(i, _)| i == 2 || i == 5);
        let same = a.raw(n).unwrap().0 == b.raw(n).unwrap().0;
        assert_eq!(same, !new, "{n}");
    }
    assert!(r.eval_after.is_empty() && r.model_dir.is_some());
    // Full training of the same model memorises the two sequences.
    let full = run(&TrainConfig {
        method: llama_pro::train::config::Method::Full,
        output: out.with_file_name("full"),
        ..cfg
    });
    let last = *full.losses.last().unwrap();
    println!("overfit (full): loss {:.3} -> {last:.3}", full.losses[0]);
    assert!(last < 0.1, "full training only reached {last}");
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let model = expanded("nan");
    let out = model.parent().unwrap().join("run");
    // A huge learning rate without clipping blows the new blocks up within a few steps.
    let cfg = TrainConfig {
        max_steps: Some(20),
        batch_size: 2,
        lr: 1e12,
        save_every: 1,
        keep: 1,
        ..base_config(&model, &out)
    };
    let e = run_with(&cfg, |_| true).unwrap_err().to_string();
    assert!(e.contains("not finite") && e.contains("step "), "{e}");
    let step: usize = e
        .split("step ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let last = llama_pro::train::trainer::latest_checkpoint(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(
        last.file_name().unwrap().to_string_lossy(),
        format!("step-{}", step - 1)
    );
    // The message names the checkpoint that is kept.
    assert!(e.contains(&last.display().to_string()), "{e}");
    let ck = Checkpoint::open(&last).unwrap();
    for n in ck.names() {
        let v = ck.read_f32(n, &ck.meta(n).unwrap().shape).unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{n} in the kept checkpoint is not finite"
        );
    }
    assert!(
        !out.join("model").exists(),
        "no model is exported after a failed run"
    );
}

#[test]
fn bad_training_options_are_clear() {
    let model = expanded("badopts");
    let out = model.parent().unwrap().join("run");
    let base = base_config(&model, &out);
    let err = |c: TrainConfig| run_with(&c, |_| true).unwrap_err().to_string();
    // Values are parsed once, where they enter; the errors name the key and the value.
    let e = "int8".parse::<DType>().unwrap_err().to_string();
    assert!(
        e.contains("dtype \"int8\": expected f32, bf16 or f16"),
        "{e}"
    );
    assert!(
        err(TrainConfig {
            data: vec![DataSource::new("nope.txt")],
            ..base.clone()
        })
        .contains("nope.txt")
    );
    let e = "x.txt:-1".parse::<DataSource>().unwrap_err().to_string();
    assert!(
        e.contains("data \"x.txt:-1\"") && e.contains("weight must be"),
        "{e}"
    );
    let e = err(TrainConfig {
        data: vec![DataSource {
            path: "x.txt".into(),
            weight: f64::NAN,
        }],
        ..base.clone()
    });
    assert!(e.contains("data") && e.contains("weight must be"), "{e}");
    let e = "general".parse::<EvalSet>().unwrap_err().to_string();
    assert!(
        e.contains("eval \"general\"") && e.contains("NAME=FILE"),
        "{e}"
    );
    let e = err(TrainConfig {
        warmup_ratio: 1.5,
        ..base.clone()
    });
    assert!(
        e.contains("warmup_ratio: must be in [0, 1), got 1.5"),
        "{e}"
    );
    assert!(
        err(TrainConfig {
            trainable: Some("layers[99]".parse().unwrap()),
            ..base.clone()
        })
        .contains("layer 99 does not exist")
    );
    // A base model that was never expanded: `pro` explains what to do.
    let e = err(TrainConfig {
        model: model_dir("llama-mha-f32"),
        ..base.clone()
    });
    assert!(
        e.contains("no expanded blocks") && e.contains("llama-pro expand"),
        "{e}"
    );
    // Config files reject unknown keys and bad values, naming the key.
    let toml = out.parent().unwrap().join("bad.toml");
    std::fs::write(&toml, "lr = 1e-3\nlearning_rate = 2\n").unwrap();
    let e = TrainConfig::from_toml(&toml).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
    std::fs::write(&toml, "dtype = \"int8\"\n").unwrap();
    let e = TrainConfig::from_toml(&toml).unwrap_err().to_string();
    assert!(
        e.contains("bad.toml") && e.contains("dtype") && e.contains("int8"),
        "{e}"
    );
    std::fs::write(&toml, "data = [{ path = \"a.txt\", wieght = 2 }]\n").unwrap();
    let e = TrainConfig::from_toml(&toml).unwrap_err().to_string();
    assert!(e.contains("data") && e.contains("wieght"), "{e}");
}

/// The TOML file takes the command line's short forms or tables, and what a run saves reads back
/// as the same configuration.
#[test]
fn toml_config_is_typed_and_round_trips() {
    let dir = tmpdir("toml-config");
    let toml = dir.join("train.toml");
    std::fs::write(
        &toml,
        r#"
model = "m"
output = "out"
data = ["code.jsonl:2", { path = "prose.txt" }]
eval = ["general=g.txt", { name = "domain", path = "d.jsonl" }]
lr_scale = ["embed_tokens=0.1", { selection = "norm", factor = 0.5 }]
trainable = "expanded+embed_tokens"
dtype = "bf16"
device = "cuda:1"
resume = "latest"
method = "freeze-originals"
lr_schedule = "linear"
"#,
    )
    .unwrap();
    let c = TrainConfig::from_toml(&toml).unwrap();
    assert_eq!(
        c.data,
        vec![
            DataSource {
                path: "code.jsonl".into(),
                weight: 2.0
            },
            DataSource::new("prose.txt")
        ]
    );
    assert_eq!(c.eval[1].name, "domain");
    assert_eq!(c.eval[0].path, Path::new("g.txt"));
    assert_eq!(c.lr_scale[0].factor, 0.1);
    assert_eq!(c.lr_scale[1].selection.to_string(), "norm");
    assert_eq!(c.dtype, DType::BF16);
    assert_eq!(c.device, llama_pro::core::device::DeviceSpec::Cuda(1));
    assert_eq!(c.resume, Some(llama_pro::train::config::Resume::Latest));
    assert_eq!(c.method, llama_pro::train::config::Method::FreezeOriginals);
    assert_eq!(c.lr_schedule, ScheduleKind::Linear);
    std::fs::write(&toml, c.to_toml().unwrap()).unwrap();
    assert_eq!(TrainConfig::from_toml(&toml).unwrap(), c);
}

#[test]
fn token_cache_is_reused_and_invalidated() {
    use llama_pro::train::data::{read_documents_cached, read_sequences};
    use llama_pro::train::trainer::silent;
    let dir = tmpdir("tokcache");
    let cache = dir.join("cache");
    let data = dir.join("a.txt");
    std::fs::write(&data, "def add(a, b):\n    return a + b\nprint(1)\n").unwrap();
    let mdir = model_dir("llama-mha-f32");
    let tok = llama_pro::core::Tokenizer::from_dir(&mdir, Some(1), &[2]).unwrap();
    let tf = mdir.join("tokenizer.json");
    let direct = read_sequences(&data, Some(&tok), 320, usize::MAX).unwrap();
    let first =
        read_documents_cached(&data, Some(&tok), Some(&tf), 320, &cache, &mut silent()).unwrap();
    assert_eq!(first, direct);
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    // Second read: served from the cache file (no tokenizer needed at all).
    assert_eq!(
        read_documents_cached(&data, None, Some(&tf), 320, &cache, &mut silent()).unwrap(),
        direct
    );
    // A changed file gets a new entry.
    std::fs::write(&data, "x = 1\n").unwrap();
    let changed =
        read_documents_cached(&data, Some(&tok), Some(&tf), 320, &cache, &mut silent()).unwrap();
    assert_eq!(
        changed,
        read_sequences(&data, Some(&tok), 320, usize::MAX).unwrap()
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    // A corrupt entry is ignored and rewritten.
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p != &files[0])
        .unwrap();
    std::fs::write(&entry, b"garbage").unwrap();
    assert_eq!(
        read_documents_cached(&data, Some(&tok), Some(&tf), 320, &cache, &mut silent()).unwrap(),
        changed
    );
    assert!(std::fs::metadata(&entry).unwrap().len() > 16);
}

#[test]
fn warmup_then_cosine_schedule() {
    use llama_pro::train::schedule::Schedule;
    let s = Schedule {
        lr: 1.0,
        min_lr: 0.1,
        warmup_steps: 4,
        total_steps: 14,
        kind: ScheduleKind::Cosine,
    };
    assert_eq!(s.lr(0), 0.25);
    assert_eq!(s.lr(3), 1.0);
    assert!((s.lr(4) - 1.0).abs() < 1e-12);
    assert!((s.lr(9) - 0.55).abs() < 1e-12); // halfway: (1 + 0.1) / 2
    assert!((s.lr(14) - 0.1).abs() < 1e-12);
    assert!((s.lr(100) - 0.1).abs() < 1e-12);
    let l = Schedule {
        kind: ScheduleKind::Linear,
        ..s
    };
    assert!((l.lr(9) - 0.55).abs() < 1e-12);
    let c = Schedule {
        kind: ScheduleKind::Constant,
        ..s
    };
    assert_eq!(c.lr(13), 1.0);
}

/// Balanced activation checkpointing (recompute memory-bound ops in the backward pass) trains
/// the same: losses and trained weights equal to the run without it.
#[test]
fn activation_checkpointing_trains_the_same() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    let model = expanded("ckpt-act");
    let out = model.parent().unwrap().join("plain");
    let cfg = TrainConfig {
        max_steps: Some(3),
        batch_size: 2,
        ..base_config(&model, &out)
    };
    let plain = run(&cfg);
    let ck_cfg = TrainConfig {
        output: out.with_file_name("checkpointed"),
        activation_checkpointing: true,
        ..cfg
    };
    let ck =
        train_on::<Autodiff<Cpu, BalancedCheckpointing>>(&ck_cfg, &Default::default(), |_| true)
            .unwrap();
    println!("losses {:?} vs checkpointed {:?}", plain.losses, ck.losses);
    for (a, b) in plain.losses.iter().zip(&ck.losses) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    let (a, b) = (
        Checkpoint::open(out.join("model")).unwrap(),
        Checkpoint::open(ck_cfg.output.join("model")).unwrap(),
    );
    for n in a.names() {
        let d = max_abs_diff(
            &a.read_f32(n, &a.meta(n).unwrap().shape).unwrap(),
            &b.read_f32(n, &b.meta(n).unwrap().shape).unwrap(),
        );
        assert!(d <= 1e-6, "{n}: {d}");
    }
}

/// bf16 mixed precision: frozen weights and activations in bf16, trainable weights (and AdamW
/// state) in f32. The loss curve tracks the f32 run; checkpoints hold f32 master weights; the
/// export is bf16 with the frozen weights exactly the base's, rounded to bf16.
#[test]
fn mixed_precision_bf16_tracks_f32() {
    let model = expanded("mixed");
    let out = model.parent().unwrap().join("f32");
    let cfg = TrainConfig {
        max_steps: Some(8),
        batch_size: 2,
        lr: 1e-2,
        ..base_config(&model, &out)
    };
    let f32_run = run(&cfg);
    let bf_cfg = TrainConfig {
        output: out.with_file_name("bf16"),
        dtype: DType::BF16,
        ..cfg
    };
    let bf = run(&bf_cfg);
    println!("f32 {:?}\nbf16 {:?}", f32_run.losses, bf.losses);
    for (a, b) in f32_run.losses.iter().zip(&bf.losses) {
        assert!((a - b).abs() <= 0.02 * a.abs(), "{a} vs {b}");
    }
    assert!(bf.losses[7] < bf.losses[0] - 1.0);
    let ck = llama_pro::train::trainer::latest_checkpoint(&bf_cfg.output.join("checkpoints"))
        .unwrap()
        .unwrap();
    let ck = Checkpoint::open(ck).unwrap();
    for n in ck.names() {
        assert_eq!(
            ck.meta(n).unwrap().dtype,
            llama_pro::core::DType::F32,
            "{n}"
        );
    }
    let (base, exp) = (
        Checkpoint::open(&model).unwrap(),
        Checkpoint::open(bf_cfg.output.join("model")).unwrap(),
    );
    for n in base.names() {
        assert_eq!(
            exp.meta(n).unwrap().dtype,
            llama_pro::core::DType::BF16,
            "{n}"
        );
        let new = llama_pro::core::expand::layer_of(n).is_some_and(|(i, _)| i == 2 || i == 5);
        if !new {
            let shape = base.meta(n).unwrap().shape;
            let want: Vec<f32> = base
                .read_f32(n, &shape)
                .unwrap()
                .into_iter()
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect();
            let got = exp.read_f32(n, &shape).unwrap();
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad,
                0,
                "{n}: {bad} of {} values differ from bf16(base), max |Δ| {}",
                got.len(),
                max_abs_diff(&got, &want)
            );
        }
    }
    let bad = "fp8".parse::<DType>().unwrap_err().to_string();
    assert!(bad.contains("dtype") && bad.contains("bf16"), "{bad}");
}

/// Model FLOPs per token: PaLM's 6N + 12·L·H·hd·s when everything trains; LLaMA Pro's step
/// needs less (no backward below the lowest new block, weight gradients only for new blocks).
#[test]
fn model_flops_per_token() {
    use llama_pro::train::flops::train_flops_per_token;
    let c = llama_pro::core::HfConfig::from_path(model_dir("llama-mha-f32"))
        .unwrap()
        .config;
    let (d, f, l, v, s) = (64.0, 128.0, 4.0, 320.0, 64.0);
    let n = l * (4.0 * d * d + 3.0 * d * f) + v * d; // blocks + lm_head (untied)
    let palm = 6.0 * n + 12.0 * l * 4.0 * 16.0 * s;
    let full = train_flops_per_token(&c, 64, Some(0), true, n as usize);
    assert_eq!(full, palm);
    // Only block 3 trains: backward through one block and the head; weight grads of one block.
    let block = 4.0 * d * d + 3.0 * d * f;
    let pro = train_flops_per_token(&c, 64, Some(3), false, block as usize);
    let want = 2.0 * n + 4.0 * l * 4.0 * 16.0 * s           // forward
        + 2.0 * (block + v * d) + 8.0 * 4.0 * 16.0 * s      // activation grads, top block
        + 2.0 * block; // weight grads
    assert_eq!(pro, want);
    assert!(pro < 0.6 * full);
}

/// Training on wgpu (lavapipe in CI) gives the CPU's losses; f16 mixed precision there either
/// tracks them or is refused with a clear error (no panic).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_training_matches_cpu() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    type W = Autodiff<llama_pro::core::device::WgpuBackend>;
    let model = expanded("wgpu-train");
    let out = model.parent().unwrap().join("cpu");
    let cfg = TrainConfig {
        max_steps: Some(3),
        batch_size: 2,
        ..base_config(&model, &out)
    };
    let cpu = run(&cfg);
    let go = |c: &TrainConfig| {
        train_on::<W>(c, &burn::backend::wgpu::WgpuDevice::DefaultDevice, |_| true)
    };
    let calls = llama_pro::core::ops::kernel_calls();
    let gpu = go(&TrainConfig {
        output: out.with_file_name("wgpu"),
        ..cfg.clone()
    })
    .unwrap();
    assert!(
        llama_pro::core::ops::kernel_calls() > calls,
        "the wgpu training step ran no kernel"
    );
    println!("cpu {:?}\nwgpu {:?}", cpu.losses, gpu.losses);
    for (a, b) in cpu.losses.iter().zip(&gpu.losses) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    match go(&TrainConfig {
        output: out.with_file_name("wgpu-f16"),
        dtype: DType::F16,
        ..cfg
    }) {
        Ok(r) => {
            println!("wgpu f16 {:?}", r.losses);
            for (a, b) in cpu.losses.iter().zip(&r.losses) {
                assert!((a - b).abs() < 0.02 * a, "{a} vs {b}");
            }
        }
        Err(e) => {
            println!("wgpu f16 refused: {e}");
            assert!(e.to_string().contains("cannot compute in"), "{e}");
        }
    }
}

/// The whole training step through the CPU kernels (and the fused AdamW) against the same run
/// composed from burn ops with burn's AdamW: GQA, tied embeddings, weight decay, clipping.
#[test]
fn kernels_and_composition_train_the_same() {
    let model = expanded_fixture("llama-gqa-tied-sharded-f32", "kernels-ab");
    let out = model.parent().unwrap().join("run");
    let cfg = TrainConfig {
        max_steps: Some(6),
        batch_size: 2,
        weight_decay: 0.1,
        clip_grad_norm: 1.0,
        method: llama_pro::train::config::Method::Full,
        ..base_config(&model, &out)
    };
    let fast = run(&cfg);
    let composed = llama_pro::core::ops::without_kernels(|| {
        run(&TrainConfig {
            output: out.with_file_name("run-composed"),
            ..cfg.clone()
        })
    });
    println!("kernels  {:?}\ncomposed {:?}", fast.losses, composed.losses);
    assert_eq!(fast.losses.len(), 6);
    for (a, b) in fast.losses.iter().zip(&composed.losses) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs {b}");
    }
    assert!(fast.losses[5] < fast.losses[0], "the loss did not fall");
}
