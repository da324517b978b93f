//! `llama-pro train-tokenizer`: a byte-level BPE from text files.

use std::path::PathBuf;

use clap::Args;
use llama_pro::train::tokenizer_train::{TokenizerTrainConfig, train_tokenizer};

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

pub fn run(a: &TrainTokenizerArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let config = TokenizerTrainConfig {
        vocab_size: a.vocab_size,
        min_frequency: a.min_frequency,
    };
    let file = train_tokenizer(&a.files, &config, &a.output)?;
    println!(
        "tokenizer ({} tokens) written to {} in {:.1}s",
        a.vocab_size,
        file.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
