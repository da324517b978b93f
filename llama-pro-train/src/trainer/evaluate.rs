//! Evaluation of the model on every evaluation set.

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn;

use crate::error::Result;
use crate::eval::{EvalResult, count_targets, eval_result, evaluate_examples, loss_sum_shard};
use crate::tasks::{McOptions, McResult, evaluate_task};

use super::{EvalPoint, Trainer};

impl<B: AutodiffBackend> Trainer<B> {
    /// Loss and perplexity on every evaluation set, without gradients (the model's inner
    /// backend), in batches of `batch_size`; recorded in the run's history (the first evaluation
    /// of a fresh run, at step 0, is the "before" of the report).
    pub fn evaluate(&mut self) -> Result<BTreeMap<String, EvalResult>> {
        let inner = self.model().valid();
        let mut out = BTreeMap::new();
        let (rank, world) = self.worker();
        if world == 1 {
            for (name, seqs) in &self.data.eval_sets {
                let r =
                    evaluate_examples(&inner, seqs, self.config.batch_size, &self.device, |_| {})?;
                out.insert(name.clone(), r);
            }
        } else {
            // Data parallel: the batches dealt round-robin to the workers, the loss sums added
            // up in one collective call (as an f32 pair per set, high and low part, so that the
            // sum keeps the f64 sums' precision); the target counts are known on the host.
            let mut parts = Vec::new();
            for (_, seqs) in &self.data.eval_sets {
                let (sum, _) = loss_sum_shard(
                    &inner,
                    seqs,
                    self.config.batch_size,
                    &self.device,
                    (rank, world),
                    |_| {},
                )?;
                let hi = sum as f32;
                parts.extend([hi, (sum - hi as f64) as f32]);
            }
            let sums = self.collective.sum_values::<B::InnerBackend>(
                "the evaluation losses",
                parts,
                &self.device,
            )?;
            for ((name, seqs), s) in self.data.eval_sets.iter().zip(sums.chunks(2)) {
                let count = count_targets(seqs) as f64;
                let sum = s[0] as f64 + s[1] as f64;
                out.insert(name.clone(), eval_result(sum, count, seqs.len())?);
            }
        }
        if self.step == 0 && self.resumed.is_none() {
            self.eval_before = out.clone();
        }
        self.evals.push(EvalPoint::new(self.step, &out));
        self.latest_eval = Some((self.step, out.clone()));
        Ok(out)
    }

    /// Score the multiple-choice tasks (`eval_tasks`) as lm-evaluation-harness does: before
    /// training (a fresh run at step 0) and after its last step, for the report. Every worker
    /// scores them (the same model: the same numbers); nothing to do without tasks.
    pub fn evaluate_tasks(&mut self) -> Result<BTreeMap<String, McResult>> {
        let mut out = BTreeMap::new();
        if self.tasks.is_empty() {
            return Ok(out);
        }
        let Some(tok) = self.info.tokenizer.as_ref() else {
            return Ok(out);
        };
        let inner = self.model().valid();
        let opts = McOptions {
            batch_size: self.config.batch_size,
            ..McOptions::default()
        };
        for task in &self.tasks {
            let r = evaluate_task(&inner, tok, task, &opts, &self.device, |_, _| {})?;
            out.insert(task.name.clone(), r);
        }
        if self.step == 0 && self.resumed.is_none() {
            self.tasks_before = out.clone();
        }
        if self.is_done() {
            self.tasks_after = out.clone();
        }
        Ok(out)
    }
}
