//! `llama-pro generate`: text from a prompt, streamed as it is decoded.

use std::io::Write;
use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use llama_pro::core::LlamaForCausalLM;
use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::device::{OnBackend, dispatch};
use llama_pro::core::generate::{GenerationConfig, generate};
use llama_pro::train::data::existing;

use super::{ComputeArgs, load_tokenizer};

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
    /// Check that every weight is finite before generating (reads the whole checkpoint once;
    /// non-finite logits stop generation with an error in any case).
    #[arg(long)]
    pub check_finite: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub compute: ComputeArgs,
}

pub fn run(a: &GenerateArgs) -> anyhow::Result<()> {
    dispatch(a.compute.device, GenerateTask { args: a })?
}

struct GenerateTask<'a> {
    args: &'a GenerateArgs,
}

impl OnBackend for GenerateTask<'_> {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.args;
        let dir = existing(&a.model)?;
        if a.check_finite {
            llama_pro::core::weights::Checkpoint::open(&dir)?.check_finite()?;
        }
        let (model, hf) =
            LlamaForCausalLM::<B>::from_pretrained(&dir, &device, Some(a.compute.dtype))?;
        let tok = load_tokenizer(&dir, &hf)?.ok_or_else(|| {
            anyhow!(
                "{}: no tokenizer.json; generate needs a tokenizer",
                dir.display()
            )
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
            if let Ok(text) = tok.decode(&generated)
                && text.len() > printed
                && text.is_char_boundary(printed)
                && !text.ends_with('\u{FFFD}')
            {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
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
