//! `llama-pro eval`: loss and perplexity of a model on a data file.

use std::path::PathBuf;

use clap::Args;
use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::device::{OnBackend, dispatch};
use llama_pro::core::{DType, LlamaForCausalLM};
use llama_pro::train::data::{existing, read_sequences};
use llama_pro::train::eval::{EvalResult, evaluate};

use super::{ComputeArgs, load_tokenizer, progress};

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
    /// Skip the check that every weight is finite (on by default: a NaN weight is an error
    /// naming the tensor instead of a NaN loss).
    #[arg(long)]
    pub no_check_finite: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub compute: ComputeArgs,
}

pub fn run(a: &EvalArgs) -> anyhow::Result<()> {
    dispatch(a.compute.device, EvalTask { args: a })?
}

struct EvalTask<'a> {
    args: &'a EvalArgs,
}

impl OnBackend for EvalTask<'_> {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.args;
        let dtype: DType = a.compute.dtype;
        let dir = existing(&a.model)?;
        let data = existing(&a.data)?;
        if !a.no_check_finite {
            llama_pro::core::weights::Checkpoint::open(&dir)?.check_finite()?;
        }
        let (model, hf) = LlamaForCausalLM::<B>::from_pretrained(&dir, &device, Some(dtype))?;
        let tok = load_tokenizer(&dir, &hf)?;
        let seqs = read_sequences(&data, tok.as_ref(), hf.config.vocab_size, a.max_seq_len)?;
        let bar = progress::bar(seqs.len() as u64, "eval", "sequences", a.json);
        let r: EvalResult = evaluate(&model, &seqs, a.batch_size, &device, |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        if a.json {
            let v = serde_json::json!({
                "loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens, "sequences": r.sequences,
                "model": dir.display().to_string(), "data": data.display().to_string(),
                "device": a.compute.device.to_string(), "dtype": dtype.to_string(),
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
