//! Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

use burn::tensor::{FloatDType, Int, Tensor, TensorData, backend::Backend};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{CoreError, Result};
use crate::model::{KvCache, LlamaForCausalLM};

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (`None` or 1: all).
    pub top_p: Option<f32>,
    /// RNG seed for sampling.
    pub seed: u64,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Reuse keys/values of earlier positions (fast). `false` recomputes the whole sequence at
    /// every step: slower, the same result (a fallback should a backend's single-position kernels
    /// misbehave, as burn's fused wgpu kernels did; see `device::WgpuBackend`).
    pub use_kv_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            eos_token_ids: vec![],
            use_kv_cache: true,
        }
    }
}

impl GenerationConfig {
    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(CoreError::setting(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(CoreError::setting(
                    "top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        if self.top_k == Some(0) {
            return Err(CoreError::setting("top_k", "must be at least 1"));
        }
        Ok(())
    }
}

/// Picks the next token from a row of logits.
pub struct Sampler {
    cfg: GenerationConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded from `cfg.seed`.
    pub fn new(cfg: GenerationConfig) -> Result<Self> {
        cfg.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Ok(Self { cfg, rng })
    }

    /// The next token given the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.cfg.temperature;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        // Sort by logit, descending (ties by index so results are deterministic).
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.cfg.top_k {
            idx.truncate(k.min(idx.len()));
        }
        let max = logits[idx[0]] / t;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] / t - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.cfg.top_p {
            // Keep tokens until the cumulative probability reaches top_p (at least one).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            idx.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u: f64 = self.rng.random();
        let mut cum = 0.0;
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if u < cum {
                return idx[n] as u32;
            }
        }
        idx[idx.len() - 1] as u32
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate a continuation of `prompt`. `on_token` sees each new token as it is produced
/// (for streaming). Returns the new tokens (the EOS that stopped generation included).
pub fn generate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    cfg: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    generate_until(model, prompt, cfg, device, |t| {
        on_token(t);
        true
    })
}

/// [`generate`] that stops when `on_token` returns `false` (e.g. when the decoded text reaches
/// a stop string that is not a single token, such as a chat template's `<|im_end|>` for a
/// tokenizer that does not know it).
pub fn generate_until<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    cfg: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(CoreError::Invalid(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(CoreError::Invalid(format!(
            "prompt token id {bad} is out of range for vocab_size {vocab}"
        )));
    }
    let mut sampler = Sampler::new(cfg.clone())?;
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut out = Vec::new();
    let mut input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut all = input.clone();
    for step in 0..cfg.max_new_tokens {
        let n = input.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [1, n]), device);
        let logits = if cfg.use_kv_cache && step > 0 {
            // One new token: a decoding step (see `ops::decoding`).
            crate::ops::decoding(|| model.forward_cached(ids, &mut cache))
        } else if cfg.use_kv_cache {
            model.forward_cached(ids, &mut cache)
        } else {
            model.forward(ids)
        };
        let last = logits
            .narrow(1, n - 1, 1)
            .cast(FloatDType::F32)
            .reshape([vocab]);
        let row: Vec<f32> = last
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| CoreError::Invalid(format!("reading logits: {e:?}")))?;
        let bad = row.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(CoreError::Invalid(format!(
                "the model's logits are not finite ({bad} of {vocab} NaN or infinite at new token {}): \
                 its weights or activations overflowed; check the weights (eval --check-finite) or compute in f32",
                step + 1
            )));
        }
        let next = sampler.sample(&row);
        out.push(next);
        let go_on = on_token(next);
        if !go_on || cfg.eos_token_ids.contains(&next) {
            break;
        }
        all.push(next as i64);
        input = if cfg.use_kv_cache {
            vec![next as i64]
        } else {
            all.clone()
        };
    }
    Ok(out)
}
