//! `llama-pro inspect`: what a model directory holds, from its config and tensor headers only.

use std::path::PathBuf;

use clap::Args;
use llama_pro::core::HfConfig;
use llama_pro::core::expand::LayerMap;
use llama_pro::core::freeze::{SelectContext, Selection, summarize};
use llama_pro::core::weights::Checkpoint;
use llama_pro::train::data::existing;

use super::{human_bytes, human_count};

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
    pub trainable: Option<Selection>,
}

pub fn run(a: &InspectArgs) -> anyhow::Result<()> {
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
    if !map.new_layers().is_empty() {
        println!("layer map      {}", map.compact());
        println!("expanded       layers {:?}", map.new_layers());
    }
    if let (Some(s), Some(sel)) = (summary, &a.trainable) {
        println!("\ntrainable with --trainable {sel}:\n{s}");
    }
    if stored_params != c.num_params() {
        println!(
            "warning        the checkpoint stores {stored_params} parameters, config.json implies {}",
            c.num_params()
        );
    }
    Ok(())
}
