//! Multi-head causal self-attention with RoPE and grouped-query heads.

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::linear::{Linear, LinearConfig};
use crate::ops::{self, AttentionShape, apply_rope, causal_attention_padded};
use crate::weights::WeightSource;

/// Configuration of an [`Attention`] layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    /// Model width d.
    pub hidden_size: usize,
    /// Query heads H.
    pub num_heads: usize,
    /// Key/value heads H_kv (H_kv divides H).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Sliding window (Mistral), `None` for full causal attention.
    pub sliding_window: Option<usize>,
}

impl AttentionConfig {
    /// From a model configuration.
    pub fn from_model(c: &LlamaConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            qkv_bias: c.qkv_bias,
            o_bias: c.o_bias,
            sliding_window: c.sliding_window,
        }
    }

    /// A randomly initialised attention layer on `device` (HF init: normal(0, 0.02) weights, unit norm
    /// scales, zero biases; seed 0). Use [`Self::load`] to read one from a checkpoint.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        crate::weights::random(device, |src| self.load("self_attn", src, 0.02))
    }

    /// Build from `src` (`{prefix}.{q,k,v,o}_proj.*`).
    pub fn load<B: Backend, S: WeightSource<B>>(
        &self,
        prefix: &str,
        src: &mut S,
        std: f64,
    ) -> Result<Attention<B>> {
        let (d, h, kv, hd) = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        );
        Ok(Attention {
            q_proj: LinearConfig::new(d, h * hd, self.qkv_bias).load(
                &format!("{prefix}.q_proj"),
                src,
                std,
            )?,
            k_proj: LinearConfig::new(d, kv * hd, self.qkv_bias).load(
                &format!("{prefix}.k_proj"),
                src,
                std,
            )?,
            v_proj: LinearConfig::new(d, kv * hd, self.qkv_bias).load(
                &format!("{prefix}.v_proj"),
                src,
                std,
            )?,
            o_proj: LinearConfig::new(h * hd, d, self.o_bias).load(
                &format!("{prefix}.o_proj"),
                src,
                std,
            )?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            sliding_window: self.sliding_window,
        })
    }
}

/// `o_proj(softmax(rope(q) rope(k)ᵀ / sqrt(head_dim) + causal) v)` with K/V heads shared by
/// groups of H / H_kv query heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[H·hd, d]`
    pub q_proj: Linear<B>,
    /// `[H_kv·hd, d]`
    pub k_proj: Linear<B>,
    /// `[H_kv·hd, d]`
    pub v_proj: Linear<B>,
    /// `[d, H·hd]` (zero in a freshly expanded block)
    pub o_proj: Linear<B>,
    /// H.
    #[module(skip)]
    pub num_heads: usize,
    /// H_kv.
    #[module(skip)]
    pub num_kv_heads: usize,
    /// hd.
    #[module(skip)]
    pub head_dim: usize,
    /// Sliding window.
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

/// Cached keys and values of one layer, after RoPE, before head repetition.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `[batch, H_kv, cached, hd]`
    pub k: Tensor<B, 4>,
    /// `[batch, H_kv, cached, hd]`
    pub v: Tensor<B, 4>,
}

/// Several documents packed into each row of a batch ("neat" packing): attention stays within
/// a document (a block-diagonal causal mask) and positions restart at 0 in each document, so a
/// packed row computes exactly what its documents compute one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    rows: Vec<Vec<usize>>,
    seq: usize,
}

impl Packing {
    /// Document lengths of each row, in order; each row's lengths sum to `seq` (padding at the
    /// end of a row is a document of its own).
    pub fn new(rows: Vec<Vec<usize>>, seq: usize) -> Result<Self> {
        for (r, docs) in rows.iter().enumerate() {
            let total: usize = docs.iter().sum();
            if total != seq || docs.contains(&0) {
                return Err(crate::error::CoreError::Invalid(format!(
                    "packing: row {r} has documents {docs:?} (sum {total}), expected non-empty documents summing to {seq}"
                )));
            }
        }
        Ok(Self { rows, seq })
    }

    /// Document lengths per row.
    pub fn rows(&self) -> &[Vec<usize>] {
        &self.rows
    }

    /// Positions per row.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// The longest document.
    pub fn max_len(&self) -> usize {
        self.rows.iter().flatten().copied().max().unwrap_or(0)
    }

    /// True when every row is one document (nothing to split).
    pub fn is_trivial(&self) -> bool {
        self.rows.iter().all(|r| r.len() == 1)
    }

    /// `(first token row in the token-major batch, length)` of every document, row by row.
    fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.rows.iter().enumerate().flat_map(move |(r, docs)| {
            docs.iter().scan(r * self.seq, |at, &len| {
                let start = *at;
                *at += len;
                Some((start, len))
            })
        })
    }
}

impl<B: Backend> Attention<B> {
    /// Attention over packed documents (see [`Packing`]): each document runs through the same
    /// fused attention op on its own, with the RoPE tables of positions `0..len`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d]`
    /// - cos, sin: `[≥ longest document, hd]` for positions `0..`
    /// - output: `[batch, seq, d]`
    pub fn forward_packed(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        packing: &Packing,
    ) -> Tensor<B, 3> {
        self.whole(x, cos, sin, Some(packing))
    }

    /// Whole sequences (training, evaluation, prefill without cache), or packed documents: one
    /// fused attention op over the q/k/v projections.
    fn whole(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        packing: Option<&Packing>,
    ) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let x = x.reshape([b * s, d]);
        let q = self.q_proj.forward_2d(x.clone());
        let k = self.k_proj.forward_2d(x.clone());
        let v = self.v_proj.forward_2d(x);
        let shape = AttentionShape {
            batch: b,
            seq: s,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
            window: self.sliding_window,
        };
        let out = match packing {
            // One attention per document (as flash-attention's varlen kernels do): no compute
            // on the masked-out blocks between documents.
            Some(p) => {
                let spans: Vec<(usize, usize)> = p.spans().collect();
                ops::attention_packed(q, k, v, cos, sin, shape, &spans)
            }
            None => ops::attention(q, k, v, cos, sin, shape),
        };
        let y = self.o_proj.forward_2d(out);
        let d_out = y.dims()[1];
        y.reshape([b, s, d_out])
    }

    /// # Shapes
    /// - x: `[batch, seq, d]`
    /// - cos, sin: `[seq, hd]` for the positions of `x`
    /// - output: `[batch, seq, d]`
    ///
    /// With `cache`, the new keys/values are appended to it and attention covers cache + new
    /// positions (the causal boundary is aligned to the last position).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let Some(cache) = cache else {
            return self.whole(x, cos, sin, None);
        };
        self.forward_padded(x, cos, sin, cache, &[])
    }

    /// [`Self::forward`] with a cache of left-padded rows (batched decoding): the first
    /// `left_pad[r]` cached positions of row `r` (counted in the cache, the new positions
    /// included) are padding that its real positions do not attend to. Empty: no padding.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d]`; cos, sin: `[seq, hd]`; output: `[batch, seq, d]`
    pub fn forward_padded(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        cache: &mut Option<LayerCache<B>>,
        left_pad: &[usize],
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, s, n·hd] → [b, n, s, hd]
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(x.clone()), h);
        let k = heads(self.k_proj.forward(x.clone()), kv);
        let v = heads(self.v_proj.forward(x), kv);
        let q = apply_rope(q, cos.clone(), sin.clone());
        let k = apply_rope(k, cos, sin);

        // Incremental decoding: append to the cache.
        let (k, v) = match cache.take() {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        *cache = Some(LayerCache {
            k: k.clone(),
            v: v.clone(),
        });
        let pads = (!left_pad.is_empty()).then_some(left_pad);
        let out =
            causal_attention_padded(q, k, v, self.sliding_window, 1.0 / (hd as f64).sqrt(), pads);
        let out = out.swap_dims(1, 2).reshape([b, s, h * hd]);
        self.o_proj.forward(out)
    }
}
