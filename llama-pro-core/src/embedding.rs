//! Token embedding (`embed_tokens`), HF layout `[vocab_size, hidden_size]`.

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, backend::Backend, module::embedding};

use crate::error::Result;
use crate::weights::{Init, WeightSource};

/// Lookup table: `out[b, s, :] = weight[ids[b, s], :]`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab_size, hidden_size]`.
    pub weight: Param<Tensor<B, 2>>,
}

/// Configuration of an [`Embedding`].
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingConfig {
    /// Rows.
    pub vocab_size: usize,
    /// Columns.
    pub hidden_size: usize,
}

impl EmbeddingConfig {
    /// A randomly initialised embedding on `device` (HF init: normal(0, 0.02) weights, unit norm
    /// scales, zero biases; seed 0). Use [`Self::load`] to read one from a checkpoint.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Embedding<B> {
        crate::weights::random(device, |src| self.load("embed_tokens", src, 0.02))
    }

    /// Build from `src` (`{prefix}.weight`).
    pub fn load<B: Backend, S: WeightSource<B>>(
        &self,
        prefix: &str,
        src: &mut S,
        std: f64,
    ) -> Result<Embedding<B>> {
        Ok(Embedding {
            weight: src.param(
                &format!("{prefix}.weight"),
                [self.vocab_size, self.hidden_size],
                Init::Normal(std),
            )?,
        })
    }
}

impl<B: Backend> Embedding<B> {
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden_size]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embedding(self.weight.val(), ids)
    }
}
