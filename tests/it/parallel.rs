//! Data parallelism (burn-collective): k workers with batch b each train exactly as one worker
//! with batch k·b — in one process (worker threads) and in two processes on loopback — with
//! clipping, accumulation, uneven sequence lengths and evaluation; a 2-worker checkpoint resumes
//! on 1 worker; a worker that dies stops the others with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llama_pro::core::device::DeviceSpec;
use llama_pro::core::weights::Checkpoint;
use llama_pro::train::config::{DataSource, EvalSet, PackMode, Resume, TrainConfig};
use llama_pro::train::schedule::ScheduleKind;
use llama_pro::train::trainer::{Event, TrainReport, train_parallel};

use crate::common::*;

type B = burn::backend::Autodiff<Cpu>;

fn code() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/code.txt")
}

/// Clipping that acts (the norm is above 0.3 at this learning rate), accumulation, one line
/// per row (rows of different lengths: the workers' slices hold different numbers of targets),
/// warmup + cosine, an evaluation set.
fn config(model: &Path, out: &Path, batch: usize) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: vec![DataSource::new(code())],
        output: out.to_path_buf(),
        eval: vec![EvalSet {
            name: "code".into(),
            path: code(),
        }],
        eval_max_sequences: Some(10),
        max_steps: Some(5),
        batch_size: batch,
        grad_accum: 2,
        seq_len: 24,
        packing: PackMode::None,
        lr: 3e-3,
        lr_schedule: ScheduleKind::Cosine,
        warmup_ratio: 0.2,
        clip_grad_norm: 0.3,
        weight_decay: 0.1,
        val_fraction: 0.0,
        save_every: 2,
        keep: 10,
        log_every: 0,
        token_cache: false,
        collective_timeout: 60.0,
        ..Default::default()
    }
}

/// Train `cfg` with `workers` CPU workers in this process; `stop_after` interrupts (as Ctrl-C on
/// one worker) after that step.
fn train_workers(
    cfg: &TrainConfig,
    workers: usize,
    stop_after: Option<usize>,
) -> Result<TrainReport, llama_pro::train::TrainError> {
    let cfg = TrainConfig {
        devices: vec![DeviceSpec::Cpu; workers],
        ..cfg.clone()
    };
    let stop = AtomicBool::new(false);
    let mut observer = |e: &Event<'_>| {
        if let Event::Step(m) = e
            && Some(m.step) == stop_after
        {
            stop.store(true, Ordering::SeqCst);
        }
    };
    let devices = vec![Default::default(); workers];
    train_parallel::<B>(cfg.clone(), &cfg.topology(), &devices, &mut observer, &stop)
}

/// Largest relative difference of two loss curves.
fn curve_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max)
}

/// Largest relative difference ‖a − b‖ / ‖b‖ (per tensor) of two models' tensors, and the largest
/// |a − b| of an element; checks that they hold the same tensors. (Element-wise relative error is
/// not the measure: in the zero-initialised `down_proj`/`o_proj` of new blocks, AdamW's
/// normalised first updates turn the gradients' reassociation error of 1e-7 into ~4e-7 on weights
/// of ~0.01.)
fn weights_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let mut names: Vec<_> = a.names().collect();
    names.sort();
    let mut other: Vec<_> = b.names().collect();
    other.sort();
    assert_eq!(names, other);
    let (mut worst, mut worst_abs) = (0f64, 0f32);
    for n in names {
        let shape = a.meta(n).unwrap().shape;
        let (x, y) = (
            a.read_f32(n, &shape).unwrap(),
            b.read_f32(n, &shape).unwrap(),
        );
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|t| t * t).sum::<f64>().sqrt();
        let d = norm(&mut x.iter().zip(&y).map(|(p, q)| (*p - *q) as f64));
        let r = d / norm(&mut y.iter().map(|q| *q as f64)).max(1e-30);
        worst = worst.max(r);
        worst_abs = worst_abs.max(max_abs_diff(&x, &y));
    }
    println!("  weights: max |Δ| of an element {worst_abs:.2e}");
    assert!(worst_abs <= 1e-5, "an element differs by {worst_abs}");
    worst
}

fn eval_diff(a: &TrainReport, b: &TrainReport) -> f64 {
    let mut worst = 0f64;
    for (name, x) in &a.eval_after {
        let y = &b.eval_after[name];
        assert_eq!(x.tokens, y.tokens);
        worst = worst.max((x.loss - y.loss).abs() / y.loss);
    }
    let before = (a.eval_before["code"].loss - b.eval_before["code"].loss).abs();
    worst.max(before / b.eval_before["code"].loss)
}

#[test]
fn workers_in_one_process_train_as_one_worker_with_their_batch() {
    let model = expanded_fixture("llama-mha-f32", "dp-threads");
    let dir = model.parent().unwrap().to_path_buf();
    let one = train_workers(&config(&model, &dir.join("one"), 6), 1, None).unwrap();
    for (workers, batch) in [(2, 3), (3, 2)] {
        let out = dir.join(format!("w{workers}"));
        let r = train_workers(&config(&model, &out, batch), workers, None).unwrap();
        let (dl, dw, de) = (
            curve_diff(&r.losses, &one.losses),
            weights_diff(&out.join("model"), &dir.join("one/model")),
            eval_diff(&r, &one),
        );
        println!(
            "{workers} workers x {batch} vs 1 x 6: losses {:?}; max rel. Δ loss {dl:.2e}, weights {dw:.2e}, eval {de:.2e}",
            r.losses
        );
        assert!(dl <= 1e-5 && dw <= 1e-5 && de <= 1e-5);
        assert!(out.join("checkpoints/step-4/state.json").exists());
        assert!(out.join("metrics.jsonl").exists());
    }
    // The loss must move for the comparison to mean anything.
    assert!(one.losses[4] < one.losses[0] - 0.05, "{:?}", one.losses);
}

#[test]
fn a_two_worker_checkpoint_resumes_on_one_worker() {
    let model = expanded_fixture("llama-mha-f32", "dp-resume");
    let dir = model.parent().unwrap().to_path_buf();
    let full = train_workers(&config(&model, &dir.join("full"), 3), 2, None).unwrap();
    let part = train_workers(&config(&model, &dir.join("split"), 3), 2, Some(2)).unwrap();
    assert!(part.interrupted);
    assert_eq!(part.steps, 2);
    // On one worker with the same global batch: no `force` needed.
    let step2 = dir.join("split/checkpoints/step-2");
    let resumed = train_workers(
        &TrainConfig {
            resume: Some(Resume::From(step2.clone())),
            ..config(&model, &dir.join("split"), 6)
        },
        1,
        None,
    )
    .unwrap();
    let (dl, dw) = (
        curve_diff(&resumed.losses, &full.losses),
        weights_diff(&dir.join("split/model"), &dir.join("full/model")),
    );
    println!("2 workers resumed on 1: max rel. Δ loss {dl:.2e}, weights {dw:.2e}");
    assert!(dl <= 1e-5 && dw <= 1e-5);
    // Another global batch is a change the resume names.
    let e = train_workers(
        &TrainConfig {
            resume: Some(Resume::From(step2)),
            ..config(&model, &dir.join("split"), 3)
        },
        1,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("batch (batch_size x workers): 3 x 2 = 6 -> 3 x 1 = 3"),
        "{e}"
    );
}

#[test]
fn workers_stop_together_and_bad_settings_are_named() {
    let model = expanded_fixture("llama-mha-f32", "dp-stop");
    let dir = model.parent().unwrap().to_path_buf();
    // A non-finite loss (lr far too high) stops every worker with the message, nothing written
    // after the last checkpoint.
    let e = train_workers(
        &TrainConfig {
            lr: 1e30,
            clip_grad_norm: 0.0,
            save_every: 1,
            ..config(&model, &dir.join("nan"), 2)
        },
        2,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not finite") && e.contains("is intact"), "{e}");
    // A bad file fails every worker alike: the error reads as one worker's.
    let missing = TrainConfig {
        data: vec![DataSource::new(dir.join("missing.txt"))],
        ..config(&model, &dir.join("missing"), 2)
    };
    let one = train_workers(&missing, 1, None).unwrap_err().to_string();
    let two = train_workers(&missing, 2, None).unwrap_err().to_string();
    assert_eq!(one, two);
    assert!(one.contains("missing.txt"), "{one}");
    let bad = |c: TrainConfig| c.validate().unwrap_err().to_string();
    let base = config(&model, &dir.join("bad"), 2);
    let e = bad(TrainConfig {
        nodes: 2,
        ..base.clone()
    });
    assert!(e.contains("master") && e.contains("HOST:PORT"), "{e}");
    let e = bad(TrainConfig {
        nodes: 2,
        node_rank: 2,
        master: Some("127.0.0.1:1".into()),
        ..base.clone()
    });
    assert!(e.contains("node_rank") && e.contains("0 to 1"), "{e}");
    let e = bad(TrainConfig {
        nodes: 2,
        master: Some("localhost".into()),
        ..base.clone()
    });
    assert!(e.contains("master") && e.contains("HOST:PORT"), "{e}");
    let e = bad(TrainConfig {
        devices: vec![DeviceSpec::Cpu, DeviceSpec::Cuda(0)],
        ..base
    });
    assert!(e.contains("devices") && e.contains("one kind"), "{e}");
}

/// Three ports free on loopback now (the master's, and the two nodes' data services after it).
fn free_ports() -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        if p < 65000 && (1..=2).all(|k| std::net::TcpListener::bind(("0.0.0.0", p + k)).is_ok()) {
            return p;
        }
    }
    panic!("no free ports");
}

fn node(cfg: &Path, rank: usize, port: u16, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_llama-pro"))
        .args(["train", "--config"])
        .arg(cfg)
        .args(["--nodes", "2", "--node-rank", &rank.to_string()])
        .args(["--master", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait(mut c: std::process::Child, limit: Duration) -> (bool, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let out = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            return (status.success(), text);
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            let out = c.wait_with_output().unwrap();
            panic!(
                "a node did not finish in {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_processes_on_loopback_train_as_one_worker() {
    let model = expanded_fixture("llama-mha-f32", "dp-nodes");
    let dir = model.parent().unwrap().to_path_buf();
    let one = train_workers(&config(&model, &dir.join("one"), 6), 1, None).unwrap();
    let cfg = config(&model, &dir.join("nodes"), 3);
    let toml = dir.join("nodes.toml");
    std::fs::write(&toml, cfg.to_toml().unwrap()).unwrap();
    let port = free_ports();
    let a = node(&toml, 0, port, &[]);
    let b = node(&toml, 1, port, &[]);
    let (ok_a, log_a) = wait(a, Duration::from_secs(300));
    let (ok_b, log_b) = wait(b, Duration::from_secs(300));
    assert!(ok_a && ok_b, "node 0:\n{log_a}\nnode 1:\n{log_b}");
    let report: TrainReport =
        serde_json::from_str(&std::fs::read_to_string(dir.join("nodes/report.json")).unwrap())
            .unwrap();
    let (dl, dw, de) = (
        curve_diff(&report.losses, &one.losses),
        weights_diff(&dir.join("nodes/model"), &dir.join("one/model")),
        eval_diff(&report, &one),
    );
    println!("2 processes x 3 vs 1 x 6: max rel. Δ loss {dl:.2e}, weights {dw:.2e}, eval {de:.2e}");
    assert!(dl <= 1e-5 && dw <= 1e-5 && de <= 1e-5);

    // Node 1 dies (SIGKILL) after its first checkpoint: node 0 stops with an error naming the
    // wait, and the checkpoint is intact.
    let out = dir.join("killed");
    let cfg = TrainConfig {
        max_steps: Some(100_000),
        save_every: 2,
        collective_timeout: 5.0,
        ..config(&model, &out, 3)
    };
    std::fs::write(&toml, cfg.to_toml().unwrap()).unwrap();
    let port = free_ports();
    let a = node(&toml, 0, port, &[]);
    let mut b = node(&toml, 1, port, &[]);
    let start = Instant::now();
    while !out.join("checkpoints/step-2/state.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill().unwrap();
    let _ = b.wait();
    let (ok, log) = wait(a, Duration::from_secs(120));
    assert!(!ok, "{log}");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    println!("node 1 killed; node 0 after {:?}: {error}", start.elapsed());
    // Whichever comes first: the wait's deadline, or burn-collective noticing the closed
    // connection.
    assert!(
        log.contains("error: worker 0 of 2: summing")
            && (log.contains("no answer from the other workers")
                || log.contains("a connection to another node was lost")),
        "{log}"
    );
    let last = llama_pro::train::trainer::latest_checkpoint(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    Checkpoint::open(&last).unwrap();
    assert!(last.join("state.json").exists());
}

/// Mixed precision (bf16 compute, f32 trainable masters): the workers' sum runs in f32 and the
/// run tracks one worker's (bf16 rounding of differently shaped matmuls: not to 1e-5).
#[test]
fn workers_train_in_mixed_precision() {
    let model = expanded_fixture("llama-mha-f32", "dp-bf16");
    let dir = model.parent().unwrap().to_path_buf();
    let bf16 = |out: &str, batch| TrainConfig {
        dtype: llama_pro::core::DType::BF16,
        ..config(&model, &dir.join(out), batch)
    };
    let one = train_workers(&bf16("one", 6), 1, None).unwrap();
    let two = train_workers(&bf16("two", 3), 2, None).unwrap();
    let d = curve_diff(&two.losses, &one.losses);
    println!("bf16: 2 workers x 3 vs 1 x 6: max rel. Δ loss {d:.2e}");
    assert!(d <= 1e-2, "{:?} vs {:?}", two.losses, one.losses);
}

/// `train --dry-run` plans one worker's device: with several workers, the all-reduce buffers
/// (the flattened gradients and their sum) are a line item and a phase.
#[test]
fn the_memory_plan_counts_the_all_reduce_buffers() {
    use llama_pro::train::memory::{MemoryPlan, PlanInputs};
    let model = expanded_fixture("llama-mha-f32", "dp-plan");
    let hf = llama_pro::core::HfConfig::from_path(&model).unwrap();
    let plan = |devices: Vec<DeviceSpec>| {
        let cfg = TrainConfig {
            devices,
            ..config(&model, &model.parent().unwrap().join("o"), 3)
        };
        let inputs = PlanInputs::from_train_config(&cfg, &hf).unwrap();
        MemoryPlan::for_training(&hf.config, &inputs)
    };
    let (one, two) = (plan(vec![]), plan(vec![DeviceSpec::Cpu; 2]));
    assert_eq!(one.bytes("all_reduce"), 0);
    assert_eq!(two.bytes("all_reduce"), 2 * two.bytes("gradients"));
    assert!(two.bytes("gradients") > 0);
    assert!(two.total_bytes() >= one.total_bytes());
}

/// In one process, a worker that fails ends the others' waits at once with an error naming it;
/// a worker that never answers (a hang) is cut off by the timeout.
#[test]
fn a_failed_or_silent_worker_ends_the_others_wait() {
    use burn::tensor::Tensor;
    use llama_pro::train::parallel::{Shared, Topology, join, with_turn};
    use std::sync::Arc;
    let topology = Topology {
        local: 2,
        timeout: Duration::from_secs(2),
        ..Topology::single()
    };
    let device = Default::default();
    let ones = || Tensor::<Cpu, 1>::ones([4], &device);
    with_turn::<Cpu, _>(|| {
        let shared = Arc::new(Shared::default());
        let (first, second) = std::thread::scope(|s| {
            let other = s.spawn(|| join::<Cpu>(&topology, 1, &device, shared.clone()).unwrap());
            let me = join::<Cpu>(&topology, 0, &device, shared.clone()).unwrap();
            (me, other.join().unwrap())
        });
        // Worker 1 is alive but does not sum: worker 0 gives up after the timeout.
        let start = Instant::now();
        let e = first.sum("x", ones()).unwrap_err().to_string();
        let waited = start.elapsed();
        assert!(
            e.contains("worker 0 of 2: summing x: no answer from the other workers for 2 s"),
            "{e}"
        );
        assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(10));
        // (Worker 1's late sum completes the operation left open, as a live peer's would.)
        let late = second.sum("x", ones()).unwrap();
        assert_eq!(late.into_data().to_vec::<f32>().unwrap(), vec![2.0; 4]);
        // Worker 1 fails: worker 0's wait ends at once.
        shared.fail(1, "boom");
        let start = Instant::now();
        let e = first.sum("y", ones()).unwrap_err().to_string();
        assert!(e.contains("another worker failed"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(shared.first_failure(), Some((1, "boom".to_string())));
        // Close the operation worker 0 opened, so that the next run starts clean.
        let _ = second.sum("y", ones());
    });
}
