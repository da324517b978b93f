//! The LLaMA model and `LlamaForCausalLM`.

use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Int, Tensor, backend::Backend};

use crate::attention::{LayerCache, Packing};
use crate::block::{DecoderLayer, DecoderLayerConfig};
use crate::config::{DType, HfConfig, LlamaConfig};
use crate::embedding::{Embedding, EmbeddingConfig};
use crate::error::Result;
use crate::linear::{Linear, LinearConfig};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::ops;
use crate::params::{NamedVisitor, visit_named};
use crate::rope::RotaryEmbedding;
use crate::weights::{Checkpoint, CheckpointSource, RandomInit, WeightSource};

/// The decoder stack (`model.*` in HF): embeddings, blocks, final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// `model.embed_tokens`
    pub embed_tokens: Embedding<B>,
    /// `model.layers.{i}`
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.norm`
    pub norm: RmsNorm<B>,
    /// RoPE frequencies (not a parameter).
    #[module(skip)]
    pub rope: RotaryEmbedding,
}

/// A causal language model: [`LlamaModel`] plus the `lm_head` (absent when tied to the
/// embeddings).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// `model.*`
    pub model: LlamaModel<B>,
    /// `lm_head` (`None` when `tie_word_embeddings`).
    pub lm_head: Option<Linear<B>>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: LlamaConfig,
    /// Dtype activations are computed in, when it differs from the weights' (mixed precision:
    /// see [`LlamaForCausalLM::mixed_precision`]); `None`: the embedding's dtype.
    #[module(skip)]
    pub compute_dtype: Option<DType>,
}

/// Keys and values of every layer for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// One slot per layer.
    pub layers: Vec<Option<LayerCache<B>>>,
    /// Number of positions already cached (the position of the next token).
    pub len: usize,
    /// Left padding of each row (batched decoding of prompts of different lengths): the first
    /// `left_pad[r]` positions of row `r` are padding its tokens do not attend to. Empty: none.
    pub left_pad: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            left_pad: Vec::new(),
        }
    }

    /// Rows of the batch (0 before the first forward).
    pub fn rows(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |c| c.k.dims()[0])
    }

    /// Keep only the rows `keep` (in that order), then drop leading positions that are padding
    /// in every row kept.
    pub fn select_rows(&mut self, keep: &[usize]) {
        let Some(device) = self.layers.iter().flatten().next().map(|c| c.k.device()) else {
            return;
        };
        let idx = Tensor::<B, 1, Int>::from_data(
            burn::tensor::TensorData::new(
                keep.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [keep.len()],
            ),
            &device,
        );
        for c in self.layers.iter_mut().flatten() {
            c.k = c.k.clone().select(0, idx.clone());
            c.v = c.v.clone().select(0, idx.clone());
        }
        if !self.left_pad.is_empty() {
            self.left_pad = keep.iter().map(|&i| self.left_pad[i]).collect();
        }
        let common = self.left_pad.iter().copied().min().unwrap_or(0);
        if common > 0 {
            for c in self.layers.iter_mut().flatten() {
                let n = c.k.dims()[2];
                c.k = c.k.clone().narrow(2, common, n - common);
                c.v = c.v.clone().narrow(2, common, n - common);
            }
            self.left_pad.iter_mut().for_each(|p| *p -= common);
        }
    }

    /// Append the rows of `other` (whose next position must be this cache's: keys are at
    /// their RoPE positions), left-padding the shorter side's keys with zeros.
    pub fn append_rows(&mut self, other: KvCache<B>) {
        if self.rows() == 0 {
            *self = other;
            return;
        }
        assert_eq!(
            self.len, other.len,
            "appended rows continue at the same position"
        );
        let (mine, theirs) = (self.rows(), other.rows());
        let kv_mine = self
            .layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |c| c.k.dims()[2]);
        let kv_theirs = other
            .layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |c| c.k.dims()[2]);
        let width = kv_mine.max(kv_theirs);
        let pad = |t: Tensor<B, 4>, n: usize| {
            if n == 0 {
                return t;
            }
            let [b, h, _, d] = t.dims();
            let z = Tensor::<B, 4>::zeros([b, h, n, d], &t.device()).cast(t.dtype());
            Tensor::cat(vec![z, t], 2)
        };
        for (a, o) in self.layers.iter_mut().zip(other.layers) {
            if let (Some(a), Some(o)) = (a.as_mut(), o) {
                a.k = Tensor::cat(
                    vec![
                        pad(a.k.clone(), width - kv_mine),
                        pad(o.k, width - kv_theirs),
                    ],
                    0,
                );
                a.v = Tensor::cat(
                    vec![
                        pad(a.v.clone(), width - kv_mine),
                        pad(o.v, width - kv_theirs),
                    ],
                    0,
                );
            }
        }
        let old = |p: &Vec<usize>, rows: usize, extra: usize| -> Vec<usize> {
            if p.is_empty() {
                vec![extra; rows]
            } else {
                p.iter().map(|x| x + extra).collect()
            }
        };
        let mut pads = old(&self.left_pad, mine, width - kv_mine);
        pads.extend(old(&other.left_pad, theirs, width - kv_theirs));
        self.left_pad = pads;
    }
}

/// Outputs of [`LlamaForCausalLM::forward_with_hidden`].
pub struct ForwardOutput<B: Backend> {
    /// `[batch, seq, vocab]`
    pub logits: Tensor<B, 3>,
    /// Output of each decoder block (before the final norm), `[batch, seq, d]` each.
    pub layer_outputs: Vec<Tensor<B, 3>>,
    /// Output of the final norm, `[batch, seq, d]`.
    pub final_hidden: Tensor<B, 3>,
}

impl LlamaConfig {
    /// Build a model from any weight source (random init or checkpoint): the one place that
    /// knows which tensors a model has, with their HF names and shapes.
    pub fn load<B: Backend, S: WeightSource<B>>(&self, src: &mut S) -> Result<LlamaForCausalLM<B>> {
        let std = 0.02;
        let embed_tokens = EmbeddingConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
        }
        .load("model.embed_tokens", src, std)?;
        let block = DecoderLayerConfig::from_model(self);
        let layers = (0..self.num_hidden_layers)
            .map(|i| block.load(&format!("model.layers.{i}"), src))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNormConfig {
            size: self.hidden_size,
            eps: self.rms_norm_eps,
        }
        .load("model.norm", src)?;
        let lm_head = if self.tie_word_embeddings {
            None
        } else {
            Some(
                LinearConfig::new(self.hidden_size, self.vocab_size, false)
                    .load("lm_head", src, std)?,
            )
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
                rope: RotaryEmbedding::new(self),
            },
            lm_head,
            config: self.clone(),
            compute_dtype: None,
        })
    }

    /// A randomly initialised model (HF init: normal(0, 0.02) weights, unit norms, zero biases),
    /// reproducible from `seed` on every backend.
    pub fn init<B: Backend>(&self, device: &B::Device, seed: u64) -> LlamaForCausalLM<B> {
        let mut src = RandomInit::<B>::new(device, self.dtype, seed);
        match self.load(&mut src) {
            Ok(m) => m,
            // RandomInit never fails; a failure here is a bug in this crate.
            Err(e) => unreachable!("random initialisation failed: {e}"),
        }
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Load a HuggingFace model directory (`config.json` + safetensors) onto `device`, converting
    /// the weights to `dtype` (default: f32). Every tensor must be present with the configured
    /// shape, and the checkpoint must hold no other tensor.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &B::Device,
        dtype: Option<DType>,
    ) -> Result<(Self, HfConfig)> {
        let dir = dir.as_ref();
        let hf = HfConfig::from_path(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let model = Self::from_checkpoint(&hf.config, &ckpt, device, dtype.unwrap_or(DType::F32))?;
        Ok((model, hf))
    }

    /// Build from an opened checkpoint.
    pub fn from_checkpoint(
        config: &LlamaConfig,
        ckpt: &Checkpoint,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut src = CheckpointSource::<B>::new(ckpt, device, dtype);
        let model = config.load(&mut src)?;
        let tied = config.tie_word_embeddings;
        // Old checkpoints carry RoPE buffers; tied ones sometimes a redundant lm_head copy.
        src.finish(|n| n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight"))?;
        Ok(model)
    }

    /// Attach LoRA adapters to the targeted linear layers of every block (see
    /// [`LoraConfig`](crate::linear::LoraConfig)); the model's output is unchanged until they
    /// train. Adapter parameters are named `<layer>.lora_a` / `<layer>.lora_b` (the selection
    /// term `lora` picks them).
    pub fn with_lora(self, cfg: &crate::linear::LoraConfig, seed: u64) -> Result<Self> {
        use crate::linear::LORA_TARGETS;
        if cfg.rank == 0 || !(cfg.alpha > 0.0) {
            return Err(crate::CoreError::Invalid(format!(
                "LoRA: rank must be >= 1 and alpha > 0 (got rank {}, alpha {})",
                cfg.rank, cfg.alpha
            )));
        }
        if let Some(t) = cfg
            .targets
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err(crate::CoreError::Invalid(format!(
                "LoRA target {t:?}: expected some of {}",
                LORA_TARGETS.join(", ")
            )));
        }
        let on = |t: &str| cfg.targets.iter().any(|x| x == t);
        Ok(self.map_block_linears(|i, name, lin| {
            if !on(name) {
                return lin;
            }
            let k = LORA_TARGETS.iter().position(|t| *t == name).unwrap_or(0) as u64 + 1;
            let s = seed ^ ((i as u64) << 8 | k).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            lin.with_lora(cfg.rank, cfg.alpha, s)
        }))
    }

    /// Fold every LoRA adapter into its weight (see [`crate::linear::Linear::merge_lora`]).
    pub fn merge_lora(self) -> Self {
        self.map_block_linears(|_, _, lin| lin.merge_lora())
    }

    /// Apply `f(layer index, HF name, layer)` to the seven linear layers of every block.
    fn map_block_linears(
        mut self,
        mut f: impl FnMut(usize, &'static str, crate::linear::Linear<B>) -> crate::linear::Linear<B>,
    ) -> Self {
        let layers = std::mem::take(&mut self.model.layers);
        self.model.layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, mut l)| {
                let a = l.self_attn;
                l.self_attn = crate::attention::Attention {
                    q_proj: f(i, "q_proj", a.q_proj),
                    k_proj: f(i, "k_proj", a.k_proj),
                    v_proj: f(i, "v_proj", a.v_proj),
                    o_proj: f(i, "o_proj", a.o_proj),
                    ..a
                };
                let m = l.mlp;
                l.mlp = crate::mlp::Mlp {
                    gate_proj: f(i, "gate_proj", m.gate_proj),
                    up_proj: f(i, "up_proj", m.up_proj),
                    down_proj: f(i, "down_proj", m.down_proj),
                };
                l
            })
            .collect();
        self
    }

    /// Mixed precision: compute in `compute` (bf16/f16) with the frozen parameters stored in it,
    /// while the trainable ones (`require_grad`) keep their dtype (f32 master weights). Every
    /// matmul casts its weight to the activations' dtype (a no-op for frozen weights), whose
    /// backward casts the gradient back: the optimizer sees f32 gradients of f32 weights. RMSNorm
    /// statistics and the loss's log-softmax stay in f32, as in transformers.
    pub fn mixed_precision(self, compute: DType) -> Self {
        // Rounded on the host with `half` (round-to-nearest-even, as torch's `.to(bfloat16)`):
        // burn-flex 0.21's cast goes through f64 and `bf16::from_f64`, which rounds some ties
        // the other way (1 ulp; seen on 1 of 20480 values of a fixture).
        struct CastFrozen(DType);
        impl<B: Backend> burn::module::ModuleMapper<B> for CastFrozen {
            fn map_float<const D: usize>(
                &mut self,
                param: burn::module::Param<Tensor<B, D>>,
            ) -> burn::module::Param<Tensor<B, D>> {
                if param.is_require_grad() {
                    return param;
                }
                let dtype = self.0;
                param.map(|t| {
                    let (dims, device) = (t.dims(), t.device());
                    let values = match t.into_data().convert::<f32>().into_vec::<f32>() {
                        Ok(v) => v,
                        Err(e) => unreachable!("data converted to f32 reads as f32: {e:?}"),
                    };
                    crate::weights::tensor_from_f32::<B, D>(values, dims, dtype, &device)
                })
            }
        }
        let mut m = self.map(&mut CastFrozen(compute));
        m.compute_dtype = Some(compute);
        m
    }

    /// Dtype activations are computed in.
    pub fn dtype(&self) -> DType {
        if let Some(d) = self.compute_dtype {
            return d;
        }
        match self.model.embed_tokens.weight.val().dtype() {
            burn::tensor::DType::BF16 => DType::BF16,
            burn::tensor::DType::F16 => DType::F16,
            _ => DType::F32,
        }
    }

    /// Every parameter with its HF name, in module order (`model.layers.0.self_attn.q_proj.weight`…).
    pub fn named_parameters(&self) -> Vec<NamedParam<B>> {
        let mut v = NamedParams { out: Vec::new() };
        visit_named(self, &mut v);
        v.out
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.num_params()
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Logits for every position.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let (h, _) = self.hidden(input_ids, None, false);
        self.head(h)
    }

    /// Logits for every position of rows that each hold several documents: attention stays
    /// within a document and positions restart in each (see [`Packing`]). Equal to running the
    /// documents one by one. `None` is [`Self::forward`].
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` (`seq` = `packing.seq()`)
    /// - output: `[batch, seq, vocab]`
    pub fn forward_packed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        packing: Option<&Packing>,
    ) -> Tensor<B, 3> {
        let Some(packing) = packing.filter(|p| !p.is_trivial()) else {
            return self.forward(input_ids);
        };
        let (h, _) = self.hidden_with(input_ids, None, false, Some(packing));
        self.head(h)
    }

    /// Sum of the causal-LM loss of `input_ids` weighted per position (see
    /// [`causal_lm_loss_weighted`]: position `t` predicts token `t+1` with weight `weights[t]`)
    /// and the sum of the weights, computed from the final hidden states by
    /// [`ops::causal_head_ce_weighted`]: on a backend with kernels the `[tokens, vocab]` logits
    /// never exist whole (the head and the loss run over chunks of rows, and a training step's
    /// head gradients are computed along). Equals `causal_lm_loss_weighted(forward_packed(..))`
    /// up to rounding; evaluation calls it, training calls [`Self::loss_scaled`].
    ///
    /// # Shapes
    /// - input_ids, weights: `[batch, seq]` (`seq` = `packing.seq()` when packed)
    /// - outputs: `[1]` each
    pub fn loss_weighted(
        &self,
        input_ids: Tensor<B, 2, Int>,
        packing: Option<&Packing>,
        weights: Tensor<B, 2>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let count = weight_sum(weights.clone());
        (self.head_loss(input_ids, packing, weights), count)
    }

    /// `scale ×` the weighted loss sum of [`Self::loss_weighted`], what a training step
    /// differentiates: with `scale = 1 / (targets × accumulation steps)` it is the mean loss's
    /// share of the step, and the scale rides on the weights (in f32, where the loss kernel
    /// applies them), so `backward()` on it starts from exactly 1 and the fused head's
    /// gradients are used as computed, with no rescaling rounding.
    ///
    /// # Shapes
    /// - input_ids, weights: `[batch, seq]`
    /// - output: `[1]`
    pub fn loss_scaled(
        &self,
        input_ids: Tensor<B, 2, Int>,
        packing: Option<&Packing>,
        weights: Tensor<B, 2>,
        scale: f64,
    ) -> Tensor<B, 1> {
        let weights = weights
            .cast(burn::tensor::FloatDType::F32)
            .mul_scalar(scale);
        self.head_loss(input_ids, packing, weights)
    }

    /// The weighted loss sum from the final hidden states (see [`Self::loss_weighted`]).
    fn head_loss(
        &self,
        input_ids: Tensor<B, 2, Int>,
        packing: Option<&Packing>,
        weights: Tensor<B, 2>,
    ) -> Tensor<B, 1> {
        let packing = packing.filter(|p| !p.is_trivial());
        let (h, _) = self.hidden_with(input_ids.clone(), None, false, packing);
        match self.head_weight(h.dtype()) {
            Some(w) => ops::causal_head_ce_weighted(h, w, input_ids, weights),
            None => ops::causal_ce_weighted(self.head(h), input_ids, weights),
        }
    }

    /// [`Self::loss_weighted`] with a padding mask (1 for real tokens): position `t` counts when
    /// it and `t+1` are real tokens, as [`causal_lm_loss_sum`]. Returns `(sum, count)`.
    pub fn loss_sum(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        self.loss_weighted(input_ids, None, ops::pair_weights(mask))
    }

    /// The head's weight `[vocab, hidden]` in `dtype` when the head is a plain matrix (tied:
    /// the embeddings), `None` when it has a bias or an adapter.
    fn head_weight(&self, dtype: burn::tensor::DType) -> Option<Tensor<B, 2>> {
        let w = match &self.lm_head {
            Some(head) if head.bias.is_some() || head.lora_a.is_some() => return None,
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val(),
        };
        Some(if w.dtype() == dtype {
            w
        } else {
            w.cast(burn::tensor::FloatDType::from(dtype))
        })
    }

    /// Logits plus every block's output (for parity tests against transformers).
    pub fn forward_with_hidden(&self, input_ids: Tensor<B, 2, Int>) -> ForwardOutput<B> {
        let (h, layer_outputs) = self.hidden(input_ids, None, true);
        ForwardOutput {
            logits: self.head(h.clone()),
            layer_outputs,
            final_hidden: h,
        }
    }

    /// Incremental forward: `input_ids` continue the sequence held in `cache`, which is updated.
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]`
    /// - output: `[batch, new, vocab]`
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let (h, _) = self.hidden(input_ids, Some(cache), false);
        self.head(h)
    }

    /// Final hidden states (after the last norm, before the head): `[batch, seq, d]`.
    pub fn forward_final_hidden(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.hidden(input_ids, None, false).0
    }

    /// [`Self::forward_cached`] that returns only the logits of the last position of each row
    /// (`[batch, vocab]`): the next-token distribution of batched decoding, without the
    /// `[batch, seq, vocab]` logits of a prefill.
    pub fn forward_cached_last(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let (h, _) = self.hidden(input_ids, Some(cache), false);
        let [b, s, _] = h.dims();
        let last = self.head(h.narrow(1, s - 1, 1));
        let v = last.dims()[2];
        last.reshape([b, v])
    }

    fn hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        keep: bool,
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
        self.hidden_with(input_ids, cache, keep, None)
    }

    /// Final hidden states (and every block's output with `keep`), continuing `cache`, or over
    /// packed documents (positions restart in each: RoPE tables for `0..longest`).
    fn hidden_with(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        keep: bool,
        packing: Option<&Packing>,
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
        let [b, s] = input_ids.dims();
        if let Some(p) = packing {
            assert_eq!(
                (b, s),
                (p.rows().len(), p.seq()),
                "packing describes {} rows of {} positions, the batch is [{b}, {s}]",
                p.rows().len(),
                p.seq()
            );
        }
        let device = input_ids.device();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let dtype = self.dtype();
        let mut x = self.model.embed_tokens.forward(input_ids);
        if x.dtype() != dtype.burn() {
            x = x.cast(burn::tensor::FloatDType::from(dtype.burn()));
        }
        let len = packing.map_or(s, Packing::max_len);
        let (cos, sin) = self.model.rope.tables::<B>(start, len, dtype, &device);
        let mut outs = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            x = match packing {
                Some(p) => layer.forward_packed(x, cos.clone(), sin.clone(), p),
                None => match cache.as_mut() {
                    Some(c) if !c.left_pad.is_empty() => layer.forward_padded(
                        x,
                        cos.clone(),
                        sin.clone(),
                        &mut c.layers[i],
                        &c.left_pad,
                    ),
                    c => {
                        let slot = c.map(|c| &mut c.layers[i]);
                        layer.forward(x, cos.clone(), sin.clone(), slot)
                    }
                },
            };
            if keep {
                outs.push(x.clone());
            }
        }
        if let Some(c) = cache {
            c.len += s;
        }
        (self.model.norm.forward(x), outs)
    }

    /// Project final hidden states to vocabulary logits (tied: `h · embed_tokensᵀ`).
    pub fn head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let w = self.model.embed_tokens.weight.val();
                let w = if w.dtype() == h.dtype() {
                    w
                } else {
                    w.cast(burn::tensor::FloatDType::from(h.dtype()))
                };
                let [b, s, d] = h.dims();
                let logits = ops::linear(h.reshape([b * s, d]), w);
                let v = logits.dims()[1];
                logits.reshape([b, s, v])
            }
        }
    }
}

/// A parameter with its HF name. 1-D and 2-D parameters are both flattened into this view.
#[derive(Debug, Clone)]
pub struct NamedParam<B: Backend> {
    /// HF tensor name.
    pub name: String,
    /// Parameter id (for optimizers and gradients).
    pub id: ParamId,
    /// Shape.
    pub shape: Vec<usize>,
    /// The value, flattened to 1-D (a view; no copy).
    pub value: Tensor<B, 1>,
}

/// Collects parameters with their HF names.
struct NamedParams<B: Backend> {
    out: Vec<NamedParam<B>>,
}

impl<B: Backend> NamedVisitor<B> for NamedParams<B> {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let n: usize = shape.iter().product();
        self.out.push(NamedParam {
            name: name.to_string(),
            id: param.id,
            shape,
            value: tensor.reshape([n]),
        });
    }
}

/// Mean causal-LM cross-entropy over the positions where `mask` is true, transformers-style:
/// position `t` predicts token `t+1`; logits are upcast to f32 first.
///
/// Returns `(sum of token losses, number of predicted tokens)` so that callers can aggregate
/// over batches exactly as one mean over all tokens.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - input_ids: `[batch, seq]`
/// - mask: `[batch, seq]`, 1.0 for real tokens, 0.0 for padding (float, any dtype)
pub fn causal_lm_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let count = ops::pair_mask(mask.clone()).sum();
    (ops::causal_ce(logits, input_ids, mask), count)
}

/// Sum of the causal-LM cross-entropy with per-position weights: position `t` predicts token
/// `t+1` with weight `weights[t]` (supervised fine-tuning: 1 where token `t+1` is a trained
/// label and starts no new packed document, else 0; the last column is ignored). Logits are
/// upcast to f32 first. Returns `(sum of weighted token losses, sum of weights)`.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`; input_ids, weights: `[batch, seq]`
pub fn causal_lm_loss_weighted<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let count = weight_sum(weights.clone());
    (ops::causal_ce_weighted(logits, input_ids, weights), count)
}

/// The sum of the loss weights `[batch, seq]` that count (the last column has no target), f32.
fn weight_sum<B: Backend>(weights: Tensor<B, 2>) -> Tensor<B, 1> {
    let [_, s] = weights.dims();
    weights
        .narrow(1, 0, s - 1)
        .cast(burn::tensor::FloatDType::F32)
        .sum()
}

impl<B: burn::tensor::backend::AutodiffBackend> LlamaForCausalLM<B> {
    /// The gradient of every parameter by HF name after `loss.backward()` (`None` for frozen
    /// parameters and parameters the loss does not depend on), flattened to 1-D.
    pub fn named_grads(
        &self,
        grads: &B::Gradients,
    ) -> Vec<(String, Option<Tensor<B::InnerBackend, 1>>)> {
        struct V<'g, B: burn::tensor::backend::AutodiffBackend> {
            grads: &'g B::Gradients,
            out: Vec<(String, Option<Tensor<B::InnerBackend, 1>>)>,
        }
        impl<B: burn::tensor::backend::AutodiffBackend> NamedVisitor<B> for V<'_, B> {
            fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
                let g = param.val().grad(self.grads).map(|g| {
                    let n = g.shape().num_elements();
                    g.reshape([n])
                });
                self.out.push((name.to_string(), g));
            }
        }
        let mut v = V::<B> {
            grads,
            out: Vec::new(),
        };
        visit_named(self, &mut v);
        v.out
    }
}
