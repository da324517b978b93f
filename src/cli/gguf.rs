//! `llama-pro import-gguf` and `llama-pro export-gguf`: models between llama.cpp's GGUF and
//! HuggingFace directories.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use llama_pro::core::DType;
use llama_pro::core::gguf::GgmlType;
use llama_pro::core::gguf::convert::{ExportOptions, ImportOptions, export_gguf, import_gguf};
use llama_pro::train::data::existing;

use super::{choice, dtype_parser, human_bytes, human_count};

/// `llama-pro import-gguf`
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The GGUF file (LLaMA family: llama, mistral, qwen2; F32/F16/BF16 and the Q4_0…Q8_0,
    /// k-quant and IQ4 types).
    pub file: PathBuf,
    /// Output HuggingFace directory (written to a temporary directory, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Storage dtype of the weights (default: f16/bf16 when the GGUF's matrices are stored so,
    /// else f32, which holds dequantised values exactly).
    #[arg(long, value_parser = dtype_parser())]
    pub dtype: Option<DType>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `llama-pro export-gguf`
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The HuggingFace model directory (llama, mistral or qwen2).
    #[arg(long)]
    pub model: PathBuf,
    /// Output GGUF file (written to a temporary file, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Storage type of the weight matrices (norms and biases stay f32, as llama.cpp's converter
    /// writes them).
    #[arg(long, default_value = "f16", value_parser = choice::<String>(["f32", "f16", "bf16", "q8_0"]))]
    pub dtype: String,
    /// `general.name` (default: the model directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_import(a: &ImportArgs) -> anyhow::Result<()> {
    let file = existing(&a.file)?;
    let bar = super::progress::bar(0, "import", "tensors", a.quiet);
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let opts = ImportOptions {
        dtype: a.dtype,
        overwrite: a.overwrite,
    };
    let r = import_gguf(&file, &a.output, &opts, &progress)
        .with_context(|| format!("importing {}", file.display()))?;
    bar.finish_and_clear();
    let c = &r.config;
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "{}: {} {}, {} layers, hidden {}, {} query / {} key-value heads, vocab {}{}",
        file.display(),
        r.name.as_deref().unwrap_or("model"),
        c.architecture.hf_class(),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        if c.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    println!(
        "tensors: {} → {} {} ({} parameters); tokenizer: {}{}{}",
        types.join(", "),
        r.types.values().sum::<usize>(),
        c.dtype,
        human_count(c.num_params()),
        r.tokenizer_model,
        r.tokenizer_pre
            .as_deref()
            .map(|p| format!(" (pre-tokenizer {p})"))
            .unwrap_or_default(),
        if r.chat_template {
            ", chat template"
        } else {
            ""
        }
    );
    println!("wrote {}", a.output.display());
    Ok(())
}

pub fn run_export(a: &ExportArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    let Some(ty) = GgmlType::from_name(&a.dtype) else {
        bail!("--dtype {}: expected f32, f16, bf16 or q8_0", a.dtype);
    };
    if a.output.is_dir() {
        bail!(
            "--output {} is a directory; give the GGUF file to write",
            a.output.display()
        );
    }
    let bar = super::progress::bar(0, "export", "tensors", a.quiet);
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let opts = ExportOptions {
        ggml_type: ty,
        name: a.name.clone(),
        overwrite: a.overwrite,
    };
    let r = export_gguf(&dir, &a.output, &opts, &mut progress)
        .with_context(|| format!("exporting {} to {}", dir.display(), a.output.display()))?;
    bar.finish_and_clear();
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({}): {} parameters, tensors {}, {} metadata keys",
        a.output.display(),
        human_bytes(r.bytes as usize),
        human_count(r.params),
        types.join(", "),
        r.metadata_keys
    );
    Ok(())
}
