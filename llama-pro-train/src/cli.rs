//! The `llama-pro` command line: `inspect`, `eval`, `generate`, `convert`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use llama_pro_core::device::{DeviceSpec, OnBackend, dispatch};
use llama_pro_core::expand::{ExpansionPlan, LayerMap, expand_checkpoint};
use llama_pro_core::freeze::{SelectContext, Selection, summarize};
use llama_pro_core::generate::{GenerationConfig, generate};
use llama_pro_core::save::{SaveOptions, save_pretrained};
use llama_pro_core::weights::Checkpoint;
use llama_pro_core::{DType, HfConfig, LlamaForCausalLM, Tokenizer};

use crate::data::{existing, read_sequences};
use crate::error::{Result, TrainError};
use crate::eval::{EvalResult, evaluate};

/// LLaMA Pro: expand a pretrained LLaMA with identity blocks, train only the new blocks, export
/// a HuggingFace checkpoint. Runs on the CPU, wgpu (Vulkan/Metal/DX12) or CUDA.
#[derive(Parser, Debug)]
#[command(name = "llama-pro", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a HuggingFace model directory: architecture, sizes, dtype, parameters.
    Inspect(InspectArgs),
    /// Causal-LM loss and perplexity of a model on a text or token file.
    Eval(EvalArgs),
    /// Generate text from a prompt (KV cache; greedy or sampled).
    Generate(GenerateArgs),
    /// Load a model and write it back as a HuggingFace directory (change dtype or sharding).
    Convert(ConvertArgs),
    /// Grow a model with zero-initialised copies of its blocks (LLaMA Pro block expansion),
    /// streaming tensor by tensor, and check that it computes exactly what the original did.
    Expand(ExpandArgs),
    /// Continued pretraining: train the expanded blocks (or another parameter selection) on a
    /// corpus, with evaluation, checkpoints and exact resume; exports a HuggingFace directory.
    Train(Box<TrainArgs>),
    /// The paper's claim at toy scale on the shipped data: a small pretrained model learns a new
    /// domain by LLaMA Pro block expansion, full fine-tuning, LoRA, prefix and suffix stacking
    /// with the same token budget; prints the table, writes a plot and a JSON report.
    Demo(DemoArgs),
    /// Train a byte-level BPE tokenizer on text files and write tokenizer.json and
    /// tokenizer_config.json (HuggingFace format) into a directory.
    TrainTokenizer(TrainTokenizerArgs),
}

/// `llama-pro demo`
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The CI-sized run (about 25 s on 2 CPU cores) instead of the default (about 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Directory with base/ and {general,domain}-{train,valid}.jsonl (default: the repository's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory: runs/, models/, forgetting.png, demo.json.
    #[arg(long, default_value = "demo-output")]
    pub output: PathBuf,
    /// Methods to compare, comma-separated (default: all five).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub methods: Vec<crate::demo::DemoMethod>,
    /// Optimizer steps per method (default 150; --quick 30).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate of every method (default 2e-4, the paper's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Fail if LLaMA Pro's general loss rises by more than this many percent (default 5).
    #[arg(long)]
    pub max_general_change: Option<f64>,
    /// Seed of the data order and adapter init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, wgpu[:N] or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `llama-pro train-tokenizer`
#[derive(Args, Debug)]
pub struct TrainTokenizerArgs {
    /// Text files: .txt (one document per line) or .jsonl ({"text": ...} per line).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Output directory (created if needed).
    #[arg(long)]
    pub output: PathBuf,
    /// Vocabulary size, special tokens <s> and </s> included.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Minimum count of a pair to be merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
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
    pub data: Vec<String>,
    /// Output directory: checkpoints/, metrics.jsonl, report.json, model/.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// pro: only the expanded blocks (default); full: everything; lora: low-rank adapters on
    /// every block's linear layers (merged at export); freeze-originals: N original
    /// interleaved blocks, no expansion (the paper's baseline).
    #[arg(long, value_enum)]
    pub method: Option<crate::config::Method>,
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
    pub trainable: Option<String>,
    /// Learning-rate factor of a group, repeatable: SELECTION=FACTOR (e.g. embed_tokens=0.1).
    #[arg(long)]
    pub lr_scale: Vec<String>,
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
    /// One line = one sequence (truncated, padding masked out of the loss) instead of packing.
    #[arg(long)]
    pub no_packing: bool,
    /// Tokenize every run instead of using the token cache ($LLAMA_PRO_CACHE or ~/.cache/llama-pro/tokens).
    #[arg(long)]
    pub no_token_cache: bool,
    /// Peak learning rate (paper: 2e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine (paper: cosine).
    #[arg(long, value_enum)]
    pub lr_schedule: Option<crate::schedule::ScheduleKind>,
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
    #[arg(long)]
    pub dtype: Option<String>,
    /// Recompute memory-bound activations in the backward pass (less memory, more compute).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Evaluation set, repeatable: NAME=FILE (default: a held-out 2% of the training data).
    #[arg(long)]
    pub eval: Vec<String>,
    /// Evaluate on at most N windows of each --eval set (evenly spaced; default: all).
    #[arg(long)]
    pub eval_max_sequences: Option<usize>,
    /// Evaluate every N steps (0: before and after only).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N steps (0: at the end only).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Keep the last N checkpoints (default 2).
    #[arg(long)]
    pub keep: Option<usize>,
    /// Resume from `latest` (the newest checkpoint in OUTPUT) or a checkpoint directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Log a line every N steps (default 10).
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Seed for the data order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, wgpu[:N] or cuda[:N].
    #[arg(long)]
    pub device: Option<String>,
    /// Peak TFLOP/s of the device for the printed MFU (default: estimated on the CPU from
    /// /proc/cpuinfo; give it for GPUs, e.g. 989 for an H100 SXM in bf16).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

impl TrainArgs {
    /// The configuration: `--config` (if any), then every given flag.
    pub fn resolve(&self) -> Result<crate::config::TrainConfig> {
        let mut c = match &self.config {
            Some(p) => crate::config::TrainConfig::from_toml(p)?,
            None => crate::config::TrainConfig::default(),
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
            lora_alpha
        );
        if !self.lora_targets.is_empty() {
            c.lora_targets = self.lora_targets.clone();
        }
        if self.random_init {
            c.random_init = true;
        }
        if self.activation_checkpointing {
            c.activation_checkpointing = true;
        }
        if self.trainable.is_some() {
            c.trainable = self.trainable.clone();
        }
        if self.peak_tflops.is_some() {
            c.peak_tflops = self.peak_tflops;
        }
        if self.eval_max_sequences.is_some() {
            c.eval_max_sequences = self.eval_max_sequences;
        }
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        if self.resume.is_some() {
            c.resume = self.resume.clone();
        }
        if !self.data.is_empty() {
            c.data = self.data.clone();
        }
        if !self.eval.is_empty() {
            c.eval = self.eval.clone();
        }
        if !self.lr_scale.is_empty() {
            c.lr_scale = self.lr_scale.clone();
        }
        if self.no_packing {
            c.packing = false;
        }
        if self.no_token_cache {
            c.token_cache = false;
        }
        Ok(c)
    }
}

/// Options shared by commands that compute.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Device: cpu, wgpu, wgpu:N (N-th discrete GPU) or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Dtype the weights are loaded into and activations computed in: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ComputeArgs {
    fn parse(&self) -> Result<(DeviceSpec, DType)> {
        let device: DeviceSpec = self.device.parse()?;
        let dtype = DType::parse(&self.dtype).ok_or_else(|| {
            TrainError::Invalid(format!(
                "--dtype {:?}: expected f32, bf16 or f16",
                self.dtype
            ))
        })?;
        Ok((device, dtype))
    }
}

/// `llama-pro inspect`
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model directory (config.json + model.safetensors or a sharded index).
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also show what a parameter selection would train (e.g. `expanded`,
    /// `expanded+embed_tokens`, `interleaved[4]`, `expanded.mlp`).
    #[arg(long, value_name = "SELECTION")]
    pub trainable: Option<String>,
}

/// `llama-pro expand`
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("layout").required(true).args(["groups", "top", "bottom", "positions"])))]
pub struct ExpandArgs {
    /// Input model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (written to a temporary directory, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Interleaved (the paper's layout): split the L blocks into N groups of L/N and add copies
    /// after each group (LLaMA-2-7B: --groups 8 turns 32 blocks into 40).
    #[arg(long, value_name = "N")]
    pub groups: Option<usize>,
    /// With --groups: copies per group, of the group's top P blocks.
    #[arg(long, value_name = "P", default_value_t = 1, requires = "groups")]
    pub copies: usize,
    /// Add K copies of the last block on top (the paper's suffix stacking).
    #[arg(long, value_name = "K")]
    pub top: Option<usize>,
    /// Add K copies of the first block at the bottom (the paper's prefix stacking).
    #[arg(long, value_name = "K")]
    pub bottom: Option<usize>,
    /// Explicit insertions SOURCE@POSITION,...: a copy of block SOURCE placed at POSITION of the
    /// expanded model (e.g. 3@4,7@9).
    #[arg(long, value_name = "LIST")]
    pub positions: Option<String>,
    /// Compare the logits of the expanded and original models after writing: auto (models up to
    /// 1.5B parameters), always or never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub identity_check: String,
    /// Device for the identity check.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Shard the weights above this size, e.g. 5GB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// `llama-pro eval`
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Data: .txt (one document per line, tokenized with the model's tokenizer) or .jsonl with
    /// {"text": ...} or pre-tokenized {"input_ids": [...]} lines (used as given, no BOS added).
    #[arg(long)]
    pub data: PathBuf,
    /// Truncate every sequence to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object {loss, perplexity, tokens, sequences}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub compute: ComputeArgs,
}

/// `llama-pro generate`
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (needs tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (BOS is added as the tokenizer does).
    #[arg(long)]
    pub prompt: String,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Recompute the whole sequence at every step instead of caching keys/values (slower, same
    /// result; a fallback should a backend's single-position kernels misbehave).
    #[arg(long)]
    pub no_kv_cache: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub compute: ComputeArgs,
}

/// `llama-pro convert`
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (written to a temporary directory, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Storage dtype of the output: f32, bf16 or f16 (default: same as the input).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Shard the weights above this size, e.g. 5GB, 500MB, 200KB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// Parse `5GB`, `500MB`, `200KB`, `1024` (bytes, decimal units as transformers).
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("GB") {
        (n, 1_000_000_000)
    } else if let Some(n) = t.strip_suffix("MB") {
        (n, 1_000_000)
    } else if let Some(n) = t.strip_suffix("KB") {
        (n, 1_000)
    } else if let Some(n) = t.strip_suffix('B') {
        (n, 1)
    } else {
        (t.as_str(), 1)
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        TrainError::Invalid(format!(
            "size {s:?}: expected a number with GB, MB, KB or B"
        ))
    })?;
    if !(v > 0.0) {
        return Err(TrainError::Invalid(format!("size {s:?} must be positive")));
    }
    Ok((v * mult as f64) as usize)
}

/// Run the command line (the binary's `main` only formats the error).
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect(&a),
        Command::Eval(a) => {
            let (device, dtype) = a.compute.parse()?;
            dispatch(device, EvalTask { args: &a, dtype })?
        }
        Command::Generate(a) => {
            let (device, dtype) = a.compute.parse()?;
            dispatch(device, GenerateTask { args: &a, dtype })?
        }
        Command::Convert(a) => convert(&a),
        Command::Expand(a) => expand(&a),
        Command::Train(a) => train_cmd(&a),
        Command::Demo(a) => demo_cmd(&a),
        Command::TrainTokenizer(a) => {
            let start = std::time::Instant::now();
            let file = crate::tokenizer_train::train_tokenizer(
                &a.files,
                &crate::tokenizer_train::TokenizerTrainConfig {
                    vocab_size: a.vocab_size,
                    min_frequency: a.min_frequency,
                },
                &a.output,
            )?;
            println!(
                "tokenizer ({} tokens) written to {} in {:.1}s",
                a.vocab_size,
                file.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let dir = existing(&a.model)?;
    let hf = HfConfig::from_path(&dir)?;
    let c = &hf.config;
    let ckpt = Checkpoint::open(&dir)?;
    let mut stored_params = 0usize;
    let mut stored_bytes = 0usize;
    let mut dtypes = std::collections::BTreeSet::new();
    let mut tensors = 0usize;
    for name in ckpt.names() {
        if let Some(m) = ckpt.meta(name) {
            let n: usize = m.shape.iter().product();
            stored_params += n;
            stored_bytes += n * m.dtype.size();
            dtypes.insert(m.dtype.to_string());
            tensors += 1;
        }
    }
    let dtypes: Vec<String> = dtypes.into_iter().collect();
    let map = LayerMap::from_config(&hf.raw, c.num_hidden_layers, &hf.path)?;
    let summary = match &a.trainable {
        Some(spec) => {
            let sel = Selection::parse(spec)?;
            // Names and shapes only: no model is built, so this is instant for any size.
            let ctx = SelectContext {
                map: &map,
                tied: c.tie_word_embeddings,
            };
            let sizes: Vec<(String, usize)> = ckpt
                .names()
                .filter_map(|n| {
                    ckpt.meta(n)
                        .map(|m| (n.to_string(), m.shape.iter().product()))
                })
                .collect();
            Some(summarize(
                sizes.iter().map(|(n, s)| (n.as_str(), *s)),
                &sel,
                &ctx,
            )?)
        }
        None => None,
    };
    if a.json {
        let v = serde_json::json!({
            "architecture": c.architecture.hf_class(),
            "num_hidden_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta,
            "config_dtype": c.dtype.hf_name(),
            "stored_dtypes": dtypes,
            "tie_word_embeddings": c.tie_word_embeddings,
            "parameters": c.num_params(),
            "stored_parameters": stored_params,
            "stored_bytes": stored_bytes,
            "tensors": tensors,
            "expanded_layers": map.new_layers(),
            "layer_map": map.compact(),
            "trainable": summary,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("model          {}", dir.display());
    println!("architecture   {}", c.architecture.hf_class());
    println!("layers         {}", c.num_hidden_layers);
    println!(
        "hidden         {} (FFN {})",
        c.hidden_size, c.intermediate_size
    );
    let attn = if c.num_key_value_heads == c.num_attention_heads {
        "MHA"
    } else {
        "GQA"
    };
    println!(
        "heads          {} query, {} key/value ({attn}), head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocab          {}", c.vocab_size);
    println!(
        "context        {} (rope_theta {}, scaling {:?})",
        c.max_position_embeddings, c.rope_theta, c.rope_scaling
    );
    if let Some(w) = c.sliding_window {
        println!("sliding window {w}");
    }
    println!(
        "dtype          {} (stored: {})",
        c.dtype.hf_name(),
        dtypes.join(", ")
    );
    println!(
        "tied lm_head   {}",
        if c.tie_word_embeddings { "yes" } else { "no" }
    );
    println!(
        "parameters     {} ({}), {} tensors, {} on disk",
        c.num_params(),
        human_count(c.num_params()),
        tensors,
        human_bytes(stored_bytes)
    );
    if !map.new_layers().is_empty() {
        println!("layer map      {}", map.compact());
        println!("expanded       layers {:?}", map.new_layers());
    }
    if let Some(s) = summary {
        println!(
            "\ntrainable with --trainable {}:\n{s}",
            a.trainable.as_deref().unwrap_or("")
        );
    }
    if stored_params != c.num_params() {
        println!(
            "warning        the checkpoint stores {stored_params} parameters, config.json implies {}",
            c.num_params()
        );
    }
    Ok(())
}

/// 1.2M, 3.4B…
pub fn human_count(n: usize) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

/// 1.2 MB…
pub fn human_bytes(n: usize) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} KB", f / 1e3)
    } else {
        format!("{n} B")
    }
}

fn load_tokenizer(dir: &Path, hf: &HfConfig) -> Result<Option<Tokenizer>> {
    if dir.join("tokenizer.json").exists() {
        Ok(Some(Tokenizer::from_dir(
            dir,
            hf.config.bos_token_id,
            &hf.config.eos_token_ids,
        )?))
    } else {
        Ok(None)
    }
}

struct EvalTask<'a> {
    args: &'a EvalArgs,
    dtype: DType,
}

impl OnBackend for EvalTask<'_> {
    type Output = Result<()>;
    fn run<B: llama_pro_core::LlamaBackend>(self, device: B::Device) -> Result<()> {
        let a = self.args;
        let dir = existing(&a.model)?;
        let data = existing(&a.data)?;
        let (model, hf) = LlamaForCausalLM::<B>::from_pretrained(&dir, &device, Some(self.dtype))?;
        let tok = load_tokenizer(&dir, &hf)?;
        let seqs = read_sequences(&data, tok.as_ref(), hf.config.vocab_size, a.max_seq_len)?;
        let bar = progress(seqs.len() as u64, "eval", a.json);
        let r: EvalResult = evaluate(&model, &seqs, a.batch_size, &device, |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        if a.json {
            let v = serde_json::json!({
                "loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens, "sequences": r.sequences,
                "model": dir.display().to_string(), "data": data.display().to_string(),
                "device": a.compute.device, "dtype": self.dtype.to_string(),
            });
            println!("{v}");
        } else {
            println!(
                "loss {:.6}  perplexity {:.4}  ({} tokens predicted in {} sequences)",
                r.loss, r.perplexity, r.tokens, r.sequences
            );
        }
        Ok(())
    }
}

struct GenerateTask<'a> {
    args: &'a GenerateArgs,
    dtype: DType,
}

impl OnBackend for GenerateTask<'_> {
    type Output = Result<()>;
    fn run<B: llama_pro_core::LlamaBackend>(self, device: B::Device) -> Result<()> {
        let a = self.args;
        let dir = existing(&a.model)?;
        let (model, hf) = LlamaForCausalLM::<B>::from_pretrained(&dir, &device, Some(self.dtype))?;
        let tok = load_tokenizer(&dir, &hf)?.ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: no tokenizer.json; generate needs a tokenizer",
                dir.display()
            ))
        })?;
        let prompt = tok.encode(&a.prompt, true)?;
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            eos_token_ids: if a.ignore_eos {
                vec![]
            } else {
                tok.eos_token_ids.clone()
            },
            use_kv_cache: !a.no_kv_cache,
        };
        let mut stdout = std::io::stdout();
        let _ = write!(stdout, "{}", a.prompt);
        let _ = stdout.flush();
        // Stream: decode everything so far and print what is new (byte-level BPE tokens may
        // only form valid text together).
        let mut generated: Vec<u32> = Vec::new();
        let mut printed = 0usize;
        let start = std::time::Instant::now();
        let out = generate(&model, &prompt, &cfg, &device, |t| {
            generated.push(t);
            if let Ok(text) = tok.decode(&generated) {
                if text.len() > printed
                    && text.is_char_boundary(printed)
                    && !text.ends_with('\u{FFFD}')
                {
                    let _ = write!(stdout, "{}", &text[printed..]);
                    let _ = stdout.flush();
                    printed = text.len();
                }
            }
        })?;
        let secs = start.elapsed().as_secs_f64();
        println!();
        eprintln!(
            "[{} prompt tokens, {} new tokens in {:.2}s, {:.1} tokens/s]",
            prompt.len(),
            out.len(),
            secs,
            out.len() as f64 / secs.max(1e-9)
        );
        Ok(())
    }
}

fn convert(a: &ConvertArgs) -> Result<()> {
    let dir = existing(&a.model)?;
    let hf = HfConfig::from_path(&dir)?;
    let out_dtype = match &a.dtype {
        None => None,
        Some(s) => Some(DType::parse(s).ok_or_else(|| {
            TrainError::Invalid(format!("--dtype {s:?}: expected f32, bf16 or f16"))
        })?),
    };
    let device = Default::default();
    // Load in f32 on the CPU: exact for every input dtype, so re-saving in the input dtype is bitwise.
    let ckpt = Checkpoint::open(&dir)?;
    let model =
        LlamaForCausalLM::<CpuBackend>::from_checkpoint(&hf.config, &ckpt, &device, DType::F32)?;
    let opts = SaveOptions {
        dtype: out_dtype,
        max_shard_bytes: parse_size(&a.max_shard_size)?,
        overwrite: a.overwrite,
    };
    save_pretrained(&model, &hf, Some(&dir), &a.output, &opts)?;
    println!("wrote {}", a.output.display());
    Ok(())
}

fn demo_cmd(a: &DemoArgs) -> Result<()> {
    use crate::demo::{DemoConfig, demo_table, run_demo};
    let mut c = if a.quick {
        DemoConfig::quick()
    } else {
        DemoConfig::default()
    };
    if let Some(d) = &a.data_dir {
        c.data_dir = d.clone();
    }
    c.output = a.output.clone();
    if !a.methods.is_empty() {
        c.methods = a.methods.clone();
    }
    if let Some(s) = a.steps {
        c.steps = s;
    }
    if let Some(lr) = a.lr {
        c.lr = lr;
    }
    if let Some(g) = a.max_general_change {
        c.max_general_change_pct = g;
    }
    c.seed = a.seed;
    c.device = a.device.clone();
    let start = std::time::Instant::now();
    let r = run_demo(&c, false)?;
    println!("\n{}", demo_table(&r));
    for v in &r.verdict {
        println!("{v}");
    }
    println!(
        "\nplot: {}\nreport: {}\n({:.0} s in all)",
        c.output.join("forgetting.png").display(),
        c.output.join("demo.json").display(),
        start.elapsed().as_secs_f64()
    );
    if !r.passed {
        return Err(TrainError::Invalid(
            "the demo's LLaMA Pro checks failed (see above)".into(),
        ));
    }
    Ok(())
}

fn train_cmd(a: &TrainArgs) -> Result<()> {
    let cfg = a.resolve()?;
    cfg.validate()?;
    let device: DeviceSpec = cfg.device.parse()?;
    std::fs::create_dir_all(&cfg.output).map_err(|source| TrainError::Io {
        path: cfg.output.clone(),
        source,
    })?;
    // The resolved configuration, saved next to the results.
    let resolved = toml::to_string_pretty(&cfg)
        .map_err(|e| TrainError::Invalid(format!("serializing the config: {e}")))?;
    let path = cfg.output.join("train.toml");
    std::fs::write(&path, &resolved).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    eprintln!("configuration (saved to {}):\n{resolved}", path.display());
    let stop: &'static std::sync::atomic::AtomicBool =
        Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing the current step and writing a checkpoint (Ctrl-C again to quit now)"
        );
    });
    let report = llama_pro_core::device::dispatch_autodiff_with(
        device,
        cfg.activation_checkpointing,
        TrainTask { cfg: &cfg, stop },
    )??;
    if report.interrupted {
        eprintln!(
            "stopped after step {}; continue with: llama-pro train --config {} --resume",
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
    Ok(())
}

struct TrainTask<'a> {
    cfg: &'a crate::config::TrainConfig,
    stop: &'a std::sync::atomic::AtomicBool,
}

impl llama_pro_core::device::OnAutodiffBackend for TrainTask<'_> {
    type Output = Result<crate::trainer::TrainReport>;
    fn run<B: llama_pro_core::LlamaAutodiffBackend>(self, device: B::Device) -> Self::Output {
        crate::trainer::train::<B>(
            self.cfg,
            &device,
            crate::trainer::RunControl {
                stop: self.stop,
                on_step: Box::new(|_| true),
                quiet: false,
            },
        )
    }
}

fn expand(a: &ExpandArgs) -> Result<()> {
    let src = existing(&a.model)?;
    let plan = if let Some(n) = a.groups {
        ExpansionPlan::Interleaved {
            groups: n,
            copies: a.copies,
        }
    } else if let Some(k) = a.top {
        ExpansionPlan::Top { k }
    } else if let Some(k) = a.bottom {
        ExpansionPlan::Bottom { k }
    } else if let Some(p) = &a.positions {
        ExpansionPlan::parse_positions(p)?
    } else {
        return Err(TrainError::Invalid(
            "give one of --groups, --top, --bottom or --positions".into(),
        ));
    };
    let device: DeviceSpec = a.device.parse()?;
    let opts = SaveOptions {
        dtype: None,
        max_shard_bytes: parse_size(&a.max_shard_size)?,
        overwrite: a.overwrite,
    };
    let start = std::time::Instant::now();
    let report = expand_checkpoint(&src, &a.output, &plan, &opts)?;
    println!(
        "expanded {} -> {} layers ({plan}) in {:.2}s, {} of weights written to {}",
        report.from_layers,
        report.to_layers,
        start.elapsed().as_secs_f64(),
        human_bytes(report.bytes_written),
        a.output.display()
    );
    println!("layer map (cN = zero-initialised copy of block N):");
    println!("  {}", report.map.compact());
    println!(
        "new layers {:?} (recorded in config.json under \"{}\")",
        report.map.new_layers(),
        llama_pro_core::expand::CONFIG_KEY
    );
    let params = HfConfig::from_path(&src)?.config.num_params();
    let run = match a.identity_check.as_str() {
        "always" => true,
        "never" => false,
        _ => params <= 1_500_000_000,
    };
    if run {
        let d = dispatch(
            device,
            IdentityCheck {
                base: &src,
                expanded: &a.output,
            },
        )??;
        println!("identity check: max |Δlogits| = {d}");
        if d != 0.0 {
            return Err(TrainError::Invalid(format!(
                "identity check failed: the expanded model's logits differ from the original's by {d}"
            )));
        }
    } else {
        println!(
            "identity check: skipped ({} parameters; pass --identity-check always to run it)",
            human_count(params)
        );
    }
    Ok(())
}

/// Compares the logits of two models on a fixed random batch; returns max |Δ| (0 = bitwise equal).
pub(crate) struct IdentityCheck<'a> {
    pub(crate) base: &'a Path,
    pub(crate) expanded: &'a Path,
}

impl OnBackend for IdentityCheck<'_> {
    type Output = Result<f32>;
    fn run<B: llama_pro_core::LlamaBackend>(self, device: B::Device) -> Result<f32> {
        use llama_pro_core::burn::tensor::{Int, Tensor, TensorData};
        let (base, _) =
            LlamaForCausalLM::<B>::from_pretrained(self.base, &device, Some(DType::F32))?;
        let (exp, _) =
            LlamaForCausalLM::<B>::from_pretrained(self.expanded, &device, Some(DType::F32))?;
        let vocab = base.config.vocab_size as u64;
        // A fixed pseudo-random batch (splitmix64), independent of any RNG crate version.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let ids: Vec<i64> = (0..2 * 32)
            .map(|_| {
                x = x.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                ((z ^ (z >> 31)) % vocab) as i64
            })
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 32]), &device);
        let d = (base.forward(ids.clone()) - exp.forward(ids))
            .abs()
            .max()
            .into_scalar();
        Ok(llama_pro_core::burn::tensor::ElementConversion::elem::<f32>(d))
    }
}

#[cfg(feature = "cpu")]
type CpuBackend = llama_pro_core::burn::backend::Flex;
#[cfg(all(not(feature = "cpu"), feature = "wgpu"))]
type CpuBackend = llama_pro_core::burn::backend::Wgpu;
#[cfg(all(not(feature = "cpu"), not(feature = "wgpu"), feature = "cuda"))]
type CpuBackend = llama_pro_core::burn::backend::Cuda;

fn progress(len: u64, what: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} sequences ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}
