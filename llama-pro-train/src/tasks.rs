//! Multiple-choice evaluation by log-likelihood, as EleutherAI's lm-evaluation-harness scores
//! its `multiple_choice` tasks (ARC, HellaSwag, MMLU, WinoGrande…), so that forgetting can be
//! measured on benchmark items without Python.
//!
//! Each item is a context and its choices; choice `i` is scored by the summed log-probability
//! of the continuation `target_delimiter + choice` given the context. As lm-eval does it:
//! - trailing whitespace of the context moves to the front of the continuation;
//! - the context and `context + continuation` are tokenized without special tokens (lm-eval's
//!   default for API and HF models of this family), and the continuation's tokens are those of
//!   the whole after the context's (so a merge across the boundary is taken as the whole has it);
//! - an empty context is the prefix token (BOS, else EOS);
//! - a request longer than `max_length` keeps its last `max_length` tokens;
//! - `acc`: the choice with the largest log-likelihood is the gold one (first on ties);
//!   `acc_norm`: the same with each log-likelihood divided by the choice's length in
//!   characters; standard errors are the sample standard deviation over `sqrt(n)`.
//!
//! The file format, one item per line: `{"context": "...", "choices": ["...", ...], "gold": k}`
//! (`query` is accepted for `context`, `label`/`answer` for `gold`).

use std::path::{Path, PathBuf};

use llama_pro_core::burn::tensor::backend::Backend;
use llama_pro_core::score::score;
use llama_pro_core::{LlamaForCausalLM, Tokenizer};

use crate::error::{Result, TrainError};

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct McItem {
    /// The text before the answer.
    pub context: String,
    /// The possible answers.
    pub choices: Vec<String>,
    /// Index of the right answer in `choices`.
    pub gold: usize,
}

/// A task: items from a `.jsonl` file, named after it.
#[derive(Debug, Clone, PartialEq)]
pub struct McTask {
    /// The file's stem (`arc_easy.jsonl` → `arc_easy`).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its items, in order.
    pub items: Vec<McItem>,
}

impl McTask {
    /// Read a task file; every malformed line is an error naming the file and line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let bad = |line: usize, message: String| TrainError::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut items = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad(line_no, format!("not a JSON object: {e}")))?;
            let obj = v.as_object().ok_or_else(|| {
                bad(
                    line_no,
                    "expected a JSON object {\"context\", \"choices\", \"gold\"}".into(),
                )
            })?;
            let context = ["context", "query"]
                .iter()
                .find_map(|k| obj.get(*k))
                .ok_or_else(|| {
                    bad(
                        line_no,
                        "no \"context\" (the text before the answer)".into(),
                    )
                })?
                .as_str()
                .ok_or_else(|| bad(line_no, "\"context\" must be a string".into()))?
                .to_string();
            let choices: Vec<String> = obj
                .get("choices")
                .and_then(|c| c.as_array())
                .ok_or_else(|| bad(line_no, "no \"choices\" list of strings".into()))?
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(line_no, "\"choices\" must be a list of strings".into()))?;
            if choices.len() < 2 {
                return Err(bad(
                    line_no,
                    format!(
                        "{} choice(s): a multiple-choice item needs at least 2",
                        choices.len()
                    ),
                ));
            }
            let gold = ["gold", "label", "answer"]
                .iter()
                .find_map(|k| obj.get(*k))
                .ok_or_else(|| {
                    bad(
                        line_no,
                        "no \"gold\" (the index of the right choice)".into(),
                    )
                })?;
            let gold = gold.as_u64().map(|g| g as usize).ok_or_else(|| {
                bad(
                    line_no,
                    format!("\"gold\" must be a choice index, got {gold}"),
                )
            })?;
            if gold >= choices.len() {
                return Err(bad(
                    line_no,
                    format!(
                        "\"gold\" is {gold}, but there are {} choices (0-based)",
                        choices.len()
                    ),
                ));
            }
            items.push(McItem {
                context,
                choices,
                gold,
            });
        }
        if items.is_empty() {
            return Err(bad(0, "no items: expected one JSON object per line".into()));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "task".into());
        Ok(Self {
            name,
            path: path.to_path_buf(),
            items,
        })
    }
}

/// How requests are built (lm-eval's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct McOptions {
    /// Between the context and a choice (lm-eval: `target_delimiter`, `" "`).
    pub target_delimiter: String,
    /// Requests keep their last `max_length` tokens (lm-eval's `local-completions` keeps
    /// 2047: its `max_length`, 2048, less the generated token).
    pub max_length: usize,
    /// Requests scored per forward pass.
    pub batch_size: usize,
}

impl Default for McOptions {
    fn default() -> Self {
        Self {
            target_delimiter: " ".into(),
            max_length: 2047,
            batch_size: 8,
        }
    }
}

/// The scores of one item.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct McScores {
    /// Summed log-likelihood of each choice's continuation.
    pub lls: Vec<f64>,
    /// The right choice.
    pub gold: usize,
}

/// A task's accuracy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct McResult {
    /// The task's name.
    pub task: String,
    /// Items scored.
    pub n: usize,
    /// Fraction of items whose most likely choice is the gold one.
    pub acc: f64,
    /// Standard error of `acc`.
    pub acc_stderr: f64,
    /// `acc` with log-likelihoods divided by the choices' lengths in characters.
    pub acc_norm: f64,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: f64,
    /// Every item's log-likelihoods (for comparisons; not serialized in reports).
    #[serde(skip)]
    pub items: Vec<McScores>,
}

/// One scoring request: the tokens given to the model and how many of them are context.
#[derive(Debug, Clone, PartialEq)]
pub struct LoglikelihoodRequest {
    /// Context then continuation tokens (the last `max_length` of them).
    pub tokens: Vec<u32>,
    /// Leading tokens that are context (the rest is scored).
    pub context_len: usize,
}

/// The requests of `item`, one per choice, as lm-eval builds them.
pub fn requests(
    tok: &Tokenizer,
    item: &McItem,
    opts: &McOptions,
) -> Result<Vec<LoglikelihoodRequest>> {
    item.choices
        .iter()
        .map(|choice| {
            let continuation = format!("{}{}", opts.target_delimiter, choice);
            request(tok, &item.context, &continuation, opts.max_length)
        })
        .collect()
}

/// lm-eval's `_encode_pair` and truncation for one (context, continuation) pair.
pub fn request(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    max_length: usize,
) -> Result<LoglikelihoodRequest> {
    let (ctx_ids, cont_ids) = if context.is_empty() {
        let prefix = tok
            .bos_token_id
            .or(tok.eos_token_ids.first().copied())
            .ok_or_else(|| {
                TrainError::Invalid(
                    "an item has an empty context and the tokenizer has neither a BOS nor an EOS \
                     token to start it with"
                        .into(),
                )
            })?;
        (vec![prefix], tok.encode(continuation, false)?)
    } else {
        let trimmed = context.trim_end();
        let moved = &context[trimmed.len()..];
        let continuation = format!("{moved}{continuation}");
        let whole = tok.encode(&format!("{trimmed}{continuation}"), false)?;
        let ctx = tok.encode(trimmed, false)?;
        let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
        (ctx, cont)
    };
    if cont_ids.is_empty() {
        return Err(TrainError::Invalid(format!(
            "the continuation {continuation:?} has no token of its own after the context"
        )));
    }
    let mut tokens = ctx_ids.clone();
    tokens.extend(&cont_ids);
    let cut = tokens.len().saturating_sub(max_length.max(1));
    let context_len = ctx_ids.len().saturating_sub(cut);
    Ok(LoglikelihoodRequest {
        tokens: tokens[cut..].to_vec(),
        context_len,
    })
}

/// Summed log-likelihood of each request's continuation, batched `batch_size` at a time
/// (longest first). `on_done` sees the number of requests done.
pub fn loglikelihoods<B: Backend>(
    model: &LlamaForCausalLM<B>,
    reqs: &[LoglikelihoodRequest],
    batch_size: usize,
    device: &B::Device,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(reqs[i].tokens.len()));
    let mut out = vec![0f64; reqs.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| reqs[i].tokens.clone()).collect();
        let scored = score(model, &seqs, 0, device)?;
        for (&i, s) in chunk.iter().zip(scored) {
            // token_logprobs[t - 1] is the log-probability of token t.
            let from = reqs[i].context_len.max(1) - 1;
            out[i] = s.token_logprobs[from..].iter().map(|&v| v as f64).sum();
        }
        done += chunk.len();
        on_done(done);
    }
    Ok(out)
}

/// Score every item of `task` and compute `acc` and `acc_norm`. `on_done` sees
/// `(requests done, requests)`.
pub fn evaluate_task<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tok: &Tokenizer,
    task: &McTask,
    opts: &McOptions,
    device: &B::Device,
    mut on_done: impl FnMut(usize, usize),
) -> Result<McResult> {
    let mut reqs = Vec::new();
    for (i, item) in task.items.iter().enumerate() {
        reqs.extend(requests(tok, item, opts).map_err(|e| TrainError::Data {
            path: task.path.clone(),
            line: i + 1,
            message: e.to_string(),
        })?);
    }
    let total = reqs.len();
    let lls = loglikelihoods(model, &reqs, opts.batch_size, device, |d| on_done(d, total))?;
    let mut at = 0;
    let items: Vec<McScores> = task
        .items
        .iter()
        .map(|item| {
            let n = item.choices.len();
            let s = McScores {
                lls: lls[at..at + n].to_vec(),
                gold: item.gold,
            };
            at += n;
            s
        })
        .collect();
    Ok(summarize(&task.name, &task.items, items))
}

/// `acc` and `acc_norm` of scored items.
pub fn summarize(name: &str, items: &[McItem], scores: Vec<McScores>) -> McResult {
    let argmax = |v: &[f64]| {
        let mut best = 0;
        for (i, x) in v.iter().enumerate() {
            if *x > v[best] {
                best = i;
            }
        }
        best
    };
    let mut acc = Vec::new();
    let mut acc_norm = Vec::new();
    for (item, s) in items.iter().zip(&scores) {
        acc.push(f64::from(u8::from(argmax(&s.lls) == s.gold)));
        let norm: Vec<f64> = s
            .lls
            .iter()
            .zip(&item.choices)
            .map(|(ll, c)| ll / c.chars().count() as f64)
            .collect();
        acc_norm.push(f64::from(u8::from(argmax(&norm) == s.gold)));
    }
    let (a, a_se) = mean_stderr(&acc);
    let (an, an_se) = mean_stderr(&acc_norm);
    McResult {
        task: name.to_string(),
        n: scores.len(),
        acc: a,
        acc_stderr: a_se,
        acc_norm: an,
        acc_norm_stderr: an_se,
        items: scores,
    }
}

/// Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval's
/// `mean_stderr`).
fn mean_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}
