//! SwiGLU feed-forward network.

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::ops;

use crate::error::Result;
use crate::linear::{Linear, LinearConfig};
use crate::weights::WeightSource;

/// Configuration of an [`Mlp`].
#[derive(Debug, Clone, Copy)]
pub struct MlpConfig {
    /// Model width d.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Biases on the three projections.
    pub bias: bool,
}

/// `down_proj(silu(gate_proj(x)) ⊙ up_proj(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[ffn, d]`
    pub gate_proj: Linear<B>,
    /// `[ffn, d]`
    pub up_proj: Linear<B>,
    /// `[d, ffn]` (the paper's W₃; zero in a freshly expanded block)
    pub down_proj: Linear<B>,
}

impl MlpConfig {
    /// A randomly initialised FFN on `device` (HF init: normal(0, 0.02) weights, unit norm
    /// scales, zero biases; seed 0). Use [`Self::load`] to read one from a checkpoint.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        crate::weights::random(device, |src| self.load("mlp", src, 0.02))
    }

    /// Build from `src` (`{prefix}.{gate,up,down}_proj.*`).
    pub fn load<B: Backend, S: WeightSource<B>>(
        &self,
        prefix: &str,
        src: &mut S,
        std: f64,
    ) -> Result<Mlp<B>> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        Ok(Mlp {
            gate_proj: LinearConfig::new(d, f, self.bias).load(
                &format!("{prefix}.gate_proj"),
                src,
                std,
            )?,
            up_proj: LinearConfig::new(d, f, self.bias).load(
                &format!("{prefix}.up_proj"),
                src,
                std,
            )?,
            down_proj: LinearConfig::new(f, d, self.bias).load(
                &format!("{prefix}.down_proj"),
                src,
                std,
            )?,
        })
    }
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - x: `[batch, seq, d]`
    /// - output: `[batch, seq, d]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let x = x.reshape([b * s, d]);
        let gate = self.gate_proj.forward_2d(x.clone());
        let hidden = ops::swiglu(gate, self.up_proj.forward_2d(x));
        let y = self.down_proj.forward_2d(hidden);
        let d_out = y.dims()[1];
        y.reshape([b, s, d_out])
    }
}
