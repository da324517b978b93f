//! Evaluation of the model on every evaluation set.

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn;

use crate::error::Result;
use crate::eval::{EvalResult, evaluate_examples};

use super::{EvalPoint, Trainer};

impl<B: AutodiffBackend> Trainer<B> {
    /// Loss and perplexity on every evaluation set, without gradients (the model's inner
    /// backend), in batches of `batch_size`; recorded in the run's history (the first evaluation
    /// of a fresh run, at step 0, is the "before" of the report).
    pub fn evaluate(&mut self) -> Result<BTreeMap<String, EvalResult>> {
        let inner = self.model().valid();
        let mut out = BTreeMap::new();
        for (name, seqs) in &self.data.eval_sets {
            let r = evaluate_examples(&inner, seqs, self.config.batch_size, &self.device, |_| {})?;
            out.insert(name.clone(), r);
        }
        if self.step == 0 && self.resumed.is_none() {
            self.eval_before = out.clone();
        }
        self.evals.push(EvalPoint::new(self.step, &out));
        self.latest_eval = Some((self.step, out.clone()));
        Ok(out)
    }
}
