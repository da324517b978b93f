//! `llama-pro demo`: the paper's claim at toy scale, on the data shipped in `data/`.
//!
//! A small LLaMA pretrained on general text (the King James Bible) learns a new domain (Python
//! source code) with the same token budget five ways: LLaMA Pro block expansion (interleaved
//! identity blocks, only they train), full fine-tuning, LoRA, and the paper's prefix and suffix
//! stacking (the same number of identity blocks, all at the bottom or all at the top). Every
//! run is evaluated on held-out general and domain text before, during and after training;
//! the result is a table, a PNG of the losses and a JSON report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use llama_pro_core::burn::tensor::backend::AutodiffBackend;
use llama_pro_core::device::{
    DeviceSpec, OnAutodiffBackend, dispatch_autodiff, verify_identity_on,
};
use llama_pro_core::expand::{ExpansionPlan, expand_checkpoint};
use llama_pro_core::save::{SaveOptions, write_json};
use serde::{Deserialize, Serialize};

use crate::config::{DataSource, EvalSet, Method, TrainConfig};
use crate::error::{Result, TrainError};
use crate::trainer::{EvalPoint, Event, Observer, TrainReport, train};

/// A way of adding the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoMethod {
    /// LLaMA Pro: interleaved identity blocks, only they train.
    Pro,
    /// Full fine-tuning of the base model.
    Full,
    /// LoRA on every linear layer of the base model.
    Lora,
    /// The same number of identity blocks stacked below the base blocks (paper Table 6).
    Prefix,
    /// The same number of identity blocks stacked on top of the base blocks (paper Table 6).
    Suffix,
}

impl DemoMethod {
    /// Every method, in the demo's order.
    pub const ALL: [DemoMethod; 5] = [
        Self::Pro,
        Self::Full,
        Self::Lora,
        Self::Prefix,
        Self::Suffix,
    ];

    /// The name in settings and on the command line.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Pro => "pro",
            Self::Full => "full",
            Self::Lora => "lora",
            Self::Prefix => "prefix",
            Self::Suffix => "suffix",
        }
    }

    /// Name in tables and files.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pro => "llama-pro",
            Self::Full => "full-ft",
            Self::Lora => "lora",
            Self::Prefix => "prefix",
            Self::Suffix => "suffix",
        }
    }
}

impl std::str::FromStr for DemoMethod {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.key() == s).ok_or_else(|| {
            TrainError::setting(
                "methods",
                format!("{s:?}: expected pro, full, lora, prefix or suffix"),
            )
        })
    }
}

/// Settings of the demo. [`DemoConfig::default`] is the ~2-minute run, [`DemoConfig::quick`]
/// the ~25-second one (CI), on 2 CPU cores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoConfig {
    /// Directory with `base/`, `{general,domain}-{train,valid}.jsonl`.
    pub data_dir: PathBuf,
    /// Where runs, the plot and the report go.
    pub output: PathBuf,
    /// Methods, in order.
    pub methods: Vec<DemoMethod>,
    /// Optimizer steps per method (the same token budget for every method).
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate (every method).
    pub lr: f64,
    /// Interleaved expansion: groups (one identity block after each group's top block).
    pub groups: usize,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Evaluations during each run (besides before and after).
    pub evals_during: usize,
    /// Windows of each evaluation set.
    pub eval_sequences: usize,
    /// The run fails if LLaMA Pro's general loss rises by more than this many percent.
    pub max_general_change_pct: f64,
    /// Seed of data order and adapter init.
    pub seed: u64,
    /// The device.
    pub device: DeviceSpec,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            output: PathBuf::from("demo-output"),
            methods: DemoMethod::ALL.to_vec(),
            steps: 150,
            batch_size: 8,
            seq_len: 128,
            // The paper's learning rate, for every method (see the README for 5e-4 and 1e-3).
            lr: 2e-4,
            groups: 2,
            lora_rank: 8,
            evals_during: 5,
            eval_sequences: 48,
            max_general_change_pct: 5.0,
            seed: 0,
            device: DeviceSpec::Cpu,
        }
    }
}

impl DemoConfig {
    /// The CI-sized demo (~25 s on 2 CPU cores).
    pub fn quick() -> Self {
        Self {
            steps: 30,
            evals_during: 2,
            eval_sequences: 16,
            ..Self::default()
        }
    }
}

/// `data/` of the repository: `./data` if it has the base model, else the one next to this
/// crate's sources (so `cargo run` works from any directory of the checkout).
pub fn default_data_dir() -> PathBuf {
    let local = PathBuf::from("data");
    if local.join("base").join("config.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("data")
}

/// One method's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoRun {
    /// Method name.
    pub method: String,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters (adapters included).
    pub total_params: usize,
    /// Layers of the trained model.
    pub layers: usize,
    /// max |Δlogits| between the expanded model and the base before training (expansions only).
    pub identity_max_abs_diff: Option<f32>,
    /// Loss per evaluation set before training.
    pub before: BTreeMap<String, f64>,
    /// Loss per evaluation set after training.
    pub after: BTreeMap<String, f64>,
    /// Every evaluation of the run.
    pub evals: Vec<EvalPoint>,
    /// Training loss per step.
    pub train_losses: Vec<f64>,
    /// Wall time of the run (training and its evaluations), seconds.
    pub seconds: f64,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
}

impl DemoRun {
    /// Relative change of an evaluation set's loss, in percent.
    pub fn change_pct(&self, set: &str) -> f64 {
        let (b, a) = (loss_of(&self.before, set), loss_of(&self.after, set));
        100.0 * (a - b) / b
    }
}

/// The demo's result (also written as `demo.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    /// Settings.
    pub config: DemoConfig,
    /// Tokens each method trained on.
    pub tokens_per_method: usize,
    /// Runs in order.
    pub runs: Vec<DemoRun>,
    /// Whether LLaMA Pro's checks passed (identity before training, general-loss bound).
    pub passed: bool,
    /// What the checks found.
    pub verdict: Vec<String>,
}

/// One method's training run; only its steps reach the demo's observer (its set-up messages
/// would repeat five times).
struct DemoTrain<'a> {
    cfg: TrainConfig,
    observer: &'a mut dyn Observer,
}

impl OnAutodiffBackend for DemoTrain<'_> {
    type Output = Result<TrainReport>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let stop = AtomicBool::new(false);
        let outer = self.observer;
        let mut steps = |e: &Event<'_>| {
            if let Event::Step(_) = e {
                outer.on_event(e)
            }
        };
        train::<B>(self.cfg, &device, &mut steps, &stop)
    }
}

fn data_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        return Err(TrainError::setting(
            "data_dir",
            format!(
                "{}: missing; the demo needs the data shipped in the repository's data/",
                p.display()
            ),
        ));
    }
    Ok(p)
}

/// Run the demo: expansions with identity checks, one training run per method, evaluation,
/// table, plot (with the `plot` feature) and report, telling `observer` what happens (an
/// [`Event::Phase`] per method, then its steps). The report says whether LLaMA Pro's expanded
/// model was the identity and its general loss stayed within the configured bound.
pub fn run_demo(cfg: &DemoConfig, observer: &mut dyn Observer) -> Result<DemoReport> {
    let base = data_file(&cfg.data_dir, "base")?;
    let domain_train = data_file(&cfg.data_dir, "domain-train.jsonl")?;
    let general_valid = data_file(&cfg.data_dir, "general-valid.jsonl")?;
    let domain_valid = data_file(&cfg.data_dir, "domain-valid.jsonl")?;
    let device = cfg.device;
    if cfg.methods.is_empty() {
        return Err(TrainError::setting("methods", "give at least one method"));
    }
    if cfg.steps == 0 {
        return Err(TrainError::setting("steps", "must be at least 1"));
    }
    std::fs::create_dir_all(&cfg.output).map_err(|source| TrainError::Io {
        path: cfg.output.clone(),
        source,
    })?;
    let base_cfg = llama_pro_core::HfConfig::from_path(&base)?.config;
    let l = base_cfg.num_hidden_layers;
    if cfg.groups == 0 || l % cfg.groups != 0 {
        return Err(TrainError::setting(
            "groups",
            format!("{}: must divide the base model's {l} layers", cfg.groups),
        ));
    }
    let tokens = cfg.steps * cfg.batch_size * cfg.seq_len;
    observer.on_event(&Event::Info(&format!(
        "base model {} ({} layers, {} parameters); every method trains on {} domain tokens ({} steps x {} x {})",
        base.display(),
        l,
        base_cfg.num_params(),
        tokens,
        cfg.steps,
        cfg.batch_size,
        cfg.seq_len
    )));

    let mut runs = Vec::new();
    let mut verdict = Vec::new();
    let mut passed = true;
    for &m in &cfg.methods {
        let name = m.name();
        observer.on_event(&Event::Phase(name));
        let plan = match m {
            DemoMethod::Pro => Some(ExpansionPlan::Interleaved {
                groups: cfg.groups,
                copies: 1,
            }),
            DemoMethod::Prefix => Some(ExpansionPlan::Bottom { k: cfg.groups }),
            DemoMethod::Suffix => Some(ExpansionPlan::Top { k: cfg.groups }),
            DemoMethod::Full | DemoMethod::Lora => None,
        };
        let (model_dir, identity) = match &plan {
            Some(plan) => {
                let dir = cfg.output.join("models").join(format!("{name}-init"));
                observer.on_event(&Event::Info(&format!(
                    "{name}: expanding the base ({plan})"
                )));
                expand_checkpoint(
                    &base,
                    &dir,
                    plan,
                    &SaveOptions {
                        overwrite: true,
                        ..Default::default()
                    },
                )?;
                let d = verify_identity_on(device, &base, &dir)?;
                let ok = d == 0.0;
                let line = format!(
                    "{name}: expanded model {} the base before training (max |Δlogits| = {d})",
                    if ok {
                        "is bitwise identical to"
                    } else {
                        "DIFFERS from"
                    }
                );
                observer.on_event(&Event::Info(&line));
                if !ok {
                    passed = false;
                    verdict.push(format!("FAIL {line}"));
                } else if m == DemoMethod::Pro {
                    verdict.push(format!("ok   {line}"));
                }
                (dir, Some(d))
            }
            None => (base.clone(), None),
        };
        let out = cfg.output.join("runs").join(name);
        let train_cfg = TrainConfig {
            model: model_dir,
            data: vec![DataSource::new(&domain_train)],
            output: out.clone(),
            method: match m {
                DemoMethod::Full => Method::Full,
                DemoMethod::Lora => Method::Lora,
                _ => Method::Pro,
            },
            lora_rank: cfg.lora_rank,
            lora_alpha: 2.0 * cfg.lora_rank as f64,
            max_steps: Some(cfg.steps),
            batch_size: cfg.batch_size,
            seq_len: cfg.seq_len,
            lr: cfg.lr,
            eval: vec![
                EvalSet {
                    name: "general".into(),
                    path: general_valid.clone(),
                },
                EvalSet {
                    name: "domain".into(),
                    path: domain_valid.clone(),
                },
            ],
            eval_max_sequences: Some(cfg.eval_sequences),
            eval_every: (cfg.steps / (cfg.evals_during + 1)).max(1),
            log_every: 0,
            keep: 1,
            // The demo owns its output directory: a rerun replaces the earlier runs.
            overwrite: true,
            seed: cfg.seed,
            device,
            ..TrainConfig::default()
        };
        let start = Instant::now();
        let r = dispatch_autodiff(
            device,
            DemoTrain {
                cfg: train_cfg,
                observer: &mut *observer,
            },
        )??;
        let seconds = start.elapsed().as_secs_f64();
        let run = DemoRun {
            method: name.into(),
            trainable_params: r.trainable_params,
            total_params: r.total_params,
            layers: l + plan.as_ref().map_or(0, |_| cfg.groups),
            identity_max_abs_diff: identity,
            // A fresh run logs the evaluation before (step 0) first and after (last step) last.
            before: r.evals.first().map(|e| e.loss.clone()).unwrap_or_default(),
            after: r.evals.last().map(|e| e.loss.clone()).unwrap_or_default(),
            evals: r.evals,
            train_losses: r.losses,
            seconds,
            tokens_per_sec: r.tokens_per_sec,
        };
        observer.on_event(&Event::Info(&format!(
            "{name}: domain {:.3} -> {:.3}, general {:.3} -> {:.3} ({:+.2}%), {seconds:.0} s",
            loss_of(&run.before, "domain"),
            loss_of(&run.after, "domain"),
            loss_of(&run.before, "general"),
            loss_of(&run.after, "general"),
            run.change_pct("general")
        )));
        if m == DemoMethod::Pro {
            let g = run.change_pct("general");
            let ok = g.is_finite() && g <= cfg.max_general_change_pct;
            let line = format!(
                "{name}: general loss changed {g:+.2}% (bound: at most +{}%)",
                cfg.max_general_change_pct
            );
            passed &= ok;
            verdict.push(format!("{} {line}", if ok { "ok  " } else { "FAIL" }));
        }
        runs.push(run);
    }
    let report = DemoReport {
        config: cfg.clone(),
        tokens_per_method: tokens,
        runs,
        passed,
        verdict,
    };
    let json = serde_json::to_value(&report)
        .map_err(|e| TrainError::Invalid(format!("serializing the demo report: {e}")))?;
    write_json(&cfg.output.join("demo.json"), &json)?;
    #[cfg(feature = "plot")]
    plot_demo(&report, &cfg.output.join("forgetting.png"))?;
    Ok(report)
}

/// Loss of evaluation set `k` (NaN when missing).
fn loss_of(m: &BTreeMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(f64::NAN)
}

/// The results table.
pub fn demo_table(r: &DemoReport) -> String {
    let mut s = format!(
        "{:<10} {:>10} {:>6} | {:>7} {:>7} {:>8} | {:>7} {:>7} {:>8} | {:>6}\n",
        "method",
        "trainable",
        "layers",
        "domain",
        "after",
        "change",
        "general",
        "after",
        "change",
        "time"
    );
    s += &format!("{}\n", "-".repeat(96));
    for run in &r.runs {
        s += &format!(
            "{:<10} {:>10} {:>6} | {:>7.3} {:>7.3} {:>+7.1}% | {:>7.3} {:>7.3} {:>+7.2}% | {:>5.0}s\n",
            run.method,
            run.trainable_params,
            run.layers,
            loss_of(&run.before, "domain"),
            loss_of(&run.after, "domain"),
            run.change_pct("domain"),
            loss_of(&run.before, "general"),
            loss_of(&run.after, "general"),
            run.change_pct("general"),
            run.seconds
        );
    }
    s
}

/// Three panels: domain loss and general loss over the steps, and the path of every method in
/// the (domain loss, general loss) plane.
#[cfg(feature = "plot")]
pub fn plot_demo(r: &DemoReport, path: &Path) -> Result<()> {
    use crate::plot::{Panel, Series, write_png};
    let series = |f: &dyn Fn(&EvalPoint) -> Option<(f64, f64)>| -> Vec<Series> {
        r.runs
            .iter()
            .map(|run| Series {
                label: run.method.clone(),
                points: run.evals.iter().filter_map(f).collect(),
            })
            .collect()
    };
    let panels = [
        Panel {
            title: "domain loss (held-out code)".into(),
            x_label: "optimizer step".into(),
            y_label: "loss".into(),
            series: series(&|e| e.loss.get("domain").map(|l| (e.step as f64, *l))),
        },
        Panel {
            title: "general loss (held-out prose)".into(),
            x_label: "optimizer step".into(),
            y_label: "loss".into(),
            series: series(&|e| e.loss.get("general").map(|l| (e.step as f64, *l))),
        },
        Panel {
            title: "forgetting: general vs domain".into(),
            x_label: "domain loss".into(),
            y_label: "general loss".into(),
            series: series(&|e| match (e.loss.get("domain"), e.loss.get("general")) {
                (Some(d), Some(g)) => Some((*d, *g)),
                _ => None,
            }),
        },
    ];
    write_png(path, &panels, (560, 420))
}
