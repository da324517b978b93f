//! `llama-pro train`: flags and `--config` TOML resolved into a `TrainConfig`, Ctrl-C, the run
//! on the chosen backend, the summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use llama_pro::core::DType;
use llama_pro::core::burn::tensor::backend::AutodiffBackend;
use llama_pro::core::device::{DeviceSpec, OnAutodiffDevices, dispatch_autodiff_devices};
use llama_pro::core::freeze::Selection;
use llama_pro::train::config::{
    DataSource, EvalSet, LrScale, Method, PackMode, Resume, Stage, TrainConfig,
};
use llama_pro::train::memory::{
    AttentionKind, MemoryPlan, PlanInputs, device_capacity, fit_report,
};
use llama_pro::train::schedule::ScheduleKind;
use llama_pro::train::sft::ChatFormat;
use llama_pro::train::trainer::{LossPlot, Observer, Observers, TrainReport, train_parallel};

use super::progress::TrainProgress;
use super::{choice, dtype_parser};

/// How conversations become examples (`sft`, `sft-preview`).
#[derive(Args, Debug, Default, Clone)]
pub struct ChatDataArgs {
    /// sft: data format (default: detected from each file's first line).
    #[arg(long, value_parser = choice::<ChatFormat>(ChatFormat::ALL.map(|f| f.name())))]
    pub format: Option<ChatFormat>,
    /// sft: chat template: chatml, llama3, mistral or a .jinja file (default: the model's own,
    /// from chat_template.jinja or tokenizer_config.json).
    #[arg(long)]
    pub template: Option<String>,
    /// sft: train on the prompts too, not only on the answers.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// sft: train on the last answer of each conversation only.
    #[arg(long)]
    pub mask_history: bool,
}

/// `llama-pro train`. Every flag overrides the same key of `--config`; defaults are the paper's
/// recipe (AdamW β 0.9/0.95, lr 2e-4, 6% warmup, cosine, weight decay 0.1, clip 1.0).
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any of the keys below (snake_case); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model directory (an expanded one for --method pro).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data, repeatable: FILE or FILE:WEIGHT (mixture), .txt or .jsonl.
    #[arg(long)]
    pub data: Vec<DataSource>,
    /// Output directory: checkpoints/, metrics.jsonl, report.json, model/.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// pro: only the expanded blocks (default); full: everything; lora: low-rank adapters on
    /// every block's linear layers (merged at export); freeze-originals: N original
    /// interleaved blocks, no expansion (the paper's baseline).
    #[arg(long, value_parser = choice::<Method>(Method::ALL.map(|m| m.name())))]
    pub method: Option<Method>,
    /// Initialise the weights randomly from the model directory's config.json (seeded by --seed)
    /// instead of loading them: pretraining from scratch (the model directory then needs only
    /// config.json and the tokenizer files).
    #[arg(long)]
    pub random_init: bool,
    /// LoRA rank for --method lora (default 8).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: updates are scaled by alpha / rank (default 16).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Linear layers with LoRA adapters, comma-separated (default: all seven of a block).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Parameter selection overriding --method, e.g. `expanded+embed_tokens`, `expanded.mlp`.
    #[arg(long)]
    pub trainable: Option<Selection>,
    /// Learning-rate factor of a group, repeatable: SELECTION=FACTOR (e.g. embed_tokens=0.1).
    #[arg(long)]
    pub lr_scale: Vec<LrScale>,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    pub max_steps: Option<usize>,
    /// Passes over the data (when --max-steps is not given; default 1).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch (default 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step; the effective batch is batch-size x grad-accum (default 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per sequence (default 512).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// One line = one sequence (truncated, padding masked out of the loss) instead of packing
    /// (the same as --packing none).
    #[arg(long, conflicts_with = "packing")]
    pub no_packing: bool,
    /// How examples fill rows: none (one per row), concat (joined and cut; attention crosses
    /// documents; pretraining default) or neat (whole examples per row, each attending only to
    /// itself, positions restarting; sft default).
    #[arg(long, value_parser = choice::<PackMode>(PackMode::ALL.map(|m| m.name())))]
    pub packing: Option<PackMode>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub chat: ChatDataArgs,
    /// Tokenize every run instead of using the token cache ($LLAMA_PRO_CACHE or ~/.cache/llama-pro/tokens).
    #[arg(long)]
    pub no_token_cache: bool,
    /// Peak learning rate (paper: 2e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decay after warmup (paper: cosine).
    #[arg(long, value_parser = choice::<ScheduleKind>(ScheduleKind::ALL.map(|k| k.name())))]
    pub lr_schedule: Option<ScheduleKind>,
    /// Fraction of steps in linear warmup (paper: 0.06).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Learning-rate floor of the decay (default 0).
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Decoupled weight decay on >= 2-D tensors (paper: 0.1).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1 (paper: 0.9).
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2 (paper: 0.95).
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon (default 1e-8, as torch).
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// Clip the global gradient norm (paper: 1.0; 0 = off).
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// f32 (default), or bf16/f16 mixed precision: frozen weights and activations in that dtype,
    /// trainable weights and optimizer state in f32 (master weights); the export is in that dtype.
    #[arg(long, value_parser = dtype_parser())]
    pub dtype: Option<DType>,
    /// Recompute memory-bound activations in the backward pass (less memory with composed ops,
    /// more compute; with the fused kernels it keeps more: see `--dry-run`).
    #[arg(long, alias = "checkpointing")]
    pub activation_checkpointing: bool,
    /// Evaluation set, repeatable: NAME=FILE (default: a held-out 2% of the training data).
    #[arg(long)]
    pub eval: Vec<EvalSet>,
    /// Evaluate on at most N windows of each --eval set (evenly spaced; default: all).
    #[arg(long)]
    pub eval_max_sequences: Option<usize>,
    /// Evaluate every N steps (0: before and after only).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// A multiple-choice task scored before and after training (acc, acc_norm as
    /// lm-evaluation-harness; .jsonl of {"context", "choices", "gold"}), repeatable: the
    /// forgetting on benchmark items in the report.
    #[arg(long, value_name = "FILE.jsonl")]
    pub eval_task: Vec<PathBuf>,
    /// Write a checkpoint every N steps (0: at the end only).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Keep the last N checkpoints (default 2).
    #[arg(long)]
    pub keep: Option<usize>,
    /// Resume from `latest` (the newest readable checkpoint in OUTPUT) or a checkpoint
    /// directory. The checkpoint must come from the same run: same model, same data files
    /// (contents), same settings; what changed is listed.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<Resume>,
    /// With --resume: accept the changes a resumed run survives (more steps, learning rate,
    /// schedule, batch size, weight decay, clipping, dtype), not those of the model or data.
    #[arg(long, requires = "resume")]
    pub force: bool,
    /// Start afresh in an OUTPUT that holds an earlier run, removing its checkpoints, metrics,
    /// report and model (without it, such a directory is refused).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Skip the check that every weight of the model is finite before training.
    #[arg(long)]
    pub no_check_finite: bool,
    /// Log a line every N steps (default 10).
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Seed for the data order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, wgpu[:N] or cuda[:N].
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Data parallelism: one worker per device, comma-separated (cuda:0,cuda:1,...; cpu,cpu for
    /// two CPU workers). --batch-size is per worker: the global batch is batch-size x workers.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Vec<DeviceSpec>,
    /// Processes (machines) of a data-parallel run, each started with the same flags and its
    /// --node-rank (default 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// This process's index among --nodes (0 runs the orchestrator and writes the outputs).
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// HOST:PORT of node 0, where the orchestrator listens (several nodes).
    #[arg(long)]
    pub master: Option<String>,
    /// HOST:PORT where this node serves gradients to the others (default: its address towards
    /// --master, port master's + 1 + node rank).
    #[arg(long)]
    pub node_address: Option<String>,
    /// Seconds a worker waits for the others before it stops the run (default 600).
    #[arg(long)]
    pub collective_timeout: Option<f64>,
    /// Peak TFLOP/s of the device for the printed MFU (default: estimated on the CPU from
    /// /proc/cpuinfo; give it for GPUs, e.g. 989 for an H100 SXM in bf16).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Check everything and print the predicted peak memory of the run (weights, gradients,
    /// AdamW state, activations, logits) and whether it fits the device, then exit: reads
    /// config.json and the safetensors headers only, writes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the device's memory (e.g. 80GB; decimal units). The CPU's is read from
    /// /proc/meminfo; a GPU's is not read (planning starts no device).
    #[arg(long, value_parser = super::parse_size, requires = "dry_run")]
    pub device_memory: Option<usize>,
    /// With --dry-run: plan for the fused kernels or for composed ops (O(seq^2) attention)
    /// instead of what the device and dtype get.
    #[arg(long, requires = "dry_run", value_parser = choice::<AttentionKind>(AttentionKind::ALL.map(|k| k.name())))]
    pub attention: Option<AttentionKind>,
}

impl TrainArgs {
    /// The configuration: `--config` (if any), then every given flag.
    pub fn resolve(&self) -> anyhow::Result<TrainConfig> {
        self.resolve_over(None)
    }

    /// The configuration over the defaults of `base` (`None`: those of the `--config` file's
    /// stage, or pretraining).
    pub fn resolve_over(&self, base: Option<TrainConfig>) -> anyhow::Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_over(p, base)?,
            None => base.unwrap_or_default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            model,
            output,
            method,
            lr,
            lr_schedule,
            warmup_ratio,
            min_lr,
            weight_decay,
            adam_beta1,
            adam_beta2,
            adam_eps,
            clip_grad_norm,
            dtype,
            eval_every,
            save_every,
            keep,
            log_every,
            seed,
            device,
            batch_size,
            grad_accum,
            seq_len,
            epochs,
            lora_rank,
            lora_alpha,
            packing,
            nodes,
            node_rank,
            collective_timeout
        );
        macro_rules! set_some {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f.clone(); } )* };
        }
        set_some!(
            trainable,
            peak_tflops,
            eval_max_sequences,
            max_steps,
            resume,
            master,
            node_address
        );
        macro_rules! set_list {
            ($($f:ident),*) => { $( if !self.$f.is_empty() { c.$f = self.$f.clone(); } )* };
        }
        set_list!(lora_targets, data, eval, lr_scale, devices);
        if !self.eval_task.is_empty() {
            c.eval_tasks = self.eval_task.clone();
        }
        c.random_init |= self.random_init;
        c.activation_checkpointing |= self.activation_checkpointing;
        if self.no_packing {
            c.packing = PackMode::None;
        }
        if let Some(f) = self.chat.format {
            c.format = f;
        }
        if self.chat.template.is_some() {
            c.template = self.chat.template.clone();
        }
        c.train_on_prompt |= self.chat.train_on_prompt;
        c.mask_history |= self.chat.mask_history;
        c.token_cache &= !self.no_token_cache;
        c.check_finite &= !self.no_check_finite;
        c.force |= self.force;
        c.overwrite |= self.overwrite;
        Ok(c)
    }
}

pub fn run(a: &TrainArgs) -> anyhow::Result<ExitCode> {
    let cfg = a.resolve()?;
    run_config(cfg, a)
}

/// `llama-pro sft`: `train` over the paper's SFT defaults ([`TrainConfig::sft`]).
pub fn run_sft(a: &TrainArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = a.resolve_over(Some(TrainConfig::sft()))?;
    if cfg.stage != Stage::Sft {
        anyhow::bail!(
            "{}: stage = \"{}\" in a configuration given to `sft`; remove it or use `train`",
            a.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "pretrain"
        );
    }
    cfg.stage = Stage::Sft;
    // bf16 on GPUs, f32 on the CPU, unless the dtype was given.
    let dtype_in_config = match &a.config {
        Some(p) => std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .is_some_and(|t| t.contains_key("dtype")),
        None => false,
    };
    if a.dtype.is_none() && !dtype_in_config {
        cfg.dtype = TrainConfig::sft_dtype(cfg.primary_device());
    }
    run_config(cfg, a)
}

fn run_config(cfg: TrainConfig, a: &TrainArgs) -> anyhow::Result<ExitCode> {
    let command = if cfg.stage == Stage::Sft {
        "sft"
    } else {
        "train"
    };
    cfg.validate()?;
    if a.dry_run {
        return dry_run(&cfg, a);
    }
    let report = run_resolved(&cfg, command)?;
    Ok(if report.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Ctrl-C, SIGTERM (schedulers, `docker stop`, `timeout`) and SIGHUP: finish the step, write a
/// checkpoint, exit 130; a second signal exits at once. One handler for the process (a pipeline
/// runs several trainings).
fn stop_flag() -> &'static AtomicBool {
    static STOP: std::sync::OnceLock<&'static AtomicBool> = std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: finishing the current step and writing a checkpoint (interrupt again to quit now)"
            );
        });
        stop
    })
}

/// Run a checked configuration with the terminal's progress display; `command` is the
/// subcommand that continues it (`train` or `sft`) in the resume hint.
pub(super) fn run_resolved(cfg: &TrainConfig, command: &str) -> anyhow::Result<TrainReport> {
    let cfg = cfg.clone();
    // The resolved configuration; the run saves it as OUTPUT/train.toml once everything is
    // checked and it owns the directory.
    let resolved = cfg.to_toml()?;
    let path = cfg.output.join("train.toml");
    eprintln!(
        "configuration (saved to {} when the run starts):\n{resolved}",
        path.display()
    );
    let stop = stop_flag();
    let report = dispatch_autodiff_devices(
        &cfg.worker_devices(),
        cfg.activation_checkpointing,
        TrainTask { cfg: &cfg, stop },
    )??;
    if report.interrupted && cfg.nodes > 1 {
        eprintln!(
            "stopped after step {}; node 0 wrote the checkpoint: continue by starting every node \
             again with its command and --resume",
            report.steps
        );
    } else if report.interrupted {
        eprintln!(
            "stopped after step {}; continue with: llama-pro {command} --config {} --resume",
            report.steps,
            path.display()
        );
    }
    println!(
        "{} steps, {:.0} tokens/s, {} of {} parameters trained{}",
        report.steps,
        report.tokens_per_sec,
        report.trainable_params,
        report.total_params,
        report
            .model_dir
            .as_ref()
            .map(|d| format!("; model: {}", d.display()))
            .unwrap_or_default()
    );
    let achieved = report.tokens_per_sec * report.flops_per_token;
    match (&report.peak_flops, report.mfu) {
        (Some((peak, source)), Some(mfu)) => println!(
            "model FLOPs: {:.1} M/token, {:.2} GFLOP/s achieved; MFU {:.1}% of {:.1} GFLOP/s peak (estimated: {source})",
            report.flops_per_token / 1e6,
            achieved / 1e9,
            100.0 * mfu,
            peak / 1e9
        ),
        _ => println!(
            "model FLOPs: {:.1} M/token, {:.2} GFLOP/s achieved (give --peak-tflops for the MFU)",
            report.flops_per_token / 1e6,
            achieved / 1e9
        ),
    }
    Ok(report)
}

struct TrainTask<'a> {
    cfg: &'a TrainConfig,
    stop: &'a AtomicBool,
}

impl OnAutodiffDevices for TrainTask<'_> {
    type Output = llama_pro::train::Result<TrainReport>;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let out = &self.cfg.output;
        let mut progress = TrainProgress::new(self.cfg.log_every);
        let mut plot = LossPlot::new(&out.join("metrics.jsonl"), &out.join("loss.png"));
        let mut observers = Observers::new();
        // The plot reads metrics.jsonl, which the trainer's log has written before the plot sees
        // the event (on node 0, which writes the outputs).
        observers.push(&mut progress);
        if self.cfg.node_rank == 0 {
            observers.push(&mut plot);
        }
        let topology = self.cfg.topology();
        let report = train_parallel::<B>(
            self.cfg.clone(),
            &topology,
            &devices,
            &mut observers,
            self.stop,
        );
        drop(observers);
        for w in &plot.warnings {
            progress.on_event(&llama_pro::train::trainer::Event::Warning(w));
        }
        report
    }
}

/// `--dry-run`: everything a run checks before it loads weights (settings, the model's
/// config.json and tensor headers, the selection, the data files, the output directory), then the
/// memory plan and whether it fits. Nothing is read beyond headers, nothing is written.
fn dry_run(cfg: &TrainConfig, a: &TrainArgs) -> anyhow::Result<ExitCode> {
    use llama_pro::core::HfConfig;
    use llama_pro::core::weights::Checkpoint;
    use llama_pro::train::TrainError;
    use llama_pro::train::data::existing;
    use llama_pro::train::trainer::RunDir;

    let dir = existing(&cfg.model)?;
    let hf = HfConfig::from_path(&dir)?;
    if !cfg.random_init {
        // Headers only: the tensors' names, dtypes and shapes against config.json.
        Checkpoint::open(&dir)?.check_layout(&hf.config)?;
    }
    let missing = |key: &str, p: &std::path::Path| {
        TrainError::setting(key, format!("{}: no such file", p.display()))
    };
    if let Some(d) = cfg.data.iter().find(|d| !d.path.is_file()) {
        return Err(missing("data", &d.path).into());
    }
    if let Some(e) = cfg.eval.iter().find(|e| !e.path.is_file()) {
        return Err(missing("eval", &e.path).into());
    }
    let out = llama_pro::core::save::resolve(&cfg.output);
    let model_dir = llama_pro::core::save::resolve(&dir);
    if ["model", "checkpoints"]
        .iter()
        .any(|d| model_dir.starts_with(out.join(d)))
    {
        return Err(TrainError::setting(
            "output",
            format!(
                "{}: the model {} lies in what this run writes (model/, checkpoints/); train into another output directory",
                cfg.output.display(),
                dir.display()
            ),
        )
        .into());
    }
    if cfg.resume.is_none() && !cfg.overwrite {
        RunDir::refuse_fresh(&cfg.output)?;
    }
    let mut inputs = PlanInputs::from_train_config(cfg, &hf)?;
    if let Some(k) = a.attention {
        inputs.attention = k;
    }
    let plan = MemoryPlan::for_training(&hf.config, &inputs);
    println!("{plan}");
    let capacity = device_capacity(cfg.primary_device(), a.device_memory.map(|b| b as u64));
    for line in fit_report(&hf.config, &inputs, &capacity) {
        println!("{line}");
    }
    println!(
        "dry run: settings, model headers, data files and output directory checked; nothing written"
    );
    Ok(ExitCode::SUCCESS)
}
