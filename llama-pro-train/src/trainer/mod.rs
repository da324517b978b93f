//! The training recipe as a small type: [`Trainer::new`] → [`Trainer::step`] →
//! [`Trainer::evaluate`] → [`Trainer::save`] → [`Trainer::finish`].
//!
//! Continued pretraining of the selected parameters (by default the expanded blocks) with AdamW,
//! warmup + decay, global-norm clipping and gradient accumulation; evaluation on named sets;
//! checkpoints with exact resume; a HuggingFace export. [`train`] composes these steps and reports
//! what happens to an [`Observer`]; a program that wants its own loop calls them itself:
//!
//! ```no_run
//! # use llama_pro_train::{config::TrainConfig, trainer::*};
//! # use llama_pro_core::burn::backend::{Autodiff, Flex};
//! # fn main() -> llama_pro_train::Result<()> {
//! # let config = TrainConfig::default();
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut quiet = silent();
//! let model = TrainModel::<B>::load(&config, &device, &mut quiet)?;
//! let data = TrainData::load(&config, &model, &mut quiet)?;
//! let mut trainer = Trainer::new(config, model, data)?;
//! trainer.evaluate()?;
//! while !trainer.is_done() {
//!     let m = trainer.step()?;
//!     println!("step {} loss {:.4}", m.step, m.loss);
//! }
//! let report = trainer.finish()?;
//! # Ok(()) }
//! ```
//!
//! The files by concern: `setup` (model, data, groups, optimizer), `step` (the loop body),
//! `evaluate`, `checkpoint` (save, resume), `report` (metrics, report, README, plot) and
//! `observer` (events). Several workers: [`train_parallel`] and [`Trainer::new_worker`] (see
//! [`crate::parallel`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn;
use llama_pro_core::model::LlamaForCausalLM;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::eval::EvalResult;
use crate::parallel::{self, Collective, Topology};
use crate::schedule::Schedule;
use crate::tasks::{McResult, McTask};

mod checkpoint;
mod evaluate;
mod observer;
mod report;
mod rundir;
mod setup;
mod step;

pub use checkpoint::{DataEntry, Manifest, latest_checkpoint};
pub use observer::{Event, Observer, Observers, silent};
pub use report::{EvalPoint, MetricsLog, StepMetrics, TrainReport, forgetting_table};
#[cfg(feature = "plot")]
pub use report::{LossPlot, plot_run};
pub use rundir::{LOCK_FILE, RUN_FILES, RunDir};
pub use setup::{ModelInfo, TrainData, TrainModel};

use setup::{Group, Optimizers};

/// A training run in progress. See the module docs.
pub struct Trainer<B: AutodiffBackend> {
    config: TrainConfig,
    device: B::Device,
    /// `None` only while an optimizer step has it (burn's optimizers take the module by value).
    model: Option<LlamaForCausalLM<B>>,
    info: ModelInfo,
    data: TrainData,
    schedule: Schedule,
    groups: Vec<Group>,
    optim: Optimizers<B>,
    /// Optimizer steps done.
    step: usize,
    /// The checkpoint this run resumed from, and its step.
    resumed: Option<(PathBuf, usize)>,
    eval_before: BTreeMap<String, EvalResult>,
    /// Multiple-choice tasks (`eval_tasks`) and their scores before and after training.
    tasks: Vec<McTask>,
    tasks_before: BTreeMap<String, McResult>,
    tasks_after: BTreeMap<String, McResult>,
    evals: Vec<EvalPoint>,
    /// The latest evaluation and its step.
    latest_eval: Option<(usize, BTreeMap<String, EvalResult>)>,
    losses: Vec<f64>,
    tokens: usize,
    /// From the start of the first step of this process to the end of the latest one.
    clock: Option<(Instant, Duration)>,
    /// Training seconds of the run before the checkpoint it resumed.
    seconds_before: f64,
    flops_per_token: f64,
    peak_flops: Option<(f64, String)>,
    /// What identifies this run (model, data, settings).
    manifest: Manifest,
    /// The output directory, once claimed.
    run_dir: Option<RunDir>,
    /// The newest checkpoint this run wrote or resumed.
    last_checkpoint: Option<PathBuf>,
    /// Things set-up wants the user to know (checkpoints passed over, changes accepted).
    notes: Vec<String>,
    /// The other workers of a data-parallel run (one worker: the identity).
    collective: Collective,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// A run of `config` on a prepared model and its data: parameter groups, schedule and
    /// optimizer set up; with `config.resume`, the checkpoint's weights, optimizer state and data
    /// position restored. Nothing is written yet.
    pub fn new(config: TrainConfig, model: TrainModel<B>, data: TrainData) -> Result<Self> {
        Self::new_worker(config, model, data, Collective::single())
    }

    /// [`Trainer::new`] for one worker of a data-parallel run (see [`crate::parallel`]): every
    /// worker is given the same configuration, model and data; each takes its slice of every
    /// global batch of `batch_size` x workers sequences, and the worker of rank 0 writes the
    /// checkpoints and the exported model.
    pub fn new_worker(
        config: TrainConfig,
        model: TrainModel<B>,
        data: TrainData,
        collective: Collective,
    ) -> Result<Self> {
        config.validate()?;
        // Task files are read now: a bad line fails before training, not after it.
        let tasks = config
            .eval_tasks
            .iter()
            .map(|p| McTask::load(p))
            .collect::<Result<Vec<_>>>()?;
        if !tasks.is_empty() && model.info.tokenizer.is_none() {
            return Err(TrainError::setting(
                "eval_tasks",
                "the model directory has no tokenizer.json: task items are text, scored with the model's tokenizer",
            ));
        }
        let per_step = config.batch_size * config.grad_accum * collective.world();
        let total_steps = config.max_steps.unwrap_or_else(|| {
            ((config.epochs * data.stream.len() as f64) / per_step as f64)
                .ceil()
                .max(1.0) as usize
        });
        let schedule = Schedule {
            lr: config.lr,
            min_lr: config.min_lr,
            warmup_steps: (config.warmup_ratio * total_steps as f64).round() as usize,
            total_steps,
            kind: config.lr_schedule,
        };
        let TrainModel { model, info } = model;
        // The model may not live where this run writes.
        let out = llama_pro_core::save::resolve(&config.output);
        let model_dir = llama_pro_core::save::resolve(&info.dir);
        if ["model", "checkpoints"]
            .iter()
            .any(|d| model_dir.starts_with(out.join(d)))
        {
            return Err(TrainError::setting(
                "output",
                format!(
                    "{}: the model {} lies in what this run writes (model/, checkpoints/); \
                     train into another output directory",
                    config.output.display(),
                    info.dir.display()
                ),
            ));
        }
        if config.resume.is_none() && !config.overwrite && collective.rank() == 0 {
            RunDir::refuse_fresh(&config.output)?;
        }
        let manifest = Manifest {
            run_id: new_run_id(),
            config_sha256: sha256_hex(config.to_toml()?.as_bytes()),
            model: info.fingerprint.clone(),
            data: data
                .stream
                .sources()
                .iter()
                .map(|s| DataEntry {
                    path: s.path.clone(),
                    weight: s.weight,
                    digest: s.digest.clone(),
                })
                .collect(),
        };
        let groups = setup::parameter_groups(&config, &model, &info);
        let flops_per_token = setup::flops_per_token(&config, &model, &info);
        let peak_flops = setup::peak_flops(&config);
        let device = model.model.embed_tokens.weight.val().device();
        let mut trainer = Self {
            optim: Optimizers::new(&config),
            config,
            device,
            model: Some(model),
            info,
            data,
            schedule,
            groups,
            step: 0,
            resumed: None,
            eval_before: BTreeMap::new(),
            tasks,
            tasks_before: BTreeMap::new(),
            tasks_after: BTreeMap::new(),
            evals: Vec::new(),
            latest_eval: None,
            losses: Vec::new(),
            tokens: 0,
            clock: None,
            seconds_before: 0.0,
            flops_per_token,
            peak_flops,
            manifest,
            run_dir: None,
            last_checkpoint: None,
            notes: Vec::new(),
            collective,
        };
        if let Some(r) = trainer.config.resume.clone() {
            trainer.resume(&r)?;
        }
        Ok(trainer)
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model being trained.
    pub fn model(&self) -> &LlamaForCausalLM<B> {
        match &self.model {
            Some(m) => m,
            None => unreachable!("the model is only taken inside an optimizer step"),
        }
    }

    /// What trains, with parameter counts.
    pub fn summary(&self) -> &llama_pro_core::freeze::TrainableSummary {
        &self.info.summary
    }

    /// Optimizer steps done (a resumed run counts the checkpoint's).
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// True when every step is done.
    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// The checkpoint this run resumed from and its step.
    pub fn resumed_from(&self) -> Option<(&Path, usize)> {
        self.resumed.as_ref().map(|(p, s)| (p.as_path(), *s))
    }

    /// This worker's rank and the number of workers (0 and 1 on one device).
    pub fn worker(&self) -> (usize, usize) {
        (self.collective.rank(), self.collective.world())
    }

    /// The training examples: how many, from which files.
    pub fn data(&self) -> &TrainData {
        &self.data
    }

    /// True when the configuration asks for an evaluation after the step just done (every
    /// `eval_every` steps, not after the last: [`Trainer::finish`] evaluates then).
    pub fn eval_due(&self) -> bool {
        let every = self.config.eval_every;
        every > 0 && self.step.is_multiple_of(every) && self.step > 0 && !self.is_done()
    }

    /// True when the configuration asks for a checkpoint after the step just done (every
    /// `save_every` steps, not after the last: [`Trainer::finish`] saves then).
    pub fn save_due(&self) -> bool {
        let every = self.config.save_every;
        every > 0 && self.step.is_multiple_of(every) && self.step > 0 && !self.is_done()
    }

    /// What set-up wants the user to know: checkpoints `resume` passed over, changes accepted
    /// with `force`.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// What identifies this run: its id, the model's fingerprint, the data files' digests.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether to stop before the next step: `stop` is set here or, in a data-parallel run, on
    /// any worker (then all stop after the same step).
    pub fn stop_requested(&self, stop: &AtomicBool) -> Result<bool> {
        let here = stop.load(Ordering::SeqCst);
        if self.collective.world() == 1 {
            return Ok(here);
        }
        let flags = self.collective.sum_values::<B::InnerBackend>(
            "the stop flags",
            vec![f32::from(u8::from(here))],
            &self.device,
        )?;
        Ok(flags[0] > 0.0)
    }

    /// Check that every worker of a data-parallel run starts from the same place: the same
    /// step, model, data and settings (a node given another checkpoint, configuration or model
    /// would otherwise train a different replica).
    fn check_workers_agree(&self) -> Result<()> {
        let world = self.collective.world();
        if world == 1 {
            return Ok(());
        }
        let cfg = serde_json::to_value(&self.config)
            .map_err(|e| TrainError::Invalid(format!("serializing the configuration: {e}")))?;
        let keys = checkpoint::NEVER.iter().chain(checkpoint::WITH_FORCE);
        let meaning: Vec<_> = keys
            .chain(&["eval", "eval_max_sequences"])
            .map(|k| cfg.get(*k).cloned())
            .collect();
        let text = serde_json::json!([
            meaning,
            self.manifest.model,
            self.manifest
                .data
                .iter()
                .map(|d| &d.digest.sha256)
                .collect::<Vec<_>>(),
            self.info.summary.trainable_names,
        ])
        .to_string();
        let h = sha256_hex(text.as_bytes());
        // 16-bit pieces: exact in f32, and so are their sums over up to 256 workers.
        let mine: Vec<f32> = std::iter::once(self.step as f32)
            .chain(
                (0..4).map(|i| u16::from_str_radix(&h[i * 4..i * 4 + 4], 16).unwrap_or(0) as f32),
            )
            .collect();
        let sums = self.collective.sum_values::<B::InnerBackend>(
            "the start-up check",
            mine.clone(),
            &self.device,
        )?;
        let expected: Vec<f32> = mine.iter().map(|v| v * world as f32).collect();
        if sums[0] != expected[0] {
            return Err(TrainError::Collective(format!(
                "worker {}: the workers start from different steps (this one from step {}): give \
                 every node the same checkpoint to resume",
                self.collective.rank(),
                self.step
            )));
        }
        if sums[1..] != expected[1..] {
            return Err(TrainError::Collective(format!(
                "worker {}: the workers were given different models, data or settings (batch, \
                 learning rate, seed...): give every node the same files and flags",
                self.collective.rank()
            )));
        }
        Ok(())
    }

    /// Training seconds of the whole run (a resumed run includes the time before its checkpoint).
    fn seconds(&self) -> f64 {
        self.seconds_before + self.clock.map_or(0.0, |(_, busy)| busy.as_secs_f64())
    }

    /// The report so far (`interrupted`: the run stops before its last step). A resumed run
    /// reports the whole run: losses, evaluations, tokens and time from before its checkpoint
    /// included.
    pub fn report(&self, interrupted: bool) -> TrainReport {
        let secs = self.seconds();
        let tokens_per_sec = if secs > 0.0 {
            self.tokens as f64 / secs
        } else {
            0.0
        };
        TrainReport {
            steps: self.step,
            losses: self.losses.clone(),
            eval_before: self.eval_before.clone(),
            eval_after: BTreeMap::new(),
            tasks_before: self.tasks_before.clone(),
            tasks_after: self.tasks_after.clone(),
            evals: self.evals.clone(),
            model_dir: None,
            interrupted,
            trainable_params: self.info.summary.trainable(),
            total_params: self.info.summary.total(),
            tokens_per_sec,
            flops_per_token: self.flops_per_token,
            mfu: self.mfu(tokens_per_sec),
            peak_flops: self.peak_flops.clone(),
        }
    }

    /// Model FLOPs utilisation at `tokens_per_sec` (of all workers together), when the device's
    /// peak is known.
    pub fn mfu(&self, tokens_per_sec: f64) -> Option<f64> {
        // CPU workers of one process share its cores (the estimated peak is the machine's).
        let devices = match self.config.primary_device() {
            llama_pro_core::device::DeviceSpec::Cpu => self.config.nodes.max(1),
            _ => self.collective.world(),
        } as f64;
        self.peak_flops
            .as_ref()
            .map(|(p, _)| tokens_per_sec * self.flops_per_token / (p * devices))
    }

    /// The end of a completed run: the final checkpoint, the evaluation after training, the
    /// HuggingFace export (see [`Trainer::export`]).
    pub fn finish(mut self) -> Result<TrainReport> {
        self.save()?;
        self.evaluate()?;
        self.evaluate_tasks()?;
        self.export()
    }
}

/// Train as `config` says on `device`, reporting to `observer`: load the model and data, resume
/// if asked, evaluate before training, run the steps with periodic evaluations and checkpoints,
/// then save, evaluate and export. When `stop` becomes true (Ctrl-C), the current step finishes,
/// a checkpoint is written and the report comes back with `interrupted = true`.
pub fn train<B: AutodiffBackend>(
    config: TrainConfig,
    device: &B::Device,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<TrainReport> {
    train_parallel::<B>(
        config,
        &Topology::single(),
        std::slice::from_ref(device),
        observer,
        stop,
    )
}

/// [`train`] with data parallelism: one worker per device of `devices` (`topology.local` of
/// them), each on its own thread, together with the workers of the other processes of
/// `topology` (see [`crate::parallel`]). The `observer` follows this process's first worker
/// (losses and evaluations are those of the whole run on every worker); the worker of rank 0
/// writes the checkpoints, the metrics and the model. A worker that fails stops the run: the
/// error names it, and the last checkpoint is intact.
pub fn train_parallel<B: AutodiffBackend>(
    config: TrainConfig,
    topology: &Topology,
    devices: &[B::Device],
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<TrainReport> {
    config.validate()?;
    if devices.len() != topology.local || devices.is_empty() {
        return Err(TrainError::setting(
            "devices",
            format!(
                "{} device(s) given for {} worker(s) per node",
                devices.len(),
                topology.local
            ),
        ));
    }
    if config.resume.is_none() && !config.overwrite && topology.node_rank == 0 {
        // Before the (long) loading: `Trainer::new` and `claim_output` check again.
        RunDir::refuse_fresh(&config.output)?;
    }
    llama_pro_core::device::tune_allocator();
    if topology.world() == 1 {
        return worker::<B>(
            config,
            topology,
            0,
            &devices[0],
            observer,
            stop,
            &Arc::default(),
        );
    }
    parallel::with_turn::<B::InnerBackend, _>(|| {
        let shared = Arc::new(parallel::Shared::default());
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = (1..devices.len())
                .map(|i| {
                    let (config, shared, device) = (config.clone(), shared.clone(), &devices[i]);
                    std::thread::Builder::new()
                        .name(format!("llama-pro-worker-{}", topology.rank(i)))
                        .spawn_scoped(s, move || {
                            let mut quiet = silent();
                            worker::<B>(config, topology, i, device, &mut quiet, stop, &shared)
                        })
                })
                .collect();
            let first = worker::<B>(
                config.clone(),
                topology,
                0,
                &devices[0],
                observer,
                stop,
                &shared,
            );
            let mut results = vec![first];
            for h in handles {
                results.push(match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(TrainError::Collective("a worker thread panicked".into()))
                    }),
                    Err(e) => Err(TrainError::Invalid(format!(
                        "starting a worker thread: {e}"
                    ))),
                });
            }
            results
        });
        let first = results.into_iter().next().expect("one worker at least");
        match (first, shared.first_failure()) {
            // This process's first worker failed on its own (a bad file or setting fails every
            // worker alike): its error as one worker would give it.
            (Err(e), _) if !matches!(e, TrainError::Collective(_)) => Err(e),
            (_, Some((rank, message))) => Err(TrainError::Collective(format!(
                "worker {rank} of {} failed: {message}",
                topology.world()
            ))),
            (first, None) => first,
        }
    })
}

/// One worker of [`train_parallel`]: the `i`-th of this process.
fn worker<B: AutodiffBackend>(
    config: TrainConfig,
    topology: &Topology,
    i: usize,
    device: &B::Device,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
    shared: &Arc<parallel::Shared>,
) -> Result<TrainReport> {
    let rank = topology.rank(i);
    let run = || -> Result<TrainReport> {
        let model = TrainModel::<B>::load(&config, device, observer)?;
        let data = TrainData::load(&config, &model, observer)?;
        let collective = parallel::join::<B::InnerBackend>(topology, rank, device, shared.clone())?;
        let mut trainer = Trainer::new_worker(config.clone(), model, data, collective)?;
        trainer.check_workers_agree()?;
        // Everything is read and checked: from here on the run writes (rank 0 alone).
        let (mut metrics, mut removed) = (None, Vec::new());
        let mut observers = Observers::new();
        if rank == 0 {
            removed = trainer.claim_output()?;
            observers.push(metrics.insert(MetricsLog::open(
                &trainer.config.output.join("metrics.jsonl"),
                trainer.resumed_from().map(|(_, s)| s),
            )?));
        }
        observers.push(observer);
        for p in removed {
            observers.on_event(&Event::Info(&format!("removed {}", p.display())));
        }
        let report = run(&mut trainer, &mut observers, stop);
        drop(observers);
        // The metrics log cannot fail the run while it goes; its first error is reported here.
        let report = match metrics.and_then(|mut m| m.take_error()) {
            Some(e) if report.is_ok() => Err(e),
            _ => report,
        }?;
        trainer.collective.finish::<B::InnerBackend>();
        Ok(report)
    };
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        if topology.world() == 1 {
            std::panic::resume_unwind(p);
        }
        Err(TrainError::Invalid(format!("panicked: {msg}")))
    });
    if let Err(e) = &out
        && topology.world() > 1
        && !matches!(e, TrainError::Collective(_))
    {
        shared.fail(rank, &e.to_string());
    }
    out
}

/// The run after set-up: evaluation before, the steps with periodic evaluations and
/// checkpoints, then save, evaluate and export (or a checkpoint when `stop` is set).
fn run<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    o: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<TrainReport> {
    for n in trainer.notes() {
        o.on_event(&Event::Warning(n));
    }
    o.on_event(&Event::Info(&describe(trainer)));
    if let Some((dir, step)) = trainer.resumed_from() {
        o.on_event(&Event::Info(&format!(
            "resumed from {} at step {step}",
            dir.display()
        )));
    }
    o.on_event(&Event::Start {
        step: trainer.steps_done(),
        total_steps: trainer.total_steps(),
        flops_per_token: trainer.flops_per_token,
        peak_flops: trainer.peak_flops.as_ref().map(|(p, _)| *p),
    });
    if trainer.resumed_from().is_none() {
        let r = trainer.evaluate()?;
        o.on_event(&Event::Eval {
            step: 0,
            results: &r,
        });
        let t = trainer.evaluate_tasks()?;
        if !t.is_empty() {
            o.on_event(&Event::Info(&format!(
                "tasks before training: {}",
                describe_tasks(&t)
            )));
        }
    }
    while !trainer.is_done() {
        if trainer.stop_requested(stop)? {
            let dir = trainer.save()?;
            let step = trainer.steps_done();
            o.on_event(&Event::Checkpoint { step, dir: &dir });
            let report = trainer.report(true);
            o.on_event(&Event::End(&report));
            return Ok(report);
        }
        let m = trainer.step()?;
        o.on_event(&Event::Step(&m));
        if trainer.eval_due() {
            let r = trainer.evaluate()?;
            o.on_event(&Event::Eval {
                step: m.step,
                results: &r,
            });
        }
        if trainer.save_due() {
            let dir = trainer.save()?;
            o.on_event(&Event::Checkpoint {
                step: m.step,
                dir: &dir,
            });
        }
    }
    let dir = trainer.save()?;
    let step = trainer.steps_done();
    o.on_event(&Event::Checkpoint { step, dir: &dir });
    let r = trainer.evaluate()?;
    o.on_event(&Event::Eval { step, results: &r });
    let t = trainer.evaluate_tasks()?;
    if !t.is_empty() {
        o.on_event(&Event::Info(&format!(
            "tasks after training: {}",
            describe_tasks(&t)
        )));
    }
    let report = trainer.export()?;
    o.on_event(&Event::End(&report));
    Ok(report)
}

/// A new run's id: time and process, hashed.
fn new_run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    sha256_hex(format!("{t}-{}", std::process::id()).as_bytes())[..16].to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One line on the data and the steps ahead.
fn describe<B: AutodiffBackend>(t: &Trainer<B>) -> String {
    let c = &t.config;
    let world = t.collective.world();
    let batch = if world == 1 {
        format!("{} x {} accumulated", c.batch_size, c.grad_accum)
    } else {
        format!(
            "{} per worker x {world} workers x {} accumulated",
            c.batch_size, c.grad_accum
        )
    };
    format!(
        "data: {} training examples of up to {} tokens from {} file(s){}; {} optimizer steps of {} sequences ({batch})",
        t.data.stream.len(),
        c.seq_len,
        t.data.stream.sources().len(),
        if c.packing == crate::config::PackMode::None {
            String::new()
        } else {
            format!(", packing {}", c.packing)
        },
        t.total_steps(),
        c.batch_size * c.grad_accum * world,
    )
}

/// `name acc 0.6500 acc_norm 0.7750; ...`
fn describe_tasks(t: &BTreeMap<String, McResult>) -> String {
    t.values()
        .map(|r| {
            format!(
                "{} acc {:.4} acc_norm {:.4} ({} items)",
                r.task, r.acc, r.acc_norm, r.n
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
