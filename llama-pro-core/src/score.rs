//! Serving primitives: the log-probability of every token of a sequence (log-likelihood
//! evaluation, OpenAI's `echo` + `logprobs`) and batched decoding of prompts of different
//! lengths ([`BatchDecoder`]: rows join and leave between steps).

use burn::tensor::{FloatDType, Int, Tensor, TensorData, activation, backend::Backend};

use crate::error::{CoreError, Result};
use crate::model::{KvCache, LlamaForCausalLM};

/// What [`score`] finds for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// `log p(token t | tokens < t)` for `t = 1..n` (`n - 1` values; the first token has none).
    pub token_logprobs: Vec<f32>,
    /// The `top_k` most likely tokens at each of those positions, best first (ties: lower id
    /// first), with their log-probabilities (from the same values as `token_logprobs`, so a
    /// token that is the most likely has exactly the first entry's value).
    pub top: Vec<Vec<(u32, f32)>>,
    /// Logits (f32) of the token after the last one: the next-token distribution.
    pub next_logits: Vec<f32>,
}

/// Logits computed at once are bounded to about this many values (positions x vocabulary), so
/// that a long sequence of a large-vocabulary model does not hold all its f32 logits.
const LOGIT_BUDGET: usize = 1 << 25;

/// Score sequences in one batch (right-padded: causal attention makes a row's real positions
/// independent of the padding after them): the log-probability of each token given those
/// before it, the `top_k` alternatives at each position, and the next-token logits. Computed
/// in f32 from the final hidden states, a slice of positions at a time.
pub fn score<B: Backend>(
    model: &LlamaForCausalLM<B>,
    seqs: &[Vec<u32>],
    top_k: usize,
    device: &B::Device,
) -> Result<Vec<Scored>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.config.vocab_size;
    for (i, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            return Err(CoreError::Invalid(format!(
                "sequence {i} is empty: give at least one token"
            )));
        }
        if let Some(bad) = s.iter().find(|&&t| t as usize >= vocab) {
            return Err(CoreError::Invalid(format!(
                "sequence {i}: token id {bad} is out of range for vocab_size {vocab}"
            )));
        }
    }
    let top_k = top_k.min(vocab);
    let b = seqs.len();
    let len = seqs.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = vec![0i64; b * len];
    for (r, s) in seqs.iter().enumerate() {
        for (c, &t) in s.iter().enumerate() {
            ids[r * len + c] = t as i64;
        }
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, len]), device);
    let hidden = model.forward_final_hidden(ids.clone());
    let mut out: Vec<Scored> = seqs
        .iter()
        .map(|s| Scored {
            token_logprobs: Vec::with_capacity(s.len() - 1),
            top: Vec::with_capacity(s.len() - 1),
            next_logits: Vec::new(),
        })
        .collect();
    // Positions 0..len-1 predict tokens 1..len.
    let chunk = (LOGIT_BUDGET / (b * vocab)).max(1);
    let mut p = 0;
    while p + 1 < len {
        let c = chunk.min(len - 1 - p);
        let logits = model
            .head(hidden.clone().narrow(1, p, c))
            .cast(FloatDType::F32);
        let lp = activation::log_softmax(logits, 2);
        let targets = ids.clone().narrow(1, p + 1, c).unsqueeze_dim::<3>(2);
        let chosen = to_f32(lp.clone().gather(2, targets))?;
        let top = if top_k == 0 {
            None
        } else if top_k == 1 {
            let (v, i) = lp.max_dim_with_indices(2);
            Some((to_f32(v)?, to_i64(i)?))
        } else {
            let (v, i) = lp.topk_with_indices(top_k, 2);
            Some((to_f32(v)?, to_i64(i)?))
        };
        for (r, s) in seqs.iter().enumerate() {
            for q in 0..c {
                let t = p + q + 1;
                if t >= s.len() {
                    break;
                }
                let v = chosen[r * c + q];
                if !v.is_finite() {
                    return Err(not_finite(t));
                }
                out[r].token_logprobs.push(v);
                if let Some((vals, idx)) = &top {
                    let at = (r * c + q) * top_k;
                    out[r].top.push(
                        (0..top_k)
                            .map(|k| (idx[at + k] as u32, vals[at + k]))
                            .collect(),
                    );
                } else {
                    out[r].top.push(Vec::new());
                }
            }
        }
        p += c;
    }
    // The next-token logits at each row's last position.
    for (r, s) in seqs.iter().enumerate() {
        let h = hidden.clone().narrow(0, r, 1).narrow(1, s.len() - 1, 1);
        let row = to_f32(model.head(h).cast(FloatDType::F32))?;
        if row.iter().any(|v| !v.is_finite()) {
            return Err(not_finite(s.len()));
        }
        out[r].next_logits = row;
    }
    Ok(out)
}

fn not_finite(position: usize) -> CoreError {
    CoreError::Invalid(format!(
        "the model's logits are not finite at position {position}: its weights or activations \
         overflowed; check the weights (eval --check-finite) or compute in f32"
    ))
}

fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| CoreError::Invalid(format!("reading logits: {e:?}")))
}

fn to_i64<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Result<Vec<i64>> {
    t.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| CoreError::Invalid(format!("reading token ids: {e:?}")))
}

/// `log_softmax` of one row of logits on the host (f64 sums): the log-probability of the
/// sampled token and of the `k` most likely ones (best first, ties by lower id).
pub fn row_logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
        });
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        top = idx.into_iter().map(|i| (i as u32, lp(i))).collect();
    }
    (lp(token as usize), top)
}

/// Batched decoding of prompts of different lengths with one KV cache: rows are left-padded
/// to a common length (padding masked), every step feeds one token per row, rows leave when
/// done and new ones join between steps. A row's tokens keep their relative positions, so
/// (RoPE being relative) it computes what it would alone, up to floating-point rounding.
pub struct BatchDecoder<'m, B: Backend> {
    model: &'m LlamaForCausalLM<B>,
    device: B::Device,
    cache: KvCache<B>,
}

impl<'m, B: Backend> BatchDecoder<'m, B> {
    /// An empty batch.
    pub fn new(model: &'m LlamaForCausalLM<B>, device: &B::Device) -> Self {
        Self {
            model,
            device: device.clone(),
            cache: KvCache::new(model.config.num_hidden_layers),
        }
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.cache.rows()
    }

    /// The position of the next token (0 when empty).
    pub fn position(&self) -> usize {
        if self.rows() == 0 { 0 } else { self.cache.len }
    }

    /// Whether a prompt of `len` tokens can join now: always into an empty batch; else when it
    /// is no longer than the batch's position (it is then placed so that it ends there), or
    /// when the batch can move forward to make room (see [`Self::join`]).
    pub fn can_join(&self, len: usize) -> bool {
        self.rows() == 0 || len <= self.cache.len || self.model.model.rope.attention_scaling == 1.0
    }

    /// Move every row `delta` positions forward: cached keys are rotated by `delta` (RoPE
    /// rotations compose, so a key at position p becomes the key at p + delta) and `delta`
    /// padding positions are put before them. Relative positions, hence attention, stay the
    /// same up to rounding.
    fn advance_positions(&mut self, delta: usize) {
        let dtype = self.model.dtype();
        let (cos, sin) = self
            .model
            .model
            .rope
            .tables::<B>(delta, 1, dtype, &self.device);
        for c in self.cache.layers.iter_mut().flatten() {
            let k = crate::ops::apply_rope(c.k.clone(), cos.clone(), sin.clone());
            let [b, h, _, d] = k.dims();
            let z = Tensor::<B, 4>::zeros([b, h, delta, d], &self.device).cast(k.dtype());
            c.k = Tensor::cat(vec![z.clone(), k], 2);
            c.v = Tensor::cat(vec![z, c.v.clone()], 2);
        }
        let rows = self.rows();
        if self.cache.left_pad.is_empty() {
            self.cache.left_pad = vec![0; rows];
        }
        self.cache.left_pad.iter_mut().for_each(|p| *p += delta);
        self.cache.len += delta;
    }

    /// Prefill `prompts` (each must [`Self::can_join`]) as new rows at the end of the batch;
    /// returns their next-token logits (f32), one row each.
    pub fn join(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = self.model.config.vocab_size;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.iter().any(Vec::is_empty) {
            return Err(CoreError::Invalid(
                "a prompt is empty: give at least one token".into(),
            ));
        }
        if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(CoreError::Invalid(format!(
                "prompt token id {bad} is out of range for vocab_size {vocab}"
            )));
        }
        if !self.can_join(longest) {
            return Err(CoreError::Invalid(format!(
                "a prompt of {longest} tokens cannot join a batch at position {}",
                self.cache.len
            )));
        }
        if self.rows() > 0 && longest > self.cache.len {
            self.advance_positions(longest - self.cache.len);
        }
        let start = if self.rows() == 0 {
            0
        } else {
            self.cache.len - longest
        };
        let n = prompts.len();
        let mut ids = vec![0i64; n * longest];
        let mut pads = Vec::with_capacity(n);
        for (r, p) in prompts.iter().enumerate() {
            let pad = longest - p.len();
            for (c, &t) in p.iter().enumerate() {
                ids[r * longest + pad + c] = t as i64;
            }
            pads.push(pad);
        }
        let mut fresh = KvCache::new(self.model.config.num_hidden_layers);
        fresh.len = start;
        fresh.left_pad = pads;
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, longest]), &self.device);
        let logits = self.model.forward_cached_last(ids, &mut fresh);
        let rows = self.read(logits, n)?;
        if self.rows() == 0 {
            self.cache = fresh;
        } else {
            self.cache.append_rows(fresh);
        }
        Ok(rows)
    }

    /// Feed one token per row (in row order); returns each row's next-token logits.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let n = self.rows();
        if tokens.len() != n {
            return Err(CoreError::Invalid(format!(
                "{} tokens for a batch of {n} rows",
                tokens.len()
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, 1]), &self.device);
        let logits = crate::ops::decoding(|| self.model.forward_cached_last(ids, &mut self.cache));
        self.read(logits, n)
    }

    /// Keep only the rows `keep`, in that order (the others leave the batch).
    pub fn keep(&mut self, keep: &[usize]) {
        if keep.is_empty() {
            self.cache = KvCache::new(self.model.config.num_hidden_layers);
        } else if keep.len() != self.rows() || keep.iter().enumerate().any(|(i, &k)| i != k) {
            self.cache.select_rows(keep);
        }
    }

    fn read(&self, logits: Tensor<B, 2>, n: usize) -> Result<Vec<Vec<f32>>> {
        let v = to_f32(logits.cast(FloatDType::F32))?;
        let vocab = v.len() / n.max(1);
        let rows: Vec<Vec<f32>> = v.chunks(vocab).map(<[f32]>::to_vec).collect();
        if let Some(r) = rows.iter().position(|r| r.iter().any(|x| !x.is_finite())) {
            return Err(CoreError::Invalid(format!(
                "the model's logits are not finite (row {r} of the batch): its weights or \
                 activations overflowed; check the weights (eval --check-finite) or compute in f32"
            )));
        }
        Ok(rows)
    }
}
