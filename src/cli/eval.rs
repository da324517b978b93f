//! `llama-pro eval`: loss and perplexity of a model on a data file, and multiple-choice accuracy
//! (`acc`, `acc_norm`) on task files, as lm-evaluation-harness scores them.

use std::path::PathBuf;

use clap::Args;
use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::device::{OnBackend, dispatch};
use llama_pro::core::{DType, LlamaForCausalLM};
use llama_pro::train::data::{existing, read_sequences};
use llama_pro::train::eval::{EvalResult, evaluate};
use llama_pro::train::tasks::{McOptions, McTask, evaluate_task};

use super::{ComputeArgs, load_tokenizer, progress};

/// `llama-pro eval`
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Data: .txt (one document per line, tokenized with the model's tokenizer) or .jsonl with
    /// {"text": ...} or pre-tokenized {"input_ids": [...]} lines (used as given, no BOS added).
    #[arg(long, required_unless_present = "task")]
    pub data: Option<PathBuf>,
    /// A multiple-choice task: a .jsonl file of {"context": ..., "choices": [...], "gold": k}
    /// items, scored by log-likelihood as lm-evaluation-harness does (acc, acc_norm); repeat
    /// for several tasks.
    #[arg(long, value_name = "FILE.jsonl")]
    pub task: Vec<PathBuf>,
    /// Task requests keep their last this many tokens (lm-eval's local-completions with its
    /// default max_length 2048 keeps 2047: one position is left for the generated token).
    #[arg(long, default_value_t = 2047)]
    pub task_max_length: usize,
    /// Between a task's context and each choice (lm-eval's target_delimiter).
    #[arg(long, default_value = " ")]
    pub target_delimiter: String,
    /// Truncate every sequence to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object {loss, perplexity, tokens, sequences} (with --task: "tasks":
    /// {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}).
    #[arg(long)]
    pub json: bool,
    /// With --json and --task: every item's log-likelihoods ("items": [{lls, gold}]).
    #[arg(long)]
    pub log_samples: bool,
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
        let data = a.data.as_deref().map(existing).transpose()?;
        // Task files are read before the model: a malformed line fails fast.
        let tasks = a
            .task
            .iter()
            .map(|p| McTask::load(&existing(p)?))
            .collect::<Result<Vec<_>, _>>()?;
        if !a.no_check_finite {
            llama_pro::core::weights::Checkpoint::open(&dir)?.check_finite()?;
        }
        let (model, hf) = LlamaForCausalLM::<B>::from_pretrained(&dir, &device, Some(dtype))?;
        let tok = load_tokenizer(&dir, &hf)?;
        let mut json = serde_json::json!({
            "model": dir.display().to_string(),
            "device": a.compute.device.to_string(), "dtype": dtype.to_string(),
        });
        if let Some(data) = &data {
            let seqs = read_sequences(data, tok.as_ref(), hf.config.vocab_size, a.max_seq_len)?;
            let bar = progress::bar(seqs.len() as u64, "eval", "sequences", a.json);
            let r: EvalResult = evaluate(&model, &seqs, a.batch_size, &device, |done| {
                bar.set_position(done as u64)
            })?;
            bar.finish_and_clear();
            json["loss"] = r.loss.into();
            json["perplexity"] = r.perplexity.into();
            json["tokens"] = r.tokens.into();
            json["sequences"] = r.sequences.into();
            json["data"] = data.display().to_string().into();
            if !a.json {
                println!(
                    "loss {:.6}  perplexity {:.4}  ({} tokens predicted in {} sequences)",
                    r.loss, r.perplexity, r.tokens, r.sequences
                );
            }
        }
        if !tasks.is_empty() {
            let Some(tok) = tok.as_ref() else {
                anyhow::bail!(
                    "{}: no tokenizer.json; --task needs the model's tokenizer to encode the items",
                    dir.display()
                );
            };
            let opts = McOptions {
                target_delimiter: a.target_delimiter.clone(),
                max_length: a.task_max_length,
                batch_size: a.batch_size,
            };
            let mut out = serde_json::Map::new();
            for task in &tasks {
                let n: usize = task.items.iter().map(|i| i.choices.len()).sum();
                let bar = progress::bar(n as u64, &task.name, "requests", a.json);
                let r = evaluate_task(&model, tok, task, &opts, &device, |d, _| {
                    bar.set_position(d as u64)
                })?;
                bar.finish_and_clear();
                if !a.json {
                    println!(
                        "{}: acc {:.4} ± {:.4}  acc_norm {:.4} ± {:.4}  ({} items)",
                        r.task, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr, r.n
                    );
                }
                let mut v = serde_json::to_value(&r)?;
                v["path"] = task.path.display().to_string().into();
                if a.log_samples {
                    v["items"] = serde_json::to_value(&r.items)?;
                }
                out.insert(r.task.clone(), v);
            }
            json["tasks"] = out.into();
        }
        if a.json {
            println!("{json}");
        }
        Ok(())
    }
}
