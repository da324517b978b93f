//! Linear layer in HuggingFace layout.
//!
//! burn-nn's `Linear` stores its weight as `[d_in, d_out]`; HF stores `[out, in]`. We keep HF's
//! layout so that a checkpoint tensor *is* the parameter (no transpose on load or save, bitwise
//! round trips, and the expansion transform can copy tensors verbatim). The matmul takes the
//! transposed view, which burn's backends handle as a stride change, not a copy.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend, module::linear};

use crate::error::Result;
use crate::weights::{Init, WeightSource};

/// Configuration of a [`Linear`] layer.
#[derive(Debug, Clone, Copy)]
pub struct LinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
}

/// `y = x Wᵀ + b`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// Weight, `[d_output, d_input]` (HF layout).
    pub weight: Param<Tensor<B, 2>>,
    /// Optional bias, `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl LinearConfig {
    /// A linear layer `d_input → d_output`.
    pub fn new(d_input: usize, d_output: usize, bias: bool) -> Self {
        Self {
            d_input,
            d_output,
            bias,
        }
    }

    /// A randomly initialised layer on `device` (HF init: normal(0, 0.02) weights, unit norm
    /// scales, zero biases; seed 0). Use [`Self::load`] to read one from a checkpoint.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Linear<B> {
        crate::weights::random(device, |src| self.load("linear", src, 0.02))
    }

    /// Build the layer from `src`, reading `{prefix}.weight` and `{prefix}.bias`.
    pub fn load<B: Backend, S: WeightSource<B>>(
        &self,
        prefix: &str,
        src: &mut S,
        std: f64,
    ) -> Result<Linear<B>> {
        let weight = src.param(
            &format!("{prefix}.weight"),
            [self.d_output, self.d_input],
            Init::Normal(std),
        )?;
        let bias = if self.bias {
            Some(src.param(&format!("{prefix}.bias"), [self.d_output], Init::Zeros)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

impl<B: Backend> Linear<B> {
    /// Apply the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        linear(
            input,
            self.weight.val().transpose(),
            self.bias.as_ref().map(|b| b.val()),
        )
    }
}
