//! The training configuration, typed: every value is parsed once, where it enters (the command
//! line, a TOML file through serde, or Rust code), and checked by [`TrainConfig::validate`]
//! with errors naming the key.
//!
//! Defaults are the paper's continued-pretraining recipe (LLaMA Pro §4.1, Table 7): AdamW with
//! β = (0.9, 0.95), lr 2e-4 with 6% warmup and cosine decay, weight decay 0.1, global gradient
//! clipping at 1.0; only the expanded blocks train. The paper's batch is 1024 × 4096 tokens; the
//! defaults here are sized for a laptop (set `batch_size`, `grad_accum` and `seq_len`).
//!
//! In TOML, the list values take either the command line's short form or a table:
//! `data = ["code.jsonl:2", { path = "prose.txt", weight = 1 }]`,
//! `eval = ["general=prose-valid.txt", { name = "domain", path = "code-valid.jsonl" }]`,
//! `lr_scale = ["embed_tokens=0.1", { selection = "norm", factor = 0.5 }]`, `resume = "latest"`.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use llama_pro_core::DType;
use llama_pro_core::device::DeviceSpec;
use llama_pro_core::freeze::Selection;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::schedule::ScheduleKind;

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// LLaMA Pro: only the expanded blocks (from the layer map in config.json).
    Pro,
    /// Every parameter.
    Full,
    /// Low-rank adapters on the linear layers of every block (`lora_rank`, `lora_alpha`,
    /// `lora_targets`), merged into the weights at export.
    Lora,
    /// No expansion: train N original interleaved blocks (`interleaved[L/4]` unless `trainable`).
    FreezeOriginals,
}

impl Method {
    /// Every method, in the order the help lists them.
    pub const ALL: [Method; 4] = [Self::Pro, Self::Full, Self::Lora, Self::FreezeOriginals];

    /// The name in configuration files and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pro => "pro",
            Self::Full => "full",
            Self::Lora => "lora",
            Self::FreezeOriginals => "freeze-originals",
        }
    }

    /// The default parameter selection of this method for an L-block model.
    pub fn default_selection(&self, num_layers: usize) -> Result<Selection> {
        let spec = match self {
            Self::Pro => "expanded".to_string(),
            Self::Full => "all".into(),
            Self::Lora => "lora".into(),
            Self::FreezeOriginals => {
                if !num_layers.is_multiple_of(4) {
                    return Err(TrainError::setting(
                        "method",
                        format!(
                            "freeze-originals: {num_layers} layers is not divisible by 4; set trainable = interleaved[N]"
                        ),
                    ));
                }
                format!("interleaved[{}]", num_layers / 4)
            }
        };
        Ok(Selection::parse(&spec)?)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                TrainError::setting(
                    "method",
                    format!("{s:?}: expected pro, full, lora or freeze-originals"),
                )
            })
    }
}

/// A training data file and its mixture weight. Short form `PATH` or `PATH:WEIGHT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct DataSource {
    /// `.txt` (one document per line) or `.jsonl` (`{"text"}` or `{"input_ids"}` per line).
    pub path: PathBuf,
    /// Relative sampling weight (> 0).
    #[serde(default = "one")]
    pub weight: f64,
}

impl DataSource {
    /// `path` with weight 1.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            weight: 1.0,
        }
    }
}

impl FromStr for DataSource {
    type Err = TrainError;
    /// `PATH` or `PATH:WEIGHT`; a suffix after the last `:` that is not a number is part of the path.
    fn from_str(s: &str) -> Result<Self> {
        if let Some((p, Ok(weight))) = s.rsplit_once(':').map(|(p, w)| (p, w.parse::<f64>())) {
            if !(weight > 0.0 && weight.is_finite()) {
                return Err(TrainError::setting(
                    "data",
                    format!("{s:?}: the mixture weight must be a number > 0"),
                ));
            }
            return Ok(Self {
                path: p.into(),
                weight,
            });
        }
        Ok(Self::new(s))
    }
}

/// A named evaluation set. Short form `NAME=FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct EvalSet {
    /// Name in logs, metrics and plots.
    pub name: String,
    /// `.txt` or `.jsonl`, read like the training data.
    pub path: PathBuf,
}

impl FromStr for EvalSet {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('=') {
            Some((name, path)) if !name.trim().is_empty() && !path.is_empty() => Ok(Self {
                name: name.trim().to_string(),
                path: path.into(),
            }),
            _ => Err(TrainError::setting(
                "eval",
                format!("{s:?}: expected NAME=FILE"),
            )),
        }
    }
}

/// A learning-rate factor for a group of parameters. Short form `SELECTION=FACTOR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct LrScale {
    /// The parameters (see `llama_pro_core::freeze` for the syntax).
    pub selection: Selection,
    /// Multiplier of the learning rate (> 0).
    pub factor: f64,
}

impl FromStr for LrScale {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        let (sel, f) = s.rsplit_once('=').ok_or_else(|| {
            TrainError::setting("lr_scale", format!("{s:?}: expected SELECTION=FACTOR"))
        })?;
        let factor: f64 = f.trim().parse().map_err(|_| {
            TrainError::setting("lr_scale", format!("{s:?}: {f:?} is not a number"))
        })?;
        Ok(Self {
            selection: Selection::parse(sel)?,
            factor,
        })
    }
}

/// Where a resumed run continues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest readable checkpoint in the output directory (written `latest`).
    Latest,
    /// A checkpoint directory.
    From(PathBuf),
}

impl FromStr for Resume {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "latest" => Self::Latest,
            "" => {
                return Err(TrainError::setting(
                    "resume",
                    "expected `latest` or a checkpoint directory",
                ));
            }
            dir => Self::From(dir.into()),
        })
    }
}

impl fmt::Display for Resume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::From(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Serialize for Resume {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// How training examples fill the `seq_len` positions of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackMode {
    /// One example per row, truncated to `seq_len`, padding masked out of the loss.
    None,
    /// Examples joined (EOS between text documents) and cut into rows of exactly `seq_len`:
    /// attention crosses document boundaries (classic pretraining packing).
    Concat,
    /// Several whole examples per row (first-fit by length), each attending only to itself, its
    /// positions restarting at 0: the same loss and gradients as running them one by one
    /// (LLaMA-Factory's `neat_packing`). The default for supervised fine-tuning.
    Neat,
}

impl PackMode {
    /// Every mode, in the order help lists them.
    pub const ALL: [PackMode; 3] = [Self::None, Self::Concat, Self::Neat];

    /// The name in settings and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Concat => "concat",
            Self::Neat => "neat",
        }
    }
}

impl fmt::Display for PackMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PackMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "false" | "off" => Ok(Self::None),
            "concat" | "true" | "on" => Ok(Self::Concat),
            "neat" => Ok(Self::Neat),
            other => Err(format!(
                "{other:?} is not a packing mode; expected none, concat or neat"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for PackMode {
    /// `none`, `concat`, `neat`, or (older configurations) `true` = concat, `false` = none.
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Self::Concat),
            Raw::Bool(false) => Ok(Self::None),
            Raw::Name(n) => n.parse().map_err(de::Error::custom),
        }
    }
}

/// What the run trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Continued pretraining on text (`text` / `input_ids` lines): every token is a target.
    Pretrain,
    /// Supervised fine-tuning on conversations (see [`crate::sft`]): the model's chat template,
    /// loss on the answers.
    Sft,
}

/// Everything a training run needs. Field names are the TOML keys and (with `-`) the flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model directory (HF layout; an expanded one for `Method::Pro`).
    pub model: PathBuf,
    /// Training data files with their mixture weights.
    pub data: Vec<DataSource>,
    /// Output directory: checkpoints, metrics, the final model.
    pub output: PathBuf,
    /// Which parameters train (preset).
    pub method: Method,
    /// Start from a random initialisation of the model directory's `config.json` (normal(0,
    /// `initializer_range`), seeded by `seed`) instead of its weights: pretraining from scratch.
    pub random_init: bool,
    /// LoRA rank (`Method::Lora`).
    pub lora_rank: usize,
    /// LoRA alpha: the update is scaled by alpha / rank.
    pub lora_alpha: f64,
    /// Linear layers that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub lora_targets: Vec<String>,
    /// Explicit parameter selection, overriding the method's (see `llama-pro inspect --trainable`).
    pub trainable: Option<Selection>,
    /// Learning-rate multipliers for parameter groups (e.g. `embed_tokens=0.1`).
    pub lr_scale: Vec<LrScale>,
    /// Optimizer steps (takes precedence over `epochs`).
    pub max_steps: Option<usize>,
    /// Passes over the training windows (used when `max_steps` is not set).
    pub epochs: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the gradients are averaged).
    pub grad_accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// How examples fill rows of `seq_len` tokens.
    pub packing: PackMode,
    /// Continued pretraining on text, or supervised fine-tuning on conversations.
    pub stage: Stage,
    /// `sft`: the format of the data files (detected from each file's first line by default).
    pub format: crate::sft::ChatFormat,
    /// `sft`: the chat template: a built-in name (chatml, llama3, mistral) or a `.jinja` file
    /// (default: the model's own).
    pub template: Option<String>,
    /// `sft`: train on the prompts too, not only on the answers.
    pub train_on_prompt: bool,
    /// `sft`: train on the last answer of each conversation only.
    pub mask_history: bool,
    /// Cache tokenized data in `$LLAMA_PRO_CACHE` (default `~/.cache/llama-pro/tokens`).
    pub token_cache: bool,
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub lr_schedule: ScheduleKind,
    /// Fraction of the steps spent in linear warmup.
    pub warmup_ratio: f64,
    /// Floor of the decay.
    pub min_lr: f64,
    /// Decoupled weight decay (not applied to 1-D tensors: norms and biases).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value (0 = off), as `torch.nn.utils.clip_grad_norm_`.
    pub clip_grad_norm: f64,
    /// Compute dtype: f32, or bf16/f16 mixed precision (frozen weights and activations in that
    /// dtype, trainable weights and optimizer state in f32).
    pub dtype: DType,
    /// Recompute memory-bound activations (norms, SwiGLU, RoPE) in the backward pass instead of
    /// storing them (burn's balanced checkpointing): less memory, some more compute.
    pub activation_checkpointing: bool,
    /// Evaluation sets.
    pub eval: Vec<EvalSet>,
    /// Evaluate on at most this many windows per set (evenly spaced through the file).
    pub eval_max_sequences: Option<usize>,
    /// Evaluate every N optimizer steps (0 = only before and after).
    pub eval_every: usize,
    /// Multiple-choice tasks (`.jsonl` of {context, choices, gold}) scored before and after
    /// training, as lm-evaluation-harness does (acc, acc_norm; see [`crate::tasks`]).
    pub eval_tasks: Vec<PathBuf>,
    /// Fraction of the training windows held out as `val` when no `eval` set is given.
    pub val_fraction: f64,
    /// Write a checkpoint every N optimizer steps (0 = only at the end).
    pub save_every: usize,
    /// Keep the last N checkpoints.
    pub keep: usize,
    /// Continue a run from a checkpoint. The checkpoint's manifest must match this run (the
    /// model, the data files' contents, the settings that decide the data and the parameters);
    /// what changed is listed.
    pub resume: Option<Resume>,
    /// With `resume`: accept the changes a resumed run can survive (more steps, another learning
    /// rate, schedule, batch size, weight decay, clipping, dtype...), not those that change the
    /// data or the model.
    pub force: bool,
    /// Start a fresh run in an output directory that holds an earlier run, removing that run's
    /// checkpoints, metrics, report and model (without it, such a directory is refused).
    pub overwrite: bool,
    /// Check that every weight of the model is finite before training (reads the checkpoint
    /// once).
    pub check_finite: bool,
    /// Print a log line every N optimizer steps (0 = none; read by the command line's progress
    /// display, not by the trainer).
    pub log_every: usize,
    /// Seed for data order and any sampling.
    pub seed: u64,
    /// The device to train on.
    pub device: DeviceSpec,
    /// Data parallelism: one worker per device listed (e.g. `["cuda:0", "cuda:1"]`; `["cpu",
    /// "cpu"]` runs two CPU workers), each with its own `batch_size` slice of every global batch
    /// (empty: one worker on `device`).
    pub devices: Vec<DeviceSpec>,
    /// Processes (machines) of a data-parallel run, each with the same `devices`.
    pub nodes: usize,
    /// This process's index among the `nodes` (0 runs the orchestrator and writes the outputs).
    pub node_rank: usize,
    /// With several nodes: `HOST:PORT` of node 0, where burn-collective's orchestrator listens.
    pub master: Option<String>,
    /// With several nodes: `HOST:PORT` where this node serves gradients to the others (default:
    /// its address towards the master, port master's + 1 + node_rank).
    pub node_address: Option<String>,
    /// Seconds a worker waits for the others in a collective operation before it stops the run
    /// (a worker that died, hangs or cannot be reached).
    pub collective_timeout: f64,
    /// Peak TFLOP/s of the device for the MFU estimate (default: estimated from /proc/cpuinfo on
    /// the CPU; none on GPUs, e.g. 989 for an H100 SXM in bf16 dense).
    pub peak_tflops: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            data: vec![],
            output: PathBuf::new(),
            method: Method::Pro,
            random_init: false,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_targets: llama_pro_core::linear::LORA_TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            trainable: None,
            lr_scale: vec![],
            max_steps: None,
            epochs: 1.0,
            batch_size: 8,
            grad_accum: 1,
            seq_len: 512,
            packing: PackMode::Concat,
            stage: Stage::Pretrain,
            format: crate::sft::ChatFormat::Auto,
            template: None,
            train_on_prompt: false,
            mask_history: false,
            token_cache: true,
            lr: 2e-4,
            lr_schedule: ScheduleKind::Cosine,
            warmup_ratio: 0.06,
            min_lr: 0.0,
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            clip_grad_norm: 1.0,
            dtype: DType::F32,
            activation_checkpointing: false,
            eval: vec![],
            eval_max_sequences: None,
            eval_every: 0,
            eval_tasks: Vec::new(),
            val_fraction: 0.02,
            save_every: 0,
            keep: 2,
            resume: None,
            force: false,
            overwrite: false,
            check_finite: true,
            log_every: 10,
            seed: 0,
            device: DeviceSpec::Cpu,
            devices: vec![],
            nodes: 1,
            node_rank: 0,
            master: None,
            node_address: None,
            collective_timeout: 600.0,
            peak_tflops: None,
        }
    }
}

impl TrainConfig {
    /// The paper's supervised fine-tuning recipe (LLaMA Pro §4.1, "SFT details"): every
    /// parameter trains (`Method::Full`), lr 2e-5, cosine, warmup 3%, clipping at 1.0, neat
    /// packing, loss on the answers. Set `method` to `pro` (or `trainable`) to tune only the
    /// expanded blocks.
    pub fn sft() -> Self {
        Self {
            stage: Stage::Sft,
            method: Method::Full,
            lr: 2e-5,
            lr_schedule: ScheduleKind::Cosine,
            warmup_ratio: 0.03,
            clip_grad_norm: 1.0,
            weight_decay: 0.0,
            packing: PackMode::Neat,
            ..Self::default()
        }
    }

    /// The paper's SFT precision: bf16 mixed precision where the device computes it (GPUs), f32
    /// on the CPU (no native bf16 matmul there: slower and no less memory-bound).
    pub fn sft_dtype(device: DeviceSpec) -> DType {
        match device {
            DeviceSpec::Cpu => DType::F32,
            _ => DType::BF16,
        }
    }

    /// The device of the (first) worker: what memory planning, the MFU and the dtype defaults
    /// look at (`devices`' first, else `device`).
    pub fn primary_device(&self) -> DeviceSpec {
        self.devices.first().copied().unwrap_or(self.device)
    }

    /// The devices of this process's workers: `devices`, or `device` alone.
    pub fn worker_devices(&self) -> Vec<DeviceSpec> {
        if self.devices.is_empty() {
            vec![self.device]
        } else {
            self.devices.clone()
        }
    }

    /// The run's workers: this process's devices, the nodes, the timeout.
    pub fn topology(&self) -> crate::parallel::Topology {
        crate::parallel::Topology {
            local: self.worker_devices().len(),
            nodes: self.nodes.max(1),
            node_rank: self.node_rank,
            master: self.master.clone(),
            node_address: self.node_address.clone(),
            timeout: std::time::Duration::from_secs_f64(self.collective_timeout.clamp(1.0, 1e9)),
        }
    }

    /// Read a TOML file (unknown keys are an error). Keys it does not set take the defaults of
    /// its stage: [`TrainConfig::sft`] for `stage = "sft"`, else [`TrainConfig::default`].
    pub fn from_toml(path: &Path) -> Result<Self> {
        Self::from_toml_over(path, None)
    }

    /// [`Self::from_toml`] with the defaults of `base` (`None`: those of the file's stage).
    pub fn from_toml_over(path: &Path, base: Option<Self>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |e: String| TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            message: format!("invalid training config: {e}"),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        Self::from_table(table, base).map_err(invalid)
    }

    /// A configuration from a TOML table over the defaults of `base` (`None`: those of the
    /// table's `stage`).
    pub fn from_table(table: toml::Table, base: Option<Self>) -> std::result::Result<Self, String> {
        let base = base.unwrap_or_else(|| match table.get("stage").and_then(|v| v.as_str()) {
            Some("sft") => Self::sft(),
            _ => Self::default(),
        });
        let mut merged = toml::Table::try_from(&base).map_err(|e| e.to_string())?;
        merged.extend(table);
        merged
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }

    /// The configuration as TOML (what `train` saves into the run directory).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| TrainError::Invalid(format!("writing the configuration as TOML: {e}")))
    }

    /// The data-parallel settings.
    fn validate_parallel(&self) -> Result<()> {
        let bad = |key: &'static str, m: String| Err(TrainError::setting(key, m));
        let kind = |d: &DeviceSpec| std::mem::discriminant(d);
        if let Some(d) = self.devices.first()
            && let Some(o) = self.devices.iter().find(|o| kind(o) != kind(d))
        {
            return bad(
                "devices",
                format!("{d} and {o}: the workers of a run use one kind of device"),
            );
        }
        if self.nodes == 0 {
            return bad("nodes", "must be at least 1".into());
        }
        if self.node_rank >= self.nodes {
            return bad(
                "node_rank",
                format!(
                    "{} with {} node(s): expected 0 to {}",
                    self.node_rank,
                    self.nodes,
                    self.nodes - 1
                ),
            );
        }
        if self.nodes > 1 && self.master.is_none() {
            return bad(
                "master",
                format!(
                    "{} nodes need the address of node 0's orchestrator: --master HOST:PORT",
                    self.nodes
                ),
            );
        }
        for (key, v) in [
            ("master", &self.master),
            ("node_address", &self.node_address),
        ] {
            if let Some(a) = v {
                crate::parallel::split_host_port(a, key)?;
            }
        }
        if !(self.collective_timeout >= 1.0 && self.collective_timeout.is_finite()) {
            return bad(
                "collective_timeout",
                format!("{}: expected seconds >= 1", self.collective_timeout),
            );
        }
        Ok(())
    }

    /// Check values that would fail later or silently do nothing; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, m: String| Err(TrainError::setting(key, m));
        let finite_pos = |x: f64| x > 0.0 && x.is_finite();
        let finite_nonneg = |x: f64| x >= 0.0 && x.is_finite();
        if self.model.as_os_str().is_empty() {
            return bad("model", "is required".into());
        }
        if self.output.as_os_str().is_empty() {
            return bad("output", "is required".into());
        }
        if self.data.is_empty() {
            return bad("data", "give at least one training file".into());
        }
        self.validate_parallel()?;
        if self.stage == Stage::Sft {
            crate::sft::LabelMode::from_flags(self.train_on_prompt, self.mask_history)?;
        } else if self.train_on_prompt || self.mask_history || self.template.is_some() {
            return bad(
                "stage",
                "train_on_prompt, mask_history and template apply to supervised fine-tuning: run `llama-pro sft` (in TOML: stage = \"sft\")".into(),
            );
        }
        if let Some(d) = self.data.iter().find(|d| !finite_pos(d.weight)) {
            return bad(
                "data",
                format!(
                    "{}: the mixture weight must be a number > 0, got {}",
                    d.path.display(),
                    d.weight
                ),
            );
        }
        for (i, e) in self.eval.iter().enumerate() {
            if e.name.is_empty() {
                return bad("eval", format!("{}: the set has no name", e.path.display()));
            }
            if self.eval[..i].iter().any(|o| o.name == e.name) {
                return bad("eval", format!("the name {:?} is given twice", e.name));
            }
        }
        if let Some(s) = self.lr_scale.iter().find(|s| !finite_pos(s.factor)) {
            return bad(
                "lr_scale",
                format!(
                    "{}={}: the factor must be a number > 0",
                    s.selection, s.factor
                ),
            );
        }
        for (key, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("keep", self.keep),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.seq_len < 2 {
            return bad(
                "seq_len",
                format!("must be at least 2, got {}", self.seq_len),
            );
        }
        if !finite_pos(self.lr) {
            return bad("lr", format!("must be a number > 0, got {}", self.lr));
        }
        if !(finite_nonneg(self.min_lr) && self.min_lr <= self.lr) {
            return bad(
                "min_lr",
                format!("must be in [0, lr = {}], got {}", self.lr, self.min_lr),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            );
        }
        for (key, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return bad(key, format!("must be in [0, 1), got {b}"));
            }
        }
        if !finite_pos(self.adam_eps) {
            return bad(
                "adam_eps",
                format!("must be a number > 0, got {}", self.adam_eps),
            );
        }
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("clip_grad_norm", self.clip_grad_norm),
        ] {
            if !finite_nonneg(v) {
                return bad(key, format!("must be a number >= 0, got {v}"));
            }
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1".into());
        }
        if self.max_steps.is_none() && !finite_pos(self.epochs) {
            return bad(
                "epochs",
                format!("must be a number > 0, got {}", self.epochs),
            );
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad(
                "val_fraction",
                format!("must be in [0, 1), got {}", self.val_fraction),
            );
        }
        if self.method == Method::Lora {
            if self.lora_rank == 0 {
                return bad("lora_rank", "must be at least 1".into());
            }
            if !finite_pos(self.lora_alpha) {
                return bad(
                    "lora_alpha",
                    format!("must be a number > 0, got {}", self.lora_alpha),
                );
            }
        }
        if let Some(p) = self.peak_tflops.filter(|p| !finite_pos(*p)) {
            return bad("peak_tflops", format!("must be a number > 0, got {p}"));
        }
        Ok(())
    }

    /// The parameters that train: `trainable` if given, else the method's default.
    pub fn selection(&self, num_layers: usize) -> Result<Selection> {
        match &self.trainable {
            Some(s) => Ok(s.clone()),
            None => self.method.default_selection(num_layers),
        }
    }
}

// ---- TOML/serde: the short string form or a table ----------------------------------------------

/// A type written as a table in TOML (its derived `remote = "Self"` functions).
trait Table: Sized {
    fn from_table<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error>;
}

/// Deserialize `T` from the command line's short string form (`T: FromStr`) or from a table.
fn str_or_table<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Table,
    T::Err: fmt::Display,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T> Visitor<'de> for V<T>
    where
        T: FromStr + Table,
        T::Err: fmt::Display,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a table")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<T, E> {
            s.parse().map_err(E::custom)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<T, A::Error> {
            T::from_table(de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// Serde for types read from a short string or a table, written as a table: the derives (with
/// `remote = "Self"`) give the table form, these impls add the string form.
macro_rules! string_or_table {
    ($($t:ty),*) => {$(
        impl Table for $t {
            fn from_table<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                <$t>::deserialize(d)
            }
        }
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                <$t>::serialize(self, s)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                str_or_table(d)
            }
        }
    )*};
}

string_or_table!(DataSource, EvalSet, LrScale);

fn one() -> f64 {
    1.0
}
