//! One optimizer step: the training loop's body.

use std::collections::HashSet;
use std::time::Instant;

use burn::module::{Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, Tensor};
use llama_pro_core::burn;
use llama_pro_core::model::LlamaForCausalLM;
use llama_pro_core::params::{NamedVisitor, visit_named};

use crate::error::{Result, TrainError};
use crate::eval::{batch_examples, count_targets, scalar};
use crate::parallel::Collective;

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
        let lr = self.schedule.lr(self.step);
        let (mut grads, loss, tokens) = if self.collective.world() == 1 {
            self.gradients()?
        } else {
            self.gradients_parallel()?
        };
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

    /// The summed gradients of one step's micro-batches on one device, the mean loss and the
    /// tokens seen.
    fn gradients(&mut self) -> Result<(GradientsParams, f64, usize)> {
        let (batch_size, accum) = (self.config.batch_size, self.config.grad_accum);
        let mut acc = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for _ in 0..accum {
            let examples = self.data.stream.next_batch(batch_size);
            let batch = batch_examples::<B>(&examples, &self.device);
            if batch.targets == 0 {
                return Err(self.no_target(batch_size));
            }
            // Counts are known on the host: one device sync per micro-batch, for the loss value
            // that the non-finite check needs. Throughput counts the positions that predict a
            // token (L - 1 per row), trained or not.
            tokens += batch.tokens.saturating_sub(examples.len());
            let model = self.model();
            // The micro-batch's share of the step's mean loss; its backward starts from 1.
            let scale = 1.0 / (batch.targets as f64 * accum as f64);
            let loss = model.loss_scaled(batch.ids, batch.packing.as_ref(), batch.weights, scale);
            let value = scalar(loss.clone())? * accum as f64;
            self.finite("loss", value)?;
            loss_sum += value;
            let grads = loss.backward();
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        Ok((acc.grads(), loss_sum / accum as f64, tokens))
    }

    /// [`Trainer::gradients`] of a data-parallel worker: each micro-batch is a global batch of
    /// `batch_size` x workers examples (the same on every worker: the stream is a function of the
    /// seed) of which this worker runs its slice; its loss is divided by the global batch's
    /// target count, so that the sum over workers is exactly the one-device loss and gradient.
    /// The trainable gradients and the loss are summed over the workers in one collective call.
    fn gradients_parallel(&mut self) -> Result<(GradientsParams, f64, usize)> {
        let (batch_size, accum) = (self.config.batch_size, self.config.grad_accum);
        let (rank, world) = self.worker();
        let mut acc = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
        let mut tokens = 0usize;
        for _ in 0..accum {
            let global = self.data.stream.next_batch(batch_size * world);
            let targets = count_targets(&global);
            if targets == 0 {
                // Every worker sees the same global batch: all stop here together.
                return Err(self.no_target(batch_size * world));
            }
            tokens += global
                .iter()
                .map(|e| e.len().saturating_sub(1))
                .sum::<usize>();
            let mine = &global[rank * batch_size..(rank + 1) * batch_size];
            let batch = batch_examples::<B>(mine, &self.device);
            let model = self.model();
            let scale = 1.0 / (targets as f64 * accum as f64);
            let loss = model.loss_scaled(batch.ids, batch.packing.as_ref(), batch.weights, scale);
            // No host sync here: the loss travels with the gradients; the non-finite check is
            // made on the sum, by every worker alike.
            let value = loss.clone().inner() * accum as f64;
            loss_sum = Some(match loss_sum {
                Some(s) => s + value,
                None => value,
            });
            let grads = loss.backward();
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        let loss = loss_sum.expect("grad_accum >= 1");
        let (grads, loss) = all_reduce_grads(self.model(), acc.grads(), loss, &self.collective)?;
        let loss = loss / accum as f64;
        self.finite("loss", loss)?;
        Ok((grads, loss, tokens))
    }

    fn no_target(&self, n: usize) -> TrainError {
        TrainError::Invalid(format!(
            "step {}: a micro-batch of {n} examples has no trained token",
            self.step + 1
        ))
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

/// Sum the trainable gradients and `loss` over the workers: flattened in the model's parameter
/// order (by name, the same on every worker; burn's `GradientsParams::all_reduce` orders by
/// `ParamId`, which is random per loaded model, and makes one call per tensor) into one vector,
/// one collective call, split back. Returns the summed gradients and loss.
fn all_reduce_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: GradientsParams,
    loss: Tensor<B::InnerBackend, 1>,
    collective: &Collective,
) -> Result<(GradientsParams, f64)> {
    // Summed in f32 whatever the gradients' dtype (trainable parameters are f32 masters in
    // mixed precision, but a caller's model may differ), cast back after.
    type Layout = (ParamId, Vec<usize>, burn::tensor::DType);
    struct Flatten<B: AutodiffBackend> {
        grads: GradientsParams,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
        layout: Vec<Layout>,
    }
    impl<B: AutodiffBackend> NamedVisitor<B> for Flatten<B> {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                let (shape, dtype) = (g.dims().to_vec(), g.dtype());
                let flat = g.reshape([shape.iter().product::<usize>()]);
                self.parts.push(flat.cast(FloatDType::F32));
                self.layout.push((param.id, shape, dtype));
            }
        }
    }
    let mut f = Flatten::<B> {
        grads,
        parts: Vec::new(),
        layout: Vec::new(),
    };
    visit_named(model, &mut f);
    f.parts.push(loss.cast(FloatDType::F32));
    let flat = collective.sum("the gradients", Tensor::cat(f.parts, 0))?;
    let n = flat.dims()[0];
    let loss = scalar(flat.clone().slice(n - 1..n))?;
    struct Unflatten<B: AutodiffBackend> {
        flat: Tensor<B::InnerBackend, 1>,
        offset: usize,
        layout: std::collections::HashMap<ParamId, (Vec<usize>, burn::tensor::DType)>,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> NamedVisitor<B> for Unflatten<B> {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            if let Some((shape, dtype)) = self.layout.get(&param.id) {
                let n: usize = shape.iter().product();
                let part = self.flat.clone().slice(self.offset..self.offset + n);
                let dims: [usize; D] = std::array::from_fn(|i| shape[i]);
                let part = part.reshape(dims).cast(FloatDType::from(*dtype));
                self.out.register::<B::InnerBackend, D>(param.id, part);
                self.offset += n;
            }
        }
    }
    let mut u = Unflatten::<B> {
        flat,
        offset: 0,
        layout: f
            .layout
            .into_iter()
            .map(|(id, s, d)| (id, (s, d)))
            .collect(),
        out: GradientsParams::new(),
    };
    visit_named(model, &mut u);
    Ok((u.out, loss))
}
