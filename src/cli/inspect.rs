//! `llama-pro inspect`: what a model directory holds, from its config and tensor headers only.

use std::path::PathBuf;

use clap::Args;
use llama_pro::core::HfConfig;
use llama_pro::core::expand::LayerMap;
use llama_pro::core::freeze::{SelectContext, Selection, summarize};
use llama_pro::core::weights::Checkpoint;
use llama_pro::train::data::existing;

use llama_pro::core::DType;
use llama_pro::core::device::DeviceSpec;
use llama_pro::train::config::{Method, TrainConfig};
use llama_pro::train::memory::{
    AttentionKind, Capacity, MemoryPlan, PlanInputs, device_capacity, fit_report,
};

use super::{choice, dtype_parser, human_bytes, human_count, parse_size};

/// `llama-pro inspect`
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model directory (config.json + model.safetensors or a sharded index), or a GGUF file
    /// (its metadata, configuration and tensor types).
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also show what a parameter selection would train (e.g. `expanded`,
    /// `expanded+embed_tokens`, `interleaved[4]`, `expanded.mlp`).
    #[arg(long, value_name = "SELECTION")]
    pub trainable: Option<Selection>,
    /// Also print the predicted peak memory of training this model (as `train --dry-run`):
    /// weights, gradients, AdamW state, activations, logits, and whether it fits the device.
    #[arg(long)]
    pub memory: bool,
    /// With --memory: what trains, as in `train` (default: pro for an expanded model, else
    /// full); --trainable overrides it.
    #[arg(long, requires = "memory", value_parser = choice::<Method>(Method::ALL.map(|m| m.name())))]
    pub method: Option<Method>,
    /// With --memory: tokens per sequence (default 512).
    #[arg(long, alias = "seq", requires = "memory")]
    pub seq_len: Option<usize>,
    /// With --memory: sequences per micro-batch (default 8).
    #[arg(long, alias = "batch", requires = "memory")]
    pub batch_size: Option<usize>,
    /// With --memory: micro-batches per optimizer step (default 1).
    #[arg(long, requires = "memory")]
    pub grad_accum: Option<usize>,
    /// With --memory: f32, or bf16/f16 mixed precision (default f32).
    #[arg(long, requires = "memory", value_parser = dtype_parser())]
    pub dtype: Option<DType>,
    /// With --memory: burn's balanced activation checkpointing.
    #[arg(long, alias = "checkpointing", requires = "memory")]
    pub activation_checkpointing: bool,
    /// With --memory: the device trained on: cpu, wgpu[:N] or cuda[:N] (default cpu).
    #[arg(long, requires = "memory")]
    pub device: Option<DeviceSpec>,
    /// With --memory: the device's memory (e.g. 80GB; decimal units). The CPU's is read from
    /// /proc/meminfo; a GPU's is not read (planning starts no device).
    #[arg(long, value_parser = parse_size, requires = "memory")]
    pub device_memory: Option<usize>,
    /// With --memory: plan for the fused kernels or for composed ops (O(seq^2) attention)
    /// instead of what the device and dtype get.
    #[arg(long, requires = "memory", value_parser = choice::<AttentionKind>(AttentionKind::ALL.map(|k| k.name())))]
    pub attention: Option<AttentionKind>,
    /// With --memory and --method lora: adapter rank (default 8).
    #[arg(long, requires = "memory")]
    pub lora_rank: Option<usize>,
    /// With --memory and --method lora: linear layers with adapters, comma-separated (default:
    /// all seven).
    #[arg(long, value_delimiter = ',', requires = "memory")]
    pub lora_targets: Vec<String>,
}

impl InspectArgs {
    /// The training run `--memory` plans: `train`'s defaults with the given flags.
    fn plan_config(&self, dir: &std::path::Path, expanded: bool) -> TrainConfig {
        let mut c = TrainConfig {
            model: dir.to_path_buf(),
            method: self
                .method
                .unwrap_or(if expanded { Method::Pro } else { Method::Full }),
            trainable: self.trainable.clone(),
            activation_checkpointing: self.activation_checkpointing,
            ..TrainConfig::default()
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(seq_len, batch_size, grad_accum, dtype, device, lora_rank);
        if !self.lora_targets.is_empty() {
            c.lora_targets = self.lora_targets.clone();
        }
        c
    }
}

pub fn run(a: &InspectArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    if dir.is_file() {
        return inspect_gguf(a, &dir);
    }
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
        Some(sel) => {
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
                sel,
                &ctx,
            )?)
        }
        None => None,
    };
    let memory = if a.memory {
        let cfg = a.plan_config(&dir, !map.new_layers().is_empty());
        let mut inputs = PlanInputs::from_train_config(&cfg, &hf)?;
        if let Some(k) = a.attention {
            inputs.attention = k;
        }
        let plan = MemoryPlan::for_training(c, &inputs);
        let capacity = device_capacity(cfg.device, a.device_memory.map(|b| b as u64));
        Some((plan, fit_report(c, &inputs, &capacity), capacity))
    } else {
        None
    };
    if a.json {
        let memory = memory.as_ref().map(|(plan, lines, capacity)| {
            let mut v = plan.to_json();
            let (cap, fits) = match capacity {
                Capacity::Known(b, _) => (Some(*b), Some(plan.total_bytes() <= *b)),
                Capacity::Unknown(_) => (None, None),
            };
            v["device_memory_bytes"] = serde_json::json!(cap);
            v["fits"] = serde_json::json!(fits);
            v["fit"] = serde_json::json!(lines);
            v
        });
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
            "memory": memory,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
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
    println!(
        "chat template  {}",
        match llama_pro::core::ChatTemplate::from_dir(&dir) {
            Ok(Some(t)) => t.origin().to_string(),
            Ok(None) => "none (sft and chat need --template chatml|llama3|mistral|FILE)".into(),
            Err(e) => format!("unreadable: {e}"),
        }
    );
    if !map.new_layers().is_empty() {
        println!("layer map      {}", map.compact());
        println!("expanded       layers {:?}", map.new_layers());
    }
    if let (Some(s), Some(sel)) = (summary, &a.trainable) {
        println!("\ntrainable with --trainable {sel}:\n{s}");
    }
    if let Some((plan, lines, _)) = &memory {
        println!("\n{plan}");
        for l in lines {
            println!("{l}");
        }
    }
    if stored_params != c.num_params() {
        println!(
            "warning        the checkpoint stores {stored_params} parameters, config.json implies {}",
            c.num_params()
        );
    }
    Ok(())
}

/// `inspect FILE.gguf`: the configuration it describes, tensor types and metadata.
fn inspect_gguf(a: &InspectArgs, path: &std::path::Path) -> anyhow::Result<()> {
    use llama_pro::core::gguf::{GgufFile, convert::config_from_gguf};
    if a.trainable.is_some() || a.memory {
        anyhow::bail!(
            "--trainable and --memory need a HuggingFace directory; convert the GGUF file first: \
             llama-pro import-gguf {} --output DIR",
            path.display()
        );
    }
    let file = GgufFile::open(path)?;
    let config = config_from_gguf(&file);
    let mut types = std::collections::BTreeMap::new();
    let mut params = 0usize;
    let mut bytes = 0usize;
    for t in &file.tensors {
        *types.entry(t.ggml_type.name()).or_insert(0usize) += 1;
        params += t.numel();
        bytes += t.byte_len();
    }
    if a.json {
        let meta: serde_json::Map<String, serde_json::Value> = file
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.summary().into()))
            .collect();
        let v = serde_json::json!({
            "format": "gguf",
            "version": file.version,
            "tensors": file.tensors.len(),
            "parameters": params,
            "tensor_bytes": bytes,
            "types": types,
            "metadata": meta,
            "config": config.as_ref().ok(),
            "config_error": config.as_ref().err().map(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} (GGUF v{})", path.display(), file.version);
    match &config {
        Ok(c) => println!(
            "{}: {} layers, hidden {}, FFN {}, {} query / {} key-value heads of {}, vocab {}{}, rope θ {}",
            c.architecture.hf_class(),
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            if c.tie_word_embeddings { " (tied)" } else { "" },
            c.rope_theta
        ),
        Err(e) => println!("not importable: {e}"),
    }
    let list: Vec<String> = types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "{} tensors, {} parameters, {}: {}",
        file.tensors.len(),
        human_count(params),
        human_bytes(bytes),
        list.join(", ")
    );
    println!("metadata:");
    for (k, v) in &file.metadata {
        println!("  {k} = {}", v.summary());
    }
    Ok(())
}
