//! `llama-pro selftest`: the golden parity checks of the test suite, run on a chosen device with
//! the fixtures the binary carries (or a fixtures directory), one line per check.
//!
//! The fixtures were made by `scripts/make_fixtures.py` with transformers and torch (versions in
//! `tests/fixtures/VERSIONS.txt`). Embedded (about 1.9 MB): `llama-mha-f32` (MHA, f32),
//! `llama3-gqa-headdim-bf16` (GQA 4/2, explicit head_dim, llama3 RoPE scaling, stored in bf16)
//! with their golden outputs, and `train-adamw-1` (one AdamW step of the expanded
//! `llama-mha-f32` with only the new blocks trainable). The checks are those of
//! `tests/it/parity.rs`, `expansion.rs` and `training.rs`:
//!
//! - logits, every block's output and the final norm, the loss (plain and right-padded) against
//!   transformers;
//! - KV-cache decoding (a 10-token prefix, then one token at a time) against transformers' cached
//!   logits and against our own full forward pass;
//! - expansion identity: the model expanded interleaved (4 → 6 blocks) gives bitwise the logits
//!   of the base;
//! - one training step through the trainer (`Trainer::step`) against torch: the loss, the 18
//!   trained tensors after AdamW and the loss after the step;
//! - the same in bf16 and f16 where the backend computes in them (mixed precision for training),
//!   with tolerances for the half type.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use llama_pro::core::burn;
use llama_pro::core::device::{DeviceSpec, OnAutodiffBackend, dispatch_autodiff};
use llama_pro::core::expand::{ExpansionPlan, expand_checkpoint, expand_model, verify_identity};
use llama_pro::core::model::causal_lm_loss_sum;
use llama_pro::core::{DType, KvCache, LlamaForCausalLM};
use llama_pro::train::config::{DataSource, TrainConfig};
use llama_pro::train::schedule::ScheduleKind;
use llama_pro::train::trainer::{TrainData, TrainModel, Trainer, silent};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

/// `llama-pro selftest`
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Device: cpu, wgpu, wgpu:N, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Half-precision dtypes checked besides f32 (comma-separated; a dtype the backend cannot
    /// compute in is reported as skipped). `--half none` checks f32 only.
    #[arg(long, default_value = "bf16,f16", value_delimiter = ',')]
    pub half: Vec<String>,
    /// A fixtures directory laid out as the repository's `tests/fixtures` (`models/NAME/`,
    /// `golden/NAME.safetensors`, `train/seqs.jsonl`) instead of the fixtures built into the
    /// binary.
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The embedded fixtures, by their path under `tests/fixtures`.
const EMBEDDED: &[(&str, &[u8])] = &[
    (
        "models/llama-mha-f32/config.json",
        include_bytes!("../../tests/fixtures/models/llama-mha-f32/config.json"),
    ),
    (
        "models/llama-mha-f32/model.safetensors",
        include_bytes!("../../tests/fixtures/models/llama-mha-f32/model.safetensors"),
    ),
    (
        "models/llama3-gqa-headdim-bf16/config.json",
        include_bytes!("../../tests/fixtures/models/llama3-gqa-headdim-bf16/config.json"),
    ),
    (
        "models/llama3-gqa-headdim-bf16/model.safetensors",
        include_bytes!("../../tests/fixtures/models/llama3-gqa-headdim-bf16/model.safetensors"),
    ),
    (
        "golden/llama-mha-f32.safetensors",
        include_bytes!("../../tests/fixtures/golden/llama-mha-f32.safetensors"),
    ),
    (
        "golden/llama3-gqa-headdim-bf16.safetensors",
        include_bytes!("../../tests/fixtures/golden/llama3-gqa-headdim-bf16.safetensors"),
    ),
    (
        "golden/train-adamw-1.safetensors",
        include_bytes!("../../tests/fixtures/golden/train-adamw-1.safetensors"),
    ),
    (
        "train/seqs.jsonl",
        include_bytes!("../../tests/fixtures/train/seqs.jsonl"),
    ),
];

const MHA: &str = "llama-mha-f32";
const GQA: &str = "llama3-gqa-headdim-bf16";

/// Tolerances on max |Δ| by compute dtype. f32: what the test suite asserts on every backend
/// (activations 1e-4, losses 1e-5, one AdamW step 1e-5; the CPU measures 1.5e-6 / 5e-7 / 6.3e-8).
/// Half types: the computation rounds every activation to 8 (bf16) or 11 (f16) significant
/// bits, against transformers' f32 or bf16 run: 0.1 / 0.05 on logits of magnitude ~2.5 (the CPU
/// measures 2.2e-2 in bf16, 2.7e-3 in f16), and 0.5% of the loss (relative) for a mixed-precision
/// training step (the CPU measures 6e-5).
struct Tol {
    logits: f32,
    kv_vs_full: f32,
    loss: f32,
    params: f32,
}

fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F32 => Tol {
            logits: 1e-4,
            kv_vs_full: 1e-5,
            loss: 1e-5,
            params: 1e-5,
        },
        DType::BF16 => Tol {
            logits: 0.1,
            kv_vs_full: 0.1,
            loss: 5e-3,
            params: f32::NAN,
        },
        DType::F16 => Tol {
            logits: 0.05,
            kv_vs_full: 0.05,
            loss: 5e-3,
            params: f32::NAN,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone)]
struct Check {
    name: String,
    model: String,
    dtype: String,
    max_abs_diff: Option<f64>,
    tolerance: Option<f64>,
    status: Status,
    note: String,
}

impl Check {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "model": self.model, "dtype": self.dtype,
            "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
            "status": match self.status { Status::Pass => "pass", Status::Fail => "fail", Status::Skip => "skip" },
            "note": self.note,
        })
    }
}

/// Collects checks and prints each as it comes.
struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn push(&mut self, c: Check) {
        let d = c
            .max_abs_diff
            .map_or("-".to_string(), |d| format!("{d:.3e}"));
        let t = c.tolerance.map_or("-".to_string(), |t| format!("{t:.0e}"));
        let status = match c.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        println!(
            "{status}  {:<20} {:<26} {:<5} max|Δ| {:>9}  tol {:>5}{}",
            c.name,
            c.model,
            c.dtype,
            d,
            t,
            if c.note.is_empty() {
                String::new()
            } else {
                format!("  {}", c.note)
            }
        );
        self.checks.push(c);
    }

    /// A measured difference against a tolerance. A difference that is not a finite number ≥ 0
    /// (NaN from non-finite outputs, or a reduction gone wrong) fails.
    fn measure(&mut self, name: &str, model: &str, dtype: DType, diff: f32, tol: f32, note: &str) {
        let valid = diff.is_finite() && diff >= 0.0;
        let note = if valid {
            note.to_string()
        } else {
            format!("not a valid difference ({diff}: non-finite outputs?); {note}")
        };
        self.push(Check {
            name: name.into(),
            model: model.into(),
            dtype: dtype.to_string(),
            max_abs_diff: valid.then_some(diff as f64),
            tolerance: Some(tol as f64),
            status: if valid && diff <= tol {
                Status::Pass
            } else {
                Status::Fail
            },
            note,
        });
    }

    fn error(&mut self, name: &str, model: &str, dtype: DType, e: &anyhow::Error) {
        self.push(Check {
            name: name.into(),
            model: model.into(),
            dtype: dtype.to_string(),
            max_abs_diff: None,
            tolerance: None,
            status: Status::Fail,
            note: format!("error: {e:#}"),
        });
    }

    fn skip(&mut self, name: &str, model: &str, dtype: DType, why: &str) {
        self.push(Check {
            name: name.into(),
            model: model.into(),
            dtype: dtype.to_string(),
            max_abs_diff: None,
            tolerance: None,
            status: Status::Skip,
            note: why.into(),
        });
    }
}

pub fn run(a: &SelftestArgs) -> anyhow::Result<ExitCode> {
    let mut halves = Vec::new();
    for h in &a.half {
        match h.trim() {
            "none" | "" => {}
            s => match DType::parse(s) {
                Some(d) if d != DType::F32 => halves.push(d),
                _ => bail!("--half {s:?}: expected bf16, f16 or none"),
            },
        }
    }
    let t0 = Instant::now();
    let (dir, scratch) = match &a.fixtures {
        Some(d) => (d.clone(), None),
        None => {
            let d = extract_embedded()?;
            (d.clone(), Some(d))
        }
    };
    let work = std::env::temp_dir().join(format!("llama-pro-selftest-work-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!(
        "selftest on {} with the fixtures {}",
        a.device,
        match &a.fixtures {
            Some(d) => format!("in {}", d.display()),
            None => "built into this binary".into(),
        }
    );
    let task = SelftestTask {
        fixtures: &dir,
        work: &work,
        halves: &halves,
    };
    let result = dispatch_autodiff(a.device, task);
    let _ = std::fs::remove_dir_all(&work);
    if let Some(d) = scratch {
        let _ = std::fs::remove_dir_all(d);
    }
    let checks = result?;
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let (passed, failed, skipped) = (
        count(Status::Pass),
        count(Status::Fail),
        count(Status::Skip),
    );
    println!(
        "{passed} passed, {failed} failed, {skipped} skipped on {} in {:.1} s",
        a.device,
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "device": a.device.to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": super::bench::git_commit(),
            "fixtures": a.fixtures.as_ref().map_or("embedded".to_string(), |d| d.display().to_string()),
            "passed": passed, "failed": failed, "skipped": skipped,
            "seconds": t0.elapsed().as_secs_f64(),
            "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if failed > 0 || passed == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Write the embedded fixtures to a scratch directory (the library reads models from disk).
fn extract_embedded() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "llama-pro-selftest-fixtures-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for (name, bytes) in EMBEDDED {
        let path = dir.join(name);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

struct SelftestTask<'a> {
    fixtures: &'a Path,
    work: &'a Path,
    halves: &'a [DType],
}

impl OnAutodiffBackend for SelftestTask<'_> {
    type Output = Vec<Check>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Vec<Check> {
        let mut r = Report { checks: Vec::new() };
        let fx = self.fixtures;
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        // f32: MHA with every intermediate, GQA logits and cache.
        guarded(&mut r, "parity", MHA, DType::F32, |r| {
            parity::<I<B>>(r, fx, MHA, DType::F32, &device)
        });
        guarded(&mut r, "parity", GQA, DType::F32, |r| {
            parity::<I<B>>(r, fx, GQA, DType::F32, &device)
        });
        guarded(&mut r, "expansion-identity", MHA, DType::F32, |r| {
            identity::<I<B>>(r, fx, MHA, DType::F32, &device)
        });
        guarded(&mut r, "train-step", MHA, DType::F32, |r| {
            train_step::<B>(r, fx, self.work, DType::F32, &device)
        });
        for &h in self.halves {
            if let Err(why) = supports::<I<B>>(&device, h) {
                for name in ["logits", "kv-vs-full", "expansion-identity", "train-step"] {
                    r.skip(name, if name == "train-step" { MHA } else { GQA }, h, &why);
                }
                continue;
            }
            guarded(&mut r, "parity", GQA, h, |r| {
                parity::<I<B>>(r, fx, GQA, h, &device)
            });
            guarded(&mut r, "expansion-identity", GQA, h, |r| {
                identity::<I<B>>(r, fx, GQA, h, &device)
            });
            guarded(&mut r, "train-step", MHA, h, |r| {
                train_step::<B>(r, fx, self.work, h, &device)
            });
        }
        r.checks
    }
}

/// Run a group of checks; an error or a panic inside the backend becomes a failed check.
fn guarded(
    r: &mut Report,
    name: &str,
    model: &str,
    dtype: DType,
    f: impl FnOnce(&mut Report) -> anyhow::Result<()>,
) {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(r)));
    std::panic::set_hook(hook);
    match out {
        Ok(Ok(())) => {}
        Ok(Err(e)) => r.error(name, model, dtype, &e),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            r.error(name, model, dtype, &anyhow!("panicked: {msg}"));
        }
    }
}

/// Whether the backend computes in `dtype`: a small matmul, exp and reduction in it.
fn supports<B: Backend>(device: &B::Device, dtype: DType) -> Result<(), String> {
    if !B::supports_dtype(device, dtype.burn()) {
        return Err(format!("this backend does not support {dtype}"));
    }
    let device = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let a = Tensor::<B, 2>::ones([4, 4], &device).cast(dtype.burn());
        let s = a
            .clone()
            .matmul(a)
            .exp()
            .sum()
            .cast(burn::tensor::DType::F32);
        to_f32(s)
    }));
    std::panic::set_hook(hook);
    match out {
        Ok(v) if v.len() == 1 && v[0].is_finite() => Ok(()),
        _ => Err(format!("this backend cannot compute in {dtype}")),
    }
}

fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    match t.into_data().convert::<f32>().into_vec::<f32>() {
        Ok(v) => v,
        Err(e) => unreachable!("data converted to f32 reads as f32: {e:?}"),
    }
}

/// Largest |a − b|; NaN if a value is not finite or the lengths differ.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::NAN;
    }
    let mut m = 0f32;
    for (x, y) in a.iter().zip(b) {
        if !(x.is_finite() && y.is_finite()) {
            return f32::NAN;
        }
        m = m.max((x - y).abs());
    }
    m
}

/// The larger of two differences, NaN winning.
fn worst(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

fn ids<B: Backend>(v: Vec<i64>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f32 {
    to_f32(t)[0]
}

/// Logits, block outputs, losses and KV-cache decoding of `name` in `dtype` against its golden
/// file. f32 on the f32 checkpoint: every output. The bf16 checkpoint in f32: logits against
/// transformers' f32 run of the same weights (`logits_f32`); in bf16: against transformers' bf16
/// run (`logits`); in f16: against `logits_f32`.
fn parity<B: Backend>(
    r: &mut Report,
    fx: &Path,
    name: &str,
    dtype: DType,
    device: &B::Device,
) -> anyhow::Result<()> {
    let g = Golden::open(&fx.join("golden").join(format!("{name}.safetensors")))?;
    let (model, _) =
        LlamaForCausalLM::<B>::from_pretrained(fx.join("models").join(name), device, Some(dtype))?;
    let t = tol(dtype);
    let (all, shape) = g.i64("input_ids")?;
    let input = ids::<B>(all.clone(), [shape[0], shape[1]], device);
    let out = model.forward_with_hidden(input.clone());
    let key = match (g.has("logits_f32"), dtype) {
        (true, DType::F32 | DType::F16) => "logits_f32",
        _ => "logits",
    };
    let kind = if name == MHA {
        "MHA"
    } else {
        "GQA, llama3 RoPE"
    };
    let logits = to_f32(out.logits.clone());
    r.measure(
        "logits",
        name,
        dtype,
        max_abs_diff(&logits, &g.f32(key)?),
        t.logits,
        &format!("vs transformers `{key}` ({kind})"),
    );
    let every_output = key == "logits" && dtype == DType::F32;
    if every_output {
        let mut d = 0f32;
        for (i, h) in out.layer_outputs.into_iter().enumerate() {
            d = worst(d, max_abs_diff(&to_f32(h), &g.f32(&format!("layer_{i}"))?));
        }
        d = worst(
            d,
            max_abs_diff(&to_f32(out.final_hidden), &g.f32("final_hidden")?),
        );
        r.measure(
            "block-outputs",
            name,
            dtype,
            d,
            t.logits,
            "every block's output and the final norm",
        );
        let mask = Tensor::<B, 2>::ones([shape[0], shape[1]], device);
        let (s, c) = causal_lm_loss_sum(out.logits, input, mask);
        let loss = scalar(s) / scalar(c);
        let (pids, ps) = g.i64("pad_input_ids")?;
        let (m, _) = g.i64("pad_mask")?;
        let mask = Tensor::<B, 2>::from_data(
            TensorData::new(
                m.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                [ps[0], ps[1]],
            ),
            device,
        );
        let pids = ids::<B>(pids, [ps[0], ps[1]], device);
        let (s, c) = causal_lm_loss_sum(model.forward(pids.clone()), pids, mask);
        let pad_loss = scalar(s) / scalar(c);
        r.measure(
            "loss",
            name,
            dtype,
            worst(
                (loss - g.f32("loss")?[0]).abs(),
                (pad_loss - g.f32("pad_loss")?[0]).abs(),
            ),
            t.loss,
            "mean cross-entropy, plain and right-padded",
        );
    }
    // KV cache: a 10-token prefix of the first row, then one token at a time.
    let seq = shape[1];
    let row: Vec<i64> = all[..seq].to_vec();
    let prefix = 10;
    let one = |v: Vec<i64>| {
        let n = v.len();
        ids::<B>(v, [1, n], device)
    };
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let prefix_logits = model.forward_cached(one(row[..prefix].to_vec()), &mut cache);
    let full = model.forward(one(row.clone()));
    let mut steps = Vec::new();
    let prefix_v = to_f32(prefix_logits);
    let mut vs_full_d = max_abs_diff(&prefix_v, &to_f32(full.clone().narrow(1, 0, prefix)));
    for p in prefix..seq {
        let l = model.forward_cached(one(vec![row[p]]), &mut cache);
        let lv = to_f32(l);
        vs_full_d = worst(
            vs_full_d,
            max_abs_diff(&lv, &to_f32(full.clone().narrow(1, p, 1))),
        );
        steps.extend(lv);
    }
    r.measure(
        "kv-vs-full",
        name,
        dtype,
        vs_full_d,
        t.kv_vs_full,
        "cached decoding vs our full forward pass",
    );
    // Transformers' cached logits were computed in the checkpoint's dtype.
    if every_output || (name == GQA && dtype == DType::BF16) {
        let d = worst(
            max_abs_diff(&prefix_v, &g.f32("kv_prefix_logits")?),
            max_abs_diff(&steps, &g.f32("kv_step_logits")?),
        );
        r.measure(
            "kv-cache",
            name,
            dtype,
            d,
            t.logits,
            "cached decoding vs transformers' cached logits",
        );
    }
    Ok(())
}

/// The model expanded interleaved (N = 2, one copy each: 4 → 6 blocks) gives bitwise the base's
/// logits (tolerance 0 in every dtype: the copies add exact zeros).
fn identity<B: Backend>(
    r: &mut Report,
    fx: &Path,
    name: &str,
    dtype: DType,
    device: &B::Device,
) -> anyhow::Result<()> {
    let (base, _) =
        LlamaForCausalLM::<B>::from_pretrained(fx.join("models").join(name), device, Some(dtype))?;
    let plan = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    };
    let (expanded, map) = expand_model(base.clone(), &plan, None)?;
    let d = verify_identity(&base, &expanded)?;
    r.measure(
        "expansion-identity",
        name,
        dtype,
        d,
        0.0,
        &format!("logits of the expanded model ({})", map.compact()),
    );
    Ok(())
}

/// One optimizer step of the trainer on `llama-mha-f32` expanded on disk (interleaved N = 2,
/// only the new blocks trainable; AdamW lr 1e-3, β 0.9/0.95, ε 1e-8, wd 0.1; batch 2 of
/// `train/seqs.jsonl`) against torch's: the step's loss, the 18 trained tensors, and the loss of
/// the batch after the step. In bf16/f16 (mixed precision) both losses within 0.5% of torch's f32.
fn train_step<B: AutodiffBackend>(
    r: &mut Report,
    fx: &Path,
    work: &Path,
    dtype: DType,
    device: &B::Device,
) -> anyhow::Result<()> {
    let g = Golden::open(&fx.join("golden").join("train-adamw-1.safetensors"))?;
    let t = tol(dtype);
    let model_dir = work.join(format!("{MHA}-pro-{dtype}"));
    let plan = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    };
    expand_checkpoint(
        &fx.join("models").join(MHA),
        &model_dir,
        &plan,
        &llama_pro::core::save::SaveOptions::default(),
    )?;
    let data = fx.join("train").join("seqs.jsonl");
    let cfg = TrainConfig {
        model: model_dir.clone(),
        data: vec![DataSource::new(&data)],
        output: work.join(format!("run-{dtype}")),
        max_steps: Some(1),
        batch_size: 2,
        lr: 1e-3,
        lr_schedule: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        clip_grad_norm: 0.0,
        weight_decay: 0.1,
        packing: llama_pro::train::config::PackMode::None,
        seq_len: 64,
        val_fraction: 0.0,
        log_every: 0,
        token_cache: false,
        dtype,
        ..Default::default()
    };
    let mut quiet = silent();
    let model = TrainModel::<B>::load(&cfg, device, &mut quiet)?;
    let data_set = TrainData::load(&cfg, &model, &mut quiet)?;
    let mut trainer = Trainer::new(cfg, model, data_set)?;
    let m = trainer.step()?;
    let want = g.f32("loss")?[0];
    let want_after = g.f32("loss_after")?[0];
    let vocab = trainer.model().config.vocab_size;
    let seqs = llama_pro::train::data::read_sequences(&data, None, vocab, 1024)?;
    let after =
        llama_pro::train::eval::evaluate(&trainer.model().valid(), &seqs, 8, device, |_| {})?;
    if dtype == DType::F32 {
        r.measure(
            "train-step-loss",
            MHA,
            dtype,
            (m.loss as f32 - want).abs(),
            t.loss,
            "the step's loss vs torch",
        );
        let trainable = trainer.summary().trainable_names.clone();
        let mut d = 0f32;
        let mut n = 0;
        for p in trainer.model().named_parameters() {
            if !trainable.contains(&p.name) {
                continue;
            }
            d = worst(
                d,
                max_abs_diff(&to_f32(p.value), &g.f32(&format!("param.{}", p.name))?),
            );
            n += 1;
        }
        if n != 18 {
            bail!("{n} trainable tensors, the golden step has 18");
        }
        r.measure(
            "train-step-params",
            MHA,
            dtype,
            d,
            t.params,
            "the 18 trained tensors after AdamW vs torch",
        );
        r.measure(
            "train-step-after",
            MHA,
            dtype,
            (after.loss as f32 - want_after).abs(),
            t.loss,
            "the batch's loss after the step vs torch",
        );
    } else {
        let rel = worst(
            (m.loss as f32 - want).abs() / want,
            (after.loss as f32 - want_after).abs() / want_after,
        );
        r.measure(
            "train-step-loss",
            MHA,
            dtype,
            rel,
            t.loss,
            "mixed precision: relative |Δ| of the step's loss and the loss after it vs torch's f32",
        );
    }
    Ok(())
}

/// A golden safetensors file, read without the library under test.
struct Golden {
    bytes: Vec<u8>,
    header: serde_json::Map<String, serde_json::Value>,
    data_start: usize,
}

impl Golden {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let n = u64::from_le_bytes(
            bytes
                .get(..8)
                .ok_or_else(|| anyhow!("{}: not a safetensors file", path.display()))?
                .try_into()?,
        ) as usize;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(
            bytes
                .get(8..8 + n)
                .ok_or_else(|| anyhow!("{}: truncated header", path.display()))?,
        )
        .with_context(|| format!("{}: header", path.display()))?;
        Ok(Self {
            bytes,
            header,
            data_start: 8 + n,
        })
    }

    fn has(&self, key: &str) -> bool {
        self.header.contains_key(key)
    }

    fn raw(&self, key: &str, dtype: &str) -> anyhow::Result<(&[u8], Vec<usize>)> {
        let t = self
            .header
            .get(key)
            .ok_or_else(|| anyhow!("golden tensor {key} missing"))?;
        if t["dtype"] != dtype {
            bail!(
                "golden tensor {key}: dtype {} (expected {dtype})",
                t["dtype"]
            );
        }
        let shape = t["shape"]
            .as_array()
            .ok_or_else(|| anyhow!("{key}: no shape"))?
            .iter()
            .map(|x| x.as_u64().map(|v| v as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("{key}: bad shape"))?;
        let off = t["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()? as usize, o.get(1)?.as_u64()? as usize)))
            .ok_or_else(|| anyhow!("{key}: bad data_offsets"))?;
        let data = self
            .bytes
            .get(self.data_start + off.0..self.data_start + off.1)
            .ok_or_else(|| anyhow!("{key}: data out of range"))?;
        Ok((data, shape))
    }

    fn f32(&self, key: &str) -> anyhow::Result<Vec<f32>> {
        let (d, _) = self.raw(key, "F32")?;
        Ok(d.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn i64(&self, key: &str) -> anyhow::Result<(Vec<i64>, Vec<usize>)> {
        let (d, shape) = self.raw(key, "I64")?;
        Ok((
            d.chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            shape,
        ))
    }
}
