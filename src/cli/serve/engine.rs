//! The engine: one thread that owns the model and runs every request, batched.
//!
//! Requests arrive as [`Job`]s (one per prompt and choice). Each loop turn:
//! 1. jobs that need their prompt's log-probabilities (`echo` + `logprobs`: lm-eval's
//!    log-likelihood requests) are scored together in right-padded batches
//!    ([`score`]); one that asks for at most one new token is answered from the same pass;
//! 2. other jobs join the decoding batch ([`BatchDecoder`]: left-padded, masked) while there is
//!    room, the oldest first (a prompt longer than the batch's position waits until the batch
//!    drains, and nothing overtakes it);
//! 3. every row of the batch decodes one token.
//!
//! A row leaves the batch at a stop token, a stop string, its token limit, or when its client
//! is gone (the HTTP side dropped its receiver): a disconnect cancels the generation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::generate::{GenerationConfig, Sampler};
use llama_pro::core::score::{BatchDecoder, row_logprobs, score};
use llama_pro::core::{LlamaForCausalLM, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::cli::chat::pending_stop;

/// One prompt to continue.
pub struct Job {
    /// Prompt tokens (non-empty; with the completion, within the context: checked by the caller).
    pub prompt: Vec<u32>,
    /// New tokens at most (0: only the prompt's log-probabilities).
    pub max_tokens: usize,
    /// Temperature (0: greedy), top-p, seed.
    pub temperature: f32,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Sampling seed.
    pub seed: u64,
    /// Tokens that end the answer (not part of its text).
    pub stop_ids: Vec<u32>,
    /// Strings that end the answer (cut off from its text).
    pub stop: Vec<String>,
    /// Log-probabilities of the generated tokens with this many alternatives.
    pub logprobs: Option<usize>,
    /// Also the prompt's log-probabilities (with `logprobs` alternatives).
    pub prompt_logprobs: bool,
    /// Where the results go.
    pub tx: UnboundedSender<Event>,
}

/// What the engine reports of a job, in order: `Prompt` (if asked), `Token`s, then `Done` or
/// `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's log-probabilities: token `t` given those before, `t = 1..n`.
    Prompt {
        /// One per prompt token after the first.
        logprobs: Vec<f32>,
        /// Alternatives at each of those positions.
        top: Vec<Vec<(u32, f32)>>,
    },
    /// A new token.
    Token {
        /// Its id.
        id: u32,
        /// Text that is now final (may be empty: a partial character or a possible stop
        /// string waits).
        text: String,
        /// Its log-probability and alternatives, if asked.
        logprob: Option<(f32, Vec<(u32, f32)>)>,
    },
    /// The end.
    Done {
        /// "stop" (stop token or string) or "length".
        finish_reason: &'static str,
        /// Tokens generated (a stop token included).
        completion_tokens: usize,
        /// Text not sent yet (what was held back).
        text: String,
    },
    /// The model failed on this job.
    Failed(String),
}

/// Counters the HTTP side reports at `/health`.
#[derive(Default)]
pub struct Stats {
    /// Jobs waiting to start.
    pub waiting: AtomicUsize,
    /// Rows decoding.
    pub active: AtomicUsize,
    /// Jobs finished.
    pub done: AtomicUsize,
    /// Jobs whose client went away before the end (generation stopped there).
    pub cancelled: AtomicUsize,
}

/// Batch limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rows decoding at once.
    pub max_batch: usize,
    /// Tokens of one prefill or scoring pass (prompts longer than this run alone).
    pub max_batch_tokens: usize,
    /// The model's context (positions).
    pub context: usize,
}

struct Row {
    job: Job,
    sampler: Sampler,
    /// Generated tokens (a stop token excluded).
    ids: Vec<u32>,
    /// Tokens generated (a stop token included).
    count: usize,
    /// Bytes of text already sent.
    sent: usize,
    /// The token to feed at the next step.
    next: u32,
}

impl Row {
    fn new(job: Job) -> Result<Self, String> {
        let cfg = GenerationConfig {
            max_new_tokens: job.max_tokens,
            temperature: job.temperature,
            top_k: None,
            top_p: job.top_p,
            seed: job.seed,
            eos_token_ids: job.stop_ids.clone(),
            use_kv_cache: true,
        };
        let sampler = Sampler::new(cfg).map_err(|e| e.to_string())?;
        Ok(Self {
            job,
            sampler,
            ids: Vec::new(),
            count: 0,
            sent: 0,
            next: 0,
        })
    }

    /// Pick the next token from `logits` and send it; `Some(reason)` when the row is done.
    fn advance(&mut self, logits: &[f32], tok: &Tokenizer) -> Option<&'static str> {
        if self.job.tx.is_closed() {
            return Some("cancelled");
        }
        let id = self.sampler.sample(logits);
        self.count += 1;
        let logprob = self.job.logprobs.map(|k| row_logprobs(logits, id, k));
        if self.job.stop_ids.contains(&id) {
            let _ = self.job.tx.send(Event::Token {
                id,
                text: String::new(),
                logprob,
            });
            return Some("stop");
        }
        self.ids.push(id);
        self.next = id;
        let text = tok.decode(&self.ids).unwrap_or_default();
        let stops: Vec<&str> = self.job.stop.iter().map(String::as_str).collect();
        let found = stops.iter().filter_map(|s| text.find(s)).min();
        let safe = found.unwrap_or_else(|| text.len() - pending_stop(&text, &stops));
        let mut delta = String::new();
        if safe > self.sent
            && text.is_char_boundary(self.sent)
            && text.is_char_boundary(safe)
            && !text[..safe].ends_with('\u{FFFD}')
        {
            delta = text[self.sent..safe].to_string();
            self.sent = safe;
        }
        let _ = self.job.tx.send(Event::Token {
            id,
            text: delta,
            logprob,
        });
        if found.is_some() {
            return Some("stop");
        }
        if self.count >= self.job.max_tokens {
            return Some("length");
        }
        None
    }

    /// Send the end of the row: what text was held back, the reason.
    fn finish(self, reason: &'static str, tok: &Tokenizer, stats: &Stats) {
        stats.done.fetch_add(1, Ordering::Relaxed);
        if reason == "cancelled" {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut text = tok.decode(&self.ids).unwrap_or_default();
        if let Some(e) = self
            .job
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(e);
        }
        let rest = if text.len() > self.sent && text.is_char_boundary(self.sent) {
            text[self.sent..].to_string()
        } else {
            String::new()
        };
        let _ = self.job.tx.send(Event::Done {
            finish_reason: reason,
            completion_tokens: self.count,
            text: rest,
        });
    }
}

fn fail(job: &Job, message: &str, stats: &Stats) {
    stats.done.fetch_add(1, Ordering::Relaxed);
    let _ = job.tx.send(Event::Failed(message.to_string()));
}

/// Sample one token for each row of `rows[from..]` (new rows) or all rows, from `logits`;
/// remove the rows that are done (from `rows` and the decoder).
fn advance_rows(
    rows: &mut Vec<Row>,
    from: usize,
    logits: &[Vec<f32>],
    decoder: Option<&mut BatchDecoder<'_, impl Backend>>,
    tok: &Tokenizer,
    stats: &Stats,
) {
    let mut done: Vec<(usize, &'static str)> = Vec::new();
    for (i, l) in (from..rows.len()).zip(logits) {
        if let Some(reason) = rows[i].advance(l, tok) {
            done.push((i, reason));
        }
    }
    if done.is_empty() {
        return;
    }
    if let Some(decoder) = decoder {
        let keep: Vec<usize> = (0..rows.len())
            .filter(|i| !done.iter().any(|(d, _)| d == i))
            .collect();
        decoder.keep(&keep);
    }
    for (i, reason) in done.into_iter().rev() {
        let row = rows.remove(i);
        row.finish(reason, tok, stats);
    }
}

/// Run jobs from `rx` until every sender is gone and no work is left.
pub fn run<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tok: &Tokenizer,
    device: &B::Device,
    rx: Receiver<Job>,
    limits: Limits,
    stats: Arc<Stats>,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    // Row i is row i of the decoder.
    let mut rows: Vec<Row> = Vec::new();
    let mut decoder = BatchDecoder::new(model, device);
    let mut open = true;
    // Diagnostics: step times on stderr; a pause per step (tests of cancellation and
    // shutdown need a generation that lasts on a tiny model).
    let trace = std::env::var_os("LLAMA_PRO_SERVE_TRACE").is_some();
    let pause = std::env::var("LLAMA_PRO_SERVE_STEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    loop {
        // Wait for work when idle; otherwise take what has arrived.
        if rows.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(j) => waiting.push_back(j),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Clients gone before their job started.
        waiting.retain(|j| {
            let gone = j.tx.is_closed();
            if gone {
                stats.done.fetch_add(1, Ordering::Relaxed);
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });

        // 1. Prompt scoring (echo + logprobs, or no new token).
        let mut batch: Vec<Job> = Vec::new();
        let mut tokens = 0;
        let mut k = 0;
        while k < waiting.len() {
            let j = &waiting[k];
            if j.prompt_logprobs || j.max_tokens == 0 {
                if !batch.is_empty() && tokens + j.prompt.len() > limits.max_batch_tokens {
                    break;
                }
                tokens += j.prompt.len();
                batch.extend(waiting.remove(k));
            } else {
                k += 1;
            }
        }
        if !batch.is_empty() {
            let top = batch.iter().filter_map(|j| j.logprobs).max().unwrap_or(0);
            let seqs: Vec<Vec<u32>> = batch.iter().map(|j| j.prompt.clone()).collect();
            match score(model, &seqs, top, device) {
                Err(e) => batch.iter().for_each(|j| fail(j, &e.to_string(), &stats)),
                Ok(scored) => {
                    let mut single: Vec<Row> = Vec::new();
                    let mut firsts: Vec<Vec<f32>> = Vec::new();
                    for (mut job, s) in batch.into_iter().zip(scored) {
                        if job.prompt_logprobs {
                            let k = job.logprobs.unwrap_or(0);
                            let top = s.top.into_iter().map(|mut t| {
                                t.truncate(k);
                                t
                            });
                            let _ = job.tx.send(Event::Prompt {
                                logprobs: s.token_logprobs,
                                top: top.collect(),
                            });
                        }
                        match job.max_tokens {
                            0 => {
                                stats.done.fetch_add(1, Ordering::Relaxed);
                                let _ = job.tx.send(Event::Done {
                                    finish_reason: "length",
                                    completion_tokens: 0,
                                    text: String::new(),
                                });
                            }
                            // One token: from this pass (lm-eval asks for one after the echo).
                            1 => match Row::new(job) {
                                Ok(row) => {
                                    single.push(row);
                                    firsts.push(s.next_logits);
                                }
                                Err(e) => eprintln!("serve: {e}"),
                            },
                            // More: it decodes in the batch like any other (its prompt
                            // prefilled again there).
                            _ => {
                                job.prompt_logprobs = false;
                                waiting.push_front(job);
                            }
                        }
                    }
                    advance_rows(
                        &mut single,
                        0,
                        &firsts,
                        None::<&mut BatchDecoder<'_, B>>,
                        tok,
                        &stats,
                    );
                    // One token was the limit: every row is done.
                    for row in single {
                        row.finish("length", tok, &stats);
                    }
                }
            }
        }

        // 2. New rows join the batch, oldest first.
        let mut joining: Vec<Job> = Vec::new();
        let mut tokens = 0;
        while let Some(j) = waiting.front() {
            let room = rows.len() + joining.len() < limits.max_batch;
            let fits = decoder.can_join(j.prompt.len());
            let budget = joining.is_empty() || tokens + j.prompt.len() <= limits.max_batch_tokens;
            // Positions grow while rows keep joining: past a bound, let the batch drain so
            // that they restart at 0.
            let young = decoder.rows() == 0 || decoder.position() < 4 * limits.context;
            if !(room && fits && budget && young) {
                break;
            }
            tokens += j.prompt.len();
            joining.extend(waiting.pop_front());
        }
        if !joining.is_empty() {
            let prompts: Vec<Vec<u32>> = joining.iter().map(|j| j.prompt.clone()).collect();
            let mut new_rows = Vec::new();
            for job in joining {
                match Row::new(job) {
                    Ok(r) => new_rows.push(r),
                    Err(e) => eprintln!("serve: {e}"),
                }
            }
            match decoder.join(&prompts) {
                Err(e) => {
                    new_rows
                        .iter()
                        .for_each(|r| fail(&r.job, &e.to_string(), &stats));
                    // The batch may be inconsistent after a failure: end it.
                    rows.drain(..)
                        .for_each(|r| fail(&r.job, &e.to_string(), &stats));
                    decoder.keep(&[]);
                }
                Ok(logits) => {
                    let from = rows.len();
                    rows.extend(new_rows);
                    advance_rows(&mut rows, from, &logits, Some(&mut decoder), tok, &stats);
                }
            }
        }
        stats.waiting.store(waiting.len(), Ordering::Relaxed);

        // 3. One decoding step for every row.
        if !rows.is_empty() {
            let feed: Vec<u32> = rows.iter().map(|r| r.next).collect();
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
            let t0 = std::time::Instant::now();
            let stepped = decoder.step(&feed);
            if trace {
                eprintln!(
                    "step rows {} pos {} waiting {} {:.1} ms",
                    feed.len(),
                    decoder.position(),
                    waiting.len(),
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
            match stepped {
                Err(e) => {
                    rows.drain(..)
                        .for_each(|r| fail(&r.job, &e.to_string(), &stats));
                    decoder.keep(&[]);
                }
                Ok(logits) => advance_rows(&mut rows, 0, &logits, Some(&mut decoder), tok, &stats),
            }
        }
        stats.active.store(rows.len(), Ordering::Relaxed);
    }
}
