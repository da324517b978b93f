//! `llama-pro chat`: an interactive conversation with a model through its chat template.
//!
//! Each user line is appended to the history (system prompt plus turns), the history is rendered
//! with the template and `add_generation_prompt`, encoded without special tokens (the rendered
//! text carries BOS and the turn markers, as transformers' `apply_chat_template(tokenize=True)`),
//! and the answer is streamed until the template's end-of-turn token. The helpers shared with
//! `generate --chat` live here.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::anyhow;
use clap::Args;
use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::device::{OnBackend, dispatch};
use llama_pro::core::generate::{GenerationConfig, Sampler, generate_until};
use llama_pro::core::{ChatTemplate, LlamaForCausalLM, Message, Tokenizer};
use llama_pro::train::data::existing;

use super::{ComputeArgs, load_tokenizer};

/// `llama-pro chat`
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model directory (needs tokenizer.json and a chat template, or --template).
    #[arg(long)]
    pub model: PathBuf,
    /// System prompt, kept at the start of the conversation (`/system TEXT` changes it).
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template: a built-in one (chatml, llama3, mistral) or a .jinja file; default: the
    /// model's own.
    #[arg(long, value_name = "NAME|FILE")]
    pub template: Option<String>,
    /// Stop an answer after this many new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub compute: ComputeArgs,
}

const HELP: &str = "commands: /reset (forget the conversation, keep the system prompt), \
/system TEXT (set the system prompt and reset; no TEXT: none), /help, /exit or /quit (or \
Ctrl-D); start a line with // to send a message that begins with /";

/// Run `llama-pro chat`.
pub fn run(a: &ChatArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    // The template first: a model without one fails before its weights are read.
    let template = ChatTemplate::load(&dir, a.template.as_deref())?;
    dispatch(
        a.compute.device,
        ChatTask {
            args: a,
            dir,
            template,
        },
    )?
}

struct ChatTask<'a> {
    args: &'a ChatArgs,
    dir: PathBuf,
    template: ChatTemplate,
}

impl OnBackend for ChatTask<'_> {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.args;
        let template = &self.template;
        let base = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            temperature: a.sampling.temperature,
            top_k: a.sampling.top_k,
            top_p: a.sampling.top_p,
            seed: a.sampling.seed,
            eos_token_ids: vec![],
            use_kv_cache: true,
        };
        // Bad sampling options fail now, not after the first question.
        Sampler::new(base.clone())?;
        let (model, tok) = load_model::<B>(&self.dir, &a.compute, &device, "chat")?;
        let stop = stop_token_ids(&tok, template);
        let turn_ends = template.turn_ends();
        let turn_ends: Vec<&str> = turn_ends.iter().map(String::as_str).collect();
        let max_positions = model.config.max_position_embeddings;
        eprintln!(
            "chat: {} · template {} · {} {} · /help for commands",
            self.dir.display(),
            template.origin(),
            a.compute.device,
            a.compute.dtype
        );

        let interactive = std::io::stdin().is_terminal();
        let mut system = a.system.clone().filter(|s| !s.is_empty());
        // The turns after the system prompt: user, assistant, user, …
        let mut turns: Vec<Message> = Vec::new();
        let mut answers = 0u64;
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        loop {
            if interactive {
                print!("> ");
                let _ = std::io::stdout().flush();
            }
            line.clear();
            if stdin.read_line(&mut line)? == 0 {
                if interactive {
                    println!();
                }
                break;
            }
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            let user = if let Some(escaped) = text.strip_prefix("//") {
                format!("/{escaped}")
            } else if let Some(command) = text.strip_prefix('/') {
                let (name, rest) = command
                    .split_once(char::is_whitespace)
                    .map_or((command, ""), |(n, r)| (n, r.trim()));
                match name {
                    "exit" | "quit" => break,
                    "reset" => {
                        turns.clear();
                        eprintln!("[conversation reset]");
                    }
                    "system" => {
                        system = Some(rest.to_string()).filter(|s| !s.is_empty());
                        turns.clear();
                        match &system {
                            Some(_) => eprintln!("[system prompt set; conversation reset]"),
                            None => eprintln!("[system prompt removed; conversation reset]"),
                        }
                    }
                    "help" => eprintln!("{HELP}"),
                    _ => eprintln!("unknown command /{name}; {HELP}"),
                }
                continue;
            } else {
                text.to_string()
            };
            turns.push(Message::new("user", user));

            // Fit the context: drop the oldest turns (never the system prompt or this question)
            // while the prompt plus the answer could exceed the model's positions.
            let mut dropped = 0usize;
            let prompt = loop {
                let prompt = encode_chat(&tok, template, system.as_deref(), &turns)?;
                if prompt.len() + a.max_new_tokens <= max_positions || turns.len() <= 1 {
                    break prompt;
                }
                turns.remove(0);
                if turns.first().is_some_and(|m| m.role == "assistant") {
                    turns.remove(0);
                }
                dropped += 1;
            };
            if dropped > 0 {
                eprintln!(
                    "[dropped the {dropped} oldest turn{} to fit the model's {max_positions} positions]",
                    if dropped == 1 { "" } else { "s" }
                );
            }
            if prompt.len() >= max_positions {
                eprintln!(
                    "error: this message takes {} tokens with the template; the model has {max_positions} \
                     positions: send a shorter one",
                    prompt.len()
                );
                turns.pop();
                continue;
            }
            let cfg = GenerationConfig {
                max_new_tokens: a.max_new_tokens.min(max_positions - prompt.len()),
                seed: a.sampling.seed.wrapping_add(answers),
                eos_token_ids: stop.clone(),
                ..base.clone()
            };
            let answer = stream::<B>(&model, &tok, &prompt, &cfg, &device, &turn_ends)?;
            println!();
            print_stats(prompt.len(), &answer);
            answers += 1;
            turns.push(Message::new("assistant", answer.text));
        }
        Ok(())
    }
}

/// Load the model in `dir` on `device` in `compute.dtype`, with its tokenizer (`command` names
/// what needs it when there is none).
pub(super) fn load_model<B: Backend>(
    dir: &Path,
    compute: &ComputeArgs,
    device: &B::Device,
    command: &str,
) -> anyhow::Result<(LlamaForCausalLM<B>, Tokenizer)> {
    let (model, hf) = LlamaForCausalLM::<B>::from_pretrained(dir, device, Some(compute.dtype))?;
    let tok = load_tokenizer(dir, &hf)?.ok_or_else(|| {
        anyhow!(
            "{}: no tokenizer.json; {command} needs a tokenizer",
            dir.display()
        )
    })?;
    Ok((model, tok))
}

/// The tokens that end an answer: the tokenizer's EOS ids plus the template's end-of-turn
/// strings ([`ChatTemplate::turn_ends`]) that are single tokens of the vocabulary
/// (`<|im_end|>`, `<|eot_id|>`…).
pub(super) fn stop_token_ids(tok: &Tokenizer, template: &ChatTemplate) -> Vec<u32> {
    let mut ids = tok.eos_token_ids.clone();
    for id in template
        .turn_ends()
        .iter()
        .filter_map(|t| tok.inner().token_to_id(t))
    {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// The prompt for the assistant's next answer: the system prompt (if any) and `turns` rendered
/// with `add_generation_prompt`, encoded without adding special tokens (the text has them).
pub(super) fn encode_chat(
    tok: &Tokenizer,
    template: &ChatTemplate,
    system: Option<&str>,
    turns: &[Message],
) -> anyhow::Result<Vec<u32>> {
    let messages: Vec<Message> = system
        .map(|s| Message::new("system", s))
        .into_iter()
        .chain(turns.iter().cloned())
        .collect();
    let text = template.render(&messages, true)?;
    Ok(tok.encode(&text, false)?)
}

/// A generated answer.
pub(super) struct Streamed {
    /// The new tokens, the one that stopped generation included.
    pub ids: Vec<u32>,
    /// Their text, without the stop token.
    pub text: String,
    /// Generation time.
    pub secs: f64,
}

/// Generate from `prompt` and print the text to stdout as it is decoded. Stop tokens
/// (`cfg.eos_token_ids`) are not printed; generation also stops where the text reaches one of
/// `stop` (a chat template's end-of-turn written as text the tokenizer has no single token
/// for), which is cut off.
pub(super) fn stream<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerationConfig,
    device: &B::Device,
    stop: &[&str],
) -> anyhow::Result<Streamed> {
    let mut stdout = std::io::stdout();
    // Decode everything so far and print what is new (byte-level BPE tokens may only form
    // valid text together: a partial UTF-8 character waits for the next token). Text that may
    // be the start of a stop string waits too.
    let mut shown: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut end: Option<usize> = None;
    let start = Instant::now();
    let ids = generate_until(model, prompt, cfg, device, |t| {
        if cfg.eos_token_ids.contains(&t) {
            return false;
        }
        shown.push(t);
        let Ok(text) = tok.decode(&shown) else {
            return true;
        };
        let found = stop.iter().filter_map(|s| text.find(s)).min();
        let safe = found.unwrap_or_else(|| text.len() - pending_stop(&text, stop));
        if safe > printed
            && text.is_char_boundary(printed)
            && text.is_char_boundary(safe)
            && !text[..safe].ends_with('\u{FFFD}')
        {
            let _ = write!(stdout, "{}", &text[printed..safe]);
            let _ = stdout.flush();
            printed = safe;
        }
        end = found;
        found.is_none()
    })?;
    let secs = start.elapsed().as_secs_f64();
    let mut text = tok.decode(&shown)?;
    if let Some(e) = end {
        text.truncate(e);
    }
    // What is left (text that ended in an incomplete character or a partial stop string).
    if text.len() > printed && text.is_char_boundary(printed) {
        let _ = write!(stdout, "{}", &text[printed..]);
        let _ = stdout.flush();
    }
    Ok(Streamed { ids, text, secs })
}

/// Length of the longest suffix of `text` that begins one of `stop` (held back from printing).
pub(super) fn pending_stop(text: &str, stop: &[&str]) -> usize {
    stop.iter()
        .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n])))
        .max()
        .unwrap_or(0)
}

/// The statistics line of one generation, on stderr.
pub(super) fn print_stats(prompt_tokens: usize, s: &Streamed) {
    eprintln!(
        "[{} prompt tokens, {} new tokens in {:.2}s, {:.1} tokens/s]",
        prompt_tokens,
        s.ids.len(),
        s.secs,
        s.ids.len() as f64 / s.secs.max(1e-9)
    );
}

/// Sampling options of `generate` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Random seed for sampling (in `chat`, the n-th answer of the session uses seed + n).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
