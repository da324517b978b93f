//! Memory planning: the predicted peak memory of a training run, from the model's configuration
//! and the run's settings alone (no weight is read), and whether it fits the device.
//!
//! [`MemoryPlan::for_training`] is a pure function of a [`LlamaConfig`] and [`PlanInputs`]
//! (what trains, dtype, sequence length, micro-batch, accumulation, activation checkpointing and
//! whether the fused kernels run). It counts what *this* code keeps alive, not a textbook
//! estimate:
//!
//! - **weights**: frozen ones in the run's dtype; trainable ones always in f32 (with `bf16`/`f16`
//!   they are the f32 master weights of mixed precision, see
//!   [`LlamaForCausalLM::mixed_precision`](llama_pro_core::model::LlamaForCausalLM::mixed_precision));
//!   LoRA adapters (f32) when attached. Mixed precision also casts every trainable matrix to the
//!   compute dtype in each forward, and the matmul keeps that copy for its backward.
//! - **gradients**: f32, trainable parameters only (frozen ones are detached); with gradient
//!   accumulation the running sum lives through every micro-batch.
//! - **AdamW**: two f32 moments per trainable parameter (burn creates them on the first step).
//! - **activations**: what the autodiff graph holds at the end of the forward pass, layer by layer.
//!   With the fused kernels (`ops/kernel.rs`): `LinearStep` keeps its input only when its weight
//!   trains, `RmsNormStep` keeps x and the f32 row statistic, `SwigluStep` gate and up,
//!   `AttentionStep` q, k, v, the output and the `[batch, heads, seq]` log-sum-exp: O(seq), the
//!   probabilities are recomputed. Without kernels (`ops/composed.rs`: the GPU backends until
//!   theirs land, bf16/f16 on the CPU, NdArray) burn's autodiff keeps what its ops save, and its
//!   decomposed attention keeps three `[batch, heads, seq, seq]` tensors per block (exp's input,
//!   the exponentials, the probabilities): O(seq²). The residual adds save nothing.
//!   Blocks below the lowest trainable parameter keep nothing: their inputs and weights do not
//!   require gradients, so burn records their ops untracked (`OpsKind::UnTracked`) and drops every
//!   intermediate as the forward goes; the plan counts no activation for them, as the code does.
//! - **activation checkpointing** (burn's `BalancedCheckpointing`): memory-bound ops (adds,
//!   reshapes, element-wise products, exp) are recomputed in the backward pass, and to do that
//!   burn keeps, *during the forward pass*, the outputs of the compute-bound ops (matmuls, casts,
//!   our kernels) that feed them; the ones nothing needs are dropped when the backward starts. On
//!   the composed path that trades the SwiGLU and softmax intermediates for the matmul outputs
//!   (less memory). With the fused kernels there is nothing to recompute (they keep their own
//!   state) while the reshapes after each kernel still keep its output: checkpointing *adds*
//!   about 2–4 `[tokens, hidden]` buffers per block. The plan says so rather than pretend.
//! - **LM head and loss**: with kernels (CPU and CubeCL) they run fused over chunks of rows
//!   (`ops::causal_head_ce_weighted`): one chunk of logits (≤ 2²⁶ elements) and its f32
//!   log-sum-exp at a time, the gradient written over it; the forward computes the head's
//!   gradients along and keeps `dh` `[tokens, hidden]` (and the head weight's gradient when it
//!   trains). Composed (burn's f32 log-softmax), the whole `[tokens, vocab]` logits in the
//!   activation dtype, the shifted f32 logits kept, and about three f32 `[tokens, vocab]`
//!   tensors live at the loss's peak.
//! - **transients**: one block's backward working set, the optimizer update (the fused AdamW
//!   writes a new parameter and moments before the old ones are freed), and an allowance for the
//!   framework and allocator.
//!
//! The peak is the largest of the phases of a step (end of forward, loss backward, each block's
//! backward, end of backward, optimizer update) plus the allowance. Checked against the CPU's
//! live and resident peaks in `tests/it/memory.rs` ([`measure_training_peak`]): the live peak is
//! within 7% of the plan before the allowance for the S and M benchmark shapes; the figures are
//! in the README ("Memory planning").

use std::fmt;

use burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn;
use llama_pro_core::device::DeviceSpec;
use llama_pro_core::expand::{LayerMap, layer_of};
use llama_pro_core::freeze::{SelectContext, Selection};
use llama_pro_core::linear::{LORA_TARGETS, LoraConfig};
use llama_pro_core::{DType, HfConfig, LlamaConfig};

use crate::config::{Method, TrainConfig};
use crate::error::{Result, TrainError};

/// How attention (and the other fused operations) run, which decides what the backward keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// The fused kernels of the kernel interface (`ops/kernel.rs`): attention keeps the
    /// `[batch, heads, seq]` log-sum-exp and recomputes the probabilities (O(seq)).
    Kernel,
    /// Composed from burn tensor ops (no kernel for this backend or dtype): burn's decomposed
    /// attention keeps `[batch, heads, seq, seq]` tensors (O(seq²)), and so do the other ops
    /// keep what burn's autodiff saves for them.
    Composed,
}

impl AttentionKind {
    /// Every kind, as named on the command line.
    pub const ALL: [AttentionKind; 2] = [Self::Kernel, Self::Composed];

    /// The name on the command line and in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Composed => "composed",
        }
    }

    /// What a run on `device` in `dtype` uses, decided as the ops dispatch decides it, by the
    /// backend's type (no device is started): the CPU kernels handle f32 only (bf16/f16 run
    /// composed); a GPU backend uses kernels when it has them (`ops::has_kernels`), in any dtype.
    /// `LLAMA_PRO_KERNELS=0` turns them off, here as in the run.
    pub fn default_for(device: DeviceSpec, dtype: DType) -> Self {
        let kernels = match device {
            DeviceSpec::Cpu => dtype == DType::F32 && kernels::cpu(),
            DeviceSpec::Wgpu(_) => kernels::wgpu(),
            DeviceSpec::Cuda(_) => kernels::cuda(),
        };
        if kernels {
            Self::Kernel
        } else {
            Self::Composed
        }
    }
}

/// Whether the autodiff backend a run on each device uses has kernels (by type: nothing starts).
mod kernels {
    #[allow(unused_imports)]
    use llama_pro_core::burn::backend::Autodiff;
    #[allow(unused_imports)]
    use llama_pro_core::ops::has_kernels;

    #[cfg(feature = "cpu")]
    pub fn cpu() -> bool {
        has_kernels::<Autodiff<llama_pro_core::burn::backend::Flex>>()
    }
    #[cfg(not(feature = "cpu"))]
    pub fn cpu() -> bool {
        false
    }
    #[cfg(feature = "wgpu")]
    pub fn wgpu() -> bool {
        has_kernels::<Autodiff<llama_pro_core::device::WgpuBackend>>()
    }
    #[cfg(not(feature = "wgpu"))]
    pub fn wgpu() -> bool {
        false
    }
    #[cfg(feature = "cuda")]
    pub fn cuda() -> bool {
        has_kernels::<Autodiff<llama_pro_core::device::CudaBackend>>()
    }
    #[cfg(not(feature = "cuda"))]
    pub fn cuda() -> bool {
        false
    }
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionKind {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                TrainError::setting("attention", format!("{s:?}: expected kernel or composed"))
            })
    }
}

/// What a plan is computed from, besides the model's configuration.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    /// What trains (the run's `trainable`, or its method's default).
    pub selection: Selection,
    /// Which blocks are new (`LayerMap::identity` for a model that was never expanded).
    pub map: LayerMap,
    /// LoRA adapters attached to every block (`Method::Lora`).
    pub lora: Option<LoraConfig>,
    /// Compute dtype: f32, or bf16/f16 mixed precision.
    pub dtype: DType,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the summed gradients live through all of them).
    pub grad_accum: usize,
    /// burn's balanced activation checkpointing.
    pub checkpointing: bool,
    /// Fused kernels or composed ops.
    pub attention: AttentionKind,
    /// The device (for the framework allowance).
    pub device: DeviceSpec,
    /// A short name of what trains, for display (`pro`, `full`, `lora`…).
    pub label: String,
    /// Data-parallel workers of the run (each device holds one replica; the plan is per device).
    pub workers: usize,
}

impl PlanInputs {
    /// `selection` over a model with layer map `map`, with the trainer's defaults for the rest:
    /// f32, 8 sequences of 512 tokens, no accumulation, no checkpointing, the kernels, CPU.
    pub fn new(selection: Selection, map: LayerMap) -> Self {
        Self {
            label: selection.to_string(),
            selection,
            map,
            lora: None,
            dtype: DType::F32,
            seq_len: 512,
            batch_size: 8,
            grad_accum: 1,
            checkpointing: false,
            attention: AttentionKind::Kernel,
            device: DeviceSpec::Cpu,
            workers: 1,
        }
    }

    /// The inputs of the run `config` would start on the model described by `hf` (its
    /// `config.json`): the same selection, layer map, adapters, dtype and shapes, checked as the
    /// run checks them (the errors name the key). The kernels or composed ops are those the run's
    /// device and dtype get ([`AttentionKind::default_for`]).
    pub fn from_train_config(config: &TrainConfig, hf: &HfConfig) -> Result<Self> {
        let c = &hf.config;
        for (key, v) in [
            ("batch_size", config.batch_size),
            ("grad_accum", config.grad_accum),
        ] {
            if v == 0 {
                return Err(TrainError::setting(key, "must be at least 1"));
            }
        }
        if config.seq_len < 2 {
            return Err(TrainError::setting(
                "seq_len",
                format!("must be at least 2, got {}", config.seq_len),
            ));
        }
        let map = LayerMap::from_config(&hf.raw, c.num_hidden_layers, &hf.path)?;
        let selection = config.selection(c.num_hidden_layers)?;
        let lora = match config.method {
            Method::Lora => {
                if config.lora_rank == 0 {
                    return Err(TrainError::setting("lora_rank", "must be at least 1"));
                }
                if let Some(t) = config
                    .lora_targets
                    .iter()
                    .find(|t| !LORA_TARGETS.contains(&t.as_str()))
                {
                    return Err(TrainError::setting(
                        "lora_targets",
                        format!(
                            "LoRA target {t:?}: expected some of {}",
                            LORA_TARGETS.join(", ")
                        ),
                    ));
                }
                Some(LoraConfig {
                    rank: config.lora_rank,
                    alpha: config.lora_alpha,
                    targets: config.lora_targets.clone(),
                })
            }
            _ => None,
        };
        let inputs = Self {
            label: match &config.trainable {
                Some(s) => format!("{} (trainable {s})", config.method),
                None => config.method.to_string(),
            },
            selection,
            map,
            lora,
            dtype: config.dtype,
            seq_len: config.seq_len,
            batch_size: config.batch_size,
            grad_accum: config.grad_accum,
            checkpointing: config.activation_checkpointing,
            workers: config.worker_devices().len() * config.nodes.max(1),
            attention: AttentionKind::default_for(config.primary_device(), config.dtype),
            device: config.primary_device(),
        };
        // What the run's `set_trainable` checks: a valid selection that selects something.
        let params = parameter_list(c, inputs.lora.as_ref());
        let ctx = SelectContext {
            map: &inputs.map,
            tied: c.tie_word_embeddings,
        };
        if inputs.map.len() != c.num_hidden_layers {
            return Err(TrainError::Invalid(format!(
                "layer map has {} layers but the model has {}",
                inputs.map.len(),
                c.num_hidden_layers
            )));
        }
        llama_pro_core::freeze::summarize(
            params.iter().map(|(n, s)| (n.as_str(), s.iter().product())),
            &inputs.selection,
            &ctx,
        )?;
        Ok(inputs)
    }
}

/// Every parameter of the model the run trains, by HF name with its shape: the checkpoint's
/// tensors ([`LlamaConfig::tensor_shapes`]) plus the LoRA adapters
/// (`<layer>.lora_a` `[rank, in]`, `<layer>.lora_b` `[out, rank]`) when attached.
pub fn parameter_list(
    config: &LlamaConfig,
    lora: Option<&LoraConfig>,
) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (name, shape) in config.tensor_shapes() {
        let adapter = lora.and_then(|l| {
            let layer = name.strip_suffix(".weight")?;
            let (_, rest) = layer_of(layer)?;
            let target = rest.rsplit('.').next()?;
            l.targets
                .iter()
                .any(|t| t == target)
                .then(|| (layer.to_string(), l.rank, shape.clone()))
        });
        out.push((name, shape));
        if let Some((layer, r, shape)) = adapter {
            out.push((format!("{layer}.lora_a"), vec![r, shape[1]]));
            out.push((format!("{layer}.lora_b"), vec![shape[0], r]));
        }
    }
    out
}

/// One named amount of memory in a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct LineItem {
    /// Stable key (`weights_frozen`, `weights_trainable`, `lora_adapters`, `weight_casts`,
    /// `gradients`, `all_reduce`, `adamw`, `activations`, `logits_loss`, `backward_work`, `optimizer_update`,
    /// `allowance`).
    pub key: &'static str,
    /// What it is, for people.
    pub label: String,
    /// Bytes.
    pub bytes: u64,
    /// How it was counted.
    pub note: String,
}

/// A moment of the training step and the memory live then.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    /// Which moment.
    pub name: String,
    /// What is live then (line item keys, some only in part).
    pub parts: String,
    /// Bytes live then (without the allowance).
    pub bytes: u64,
}

/// The predicted memory of a training run. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// What trains (display).
    pub label: String,
    /// Compute dtype.
    pub dtype: DType,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Kernels or composed ops.
    pub attention: AttentionKind,
    /// The device the allowance was sized for.
    pub device: DeviceSpec,
    /// Parameters of the model (adapters included).
    pub parameters: u64,
    /// Trainable parameters.
    pub trainable: u64,
    /// Blocks whose activations are kept (from the lowest trainable one up).
    pub tracked_blocks: usize,
    /// The line items.
    pub items: Vec<LineItem>,
    /// The phases of a step; the peak is the largest.
    pub phases: Vec<Phase>,
    /// Index of the largest phase in `phases`.
    pub peak_phase: usize,
}

/// Whether each operation of a block has a trainable parameter (weight, bias or adapter).
#[derive(Debug, Clone, Copy, Default)]
struct BlockTrains {
    n1: bool,
    q: bool,
    k: bool,
    v: bool,
    o: bool,
    n2: bool,
    gate: bool,
    up: bool,
    down: bool,
    /// Adapter ranks on [q, k, v, o, gate, up, down] (0: none).
    lora: [usize; 7],
    /// Trainable elements of the block.
    trainable: u64,
}

/// Activation bytes of one block.
#[derive(Debug, Clone, Copy, Default)]
struct BlockAct {
    /// Held at the end of the forward pass.
    fwd: u64,
    /// Held once the backward pass starts (checkpointing drops what nothing needs).
    bwd: u64,
    /// Its backward's transient working set.
    work: u64,
}

/// Sizes in bytes of the activation shapes of one micro-batch.
struct Shapes {
    /// Tokens of the micro-batch.
    t: u64,
    /// Activation element size.
    e: u64,
    d: u64,
    q: u64,
    kv: u64,
    f: u64,
    heads: u64,
    vocab: u64,
    /// `[batch, heads, seq, seq]` in the activation dtype.
    bhss: u64,
    /// K/V width after repetition for GQA (composed attention materialises it).
    kv_rep: u64,
}

impl Shapes {
    fn td(&self) -> u64 {
        self.t * self.d * self.e
    }
    fn tf(&self) -> u64 {
        self.t * self.f * self.e
    }
    fn tq(&self) -> u64 {
        self.t * self.q * self.e
    }
    fn tkv(&self) -> u64 {
        self.t * self.kv * self.e
    }
    /// One f32 value per row.
    fn stat(&self) -> u64 {
        self.t * 4
    }
    /// `[tokens, hidden]` in f32 (RMSNorm statistics are computed in f32).
    fn td32(&self) -> u64 {
        self.t * self.d * 4
    }
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Bytes in binary units: `12.3 GiB`, `512.0 MiB`, `3.0 KiB`, `12 B`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

impl MemoryPlan {
    /// The plan of one optimizer step of training `config` as `inputs` say (steady state: the
    /// AdamW moments exist). Pure: nothing is allocated or read. A selection that does not fit
    /// the model selects what it matches (check it with [`PlanInputs::from_train_config`]).
    pub fn for_training(config: &LlamaConfig, inputs: &PlanInputs) -> MemoryPlan {
        let c = config;
        let params = parameter_list(c, inputs.lora.as_ref());
        let ctx = SelectContext {
            map: &inputs.map,
            tied: c.tie_word_embeddings,
        };
        let mixed = inputs.dtype != DType::F32;
        let e = inputs.dtype.size() as u64;
        let composed = inputs.attention == AttentionKind::Composed;
        let ck = inputs.checkpointing;
        let l = c.num_hidden_layers;

        // ---- parameters by trainability --------------------------------------------------
        let mut blocks = vec![BlockTrains::default(); l];
        let (mut frozen, mut trainable, mut adapters) = (0u64, 0u64, 0u64);
        let (mut casts, mut largest, mut total) = (0u64, 0u64, 0u64);
        let (mut embed_trains, mut norm_trains, mut head_trains) = (false, false, false);
        let mut head_grad = 0u64;
        for (name, shape) in &params {
            let n: u64 = shape.iter().product::<usize>() as u64;
            total += n;
            let trains = inputs.selection.matches(name, &ctx);
            if !trains {
                frozen += n;
                continue;
            }
            largest = largest.max(n);
            let lora = llama_pro_core::freeze::is_lora(name);
            if lora {
                adapters += n;
            } else {
                trainable += n;
            }
            // Matrices a matmul multiplies by are cast to the compute dtype each forward.
            let matmul =
                shape.len() == 2 && (name != "model.embed_tokens.weight" || c.tie_word_embeddings);
            if mixed && matmul {
                casts += n * e;
            }
            match layer_of(name) {
                Some((i, rest)) if i < l => {
                    let b = &mut blocks[i];
                    b.trainable += n;
                    let ops = [
                        "self_attn.q_proj.",
                        "self_attn.k_proj.",
                        "self_attn.v_proj.",
                        "self_attn.o_proj.",
                        "mlp.gate_proj.",
                        "mlp.up_proj.",
                        "mlp.down_proj.",
                    ];
                    if let Some(k) = ops.iter().position(|p| rest.starts_with(p)) {
                        *[
                            &mut b.q,
                            &mut b.k,
                            &mut b.v,
                            &mut b.o,
                            &mut b.gate,
                            &mut b.up,
                            &mut b.down,
                        ][k] = true;
                        if lora && rest.ends_with(".lora_a") {
                            b.lora[k] = shape[0];
                        }
                    } else if rest.starts_with("input_layernorm.") {
                        b.n1 = true;
                    } else if rest.starts_with("post_attention_layernorm.") {
                        b.n2 = true;
                    }
                }
                _ => {
                    if name.starts_with("model.embed_tokens.") {
                        embed_trains = true;
                    } else if name.starts_with("model.norm.") {
                        norm_trains = true;
                    } else if name.starts_with("lm_head.") {
                        head_trains = true;
                    }
                    head_grad += 4 * n;
                }
            }
        }
        let all_trainable = trainable + adapters;
        let weight_bytes_frozen = frozen * if mixed { e } else { 4 };
        let grads = 4 * all_trainable;
        let adamw = 8 * all_trainable;

        // ---- activations, block by block --------------------------------------------------
        let (b, s) = (inputs.batch_size as u64, inputs.seq_len as u64);
        let heads = c.num_attention_heads as u64;
        let hd = c.head_dim as u64;
        let sh = Shapes {
            t: b * s,
            e,
            d: c.hidden_size as u64,
            q: heads * hd,
            kv: c.num_key_value_heads as u64 * hd,
            f: c.intermediate_size as u64,
            heads,
            vocab: c.vocab_size as u64,
            bhss: b * heads * s * s * e,
            kv_rep: if c.num_key_value_heads < c.num_attention_heads {
                heads * hd
            } else {
                c.num_key_value_heads as u64 * hd
            },
        };
        let mut tracked = embed_trains;
        let mut acts = Vec::with_capacity(l);
        let mut lowest = None;
        for (i, bt) in blocks.iter().enumerate() {
            let (act, out) = if composed {
                composed_block(&sh, tracked, bt, ck, mixed)
            } else {
                kernel_block(&sh, tracked, bt, ck)
            };
            if out && lowest.is_none() {
                lowest = Some(i);
            }
            tracked = out;
            acts.push(act);
        }
        let tracked_blocks = lowest.map_or(0, |i| l - i);
        // RoPE tables [seq, head_dim], cos and sin, shared by every block.
        let rope = 2 * s * hd * e;

        // ---- final norm, head and loss ------------------------------------------------------
        let norm_tracked = tracked || norm_trains;
        let head_w_trains = head_trains || (c.tie_word_embeddings && embed_trains);
        let mut head_act = 0u64;
        if norm_tracked {
            head_act += if composed && mixed {
                sh.td32()
            } else {
                sh.td()
            } + sh.stat();
            if composed && norm_trains {
                head_act += sh.td();
            }
            if ck && !composed {
                head_act += sh.td(); // the norm's output, kept by its reshape
            }
        }
        if head_w_trains && composed {
            head_act += sh.td(); // lm_head keeps its input (the fused loss does not)
        }
        let tv = sh.t * sh.vocab;
        // The peak of the loss forward (what it keeps and its transients), and of the loss
        // backward (until the head's input gradient).
        let (loss_fwd_peak, loss_bwd_peak, loss_note) = if composed {
            // Composed (burn's default log-softmax in f32): the forward keeps exp's input, the
            // shifted logits (with checkpointing: the f32 logits instead, and recomputes); the
            // shifted logits, the exponential and the log-probabilities coexist once. The
            // backward holds about three f32 [tokens, vocab] tensors (the scattered gradient,
            // exp's gradient, their sum), plus in mixed precision the f32 copy and the gradient
            // cast back to the logits' dtype. (Fitted to the CPU's live peaks, `tests/it/memory.rs`.)
            let cast_back = if mixed { 2 * tv * e } else { 0 };
            let held = if ck { tv * 4 } else { 0 };
            (
                held + 3 * tv * 4,
                held + 3 * tv * 4 + cast_back,
                format!(
                    "[{} x {}] logits ({}) through burn's composed f32 log-softmax: about 3 f32 copies at its peak",
                    sh.t, sh.vocab, inputs.dtype
                ),
            )
        } else {
            // Kernels: the head and the loss fused over chunks of rows
            // (`ops::causal_head_ce_weighted`): one chunk of logits (and its f32 log-sum-exp) at
            // a time, the gradient written over it; the forward already computes the head's
            // gradients (the loss is the last operation) and keeps `dh` `[tokens, hidden]` and,
            // when the head's weight trains, its gradient in the compute dtype (summed in f32
            // over the chunks). The chunks' `dh` are concatenated at the end (twice `dh` for a
            // moment). Backward only rescales them by the upstream gradient, in f32.
            let rows =
                llama_pro_core::ops::tiled::block_rows(sh.t as usize, 1, sh.vocab as usize) as u64;
            let chunk = rows * sh.vocab * e + rows * 4;
            let vd = sh.vocab * sh.d;
            let dw_keep = if head_w_trains { vd * e } else { 0 };
            // f32 sum, the chunk's gradient and its f32 cast.
            let dw_work = if head_w_trains {
                2 * vd * 4 + vd * e
            } else {
                0
            };
            let fwd = (sh.td() + chunk + dw_work)
                .max(2 * sh.td() + if head_w_trains { vd * 4 } else { 0 })
                .max(sh.td() + if head_w_trains { vd * 4 + vd * e } else { 0 });
            let rescale = sh.td32() + if head_w_trains { vd * 4 } else { 0 };
            (
                fwd,
                sh.td() + dw_keep + rescale,
                format!(
                    "head fused with the loss over chunks of {rows} rows: [{rows} x {}] logits ({}) at a time; keeps the head's input gradient{}",
                    sh.vocab,
                    inputs.dtype,
                    if head_w_trains {
                        " and its weight's"
                    } else {
                        ""
                    }
                ),
            )
        };

        // ---- phases --------------------------------------------------------------------------
        let weights = weight_bytes_frozen + 4 * trainable + 4 * adapters;
        let persistent = weights + adamw;
        let accum = if inputs.grad_accum > 1 { grads } else { 0 };
        let step_base = persistent + casts + accum;
        let fwd_acts: u64 = acts.iter().map(|a| a.fwd).sum::<u64>() + head_act + rope;
        let bwd_acts: u64 = acts.iter().map(|a| a.bwd).sum::<u64>() + head_act + rope;
        let max_work = acts.iter().map(|a| a.work).max().unwrap_or(0);
        let mut phases = vec![
            Phase {
                name: "end of forward".into(),
                parts: format!(
                    "weights + AdamW + activations + logits/loss{}{}",
                    if accum > 0 {
                        " + accumulated gradients"
                    } else {
                        ""
                    },
                    if casts > 0 { " + weight casts" } else { "" }
                ),
                bytes: step_base + fwd_acts + loss_fwd_peak,
            },
            Phase {
                name: "loss backward".into(),
                parts: "weights + AdamW + activations + logits/loss backward + head gradients"
                    .into(),
                bytes: step_base + bwd_acts + loss_bwd_peak + head_grad,
            },
        ];
        // Backward of block i: blocks below still hold their activations, blocks above have
        // produced their gradients.
        let mut best_block = (0u64, 0usize);
        for i in (0..l).rev() {
            if acts[i].bwd == 0 && acts[i].work == 0 {
                continue;
            }
            let below: u64 = acts[..=i].iter().map(|a| a.bwd).sum();
            let above: u64 = blocks[i + 1..].iter().map(|b| 4 * b.trainable).sum();
            let bytes = step_base + below + rope + acts[i].work + above + head_grad;
            if bytes > best_block.0 {
                best_block = (bytes, i);
            }
        }
        if best_block.0 > 0 {
            phases.push(Phase {
                name: format!("backward of block {}", best_block.1),
                parts: "weights + AdamW + activations of the blocks below + working set + gradients above"
                    .into(),
                bytes: best_block.0,
            });
        }
        // The fused AdamW runs where the backend has kernels (its f32 masters whatever the
        // compute dtype: on the CPU also in bf16 runs); burn's composed AdamW elsewhere.
        let fused_adamw = !composed || inputs.device == DeviceSpec::Cpu;
        let update_factor = if fused_adamw { 3 } else { 5 };
        let update = update_factor * 4 * largest;
        phases.push(Phase {
            name: "end of backward".into(),
            parts: if accum > 0 {
                "weights + AdamW + gradients + accumulated gradients".into()
            } else {
                "weights + AdamW + gradients".into()
            },
            bytes: persistent + grads + accum + if accum > 0 { 4 * largest } else { 0 },
        });
        // Data parallel: the gradients flattened into one buffer, summed across the workers (the
        // sum is a new buffer) and split back; the accumulated gradients are consumed.
        let reduce = if inputs.workers > 1 { 2 * grads } else { 0 };
        if reduce > 0 {
            phases.push(Phase {
                name: "gradient all-reduce".into(),
                parts: "weights + AdamW + gradients + flattened gradients and their sum".into(),
                bytes: persistent + grads + reduce,
            });
        }
        phases.push(Phase {
            name: "optimizer step".into(),
            parts: "weights + AdamW + gradients + update".into(),
            bytes: persistent + grads + update,
        });
        let peak_phase = phases
            .iter()
            .enumerate()
            .max_by_key(|(_, p)| p.bytes)
            .map_or(0, |(i, _)| i);
        let peak = phases[peak_phase].bytes;
        let (fixed, share, allowance_note) = allowance(inputs.device);
        let allowance = fixed + (peak as f64 * share) as u64;

        // ---- line items ----------------------------------------------------------------------
        let wdt = if mixed { inputs.dtype } else { DType::F32 };
        let mut items = vec![LineItem {
            key: "weights_frozen",
            label: format!("frozen weights ({wdt})"),
            bytes: weight_bytes_frozen,
            note: format!("{frozen} parameters"),
        }];
        items.push(LineItem {
            key: "weights_trainable",
            label: if mixed {
                "trainable weights (f32 masters)".into()
            } else {
                "trainable weights (f32)".into()
            },
            bytes: 4 * trainable,
            note: format!("{trainable} parameters"),
        });
        if inputs.lora.is_some() {
            items.push(LineItem {
                key: "lora_adapters",
                label: "LoRA adapters (f32)".into(),
                bytes: 4 * adapters,
                note: format!(
                    "{adapters} parameters{}",
                    if adapters == 0 { " (not trained)" } else { "" }
                ),
            });
        }
        if casts > 0 {
            items.push(LineItem {
                key: "weight_casts",
                label: format!("trainable matrices cast to {}", inputs.dtype),
                bytes: casts,
                note: "mixed precision: each forward's copy, kept for the backward".into(),
            });
        }
        items.push(LineItem {
            key: "gradients",
            label: "gradients (f32)".into(),
            bytes: grads,
            note: if accum > 0 {
                format!(
                    "trainable only; a running sum over {} micro-batches",
                    inputs.grad_accum
                )
            } else {
                "trainable parameters only".into()
            },
        });
        if reduce > 0 {
            items.push(LineItem {
                key: "all_reduce",
                label: "all-reduce buffers (f32)".into(),
                bytes: reduce,
                note: format!(
                    "{} data-parallel workers: the flattened gradients and their sum (transient)",
                    inputs.workers
                ),
            });
        }
        items.push(LineItem {
            key: "adamw",
            label: "AdamW moments (2 x f32)".into(),
            bytes: adamw,
            note: "trainable parameters only".into(),
        });
        let act_note = {
            let below = lowest.unwrap_or(l);
            let mut n = format!(
                "{tracked_blocks} of {l} blocks keep activations ({} attention, O(seq{}))",
                inputs.attention,
                if composed { "^2" } else { "" }
            );
            if below > 0 && tracked_blocks < l {
                n += &format!("; the {below} below the lowest trainable one keep none");
            }
            if ck {
                n += if composed {
                    "; checkpointing recomputes the element-wise ops"
                } else {
                    "; checkpointing keeps kernel outputs for its reshapes until the backward (more, not less, with kernels)"
                };
            }
            n
        };
        items.push(LineItem {
            key: "activations",
            label: "activations saved for backward".into(),
            bytes: fwd_acts.max(bwd_acts),
            note: act_note,
        });
        items.push(LineItem {
            key: "logits_loss",
            label: "logits + loss".into(),
            bytes: loss_fwd_peak.max(loss_bwd_peak),
            note: loss_note,
        });
        items.push(LineItem {
            key: "backward_work",
            label: "backward working set".into(),
            bytes: max_work,
            note: "one block's gradients in flight (transient)".into(),
        });
        items.push(LineItem {
            key: "optimizer_update",
            label: "optimizer update".into(),
            bytes: update,
            note: format!(
                "{update_factor} x the largest trainable tensor in f32 (transient, {} AdamW)",
                if update_factor == 3 {
                    "fused"
                } else {
                    "burn's composed"
                }
            ),
        });
        items.push(LineItem {
            key: "allowance",
            label: "framework allowance".into(),
            bytes: allowance,
            note: allowance_note,
        });
        MemoryPlan {
            label: inputs.label.clone(),
            dtype: inputs.dtype,
            seq_len: inputs.seq_len,
            batch_size: inputs.batch_size,
            grad_accum: inputs.grad_accum,
            checkpointing: ck,
            attention: inputs.attention,
            device: inputs.device,
            parameters: total,
            trainable: all_trainable,
            tracked_blocks,
            items,
            phases,
            peak_phase,
        }
    }

    /// The predicted peak: the largest phase plus the framework allowance.
    pub fn total_bytes(&self) -> u64 {
        self.phases[self.peak_phase].bytes + self.bytes("allowance")
    }

    /// The bytes of line item `key` (0 when the plan has no such item).
    pub fn bytes(&self, key: &str) -> u64 {
        self.items
            .iter()
            .find(|i| i.key == key)
            .map_or(0, |i| i.bytes)
    }

    /// The plan as JSON: settings, line items, phases, peak and total, in bytes.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "trainable_label": self.label,
            "dtype": self.dtype.to_string(),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.checkpointing,
            "attention": self.attention.name(),
            "device": self.device.to_string(),
            "parameters": self.parameters,
            "trainable_parameters": self.trainable,
            "tracked_blocks": self.tracked_blocks,
            "items": self.items.iter().map(|i| serde_json::json!({
                "key": i.key, "label": i.label, "bytes": i.bytes, "note": i.note,
            })).collect::<Vec<_>>(),
            "phases": self.phases.iter().map(|p| serde_json::json!({
                "name": p.name, "parts": p.parts, "bytes": p.bytes,
            })).collect::<Vec<_>>(),
            "peak_phase": self.phases[self.peak_phase].name,
            "total_bytes": self.total_bytes(),
        })
    }

    /// Whether the plan fits in `capacity` bytes, as one line: `fits (…)` or
    /// `does not fit (needs X, device has Y)`.
    pub fn fit_line(&self, capacity: u64) -> String {
        let need = self.total_bytes();
        if need <= capacity {
            format!(
                "fits ({} of {}, {:.1}%)",
                human(need),
                human(capacity),
                100.0 * need as f64 / capacity as f64
            )
        } else {
            format!(
                "does not fit (needs {}, device has {})",
                human(need),
                human(capacity)
            )
        }
    }
}

/// The fixed part, the share of the peak, and the explanation of the framework allowance.
fn allowance(device: DeviceSpec) -> (u64, f64, String) {
    match device {
        DeviceSpec::Cpu => (
            24 << 20,
            0.10,
            "24 MiB + 10%: freed memory glibc keeps and fragments, burn's thread pool and graph (fitted to resident peaks on the CPU)".into(),
        ),
        DeviceSpec::Cuda(_) | DeviceSpec::Wgpu(_) => (
            768 << 20,
            0.05,
            "768 MiB + 5%: driver context and cubecl's memory pools (an estimate, not yet measured on a GPU)".into(),
        ),
    }
}

/// What one block keeps with the fused kernels, and whether its output requires a gradient.
/// `tin`: its input requires a gradient.
fn kernel_block(sh: &Shapes, tin: bool, bt: &BlockTrains, ck: bool) -> (BlockAct, bool) {
    let (mut keep, mut fwd_only) = (0u64, 0u64);
    let lows = |ks: &[usize]| -> u64 {
        ks.iter()
            .map(|&k| sh.t * bt.lora[k] as u64 * sh.e)
            .sum::<u64>()
    };
    // input_layernorm: RmsNormStep keeps x and 1/rms when anything below or its weight trains.
    let n1 = tin || bt.n1;
    if n1 {
        keep += sh.td() + sh.stat();
    }
    // q/k/v: LinearStep keeps the (shared) normed input when a weight trains.
    let qkv_w = bt.q || bt.k || bt.v;
    if qkv_w {
        keep += sh.td();
    } else if ck && n1 {
        fwd_only += sh.td(); // the norm's output, kept by its reshape until the backward
    }
    keep += lows(&[0, 1, 2, 3]);
    // AttentionStep keeps q, k, v, the output and the log-sum-exp.
    let att = n1 || qkv_w;
    if att {
        keep += 2 * sh.tq() + 2 * sh.tkv() + sh.t * sh.heads * 4;
    } else if bt.o {
        keep += sh.tq(); // o_proj's input
    }
    let a = att || bt.o;
    if ck && a {
        fwd_only += sh.td(); // o_proj's output, kept by its reshape
    }
    // post_attention_layernorm on h = x + attn.
    let th = tin || a;
    let n2 = th || bt.n2;
    if n2 {
        keep += sh.td() + sh.stat();
    }
    let gu_w = bt.gate || bt.up;
    if gu_w {
        keep += sh.td();
    } else if ck && n2 {
        fwd_only += sh.td();
    }
    keep += lows(&[4, 5, 6]);
    // SwigluStep keeps gate and up; down_proj keeps its input when it trains.
    let mlp = n2 || gu_w;
    if mlp {
        keep += 2 * sh.tf();
    }
    if bt.down {
        keep += sh.tf();
    }
    let out = th || mlp || bt.down;
    if ck && out {
        fwd_only += sh.td(); // down_proj's output, kept by its reshape
    }
    if ck {
        // LoRA: the scaled adapter output and the base output are kept by the memory-bound
        // scale and add (approximate).
        let d_out = [sh.q, sh.kv, sh.kv, sh.d, sh.f, sh.f, sh.d];
        fwd_only += (0..7)
            .filter(|&k| bt.lora[k] > 0)
            .map(|k| 2 * sh.t * d_out[k] * sh.e)
            .sum::<u64>();
    }
    // Backward: the SwiGLU's dhidden, dgate, dup, or attention's dout, dq, dk, dv, plus the
    // residual stream's gradient and its sum.
    let work = if out {
        sh.t * sh.e * (3 * sh.f).max(2 * sh.q + 2 * sh.kv) + 2 * sh.td()
    } else {
        0
    };
    (
        BlockAct {
            fwd: keep + fwd_only,
            bwd: keep,
            work,
        },
        out,
    )
}

/// What one block keeps when composed from burn ops (burn's autodiff states), and whether its
/// output requires a gradient.
fn composed_block(
    sh: &Shapes,
    tin: bool,
    bt: &BlockTrains,
    ck: bool,
    mixed: bool,
) -> (BlockAct, bool) {
    let (mut keep, mut fwd_only) = (0u64, 0u64);
    // RMSNorm computes in f32: its input as f32 (x itself, or an f32 copy in mixed precision).
    let stat_in = if mixed { sh.td32() } else { sh.td() };
    // The normalised rows kept for a trainable weight's gradient (in f32 for an f32 master).
    let normed = if mixed { sh.td32() } else { sh.td() };
    let small = 3 * sh.stat();
    let qkv_w = bt.q || bt.k || bt.v;
    let gu_w = bt.gate || bt.up;
    let n1 = tin || bt.n1;
    let att = n1 || qkv_w;
    let th = tin || att || bt.o;
    let n2 = th || bt.n2;
    let mlp = n2 || gu_w;
    let out = th || mlp || bt.down;
    let lows: u64 = (0..7).map(|k| sh.t * bt.lora[k] as u64 * sh.e).sum::<u64>();
    if !ck {
        if tin {
            keep += stat_in + small;
        }
        if bt.n1 {
            keep += normed;
        }
        if qkv_w {
            keep += sh.td();
        }
        if att {
            // roped q, k and v (repeated for GQA); exp's input, the exponentials (kept by the
            // division) and the probabilities (kept by the matmul with v).
            keep += sh.tq() + 2 * sh.t * sh.kv_rep * sh.e + 3 * sh.bhss;
        }
        if bt.o {
            keep += sh.tq();
        }
        if th {
            keep += stat_in + small;
        }
        if bt.n2 {
            keep += normed;
        }
        if gu_w {
            keep += sh.td();
        }
        if mlp {
            keep += 4 * sh.tf(); // gate, sigmoid(gate), silu(gate), up
        }
        if bt.down {
            keep += sh.tf();
        }
        keep += lows;
    } else {
        // Balanced checkpointing keeps the compute-bound outputs that feed memory-bound ops.
        if n1 {
            keep += stat_in + small;
            if bt.n1 {
                keep += normed;
            }
        }
        if att {
            keep += sh.tq() + 2 * sh.tkv() + sh.bhss; // q, k, v; masked scores
            fwd_only += sh.bhss; // the raw scores, dropped when the backward starts
            if bt.o {
                keep += sh.tq(); // the attention output, to rebuild o_proj's input
            } else {
                fwd_only += sh.tq();
            }
            fwd_only += sh.td(); // o_proj's output
        }
        if th {
            keep += stat_in + small;
            if bt.n2 {
                keep += normed;
            }
        }
        if mlp {
            keep += 2 * sh.tf(); // gate and up
            fwd_only += sh.td(); // down_proj's output
        }
        keep += lows;
    }
    // Backward: attention's score gradients (about 4 [b, h, s, s], 6 when the probabilities are
    // recomputed), or the SwiGLU chain's (about 5 [t, f], 8 recomputed), plus the residual's.
    let work = if out {
        let att_w = if att {
            (if ck { 6 } else { 4 }) * sh.bhss + 3 * sh.tq()
        } else {
            0
        };
        let mlp_w = (if ck { 8 } else { 5 }) * sh.tf();
        att_w.max(mlp_w) + 2 * sh.td()
    } else {
        0
    };
    (
        BlockAct {
            fwd: keep + fwd_only,
            bwd: keep,
            work,
        },
        out,
    )
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory plan: {}, {}, {} x {} tokens per micro-batch{}, checkpointing {}, {} ops",
            self.label,
            self.dtype,
            self.batch_size,
            self.seq_len,
            if self.grad_accum > 1 {
                format!(" (x{} accumulated)", self.grad_accum)
            } else {
                String::new()
            },
            if self.checkpointing { "on" } else { "off" },
            self.attention
        )?;
        writeln!(
            f,
            "parameters: {} ({} trainable)",
            self.parameters, self.trainable
        )?;
        for i in &self.items {
            writeln!(f, "  {:<34} {:>10}   {}", i.label, human(i.bytes), i.note)?;
        }
        writeln!(f, "phases of a step (the peak is the largest):")?;
        for (k, p) in self.phases.iter().enumerate() {
            writeln!(
                f,
                "  {} {:<30} {:>10}   {}",
                if k == self.peak_phase { "*" } else { " " },
                p.name,
                human(p.bytes),
                p.parts
            )?;
        }
        write!(
            f,
            "predicted peak: {} ({} + {} allowance)",
            human(self.total_bytes()),
            self.phases[self.peak_phase].name,
            human(self.bytes("allowance"))
        )
    }
}

/// How much memory the device has, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capacity {
    /// Known: bytes and source.
    Known(u64, String),
    /// Unknown, with what to do about it.
    Unknown(String),
}

/// The memory of `device`: `given` when set (`--device-memory`); for the CPU the machine's total
/// physical memory (`/proc/meminfo` `MemTotal`); a GPU's is unknown without starting it, which
/// planning does not do.
pub fn device_capacity(device: DeviceSpec, given: Option<u64>) -> Capacity {
    if let Some(b) = given {
        return Capacity::Known(b, "--device-memory".into());
    }
    match device {
        DeviceSpec::Cpu => match cpu_memory_total() {
            Some(b) => Capacity::Known(b, "total physical memory, /proc/meminfo".into()),
            None => Capacity::Unknown("unknown (no /proc/meminfo): pass --device-memory".into()),
        },
        _ => Capacity::Unknown("unknown: pass --device-memory (e.g. 80GB)".into()),
    }
}

/// Total physical memory from `/proc/meminfo` (`MemTotal`), in bytes.
pub fn cpu_memory_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Lines saying whether the run fits `capacity` and, when it does not, which change makes it
/// fit: activation checkpointing, bf16 mixed precision, a smaller micro-batch (with more
/// accumulation, so the effective batch is the same), or combinations.
pub fn fit_report(config: &LlamaConfig, inputs: &PlanInputs, capacity: &Capacity) -> Vec<String> {
    let plan = MemoryPlan::for_training(config, inputs);
    let cap = match capacity {
        Capacity::Known(b, source) => {
            let mut lines = vec![format!(
                "device {}: {} ({source}): {}",
                inputs.device,
                human(*b),
                plan.fit_line(*b)
            )];
            if plan.total_bytes() > *b {
                lines.extend(suggestions(config, inputs, *b));
            }
            return lines;
        }
        Capacity::Unknown(why) => why,
    };
    vec![format!(
        "device {}: memory {cap}; the run needs {}",
        inputs.device,
        human(plan.total_bytes())
    )]
}

fn suggestions(config: &LlamaConfig, inputs: &PlanInputs, capacity: u64) -> Vec<String> {
    let need = |i: &PlanInputs| MemoryPlan::for_training(config, i).total_bytes();
    let base = need(inputs);
    let mut options: Vec<(String, PlanInputs)> = Vec::new();
    let mut ck = inputs.clone();
    ck.checkpointing = true;
    if !inputs.checkpointing && need(&ck) < base {
        options.push(("--activation-checkpointing".into(), ck));
    }
    if inputs.dtype == DType::F32 {
        let mut bf = inputs.clone();
        bf.dtype = DType::BF16;
        // What the run would get in bf16 (on the CPU the kernels are f32-only).
        bf.attention = match (inputs.device, inputs.attention) {
            (DeviceSpec::Cpu, _) => AttentionKind::Composed,
            (_, k) => k,
        };
        if need(&bf) < base {
            options.push(("--dtype bf16".into(), bf));
        }
    }
    let mut mb = inputs.clone();
    while mb.batch_size > 1 {
        mb.batch_size = mb.batch_size.div_ceil(2);
        mb.grad_accum *= 2;
        options.push((
            format!(
                "--batch-size {} --grad-accum {} (same effective batch)",
                mb.batch_size, mb.grad_accum
            ),
            mb.clone(),
        ));
        if need(&mb) <= capacity {
            break;
        }
    }
    // Combinations of the single changes, cheapest first.
    let singles = options.len();
    for i in 0..singles {
        for j in i + 1..singles {
            let (a, b) = (&options[i], &options[j]);
            let mut c = b.1.clone();
            c.checkpointing |= a.1.checkpointing;
            if a.1.dtype != inputs.dtype {
                c.dtype = a.1.dtype;
                c.attention = a.1.attention;
            }
            options.push((format!("{} and {}", a.0, b.0), c));
        }
    }
    // Single changes first, then the smallest need.
    let mut fitting: Vec<(bool, u64, String)> = options
        .iter()
        .enumerate()
        .map(|(k, (what, i))| (k >= singles, need(i), what.clone()))
        .filter(|(_, n, _)| *n <= capacity)
        .collect();
    fitting.sort();
    if fitting.is_empty() {
        let best = options.iter().map(|(_, i)| need(i)).min().unwrap_or(base);
        let tried = if options.is_empty() {
            "checkpointing, bf16 and a smaller micro-batch do not apply".to_string()
        } else {
            format!(
                "the best of checkpointing, bf16 and a smaller micro-batch still needs {}",
                human(best)
            )
        };
        return vec![format!(
            "  no change of these settings makes it fit ({tried}): train fewer parameters \
             (fewer new blocks, LoRA), use a shorter --seq-len, or a device with more memory"
        )];
    }
    fitting
        .into_iter()
        .take(3)
        .map(|(_, n, what)| format!("  would fit with {what}: {}", human(n)))
        .collect()
}

/// A measured training peak (see [`measure_training_peak`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasuredPeak {
    /// Resident memory of the process before the model was built.
    pub rss_before: u64,
    /// Peak resident memory while the steps ran (`VmHWM`).
    pub peak_rss: u64,
    /// `peak_rss - rss_before`: weights, optimizer state, activations, transients.
    pub delta: u64,
    /// The peak above `rss_before` in each phase of a step: forward with the loss, backward
    /// with the gradients' accumulation, optimizer update (largest over the steps).
    pub phases: [u64; 3],
}

/// Measure the peak resident memory of `steps` training steps of a randomly initialised model
/// of `config` as `inputs` say (selection, adapters, dtype, shapes, accumulation; the kernels
/// are turned off for [`AttentionKind::Composed`]), on backend `B`, which must match
/// `inputs.checkpointing` (`Autodiff<Flex, BalancedCheckpointing>` with it). The step is the
/// trainer's: forward, mean causal-LM loss, backward per micro-batch with the gradients
/// accumulated, then the fused AdamW.
///
/// This reads the *process's* resident memory (Linux `/proc/self/status`), so it measures the
/// CPU backend only, and only in a process that does nothing else meanwhile (the test runs it
/// in a child process). Before the steps the allocator's free memory is returned to the system
/// (glibc `malloc_trim`) and the peak counter is reset (`/proc/self/clear_refs`), so model
/// building does not count except for the weights it leaves.
pub fn measure_training_peak<B: AutodiffBackend>(
    config: &LlamaConfig,
    inputs: &PlanInputs,
    steps: usize,
    device: &B::Device,
) -> Result<MeasuredPeak> {
    if inputs.attention == AttentionKind::Composed {
        llama_pro_core::ops::without_kernels(|| measure_inner::<B>(config, inputs, steps, device))
    } else {
        measure_inner::<B>(config, inputs, steps, device)
    }
}

fn measure_inner<B: AutodiffBackend>(
    config: &LlamaConfig,
    inputs: &PlanInputs,
    steps: usize,
    device: &B::Device,
) -> Result<MeasuredPeak> {
    use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
    use burn::tensor::{Int, Tensor, TensorData};
    use llama_pro_core::model::LlamaForCausalLM;

    let status = |key: &str| -> Result<u64> {
        let text = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| TrainError::io("/proc/self/status", e))?;
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| TrainError::Invalid(format!("/proc/self/status has no {key}")))
    };
    llama_pro_core::device::tune_allocator();
    let rss_before = status("VmRSS:")?;
    let mut c = config.clone();
    c.dtype = DType::F32;
    let model = c.init::<B>(device, 0);
    let model = match &inputs.lora {
        Some(l) => model.with_lora(l, 0)?,
        None => model,
    };
    let (model, _) = llama_pro_core::freeze::set_trainable(model, &inputs.selection, &inputs.map)?;
    let mut model = if inputs.dtype != DType::F32 {
        model.mixed_precision(inputs.dtype)
    } else {
        model
    };
    let (b, s) = (inputs.batch_size, inputs.seq_len);
    let ids: Vec<i64> = (0..b * s)
        .map(|i| ((i as u64 * 2_654_435_761) % c.vocab_size as u64) as i64)
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), device);
    let mask = Tensor::<B, 2>::ones([b, s], device);
    let mut optim =
        crate::optim::FusedAdamW::new(0.9, 0.95, 1e-8, 0.1).init::<B, LlamaForCausalLM<B>>();
    release_free_memory();
    // The peak since the last call, above `rss_before` (the eager CPU backend has finished
    // every op when its call returns).
    let phase_peak = || -> Result<u64> {
        let hwm = status("VmHWM:")?;
        std::fs::write("/proc/self/clear_refs", "5")
            .map_err(|e| TrainError::io("/proc/self/clear_refs", e))?;
        Ok(hwm.saturating_sub(rss_before))
    };
    phase_peak()?;
    let mut phases = [0u64; 3];
    for _ in 0..steps {
        let mut acc = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        for _ in 0..inputs.grad_accum {
            let (sum, n) = model.loss_sum(ids.clone(), mask.clone());
            let loss = sum / n;
            phases[0] = phases[0].max(phase_peak()?);
            let grads = (loss / inputs.grad_accum as f64).backward();
            acc.accumulate(&model, GradientsParams::from_grads(grads, &model));
            phases[1] = phases[1].max(phase_peak()?);
        }
        model = optim.step(1e-4, model, acc.grads());
        phases[2] = phases[2].max(phase_peak()?);
    }
    let delta = phases.into_iter().max().unwrap_or(0);
    Ok(MeasuredPeak {
        rss_before,
        peak_rss: rss_before + delta,
        delta,
        phases,
    })
}

/// Give the allocator's free memory back to the system (glibc), so that resident memory counts
/// live memory only.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free memory to the system; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}
