//! The training configuration: serde (TOML file) plus command-line overrides.
//!
//! Defaults are the paper's continued-pretraining recipe (LLaMA Pro §4.1, Table 7): AdamW with
//! β = (0.9, 0.95), lr 2e-4 with 6% warmup and cosine decay, weight decay 0.1, global gradient
//! clipping at 1.0; only the expanded blocks train. The paper's batch is 1024 × 4096 tokens; the
//! defaults here are sized for a laptop (set `batch_size`, `grad_accum` and `seq_len`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::schedule::ScheduleKind;

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// LLaMA Pro: only the expanded blocks (from the layer map in config.json).
    Pro,
    /// Every parameter.
    Full,
    /// Low-rank adapters on the linear layers of every block (`lora_rank`, `lora_alpha`,
    /// `lora_targets`), merged into the weights at export.
    Lora,
    /// No expansion: train N original interleaved blocks (`interleaved[L/4]` unless `--trainable`).
    FreezeOriginals,
}

impl Method {
    /// The default parameter selection of this method for an L-block model.
    pub fn default_selection(&self, num_layers: usize) -> Result<String> {
        Ok(match self {
            Self::Pro => "expanded".into(),
            Self::Full => "all".into(),
            Self::Lora => "lora".into(),
            Self::FreezeOriginals => {
                if num_layers % 4 != 0 {
                    return Err(TrainError::Invalid(format!(
                        "--method freeze-originals: {num_layers} layers is not divisible by 4; give --trainable interleaved[N]"
                    )));
                }
                format!("interleaved[{}]", num_layers / 4)
            }
        })
    }
}

/// Everything a training run needs. Field names are the TOML keys and (with `-`) the flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model directory (HF layout; an expanded one for `--method pro`).
    pub model: PathBuf,
    /// Training data: `PATH` or `PATH:WEIGHT` (mixture weight), `.txt` or `.jsonl`.
    pub data: Vec<String>,
    /// Output directory: checkpoints, metrics, the final model.
    pub output: PathBuf,
    /// Which parameters train (preset).
    pub method: Method,
    /// Start from a random initialisation of the model directory's `config.json` (normal(0,
    /// `initializer_range`), seeded by `seed`) instead of its weights: pretraining from scratch.
    pub random_init: bool,
    /// LoRA rank (`--method lora`).
    pub lora_rank: usize,
    /// LoRA alpha: the update is scaled by alpha / rank.
    pub lora_alpha: f64,
    /// Linear layers that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub lora_targets: Vec<String>,
    /// Explicit parameter selection, overriding the method's (see `llama-pro inspect --trainable`).
    pub trainable: Option<String>,
    /// Learning-rate multipliers for parameter groups, `SELECTION=FACTOR` (e.g. `embed_tokens=0.1`).
    pub lr_scale: Vec<String>,
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
    /// Pack documents into `seq_len` windows with EOS between them; `false`: one line = one sequence.
    pub packing: bool,
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
    /// Compute dtype: `f32`, or `bf16`/`f16` mixed precision (frozen weights and activations in
    /// that dtype, trainable weights and optimizer state in f32).
    pub dtype: String,
    /// Recompute memory-bound activations (norms, SwiGLU, RoPE) in the backward pass instead of
    /// storing them (burn's balanced checkpointing): less memory, some more compute.
    pub activation_checkpointing: bool,
    /// Evaluation sets, `NAME=FILE`.
    pub eval: Vec<String>,
    /// Evaluate on at most this many windows per set (evenly spaced through the file).
    pub eval_max_sequences: Option<usize>,
    /// Evaluate every N optimizer steps (0 = only before and after).
    pub eval_every: usize,
    /// Fraction of the training windows held out as `val` when no `eval` set is given.
    pub val_fraction: f64,
    /// Write a checkpoint every N optimizer steps (0 = only at the end).
    pub save_every: usize,
    /// Keep the last N checkpoints.
    pub keep: usize,
    /// Resume from `latest` or a checkpoint directory.
    pub resume: Option<String>,
    /// Print a log line every N optimizer steps.
    pub log_every: usize,
    /// Seed for data order and any sampling.
    pub seed: u64,
    /// `cpu`, `wgpu[:N]` or `cuda[:N]`.
    pub device: String,
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
            packing: true,
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
            dtype: "f32".into(),
            activation_checkpointing: false,
            eval: vec![],
            eval_max_sequences: None,
            eval_every: 0,
            val_fraction: 0.02,
            save_every: 0,
            keep: 2,
            resume: None,
            log_every: 10,
            seed: 0,
            device: "cpu".into(),
            peak_tflops: None,
        }
    }
}

impl TrainConfig {
    /// Read a TOML file (unknown keys are an error).
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            message: format!("invalid training config: {e}"),
        })
    }

    /// Check values that would fail later or silently do nothing.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.model.as_os_str().is_empty() {
            return bad("--model is required".into());
        }
        if self.output.as_os_str().is_empty() {
            return bad("--output is required".into());
        }
        if self.data.is_empty() {
            return bad("give at least one --data FILE".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.seq_len < 2 {
            return bad("--batch-size and --grad-accum must be >= 1 and --seq-len >= 2".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.min_lr < 0.0 || self.min_lr > self.lr {
            return bad(format!(
                "--lr must be > 0 and --min-lr in [0, lr] (lr {}, min-lr {})",
                self.lr, self.min_lr
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "--warmup-ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.adam_beta1)
            || !(0.0..1.0).contains(&self.adam_beta2)
            || self.adam_eps <= 0.0
        {
            return bad("--adam-beta1/--adam-beta2 must be in [0, 1) and --adam-eps > 0".into());
        }
        if self.weight_decay < 0.0 || self.clip_grad_norm < 0.0 {
            return bad("--weight-decay and --clip-grad-norm must be >= 0".into());
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && !(self.epochs > 0.0)) {
            return bad("--max-steps must be >= 1 (or --epochs > 0)".into());
        }
        if !matches!(self.dtype.as_str(), "f32" | "bf16" | "f16") {
            return bad(format!(
                "--dtype {:?}: expected f32, bf16 or f16",
                self.dtype
            ));
        }
        if self.keep == 0 {
            return bad("--keep must be >= 1".into());
        }
        Ok(())
    }
}
