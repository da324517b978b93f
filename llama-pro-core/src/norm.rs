//! RMSNorm with HuggingFace semantics.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

use crate::ops;

use crate::error::Result;
use crate::weights::{Init, WeightSource};

/// Configuration of an [`RmsNorm`].
#[derive(Debug, Clone, Copy)]
pub struct RmsNormConfig {
    /// Normalised width.
    pub size: usize,
    /// ε added to the mean square.
    pub eps: f64,
}

/// `y = w ⊙ cast(x / sqrt(mean(x²) + ε))`, where the statistic and the normalisation are
/// computed in f32 and the result is cast back to the input dtype before the scale (exactly
/// `LlamaRMSNorm`). The weight is called `weight` as in HF.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale, `[size]`.
    pub weight: Param<Tensor<B, 1>>,
    /// ε.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNormConfig {
    /// A randomly initialised norm on `device` (HF init: normal(0, 0.02) weights, unit norm
    /// scales, zero biases; seed 0). Use [`Self::load`] to read one from a checkpoint.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        crate::weights::random(device, |src| self.load("norm", src))
    }

    /// Build from `src` (`{prefix}.weight`, ones when random).
    pub fn load<B: Backend, S: WeightSource<B>>(
        &self,
        prefix: &str,
        src: &mut S,
    ) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: src.param(&format!("{prefix}.weight"), [self.size], Init::Ones)?,
            eps: self.eps,
        })
    }
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - input: `[..., size]`
    /// - output: same as input
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows = dims[..D - 1].iter().product();
        ops::rms_norm(x.reshape([rows, d]), self.weight.val(), self.eps).reshape(dims)
    }
}
