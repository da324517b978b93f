//! What must not lose a user's work or tell them something false: the run directory is owned,
//! resume checks what it resumes, expansion and conversion cannot leave or destroy a model,
//! non-finite values stop with a message, tiny data is not silently halved, signals leave a
//! checkpoint. (`scripts/crash_loop.sh` kills runs at random moments and resumes them.)

use std::path::{Path, PathBuf};

use llama_pro::core::DType;
use llama_pro::core::expand::{ExpansionPlan, expand_checkpoint, expand_checkpoint_checked};
use llama_pro::core::save::SaveOptions;
use llama_pro::core::weights::Checkpoint;
use llama_pro::train::config::{DataSource, Resume, TrainConfig};
use llama_pro::train::schedule::ScheduleKind;
use llama_pro::train::trainer::{LOCK_FILE, RunDir};

use crate::cli::{run_err, run_ok};
use crate::common::*;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/code.txt")
}

/// A small run on the expanded fixture: packed code.txt, 6 steps, checkpoints every 2.
fn config(model: &Path, output: &Path) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: vec![DataSource::new(data())],
        output: output.to_path_buf(),
        max_steps: Some(6),
        batch_size: 2,
        seq_len: 16,
        lr: 3e-3,
        lr_schedule: ScheduleKind::Cosine,
        warmup_ratio: 0.2,
        save_every: 2,
        keep: 10,
        val_fraction: 0.0,
        log_every: 0,
        token_cache: false,
        ..Default::default()
    }
}

fn steps_in(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn err_of(cfg: &TrainConfig) -> String {
    train_cpu(cfg, |_| true).unwrap_err().to_string()
}

// ---- 1. the run directory is owned --------------------------------------------------------------

#[test]
fn a_fresh_run_refuses_a_directory_holding_a_run_and_overwrite_replaces_it() {
    let model = expanded_fixture("llama-mha-f32", "own-dir");
    let out = model.parent().unwrap().join("run");
    train_cpu(
        &TrainConfig {
            max_steps: Some(8),
            ..config(&model, &out)
        },
        |_| true,
    )
    .unwrap();
    assert_eq!(
        steps_in(&out),
        ["step-2", "step-4", "step-6", "step-8"],
        "first run"
    );
    // A fresh run of 4 steps into it: refused, nothing touched.
    let short = TrainConfig {
        max_steps: Some(4),
        keep: 1,
        ..config(&model, &out)
    };
    let e = err_of(&short);
    assert!(
        e.contains("holds an earlier run") && e.contains("checkpoints") && e.contains("overwrite"),
        "{e}"
    );
    assert_eq!(
        steps_in(&out).len(),
        4,
        "the refused run touched the directory"
    );
    // With overwrite: the old run's checkpoints, metrics and model are gone; `keep` counts only
    // this run's checkpoints, so its newest survives (it used to prune its own at once).
    let r = train_cpu(
        &TrainConfig {
            overwrite: true,
            ..short.clone()
        },
        |_| true,
    )
    .unwrap();
    assert_eq!(steps_in(&out), ["step-4"]);
    assert_eq!(r.steps, 4);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("\"step\":8"), "old metrics kept");
    // `latest` now is this run's.
    let resumed = train_cpu(
        &TrainConfig {
            resume: Some(Resume::Latest),
            overwrite: false,
            ..short
        },
        |_| true,
    )
    .unwrap();
    assert_eq!(resumed.steps, 4);
}

#[test]
fn two_runs_cannot_share_an_output_directory() {
    let model = expanded_fixture("llama-mha-f32", "lock");
    let out = model.parent().unwrap().join("run");
    // Another process (here: another open of the lock file) holds the directory.
    let (held, _) = RunDir::claim(&out, true, false).unwrap();
    assert!(out.join(LOCK_FILE).exists());
    let e = err_of(&config(&model, &out));
    assert!(
        e.contains("in use by another llama-pro run")
            && e.contains(&std::process::id().to_string()),
        "{e}"
    );
    drop(held);
    train_cpu(&config(&model, &out), |_| true).unwrap();
}

#[test]
fn a_failed_run_writes_nothing_and_stale_temporaries_are_removed() {
    let model = expanded_fixture("llama-mha-f32", "nothing");
    let out = model.parent().unwrap().join("run");
    let e = err_of(&TrainConfig {
        data: vec![DataSource::new(model.parent().unwrap().join("missing.txt"))],
        ..config(&model, &out)
    });
    assert!(e.contains("missing.txt"), "{e}");
    assert!(!out.exists(), "a failed run created {}", out.display());
    // Temporaries left by a process that died while writing (a finished child's pid).
    let pid = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let id = c.id();
        c.wait().unwrap();
        id
    };
    std::fs::create_dir_all(out.join("checkpoints")).unwrap();
    let stale = [
        out.join(format!(".model.tmp-{pid}")),
        out.join("checkpoints").join(format!(".step-4.tmp-{pid}")),
        out.join("checkpoints")
            .join(format!(".step-2.tmp-{pid}.old")),
    ];
    for s in &stale {
        std::fs::create_dir_all(s).unwrap();
        std::fs::write(s.join("model.safetensors"), b"half-written").unwrap();
    }
    train_cpu(&config(&model, &out), |_| true).unwrap();
    for s in &stale {
        assert!(!s.exists(), "{} left behind", s.display());
    }
    assert!(out.join("train.toml").exists() && out.join("model/config.json").exists());
}

#[test]
fn the_model_may_not_live_in_what_the_run_writes() {
    let model = expanded_fixture("llama-mha-f32", "inside");
    let out = model.parent().unwrap().join("run");
    train_cpu(&config(&model, &out), |_| true).unwrap();
    // Training the exported model into the same output would replace it at export.
    let e = err_of(&TrainConfig {
        model: out.join("model"),
        method: llama_pro::train::config::Method::Full,
        overwrite: true,
        ..config(&model, &out)
    });
    assert!(e.contains("lies in what this run writes"), "{e}");
    assert!(out.join("model/model.safetensors").exists());
}

// ---- 2. resume checks what it resumes -----------------------------------------------------------

/// Runs 3 of 6 steps (checkpoint at 2 and at the interruption, 3) and returns the config.
fn interrupted(tag: &str) -> (PathBuf, TrainConfig) {
    let model = expanded_fixture("llama-mha-f32", tag);
    let out = model.parent().unwrap().join("run");
    let cfg = config(&model, &out);
    let r = train_cpu(&cfg, |m| m.step < 3).unwrap();
    assert!(r.interrupted && r.steps == 3);
    (model, cfg)
}

#[test]
fn resume_refuses_another_run_and_lists_what_changed() {
    let (_, cfg) = interrupted("resume-check");
    let resume = |c: TrainConfig| TrainConfig {
        resume: Some(Resume::Latest),
        ..c
    };
    // Settings that change the data: never.
    let e = err_of(&resume(TrainConfig {
        seq_len: 32,
        seed: 7,
        force: true,
        ..cfg.clone()
    }));
    assert!(
        e.contains("written by a different run")
            && e.contains("seq_len: 16 -> 32 (cannot be resumed)")
            && e.contains("seed: 0 -> 7 (cannot be resumed)"),
        "{e}"
    );
    // Settings a resumed run survives: with force only.
    let changed = TrainConfig {
        lr: 1e-3,
        batch_size: 4,
        ..cfg.clone()
    };
    let e = err_of(&resume(changed.clone()));
    assert!(
        e.contains("lr: 0.003 -> 0.001 (accepted with force)")
            && e.contains("batch_size: 2 -> 4 (accepted with force)"),
        "{e}"
    );
    let r = train_cpu(
        &resume(TrainConfig {
            force: true,
            ..changed
        }),
        |_| true,
    )
    .unwrap();
    assert_eq!(r.steps, 6);
}

#[test]
fn resume_refuses_changed_data_or_another_model_or_too_few_steps() {
    let (model, cfg) = interrupted("resume-data");
    let dir = model.parent().unwrap();
    let step3 = cfg.output.join("checkpoints/step-3");
    let resume = TrainConfig {
        resume: Some(Resume::From(step3.clone())),
        force: true,
        ..cfg.clone()
    };
    // The same file elsewhere: the contents decide, not the name.
    let copy = dir.join("code-copy.txt");
    std::fs::copy(data(), &copy).unwrap();
    let moved = TrainConfig {
        data: vec![DataSource::new(&copy)],
        ..resume.clone()
    };
    std::fs::write(&copy, "x = 1\n".repeat(200)).unwrap();
    let e = err_of(&moved);
    assert!(
        e.contains("data file 0") && e.contains("contents differ"),
        "{e}"
    );
    // Another base model: the same files with one frozen weight changed.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&model).unwrap().flatten() {
        std::fs::copy(f.path(), other.join(f.file_name())).unwrap();
    }
    let (file, offset, _) = Checkpoint::open(&other)
        .unwrap()
        .location("model.norm.weight")
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[offset as usize..offset as usize + 4].copy_from_slice(&2f32.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    let e = err_of(&TrainConfig {
        model: other,
        ..resume.clone()
    });
    assert!(
        e.contains("the model:") && e.contains("is not the model the checkpoint trained"),
        "{e}"
    );
    // A checkpoint beyond the end of the run.
    let e = err_of(&TrainConfig {
        max_steps: Some(2),
        ..resume.clone()
    });
    assert!(e.contains("past the end of this run (2 steps)"), "{e}");
    // Identical contents under another name: resumed.
    std::fs::copy(data(), &copy).unwrap();
    let r = train_cpu(&moved, |_| true).unwrap();
    assert_eq!(r.steps, 6);
}

#[test]
fn latest_passes_over_an_unreadable_checkpoint_and_reports_the_whole_run() {
    let (model, cfg) = interrupted("resume-fallback");
    let full = train_cpu(
        &TrainConfig {
            output: model.parent().unwrap().join("full"),
            ..cfg.clone()
        },
        |_| true,
    )
    .unwrap();
    // The newest checkpoint (step 3) is damaged: `latest` resumes from step 2 and says so.
    std::fs::write(
        cfg.output.join("checkpoints/step-3/optimizer-plain.bin"),
        b"torn",
    )
    .unwrap();
    let (r, notes) = train_cpu_lines(&TrainConfig {
        resume: Some(Resume::Latest),
        ..cfg.clone()
    });
    let r = r.unwrap();
    assert!(
        notes.iter().any(
            |n| n.starts_with("warning: skipped an unreadable checkpoint") && n.contains("step-3")
        ),
        "{notes:?}"
    );
    // The whole run, bitwise the uninterrupted one (the report covers steps 1-6, not 3-6).
    assert_eq!(r.losses, full.losses);
    assert_eq!(r.steps, 6);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.output.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["losses"].as_array().unwrap().len(), 6);
    let (a, b) = (
        Checkpoint::open(cfg.output.join("model")).unwrap(),
        Checkpoint::open(model.parent().unwrap().join("full/model")).unwrap(),
    );
    for n in a.names() {
        assert!(a.raw(n).unwrap().0 == b.raw(n).unwrap().0, "{n} differs");
    }
}

// ---- 3. expand and convert cannot leave or destroy a model --------------------------------------

/// A copy of a fixture model directory whose checkpoint lacks `drop` (rewritten without it).
fn without_tensor(model: &str, drop: &str, tag: &str) -> PathBuf {
    use llama_pro::core::save::{OwnedTensor, write_weights};
    let src = model_dir(model);
    let dst = tmpdir(tag).join("m");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    let ck = Checkpoint::open(&src).unwrap();
    let tensors: Vec<(String, OwnedTensor)> = ck
        .names()
        .filter(|n| *n != drop)
        .map(|n| {
            let m = ck.meta(n).unwrap();
            let bytes = ck.raw(n).unwrap().0.to_vec();
            (
                n.to_string(),
                OwnedTensor {
                    dtype: m.dtype,
                    shape: m.shape,
                    bytes,
                },
            )
        })
        .collect();
    write_weights(&dst, tensors, usize::MAX).unwrap();
    dst
}

#[test]
fn expand_checks_the_input_before_writing_a_byte() {
    let broken = without_tensor(
        "llama-mha-f32",
        "model.layers.1.mlp.up_proj.weight",
        "expand-missing",
    );
    let out = broken.with_file_name("out");
    // `--identity-check never` used to exit 0 with an unloadable model.
    let e = run_err(&[
        "expand",
        "--model",
        broken.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--groups",
        "2",
        "--identity-check",
        "never",
    ]);
    assert!(
        e.contains("missing tensor") && e.contains("model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(broken.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failed_identity_check_or_device_leaves_no_output() {
    let src = model_dir("llama-mha-f32");
    let out = tmpdir("expand-check").join("out");
    let plan = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    };
    let e = expand_checkpoint_checked(&src, &out, &plan, &SaveOptions::default(), &mut |tmp| {
        // The check sees the complete model in its temporary directory.
        assert!(tmp.join("config.json").exists() && tmp.join("model.safetensors").exists());
        Err(llama_pro::core::CoreError::Invalid(
            "logits differ by 0.5".into(),
        ))
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("logits differ"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 0);
    // An existing output stays as it was when the check fails with overwrite.
    expand_checkpoint(&src, &out, &plan, &SaveOptions::default()).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let opts = SaveOptions {
        overwrite: true,
        ..Default::default()
    };
    let bottom = ExpansionPlan::Bottom { k: 1 };
    assert!(
        expand_checkpoint_checked(&src, &out, &bottom, &opts, &mut |_| {
            Err(llama_pro::core::CoreError::Invalid("no".into()))
        })
        .is_err()
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    // A device that is not there fails before anything is written.
    #[cfg(not(feature = "cuda"))]
    {
        let out2 = out.with_file_name("out2");
        let e = run_err(&[
            "expand",
            "--model",
            src.to_str().unwrap(),
            "--output",
            out2.to_str().unwrap(),
            "--groups",
            "2",
            "--device",
            "cuda",
        ]);
        assert!(e.contains("without the `cuda` feature"), "{e}");
        assert!(!out2.exists());
    }
}

#[test]
fn output_equal_to_input_is_refused_and_the_input_survives() {
    let src = tmpdir("same-dir").join("m");
    std::fs::create_dir_all(&src).unwrap();
    for f in std::fs::read_dir(model_dir("llama-mha-f32"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(f.path(), src.join(f.file_name())).unwrap();
    }
    let before = std::fs::read(src.join("model.safetensors")).unwrap();
    let same = src.join(".").join("..").join("m");
    for args in [
        vec!["expand", "--groups", "2", "--overwrite"],
        vec!["convert", "--dtype", "bf16", "--overwrite"],
    ] {
        let mut a = args.clone();
        a.extend([
            "--model",
            src.to_str().unwrap(),
            "--output",
            same.to_str().unwrap(),
        ]);
        let e = run_err(&a);
        assert!(
            e.contains("is the input model") || e.contains("is the source model"),
            "{a:?}: {e}"
        );
        // And an output inside the input.
        let inner = src.join("sub");
        let mut a = args.clone();
        a.extend([
            "--model",
            src.to_str().unwrap(),
            "--output",
            inner.to_str().unwrap(),
        ]);
        assert!(!run_err(&a).is_empty());
        assert!(!inner.exists());
    }
    assert_eq!(
        std::fs::read(src.join("model.safetensors")).unwrap(),
        before
    );
}

// ---- 4. non-finite values do not pass silently --------------------------------------------------

/// A copy of the mha fixture with `value` written into the first element of `tensor`.
fn with_value(tag: &str, tensor: &str, value: f32, dtype: DType) -> PathBuf {
    let dst = tmpdir(tag).join("m");
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(model_dir("llama-mha-f32"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
    }
    if dtype != DType::F32 {
        let out = dst.with_file_name(format!("m-{dtype}"));
        run_ok(&[
            "convert",
            "--model",
            dst.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--dtype",
            &dtype.to_string(),
        ]);
        std::fs::remove_dir_all(&dst).unwrap();
        std::fs::rename(&out, &dst).unwrap();
    }
    let (file, offset, _) = Checkpoint::open(&dst).unwrap().location(tensor).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let o = offset as usize;
    match dtype {
        DType::F32 => bytes[o..o + 4].copy_from_slice(&value.to_le_bytes()),
        DType::BF16 => bytes[o..o + 2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        DType::F16 => bytes[o..o + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
    }
    std::fs::write(&file, bytes).unwrap();
    dst
}

#[test]
fn a_cast_that_overflows_is_refused() {
    let m = with_value(
        "f16-overflow",
        "model.layers.0.mlp.up_proj.weight",
        999424.0,
        DType::BF16,
    );
    let out = m.with_file_name("f16");
    let e = run_err(&[
        "convert",
        "--model",
        m.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight")
            && e.contains("overflow f16")
            && e.contains("999424"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn nan_weights_are_errors_in_eval_generate_and_train() {
    let m = with_value(
        "nan",
        "model.layers.1.self_attn.v_proj.weight",
        f32::NAN,
        DType::F32,
    );
    let data = fixtures().join("train/seqs.jsonl");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "eval".to_string(),
            "--model".into(),
            m.display().to_string(),
            "--data".into(),
            data.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let e = run_err(&args(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("model.layers.1.self_attn.v_proj.weight") && e.contains("NaN or infinite"),
        "{e}"
    );
    // Without the weight check, the loss itself is not accepted.
    let e = run_err(
        &args(&["--no-check-finite"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("evaluation loss is NaN"), "{e}");
    // Generation stops on non-finite logits, cached or not.
    for cache in [&[][..], &["--no-kv-cache"][..]] {
        let mut a = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "def",
            "--max-new-tokens",
            "4",
        ];
        a.extend(cache);
        let e = run_err(&a);
        assert!(e.contains("logits are not finite"), "{a:?}: {e}");
    }
    let e = err_of(&TrainConfig {
        method: llama_pro::train::config::Method::Full,
        ..config(&m, &m.with_file_name("run"))
    });
    assert!(e.contains("v_proj") && e.contains("NaN or infinite"), "{e}");
}

#[test]
fn hyperparameters_must_be_finite_and_positive() {
    let model = expanded_fixture("llama-mha-f32", "bad-hyper");
    let base = config(&model, &model.with_file_name("run"));
    for (cfg, key) in [
        (
            TrainConfig {
                weight_decay: f64::NAN,
                ..base.clone()
            },
            "weight_decay: must be a number >= 0, got NaN",
        ),
        (
            TrainConfig {
                clip_grad_norm: f64::NAN,
                ..base.clone()
            },
            "clip_grad_norm: must be a number >= 0, got NaN",
        ),
        (
            TrainConfig {
                lr_scale: vec!["expanded=-1".parse().unwrap()],
                ..base.clone()
            },
            "lr_scale: expanded=-1: the factor must be a number > 0",
        ),
        (
            TrainConfig {
                lr: f64::INFINITY,
                ..base.clone()
            },
            "lr: must be a number > 0, got inf",
        ),
    ] {
        let e = err_of(&cfg);
        assert!(e.contains(key), "{e}");
    }
}

#[test]
fn the_non_finite_stop_says_when_no_checkpoint_was_kept() {
    let model = expanded_fixture("llama-mha-f32", "nan-stop");
    let e = err_of(&TrainConfig {
        lr: 1e12,
        clip_grad_norm: 0.0,
        max_steps: Some(20),
        save_every: 0,
        ..config(&model, &model.with_file_name("none"))
    });
    assert!(
        e.contains("not finite") && e.contains("no checkpoint was written"),
        "{e}"
    );
    // With a checkpoint the message names it (`training::non_finite_loss_stops_and_keeps_the_last_checkpoint`).
}

// ---- 5. tiny data is not silently halved --------------------------------------------------------

#[test]
fn tiny_data_is_not_held_out_and_what_is_held_out_is_said() {
    let model = expanded_fixture("llama-mha-f32", "tiny");
    let cfg = TrainConfig {
        data: vec![DataSource::new(fixtures().join("train/seqs.jsonl"))],
        packing: llama_pro::train::config::PackMode::None,
        seq_len: 64,
        val_fraction: 0.02,
        max_steps: Some(1),
        ..config(&model, &model.with_file_name("run"))
    };
    let (r, lines) = train_cpu_lines(&cfg);
    let r = r.unwrap();
    assert!(r.eval_before.is_empty(), "two sequences: nothing held out");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("no evaluation windows held out") && l.contains("2 windows")),
        "{lines:?}"
    );
    // Enough windows: 2% held out, and said.
    let (r, lines) = train_cpu_lines(&TrainConfig {
        data: vec![DataSource::new(data())],
        packing: llama_pro::train::config::PackMode::Concat,
        seq_len: 8,
        output: model.with_file_name("run2"),
        ..cfg
    });
    let r = r.unwrap();
    assert!(r.eval_before.contains_key("val"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("held out") && l.contains("as the evaluation set `val`")),
        "{lines:?}"
    );
}

// ---- 6. signals ---------------------------------------------------------------------------------

/// SIGTERM (what schedulers, `docker stop` and `timeout` send) stops a `train` after its step
/// with a checkpoint and exit status 130; `--resume` finishes the run.
#[test]
fn sigterm_leaves_a_checkpoint_and_exits_130() {
    let model = expanded_fixture("llama-mha-f32", "sigterm");
    let out = model.with_file_name("run");
    let data = data();
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        "100000",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--no-token-cache",
    ];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llama-pro"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few steps in metrics.jsonl.
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl"))
        .map_or(0, |m| m.matches("\"grad_norm\"").count())
        < 3
    {
        assert!(t0.elapsed().as_secs() < 120, "no steps within 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(130), "exit status after SIGTERM");
    let latest = llama_pro::train::trainer::latest_checkpoint(&out.join("checkpoints"))
        .unwrap()
        .expect("a checkpoint after SIGTERM");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(latest.join("state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 3, "checkpoint at step {step}");
    // Continue to a few steps past it.
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let steps = (step + 2).to_string();
    a[8] = steps.clone();
    a.extend(["--resume".into(), "--force".into()]);
    let text = run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(text.contains(&format!("{steps} steps")), "{text}");
}

/// No Vulkan driver: `--device wgpu` is an error naming what was (not) found, not a panic.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_without_an_adapter_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llama-pro"))
        .args([
            "eval",
            "--model",
            model_dir("llama-mha-f32").to_str().unwrap(),
            "--data",
            fixtures().join("train/seqs.jsonl").to_str().unwrap(),
            "--device",
            "wgpu",
        ])
        .env("VK_ICD_FILENAMES", "/nonexistent.json")
        .env("VK_DRIVER_FILES", "/nonexistent.json")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("--device \"wgpu\"") && e.contains("no Vulkan adapter found"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}
