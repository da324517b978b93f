//! AdamW with a fused update where the backend has one.
//!
//! burn's `AdamW` updates a parameter with about a dozen whole-tensor ops (moment updates, bias
//! corrections, square root, division, decay), each reading and writing the full tensor: 7% of
//! a CPU training step of the M benchmark. [`FusedAdamW`] does the same arithmetic in one pass
//! through [`llama_pro_core::ops::adamw`] and falls back to burn's `AdamW` where the backend has
//! no kernel (GPU backends, half-precision parameters, any other backend). Its state is burn's `AdamWState`, so
//! optimizer records (checkpoints) are the same as with burn's `AdamW`.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use llama_pro_core::ops::{AdamWStep, adamw};

/// AdamW (decoupled weight decay), fused on backends with a kernel.
#[derive(Clone)]
pub struct FusedAdamW {
    composed: AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl FusedAdamW {
    /// AdamW with these hyper-parameters (PyTorch's names and meaning).
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let composed = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            composed,
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
        }
    }

    /// The optimizer for module `M` on autodiff backend `B`.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(0, |s| s.momentum.time) + 1;
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
        };
        let moments = state
            .as_ref()
            .map(|s| (s.momentum.moment_1.clone(), s.momentum.moment_2.clone()));
        match adamw(tensor.clone(), grad.clone(), moments, step) {
            Some([p, m, v]) => {
                let momentum = AdaptiveMomentumState::new(time, m, v);
                (p, Some(AdamWState::new(momentum)))
            }
            None => self.composed.step(lr, tensor, grad, state),
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}
