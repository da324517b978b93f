//! Causal-LM loss and perplexity of a model on a set of sequences.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use llama_pro_core::attention::Packing;
use llama_pro_core::burn;
use llama_pro_core::model::LlamaForCausalLM;

use crate::dataset::Example;
use crate::error::{Result, TrainError};

/// Loss over a data set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
    /// Number of sequences.
    pub sequences: usize,
}

/// A batch of examples on a device.
pub struct Batch<B: Backend> {
    /// Token ids, right-padded: `[batch, longest]`.
    pub ids: Tensor<B, 2, Int>,
    /// Loss weight of position `t` predicting token `t+1`: `[batch, longest]` (see
    /// `causal_lm_loss_weighted`).
    pub weights: Tensor<B, 2>,
    /// The documents of each row, when any row holds several.
    pub packing: Option<Packing>,
    /// Tokens that are not padding.
    pub tokens: usize,
    /// Tokens the loss covers.
    pub targets: usize,
}

/// Right-pad examples into a [`Batch`]: weight 1 where the next token is a target of its
/// example (trained, not padding, not the start of a packed document).
pub fn batch_examples<B: Backend>(examples: &[Example], device: &B::Device) -> Batch<B> {
    let len = examples.iter().map(Example::len).max().unwrap_or(1).max(1);
    let n = examples.len();
    let mut ids = vec![0i64; n * len];
    let mut weights = vec![0f32; n * len];
    let (mut tokens, mut targets) = (0, 0);
    for (r, e) in examples.iter().enumerate() {
        for (c, &t) in e.ids.iter().enumerate() {
            ids[r * len + c] = t as i64;
            if e.is_target(c + 1) {
                weights[r * len + c] = 1.0;
                targets += 1;
            }
        }
        tokens += e.len();
    }
    let packing = examples.iter().any(|e| e.docs.len() > 1).then(|| {
        let rows = examples
            .iter()
            .map(|e| {
                let mut docs = if e.docs.is_empty() {
                    vec![e.len()]
                } else {
                    e.docs.clone()
                };
                docs.retain(|&d| d > 0);
                if e.len() < len {
                    docs.push(len - e.len());
                }
                docs
            })
            .collect();
        Packing::new(rows, len).expect("documents sum to the row length")
    });
    Batch {
        ids: Tensor::from_data(TensorData::new(ids, [n, len]), device),
        weights: Tensor::from_data(TensorData::new(weights, [n, len]), device),
        packing,
        tokens,
        targets,
    }
}

/// Mean loss over all predicted tokens of all sequences (each sequence on its own: no packing),
/// as transformers computes it with `labels = input_ids` and `-100` on padding.
/// `on_batch` is called after each batch with the number of sequences done.
pub fn evaluate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    seqs: &[Vec<u32>],
    batch_size: usize,
    device: &B::Device,
    on_batch: impl FnMut(usize),
) -> Result<EvalResult> {
    let examples: Vec<Example> = seqs.iter().cloned().map(Example::text).collect();
    evaluate_examples(model, &examples, batch_size, device, on_batch)
}

/// Mean loss over the target tokens of `examples` (supervised examples: their trained tokens;
/// packed examples: their documents on their own), as transformers computes it with their
/// labels. `on_batch` is called after each batch with the number of examples done.
pub fn evaluate_examples<B: Backend>(
    model: &LlamaForCausalLM<B>,
    seqs: &[Example],
    batch_size: usize,
    device: &B::Device,
    on_batch: impl FnMut(usize),
) -> Result<EvalResult> {
    let (sum, count) = loss_sum_shard(model, seqs, batch_size, device, (0, 1), on_batch)?;
    eval_result(sum, count, seqs.len())
}

/// The summed loss and the number of target tokens of the batches of `seqs` that fall to worker
/// `shard.0` of `shard.1` (batches dealt round-robin in the order [`evaluate_examples`] runs
/// them: the workers' sums add up to the one-worker sum).
pub fn loss_sum_shard<B: Backend>(
    model: &LlamaForCausalLM<B>,
    seqs: &[Example],
    batch_size: usize,
    device: &B::Device,
    shard: (usize, usize),
    mut on_batch: impl FnMut(usize),
) -> Result<(f64, f64)> {
    let batch_size = batch_size.max(1);
    let (mut sum, mut count) = (0f64, 0f64);
    // Batch sequences of similar length together to waste little compute on padding; the
    // result does not depend on the grouping.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut done = 0;
    for (k, chunk) in order.chunks(batch_size).enumerate() {
        done += chunk.len();
        if k % shard.1.max(1) != shard.0 {
            continue;
        }
        let batch: Vec<Example> = chunk
            .iter()
            .map(|&i| seqs[i].clone())
            .filter(|s| s.len() >= 2)
            .collect();
        if batch.is_empty() {
            on_batch(done);
            continue;
        }
        let b = batch_examples::<B>(&batch, device);
        let (s, c) = model.loss_weighted(b.ids, b.packing.as_ref(), b.weights);
        sum += scalar(s)?;
        count += scalar(c)?;
        on_batch(done);
    }
    Ok((sum, count))
}

/// Tokens the loss covers in `examples` (what [`batch_examples`] counts as `targets`).
pub fn count_targets(examples: &[Example]) -> usize {
    examples
        .iter()
        .map(|e| (1..e.len()).filter(|&t| e.is_target(t)).count())
        .sum()
}

/// The [`EvalResult`] of a summed loss over `count` target tokens of `sequences` sequences.
pub fn eval_result(sum: f64, count: f64, sequences: usize) -> Result<EvalResult> {
    if count == 0.0 {
        return Err(TrainError::Invalid(
            "no token to predict: every sequence has fewer than 2 tokens".into(),
        ));
    }
    let loss = sum / count;
    if !loss.is_finite() {
        return Err(TrainError::Invalid(format!(
            "the evaluation loss is {loss} over {count} tokens (not finite): the model's outputs \
             overflow or its weights are not finite"
        )));
    }
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: count as usize,
        sequences,
    })
}

pub(crate) fn scalar<B: Backend>(t: Tensor<B, 1>) -> Result<f64> {
    let v = t
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| TrainError::Invalid(format!("reading a loss value: {e:?}")))?;
    Ok(v[0])
}
