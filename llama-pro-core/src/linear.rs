//! Linear layer in HuggingFace layout.
//!
//! burn-nn's `Linear` stores its weight as `[d_in, d_out]`; HF stores `[out, in]`. We keep HF's
//! layout so that a checkpoint tensor *is* the parameter (no transpose on load or save, bitwise
//! round trips, and the expansion transform can copy tensors verbatim). The matmul takes the
//! transposed view, which burn's backends handle as a stride change, not a copy.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

use crate::ops;

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

/// `y = x Wᵀ + b`, plus `s · (x Aᵀ) Bᵀ` when a LoRA adapter is attached.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// Weight, `[d_output, d_input]` (HF layout).
    pub weight: Param<Tensor<B, 2>>,
    /// Optional bias, `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// LoRA down-projection A, `[rank, d_input]` (PEFT's `lora_A.weight`).
    pub lora_a: Option<Param<Tensor<B, 2>>>,
    /// LoRA up-projection B, `[d_output, rank]` (PEFT's `lora_B.weight`; zero at attach time).
    pub lora_b: Option<Param<Tensor<B, 2>>>,
    /// LoRA scale `alpha / rank`.
    #[module(skip)]
    pub lora_scale: f64,
}

/// Low-rank adapters (Hu et al., 2021) as PEFT's defaults: A ~ U(-1/√d_in, 1/√d_in) (PEFT's
/// kaiming-uniform with a = √5), B = 0, so a freshly attached adapter changes nothing; scale
/// `alpha / rank`. burn 0.21 has no LoRA, hence this.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Scale numerator: the update is `alpha / r · B A`.
    pub alpha: f64,
    /// Linear layers (by HF name: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
    /// that get an adapter.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Every linear layer of a LLaMA block.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

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
        Ok(Linear {
            weight,
            bias,
            lora_a: None,
            lora_b: None,
            lora_scale: 0.0,
        })
    }
}

/// `t` in `dtype` (no-op when it already is): mixed precision casts f32 master weights to the
/// activations' dtype here; the cast's backward casts the gradient back.
fn as_dtype<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    dtype: burn::tensor::DType,
) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(burn::tensor::FloatDType::from(dtype))
    }
}

impl<B: Backend> Linear<B> {
    /// Apply the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let dims = input.dims();
        let d_in = dims[D - 1];
        let rows = dims[..D - 1].iter().product();
        let x = input.reshape([rows, d_in]);
        let y = self.forward_2d(x);
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    /// [`Self::forward`] on rows: `[n, d_input]` → `[n, d_output]`.
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let w = as_dtype(self.weight.val(), dtype);
        let mut y = match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => {
                let low = ops::linear(x.clone(), as_dtype(a.val(), dtype));
                let up = ops::linear(low, as_dtype(b.val(), dtype)).mul_scalar(self.lora_scale);
                ops::linear(x, w) + up
            }
            _ => ops::linear(x, w),
        };
        if let Some(b) = &self.bias {
            y = y + as_dtype(b.val(), dtype).unsqueeze::<2>();
        }
        y
    }
}

impl<B: Backend> Linear<B> {
    /// Attach a LoRA adapter of rank `rank` (A from `seed`, B = 0); the layer's output is unchanged
    /// until B is trained.
    pub fn with_lora(mut self, rank: usize, alpha: f64, seed: u64) -> Self {
        let [d_out, d_in] = self.weight.shape().dims::<2>();
        let device = self.weight.device();
        let dtype = match self.weight.val().dtype() {
            burn::tensor::DType::BF16 => crate::DType::BF16,
            burn::tensor::DType::F16 => crate::DType::F16,
            _ => crate::DType::F32,
        };
        let bound = 1.0 / (d_in as f64).sqrt();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let a: Vec<f32> = (0..rank * d_in)
            .map(|_| rand::Rng::random_range(&mut rng, -bound..bound) as f32)
            .collect();
        let a = crate::weights::tensor_from_f32::<B, 2>(a, [rank, d_in], dtype, &device);
        let b = crate::weights::tensor_from_f32::<B, 2>(
            vec![0.0; d_out * rank],
            [d_out, rank],
            dtype,
            &device,
        );
        self.lora_a = Some(Param::from_tensor(a));
        self.lora_b = Some(Param::from_tensor(b));
        self.lora_scale = alpha / rank as f64;
        self
    }

    /// Fold the adapter into the weight (`W + s · B A`) and drop it: a plain linear layer that
    /// computes the same function (up to rounding), e.g. for a HuggingFace export.
    pub fn merge_lora(mut self) -> Self {
        if let (Some(a), Some(b)) = (self.lora_a.take(), self.lora_b.take()) {
            let f32 = burn::tensor::DType::F32;
            let delta = as_dtype(b.val(), f32)
                .matmul(as_dtype(a.val(), f32))
                .mul_scalar(self.lora_scale);
            let dtype = self.weight.val().dtype();
            let w = as_dtype(as_dtype(self.weight.val(), f32) + delta, dtype);
            self.weight = Param::from_tensor(w.detach()).set_require_grad(false);
        }
        self.lora_scale = 0.0;
        self
    }
}
