//! What a run produces besides the model: per-step metrics, the evaluation history, the final
//! report, the `metrics.jsonl` log, the loss plot and the exported model's README.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::eval::EvalResult;

use super::{Event, Observer};

/// One optimizer step's numbers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Mean loss of the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Gradient norm per parameter group (before clipping).
    pub group_grad_norms: BTreeMap<String, f64>,
    /// Tokens in the step's loss.
    pub tokens: usize,
    /// Training tokens per second over this step.
    pub tokens_per_sec: f64,
}

/// The evaluation losses at one step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    /// Optimizer steps done when evaluated.
    pub step: usize,
    /// Loss per evaluation set.
    pub loss: BTreeMap<String, f64>,
}

impl EvalPoint {
    pub(super) fn new(step: usize, r: &BTreeMap<String, EvalResult>) -> Self {
        Self {
            step,
            loss: r.iter().map(|(k, v)| (k.clone(), v.loss)).collect(),
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps done (in total, resumed runs included).
    pub steps: usize,
    /// Loss of every optimizer step of this process, in order.
    pub losses: Vec<f64>,
    /// Evaluation before training, per set.
    pub eval_before: BTreeMap<String, EvalResult>,
    /// Evaluation after training, per set (empty if interrupted).
    pub eval_after: BTreeMap<String, EvalResult>,
    /// Multiple-choice task scores before training (`eval_tasks`).
    #[serde(default)]
    pub tasks_before: BTreeMap<String, crate::tasks::McResult>,
    /// Multiple-choice task scores after training (empty if interrupted).
    #[serde(default)]
    pub tasks_after: BTreeMap<String, crate::tasks::McResult>,
    /// Every evaluation of this process, in order: before training (step 0, unless resumed),
    /// every `eval_every` steps, and after training.
    pub evals: Vec<EvalPoint>,
    /// The exported HuggingFace directory (None if interrupted).
    pub model_dir: Option<PathBuf>,
    /// True when stopped before the last step.
    pub interrupted: bool,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// Mean training tokens per second.
    pub tokens_per_sec: f64,
    /// Model FLOPs per trained token (see [`crate::flops::train_flops_per_token`]).
    pub flops_per_token: f64,
    /// Model FLOPs utilisation against `peak_flops`, when the peak is known.
    pub mfu: Option<f64>,
    /// Peak FLOP/s used for the MFU, and where it came from.
    pub peak_flops: Option<(f64, String)>,
}

/// The before/after table of every evaluation set.
pub fn forgetting_table(r: &TrainReport) -> String {
    let mut s = format!(
        "{:<12} {:>12} {:>12} {:>9}\n",
        "eval set", "loss before", "loss after", "change"
    );
    for (k, b) in &r.eval_before {
        if let Some(a) = r.eval_after.get(k) {
            s += &format!(
                "{k:<12} {:>12.4} {:>12.4} {:>+8.2}%\n",
                b.loss,
                a.loss,
                100.0 * (a.loss - b.loss) / b.loss
            );
        }
    }
    if !r.tasks_before.is_empty() {
        // Wide enough for "<task> acc_norm".
        let w = r
            .tasks_before
            .keys()
            .map(|k| k.len() + 9)
            .max()
            .unwrap_or(0)
            .max(12);
        s += &format!(
            "{:<w$} {:>12} {:>12} {:>9}\n",
            "task", "acc before", "acc after", "change"
        );
        for (k, b) in &r.tasks_before {
            if let Some(a) = r.tasks_after.get(k) {
                for (metric, before, after) in
                    [("acc", b.acc, a.acc), ("acc_norm", b.acc_norm, a.acc_norm)]
                {
                    s += &format!(
                        "{:<w$} {:>12.4} {:>12.4} {:>+9.4}\n",
                        format!("{k} {metric}"),
                        before,
                        after,
                        after - before
                    );
                }
            }
        }
    }
    s
}

/// The exported model's README: base model, selection, data, recipe, the forgetting table.
pub(super) fn write_run_readme(
    dir: &Path,
    cfg: &TrainConfig,
    selection: &str,
    r: &TrainReport,
) -> Result<()> {
    let data: Vec<String> = cfg
        .data
        .iter()
        .map(|d| {
            if d.weight == 1.0 {
                d.path.display().to_string()
            } else {
                format!("{}:{}", d.path.display(), d.weight)
            }
        })
        .collect();
    let text = format!(
        "# Trained with llama-pro\n\nBase model: `{}`\n\nTrainable selection: `{selection}` ({} of {} parameters)\n\n\
         Data: {}\n\nSteps: {} (batch {} x {} accumulation, seq {}), lr {} ({:?}, warmup {}), weight decay {}, clip {}\n\n\
         ```\n{}```\n",
        cfg.model.display(),
        r.trainable_params,
        r.total_params,
        data.join(", "),
        r.steps,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seq_len,
        cfg.lr,
        cfg.lr_schedule,
        cfg.warmup_ratio,
        cfg.weight_decay,
        cfg.clip_grad_norm,
        forgetting_table(r)
    );
    let p = dir.join("README.md");
    std::fs::write(&p, text).map_err(|source| TrainError::Io { path: p, source })
}

/// Writes `metrics.jsonl`: one JSON line per optimizer step ([`StepMetrics`]) and one per
/// evaluation set and evaluation (`{"step", "eval", "loss", "perplexity"}`).
///
/// A fresh run starts a new log; a resumed one keeps the lines up to its checkpoint's step (an
/// interrupted process may have logged steps after it, which are about to be redone).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    error: Option<TrainError>,
}

impl MetricsLog {
    /// Open `path` for a run that starts at optimizer step `resumed_at` (`None`: a fresh run).
    pub fn open(path: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let kept = match resumed_at {
            Some(step) => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|l| step_of(l).is_some_and(|s| s <= step))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            None => String::new(),
        };
        std::fs::write(path, kept).map_err(|e| TrainError::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            error: None,
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first write error, if any (observers cannot fail a run; the caller checks this).
    pub fn take_error(&mut self) -> Option<TrainError> {
        self.error.take()
    }

    fn line(&mut self, v: &impl Serialize) {
        let r = serde_json::to_string(v)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", self.path.display())))
            .and_then(|l| writeln!(self.file, "{l}").map_err(|e| TrainError::io(&self.path, e)));
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }
}

fn step_of(line: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("step")?.as_u64().map(|s| s as usize)
}

impl Observer for MetricsLog {
    fn on_event(&mut self, event: &Event<'_>) {
        match event {
            Event::Step(m) => self.line(m),
            Event::Eval { step, results } => {
                for (k, v) in results.iter() {
                    self.line(&serde_json::json!({
                        "step": step, "eval": k, "loss": v.loss, "perplexity": v.perplexity
                    }));
                }
            }
            _ => {}
        }
    }
}

/// Draw a `metrics.jsonl` (training loss per step, evaluation loss per set) into a PNG.
#[cfg(feature = "plot")]
pub fn plot_run(metrics: &Path, png: &Path) -> Result<()> {
    use crate::plot::{Panel, Series, write_png};
    let text = std::fs::read_to_string(metrics).map_err(|e| TrainError::io(metrics, e))?;
    let mut train = Vec::new();
    let mut evals: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let (Some(step), Some(loss)) = (
            v.get("step").and_then(|s| s.as_f64()),
            v.get("loss").and_then(|s| s.as_f64()),
        ) else {
            continue;
        };
        match v.get("eval").and_then(|e| e.as_str()) {
            Some(name) => evals
                .entry(name.to_string())
                .or_default()
                .push((step, loss)),
            None => train.push((step, loss)),
        }
    }
    let mut panels = vec![Panel {
        title: "training loss".into(),
        x_label: "optimizer step".into(),
        y_label: "loss".into(),
        series: vec![Series {
            label: "train".into(),
            points: train,
        }],
    }];
    if !evals.is_empty() {
        panels.push(Panel {
            title: "evaluation loss".into(),
            x_label: "optimizer step".into(),
            y_label: "loss".into(),
            series: evals
                .into_iter()
                .map(|(label, points)| Series { label, points })
                .collect(),
        });
    }
    write_png(png, &panels, (640, 420))
}

/// Redraws `loss.png` from `metrics.jsonl` at every evaluation and at the end of the run
/// (after [`MetricsLog`] has written the lines). A failed drawing is reported as a warning.
#[cfg(feature = "plot")]
pub struct LossPlot {
    metrics: PathBuf,
    png: PathBuf,
    /// Warnings to report (the observer cannot print).
    pub warnings: Vec<String>,
}

#[cfg(feature = "plot")]
impl LossPlot {
    /// Plot `metrics` into `png`.
    pub fn new(metrics: &Path, png: &Path) -> Self {
        Self {
            metrics: metrics.to_path_buf(),
            png: png.to_path_buf(),
            warnings: Vec::new(),
        }
    }
}

#[cfg(feature = "plot")]
impl Observer for LossPlot {
    fn on_event(&mut self, event: &Event<'_>) {
        if !matches!(event, Event::Eval { .. } | Event::End(_)) {
            return;
        }
        if let Err(e) = plot_run(&self.metrics, &self.png) {
            self.warnings.push(format!("loss plot: {e}"));
        }
    }
}
