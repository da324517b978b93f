//! Causal-LM loss and perplexity of a model on a set of sequences.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use llama_pro_core::burn;
use llama_pro_core::model::{LlamaForCausalLM, causal_lm_loss_sum};

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

/// Right-pad `seqs` into `[batch, max_len]` ids and a float mask.
pub fn pad_batch<B: Backend>(
    seqs: &[Vec<u32>],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let len = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut ids = vec![0i64; seqs.len() * len];
    let mut mask = vec![0f32; seqs.len() * len];
    for (r, s) in seqs.iter().enumerate() {
        for (c, &t) in s.iter().enumerate() {
            ids[r * len + c] = t as i64;
            mask[r * len + c] = 1.0;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [seqs.len(), len]), device),
        Tensor::from_data(TensorData::new(mask, [seqs.len(), len]), device),
    )
}

/// Mean loss over all predicted tokens of all sequences (each sequence on its own: no packing),
/// as transformers computes it with `labels = input_ids` and `-100` on padding.
/// `on_batch` is called after each batch with the number of sequences done.
pub fn evaluate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    seqs: &[Vec<u32>],
    batch_size: usize,
    device: &B::Device,
    mut on_batch: impl FnMut(usize),
) -> Result<EvalResult> {
    let batch_size = batch_size.max(1);
    let (mut sum, mut count) = (0f64, 0f64);
    // Batch sequences of similar length together to waste little compute on padding; the
    // result does not depend on the grouping.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut done = 0;
    for chunk in order.chunks(batch_size) {
        let batch: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| seqs[i].clone())
            .filter(|s| s.len() >= 2)
            .collect();
        done += chunk.len();
        if batch.is_empty() {
            on_batch(done);
            continue;
        }
        let (ids, mask) = pad_batch::<B>(&batch, device);
        let logits = model.forward(ids.clone());
        let (s, c) = causal_lm_loss_sum(logits, ids, mask);
        sum += scalar(s)?;
        count += scalar(c)?;
        on_batch(done);
    }
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
        sequences: seqs.len(),
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
