//! `llama-pro generate`: text from a prompt, streamed as it is decoded; with `--chat`, the
//! answer to a user message rendered through the chat template.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::device::{OnBackend, dispatch};
use llama_pro::core::generate::GenerationConfig;
use llama_pro::core::{ChatTemplate, Message};
use llama_pro::train::data::existing;

use super::ComputeArgs;
use super::chat::{SamplingArgs, encode_chat, load_model, print_stats, stop_token_ids, stream};

/// `llama-pro generate`
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (needs tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (BOS is added as the tokenizer does); with --chat, the user's message.
    #[arg(long)]
    pub prompt: String,
    /// Render --prompt as one user message through the chat template (with the assistant's
    /// generation prompt) and print only the answer, which ends at the template's end of turn.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: the chat template, a built-in one (chatml, llama3, mistral) or a .jinja
    /// file; default: the model's own.
    #[arg(long, value_name = "NAME|FILE")]
    pub template: Option<String>,
    /// With --chat: a system prompt before the user's message.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub sampling: SamplingArgs,
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

/// Run `llama-pro generate`.
pub fn run(a: &GenerateArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    let template = if a.chat {
        // The template first: a model without one fails before its weights are read.
        Some(ChatTemplate::load(&dir, a.template.as_deref())?)
    } else {
        for (flag, given) in [
            ("--template", a.template.is_some()),
            ("--system", a.system.is_some()),
        ] {
            if given {
                bail!(
                    "{flag} only applies with --chat (which renders --prompt as a user message \
                     through the chat template); add --chat or drop {flag}"
                );
            }
        }
        None
    };
    dispatch(
        a.compute.device,
        GenerateTask {
            args: a,
            dir,
            template,
        },
    )?
}

struct GenerateTask<'a> {
    args: &'a GenerateArgs,
    dir: PathBuf,
    template: Option<ChatTemplate>,
}

impl OnBackend for GenerateTask<'_> {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.args;
        let dir = &self.dir;
        if a.check_finite {
            llama_pro::core::weights::Checkpoint::open(dir)?.check_finite()?;
        }
        let (model, tok) = load_model::<B>(dir, &a.compute, &device, "generate")?;
        let (prompt, stop) = match &self.template {
            Some(template) => {
                let user = [Message::new("user", a.prompt.as_str())];
                let system = a.system.as_deref().filter(|s| !s.is_empty());
                (
                    encode_chat(&tok, template, system, &user)?,
                    stop_token_ids(&tok, template),
                )
            }
            None => {
                let ids = tok.encode(&a.prompt, true)?;
                // The prompt is part of the text shown.
                print!("{}", a.prompt);
                (ids, tok.eos_token_ids.clone())
            }
        };
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            temperature: a.sampling.temperature,
            top_k: a.sampling.top_k,
            top_p: a.sampling.top_p,
            seed: a.sampling.seed,
            eos_token_ids: if a.ignore_eos { vec![] } else { stop },
            use_kv_cache: !a.no_kv_cache,
        };
        let turn_ends = match &self.template {
            Some(t) if !a.ignore_eos => t.turn_ends(),
            _ => vec![],
        };
        let turn_ends: Vec<&str> = turn_ends.iter().map(String::as_str).collect();
        let out = stream::<B>(&model, &tok, &prompt, &cfg, &device, &turn_ends)?;
        println!();
        print_stats(prompt.len(), &out);
        Ok(())
    }
}
