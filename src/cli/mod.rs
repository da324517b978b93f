//! The `llama-pro` command line: one module per subcommand, the terminal rendering of runs
//! (`progress`), and the mapping of library errors to flags (`errors`).
//!
//! The libraries never print and know no flags: values are parsed here, once (clap parses typed
//! values with the libraries' `FromStr`), and a library error that names a setting is shown with
//! the flag that sets it.

use std::path::Path;
use std::str::FromStr;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use llama_pro::core::device::DeviceSpec;
use llama_pro::core::{DType, HfConfig, Tokenizer};

mod bench;
mod chat;
mod convert;
mod demo;
pub mod errors;
mod eval;
mod expand;
mod generate;
mod gguf;
mod inspect;
mod pipeline;
mod progress;
mod selftest;
mod serve;
mod sft;
mod tokenizer;
mod train;

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
    Inspect(inspect::InspectArgs),
    /// Causal-LM loss and perplexity of a model on a text or token file.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt (KV cache; greedy or sampled).
    Generate(generate::GenerateArgs),
    /// Load a model and write it back as a HuggingFace directory (change dtype or sharding).
    Convert(convert::ConvertArgs),
    /// Convert a GGUF file (llama.cpp, Ollama, LM Studio) of the LLaMA family into a HuggingFace
    /// directory: config, dequantised weights, tokenizer and chat template.
    ImportGguf(gguf::ImportArgs),
    /// Write a HuggingFace model as GGUF for llama.cpp, Ollama and LM Studio (f16, bf16, q8_0
    /// or f32; the tokenizer and chat template included), as llama.cpp's converter does.
    ExportGguf(gguf::ExportArgs),
    /// Grow a model with zero-initialised copies of its blocks (LLaMA Pro block expansion),
    /// streaming tensor by tensor, and check that it computes exactly what the original did.
    Expand(expand::ExpandArgs),
    /// Continued pretraining: train the expanded blocks (or another parameter selection) on a
    /// corpus, with evaluation, checkpoints and exact resume; exports a HuggingFace directory.
    Train(Box<train::TrainArgs>),
    /// Supervised fine-tuning (LLaMA Pro - Instruct): conversations (OpenAI messages, ShareGPT,
    /// Alpaca, prompt/completion) through the model's chat template, loss on the answers, neat
    /// packing; the paper's SFT defaults (all parameters, lr 2e-5, cosine, 3% warmup). Every
    /// `train` option applies.
    Sft(Box<train::TrainArgs>),
    /// Show how conversations become training examples: the rendered text with the trained
    /// tokens marked, and counts (or the ids and labels as JSON).
    SftPreview(sft::PreviewArgs),
    /// The paper's whole recipe from one TOML file: expand, post-pretrain the new blocks,
    /// instruction-tune all blocks; resumable, leaves a HuggingFace model.
    Pipeline(pipeline::PipelineArgs),
    /// Talk to a model through its chat template: streamed answers, history, /reset, /exit.
    Chat(chat::ChatArgs),
    /// The paper's claim at toy scale on the shipped data: a small pretrained model learns a new
    /// domain by LLaMA Pro block expansion, full fine-tuning, LoRA, prefix and suffix stacking
    /// with the same token budget; prints the table, writes a plot and a JSON report.
    Demo(demo::DemoArgs),
    /// Train a byte-level BPE tokenizer on text files and write tokenizer.json and
    /// tokenizer_config.json (HuggingFace format) into a directory.
    TrainTokenizer(tokenizer::TrainTokenizerArgs),
    /// One training step (or forward pass, or greedy decoding) of a synthetic model on a device:
    /// tokens/s, step time, model FLOPs, MFU, peak memory; JSON with --json.
    Bench(Box<bench::BenchArgs>),
    /// Serve the model over HTTP with the OpenAI API (completions with echo and logprobs for
    /// lm-evaluation-harness, chat completions with streaming, models, health), batching
    /// requests on one engine.
    Serve(serve::ServeArgs),
    /// Golden parity checks on a device: logits and KV-cache decoding against transformers, one
    /// training step against torch, expansion identity; exits 1 on a failure.
    Selftest(selftest::SelftestArgs),
}

/// Run the command line. The exit status is 0, or 130 for a run stopped by Ctrl-C or SIGTERM
/// (after its checkpoint); errors exit with 1.
pub fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Inspect(a) => inspect::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::ImportGguf(a) => gguf::run_import(&a),
        Command::ExportGguf(a) => gguf::run_export(&a),
        Command::Expand(a) => expand::run(&a),
        Command::Train(a) => return train::run(&a),
        Command::Sft(a) => return train::run_sft(&a),
        Command::SftPreview(a) => sft::run(&a),
        Command::Chat(a) => chat::run(&a),
        Command::Pipeline(a) => return pipeline::run(&a),
        Command::Demo(a) => demo::run(&a),
        Command::TrainTokenizer(a) => tokenizer::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Selftest(a) => return selftest::run(&a),
    }?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Options shared by commands that compute.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Device: cpu, wgpu (the best adapter: discrete, integrated, virtual, then a CPU one such
    /// as Mesa's lavapipe), wgpu:N (the N-th of that kind) or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Dtype the weights are loaded into and activations computed in.
    #[arg(long, default_value = "f32", value_parser = dtype_parser())]
    pub dtype: DType,
}

/// A flag whose values are the names of `T` (listed in `--help`), parsed with `T::from_str`.
pub fn choice<T>(names: impl IntoIterator<Item = &'static str>) -> impl TypedValueParser<Value = T>
where
    T: FromStr + Clone + Send + Sync + 'static,
    T::Err: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}

/// `--dtype`: f32, bf16 or f16.
pub fn dtype_parser() -> impl TypedValueParser<Value = DType> {
    choice::<DType>(["f32", "bf16", "f16"])
}

/// Parse `5GB`, `500MB`, `200KB`, `1024` (bytes, decimal units as transformers).
pub fn parse_size(s: &str) -> Result<usize, String> {
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
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with GB, MB, KB or B"))?;
    if !(v > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok((v * mult as f64) as usize)
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

/// The model directory's tokenizer, if it has one.
pub fn load_tokenizer(dir: &Path, hf: &HfConfig) -> anyhow::Result<Option<Tokenizer>> {
    if !dir.join("tokenizer.json").exists() {
        return Ok(None);
    }
    let c = &hf.config;
    Ok(Some(Tokenizer::from_dir(
        dir,
        c.bos_token_id,
        &c.eos_token_ids,
    )?))
}
