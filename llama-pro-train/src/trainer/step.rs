//! One optimizer step: the training loop's body.

use std::collections::HashSet;
use std::time::Instant;

use burn::module::{Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn;
use llama_pro_core::model::{LlamaForCausalLM, causal_lm_loss_weighted};
use llama_pro_core::params::{NamedVisitor, visit_named};

use crate::error::{Result, TrainError};
use crate::eval::{batch_examples, scalar};

use super::setup::Group;
use super::{StepMetrics, Trainer};

impl<B: AutodiffBackend> Trainer<B> {
    /// One optimizer step: `grad_accum` micro-batches of `batch_size` examples, each forward and
    /// backward with its mean loss divided by `grad_accum` (so the gradients add up to the mean
    /// over micro-batches); the global gradient norm clipped as `torch.nn.utils.clip_grad_norm_`;
    /// AdamW on every parameter group at the schedule's learning rate times the group's factor.
    ///
    /// # Errors
    /// A non-finite loss or gradient norm stops the run before anything is updated or written.
    pub fn step(&mut self) -> Result<StepMetrics> {
        if self.is_done() {
            return Err(TrainError::Invalid(format!(
                "the run is complete ({} steps)",
                self.total_steps()
            )));
        }
        let t0 = Instant::now();
        let (batch_size, accum) = (self.config.batch_size, self.config.grad_accum);
        let lr = self.schedule.lr(self.step);
        let mut acc = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for _ in 0..accum {
            let examples = self.data.stream.next_batch(batch_size);
            let batch = batch_examples::<B>(&examples, &self.device);
            if batch.targets == 0 {
                return Err(TrainError::Invalid(format!(
                    "step {}: a micro-batch of {batch_size} examples has no trained token",
                    self.step + 1
                )));
            }
            // Counts are known on the host: one device sync per micro-batch, for the loss value
            // that the non-finite check needs. Throughput counts the positions that predict a
            // token (L - 1 per row), trained or not.
            tokens += batch.tokens.saturating_sub(examples.len());
            let model = self.model();
            let logits = model.forward_packed(batch.ids.clone(), batch.packing.as_ref());
            let (sum, _) = causal_lm_loss_weighted(logits, batch.ids, batch.weights);
            let loss = sum / batch.targets as f64;
            let value = scalar(loss.clone())?;
            self.finite("loss", value)?;
            loss_sum += value;
            let grads = (loss / accum as f64).backward();
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        let mut grads = acc.grads();
        let (norm, group_norms) = grad_norms(self.model(), &grads, &self.groups)?;
        self.finite("gradient norm", norm)?;
        let clip = self.config.clip_grad_norm;
        if clip > 0.0 {
            // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1.
            let coef = clip / (norm + 1e-6);
            if coef < 1.0 {
                grads = scale_grads(self.model(), grads, coef);
            }
        }
        for g in &self.groups {
            let part = take_grads(self.model(), &mut grads, &g.ids);
            let model = self.model.take();
            let opt = self.optim.of(g);
            self.model = model.map(|m| opt.step(lr * g.lr_scale, m, part));
        }
        self.step += 1;
        let loss = loss_sum / accum as f64;
        self.losses.push(loss);
        self.tokens += tokens;
        let start = self.clock.map_or(t0, |(s, _)| s);
        self.clock = Some((start, start.elapsed()));
        Ok(StepMetrics {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
            group_grad_norms: self
                .groups
                .iter()
                .map(|g| g.label.clone())
                .zip(group_norms)
                .collect(),
            tokens,
            tokens_per_sec: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        })
    }

    /// An error if `value` is not finite: the step is abandoned before any update.
    fn finite(&self, what: &str, value: f64) -> Result<()> {
        if value.is_finite() {
            return Ok(());
        }
        let kept = match &self.last_checkpoint {
            Some(dir) => format!(
                "the last good checkpoint, {}, is intact (resume from it with a lower learning rate or clipping)",
                dir.display()
            ),
            None => "no checkpoint was written before it (save_every sets how often)".into(),
        };
        Err(TrainError::Invalid(format!(
            "step {}: the {what} is {value} (not finite); stopping without writing anything; {kept}",
            self.step + 1
        )))
    }
}

/// Squared norms of every parameter gradient → (global norm, norm per group).
fn grad_norms<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: &GradientsParams,
    groups: &[Group],
) -> Result<(f64, Vec<f64>)> {
    struct V<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        out: Vec<(ParamId, Tensor<B::InnerBackend, 1>)>,
    }
    impl<B: AutodiffBackend> NamedVisitor<B> for V<'_, B> {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.out.push((param.id, g.square().sum()));
            }
        }
    }
    let mut v = V::<B> {
        grads,
        out: Vec::new(),
    };
    visit_named(model, &mut v);
    if v.out.is_empty() {
        return Ok((0.0, vec![0.0; groups.len()]));
    }
    let ids: Vec<ParamId> = v.out.iter().map(|(id, _)| *id).collect();
    // One host transfer for all of them.
    let sq: Vec<f64> = Tensor::cat(v.out.into_iter().map(|(_, t)| t).collect(), 0)
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| TrainError::Invalid(format!("reading the gradient norms: {e:?}")))?;
    let total = sq.iter().sum::<f64>().sqrt();
    let per_group = groups
        .iter()
        .map(|g| {
            ids.iter()
                .zip(&sq)
                .filter(|(id, _)| g.ids.contains(id))
                .map(|(_, s)| s)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    Ok((total, per_group))
}

/// Multiply every gradient by `coef`.
fn scale_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: GradientsParams,
    coef: f64,
) -> GradientsParams {
    struct V {
        grads: GradientsParams,
        coef: f64,
    }
    impl<B: AutodiffBackend> NamedVisitor<B> for V {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads
                    .register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.coef));
            }
        }
    }
    let mut v = V { grads, coef };
    visit_named(model, &mut v);
    v.grads
}

/// Move the gradients of `ids` out of `grads`.
fn take_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: &mut GradientsParams,
    ids: &HashSet<ParamId>,
) -> GradientsParams {
    struct V<'a> {
        from: &'a mut GradientsParams,
        to: GradientsParams,
        ids: &'a HashSet<ParamId>,
    }
    impl<B: AutodiffBackend> NamedVisitor<B> for V<'_> {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            if !self.ids.contains(&param.id) {
                return;
            }
            if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
                self.to.register::<B::InnerBackend, D>(param.id, g);
            }
        }
    }
    let mut v = V {
        from: grads,
        to: GradientsParams::new(),
        ids,
    };
    visit_named(model, &mut v);
    v.to
}
