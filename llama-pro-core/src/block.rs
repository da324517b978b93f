//! The LLaMA decoder block (pre-norm residual).

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::attention::{Attention, AttentionConfig, LayerCache, Packing};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::mlp::{Mlp, MlpConfig};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::weights::WeightSource;

/// Builds [`DecoderLayer`]s.
#[derive(Debug, Clone)]
pub struct DecoderLayerConfig {
    /// Attention settings.
    pub attention: AttentionConfig,
    /// FFN settings.
    pub mlp: MlpConfig,
    /// RMSNorm settings.
    pub norm: RmsNormConfig,
    /// std of the random normal init.
    pub init_std: f64,
}

impl DecoderLayerConfig {
    /// From a model configuration.
    pub fn from_model(c: &LlamaConfig) -> Self {
        Self {
            attention: AttentionConfig::from_model(c),
            mlp: MlpConfig {
                hidden_size: c.hidden_size,
                intermediate_size: c.intermediate_size,
                bias: c.mlp_bias,
            },
            norm: RmsNormConfig {
                size: c.hidden_size,
                eps: c.rms_norm_eps,
            },
            init_std: 0.02,
        }
    }

    /// A randomly initialised block on `device` (HF init: normal(0, 0.02) weights, unit norm
    /// scales, zero biases; seed 0). Use [`Self::load`] to read one from a checkpoint.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DecoderLayer<B> {
        crate::weights::random(device, |src| self.load("layer", src))
    }

    /// Build block `{prefix}` (e.g. `model.layers.3`) from `src`.
    pub fn load<B: Backend, S: WeightSource<B>>(
        &self,
        prefix: &str,
        src: &mut S,
    ) -> Result<DecoderLayer<B>> {
        Ok(DecoderLayer {
            self_attn: self
                .attention
                .load(&format!("{prefix}.self_attn"), src, self.init_std)?,
            mlp: self
                .mlp
                .load(&format!("{prefix}.mlp"), src, self.init_std)?,
            input_layernorm: self.norm.load(&format!("{prefix}.input_layernorm"), src)?,
            post_attention_layernorm: self
                .norm
                .load(&format!("{prefix}.post_attention_layernorm"), src)?,
        })
    }
}

/// `h = x + attn(norm₁(x))`, `y = h + mlp(norm₂(h))` (paper eq. 1–2).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// SwiGLU FFN.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the FFN.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// # Shapes
    /// - x: `[batch, seq, d]`; cos, sin: `[seq, hd]`
    /// - output: `[batch, seq, d]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        self.residual(x, |a| self.self_attn.forward(a, cos, sin, cache))
    }

    /// [`Self::forward`] continuing a cache of left-padded rows (see
    /// [`Attention::forward_padded`](crate::attention::Attention::forward_padded)).
    pub fn forward_padded(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        cache: &mut Option<LayerCache<B>>,
        left_pad: &[usize],
    ) -> Tensor<B, 3> {
        self.residual(x, |a| {
            self.self_attn.forward_padded(a, cos, sin, cache, left_pad)
        })
    }

    /// [`Self::forward`] over packed documents (see [`Packing`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, d]`; cos, sin: `[≥ longest document, hd]`
    /// - output: `[batch, seq, d]`
    pub fn forward_packed(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        packing: &Packing,
    ) -> Tensor<B, 3> {
        self.residual(x, |a| self.self_attn.forward_packed(a, cos, sin, packing))
    }

    /// `h = x + attn(norm₁(x))`, `y = h + mlp(norm₂(h))` with `attn` given.
    fn residual(
        &self,
        x: Tensor<B, 3>,
        attn: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + attn(self.input_layernorm.forward(x));
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}
