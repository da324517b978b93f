//! Rotary position embedding in the rotate-half (GPT-NeoX / HF LLaMA) form.
//!
//! burn-nn's `RotaryEncoding` rotates interleaved pairs `(x0, x1), (x2, x3)…`; HF LLaMA rotates
//! the two halves `(x_i, x_{i+d/2})`. Using HF's form keeps q/k weights byte-identical to the
//! checkpoint (no permutation on import/export).
//!
//! `inv_freq_i = 1 / θ^(2i/d)` (scaled for `linear` / `llama3`), `φ(p, i) = p · inv_freq_i`,
//! `cos = cos([φ, φ])`, `sin = sin([φ, φ])`, and `rope(x) = x ⊙ cos + rotate_half(x) ⊙ sin` with
//! `rotate_half([x1, x2]) = [-x2, x1]`. Tables are computed in f32 as transformers does, then cast
//! to the activation dtype.

use burn::tensor::{Tensor, backend::Backend};

use crate::config::{DType, LlamaConfig, RopeScaling};
use crate::weights::tensor_from_f32;

/// The frequencies of a model's RoPE (no parameters).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[head_dim / 2]` inverse frequencies (f32, as HF computes them).
    pub inv_freq: Vec<f32>,
    /// Multiplier on cos/sin (1 for the implemented rope types).
    pub attention_scaling: f32,
}

impl RotaryEmbedding {
    /// The RoPE of `config` (`rope_theta`, `rope_scaling`, `head_dim`).
    pub fn new(config: &LlamaConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
            .collect();
        match config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f /= factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // transformers `_compute_llama3_parameters`, in f32.
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old_len = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                    *f = if medium {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self {
            inv_freq,
            attention_scaling: 1.0,
        }
    }

    /// cos and sin tables for positions `start..start+len`.
    ///
    /// # Shapes
    /// - output: two tensors `[len, head_dim]`
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for p in start..start + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|x| x.cos() * self.attention_scaling));
                sin.extend(row.iter().map(|x| x.sin() * self.attention_scaling));
            }
        }
        (
            tensor_from_f32(cos, [len, dim], dtype, device),
            tensor_from_f32(sin, [len, dim], dtype, device),
        )
    }
}
