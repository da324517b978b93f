//! Block expansion, the LLaMA Pro transform (arXiv 2401.02415, §3.2, Figure 3).
//!
//! An L-block model grows to L + K blocks by inserting copies of existing blocks whose attention
//! output projection `o_proj` and FFN down projection `down_proj` (the paper's W_O and W₃, with
//! their biases if any) are exactly zero. A zero-initialised block maps `x ↦ x + 0 + 0 = x`, so the
//! grown model computes exactly what the original did (bitwise in f32 and bf16).
//!
//! Layouts:
//! - **interleaved** (the paper, LLaMA-Factory, the official `block_expansion.py`): the L blocks in
//!   N groups of L/N; after each group, copies of the group's top P blocks, in order
//!   (4 blocks, N=2, P=1: `0 1 c1 2 3 c3`; N=2, P=2: `0 1 c0 c1 2 3 c2 c3`);
//! - **top** / **bottom** (the paper's suffix / prefix stacking): K copies of the last / first
//!   block after the last / before the first;
//! - **positions**: a copy of a named source block at each given position of the new model.
//!
//! The result is a [`LayerMap`]: for every layer of the expanded model, its source block and
//! whether it is new. It is stored in the exported `config.json` under [`CONFIG_KEY`] (a key
//! transformers ignores), so that training later knows which blocks are new.

use burn::module::{Param, ParamId};
use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::block::DecoderLayer;
use crate::error::{CoreError, Result};
use crate::model::LlamaForCausalLM;
use crate::params::{NamedMapper, map_named};

/// The `config.json` key holding our expansion record.
pub const CONFIG_KEY: &str = "llama_pro";

/// How to grow a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpansionPlan {
    /// After every group of L/`groups` blocks, copies of the group's top `copies` blocks.
    Interleaved {
        /// N, the number of groups (must divide L).
        groups: usize,
        /// P, copies per group (at most L/N).
        copies: usize,
    },
    /// `k` copies of the last block, appended after it (the paper's "suffix stacking").
    Top {
        /// Number of new blocks.
        k: usize,
    },
    /// `k` copies of the first block, inserted before it (the paper's "prefix stacking").
    Bottom {
        /// Number of new blocks.
        k: usize,
    },
    /// Explicit insertions: `(source, position)`, a copy of original block `source` placed so that
    /// it ends up at index `position` of the expanded model.
    Positions(Vec<(usize, usize)>),
}

impl std::fmt::Display for ExpansionPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Interleaved { groups, copies } => {
                write!(f, "interleaved (groups={groups}, copies={copies})")
            }
            Self::Top { k } => write!(f, "top (k={k})"),
            Self::Bottom { k } => write!(f, "bottom (k={k})"),
            Self::Positions(p) => {
                let s: Vec<String> = p.iter().map(|(s, p)| format!("{s}@{p}")).collect();
                write!(f, "positions ({})", s.join(", "))
            }
        }
    }
}

/// Where one layer of an expanded model comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerOrigin {
    /// Index of the block it was copied from (in the model that was expanded).
    pub source: usize,
    /// True for an inserted (zero-initialised) block.
    pub new: bool,
}

/// For every layer of an expanded model, its source and whether it is new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMap {
    /// One entry per layer of the expanded model.
    pub layers: Vec<LayerOrigin>,
}

impl LayerMap {
    /// The identity map of an unexpanded L-block model.
    pub fn identity(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|i| LayerOrigin {
                    source: i,
                    new: false,
                })
                .collect(),
        }
    }

    /// Indices of the new blocks.
    pub fn new_layers(&self) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, o)| o.new)
            .map(|(i, _)| i)
            .collect()
    }

    /// Number of blocks of the model the map describes.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// True when the map has no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// A compact line such as `0 1 c1 2 3 c3` (copies written `c<source>`).
    pub fn compact(&self) -> String {
        self.layers
            .iter()
            .map(|o| {
                if o.new {
                    format!("c{}", o.source)
                } else {
                    o.source.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Apply `next` (a map over this model's layers) after `self`: sources refer to the
    /// original base model and earlier new blocks stay new.
    pub fn then(&self, next: &LayerMap) -> LayerMap {
        LayerMap {
            layers: next
                .layers
                .iter()
                .map(|o| {
                    let prev = self.layers[o.source];
                    LayerOrigin {
                        source: prev.source,
                        new: o.new || prev.new,
                    }
                })
                .collect(),
        }
    }

    /// The record stored in `config.json` under [`CONFIG_KEY`].
    pub fn to_config_value(&self, plan: &str, base_layers: usize) -> Value {
        serde_json::json!({
            "expanded_layers": self.new_layers(),
            "layer_sources": self.layers.iter().map(|o| o.source).collect::<Vec<_>>(),
            "base_num_hidden_layers": base_layers,
            "plan": plan,
            "note": "written by llama-pro block expansion; new layers start with zero o_proj/down_proj",
        })
    }

    /// Read the map from a `config.json` object: the stored record, or the identity map of a
    /// model that was never expanded. `path` is used in messages.
    pub fn from_config(
        raw: &Map<String, Value>,
        num_layers: usize,
        path: &std::path::Path,
    ) -> Result<Self> {
        let Some(v) = raw.get(CONFIG_KEY) else {
            return Ok(Self::identity(num_layers));
        };
        let bad = |m: &str| CoreError::config(path, format!("`{CONFIG_KEY}`: {m}"));
        let sources: Vec<usize> = v
            .get("layer_sources")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing `layer_sources` list"))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| bad("`layer_sources` must hold layer indices"))
            })
            .collect::<Result<_>>()?;
        let expanded: Vec<usize> = v
            .get("expanded_layers")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing `expanded_layers` list"))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| bad("`expanded_layers` must hold layer indices"))
            })
            .collect::<Result<_>>()?;
        if sources.len() != num_layers {
            return Err(bad(&format!(
                "`layer_sources` has {} entries but num_hidden_layers is {num_layers}",
                sources.len()
            )));
        }
        if let Some(e) = expanded.iter().find(|&&e| e >= num_layers) {
            return Err(bad(&format!(
                "expanded layer {e} is out of range (num_hidden_layers {num_layers})"
            )));
        }
        Ok(Self {
            layers: sources
                .iter()
                .enumerate()
                .map(|(i, &s)| LayerOrigin {
                    source: s,
                    new: expanded.contains(&i),
                })
                .collect(),
        })
    }
}

impl ExpansionPlan {
    /// The layer map of this plan applied to an `num_layers`-block model, or a clear error.
    pub fn layer_map(&self, num_layers: usize) -> Result<LayerMap> {
        let l = num_layers;
        let orig = |i| LayerOrigin {
            source: i,
            new: false,
        };
        let copy = |i| LayerOrigin {
            source: i,
            new: true,
        };
        let layers = match *self {
            Self::Interleaved { groups, copies } => {
                if groups == 0 || copies == 0 {
                    let key = if groups == 0 { "groups" } else { "copies" };
                    return Err(CoreError::setting(
                        key,
                        "must be at least 1 (zero new blocks)",
                    ));
                }
                if l % groups != 0 {
                    let divisors: Vec<String> = (1..=l)
                        .filter(|d| l % d == 0)
                        .map(|d| d.to_string())
                        .collect();
                    return Err(CoreError::setting(
                        "groups",
                        format!(
                            "{groups}: {l} layers cannot be split into {groups} equal groups; N must divide {l}: {}",
                            divisors.join(", ")
                        ),
                    ));
                }
                let size = l / groups;
                if copies > size {
                    return Err(CoreError::setting(
                        "copies",
                        format!(
                            "{copies} is larger than the group size {size} ({l} layers / {groups} groups)"
                        ),
                    ));
                }
                let mut v = Vec::with_capacity(l + groups * copies);
                for g in 0..groups {
                    let start = g * size;
                    v.extend((start..start + size).map(orig));
                    v.extend((start + size - copies..start + size).map(copy));
                }
                v
            }
            Self::Top { k } => {
                if k == 0 {
                    return Err(CoreError::setting("top", "0 adds no block"));
                }
                let mut v: Vec<LayerOrigin> = (0..l).map(orig).collect();
                v.extend(std::iter::repeat_n(copy(l - 1), k));
                v
            }
            Self::Bottom { k } => {
                if k == 0 {
                    return Err(CoreError::setting("bottom", "0 adds no block"));
                }
                let mut v: Vec<LayerOrigin> = std::iter::repeat_n(copy(0), k).collect();
                v.extend((0..l).map(orig));
                v
            }
            Self::Positions(ref ins) => {
                if ins.is_empty() {
                    return Err(CoreError::setting(
                        "positions",
                        "no insertion given (zero new blocks)",
                    ));
                }
                let total = l + ins.len();
                let mut slots: Vec<Option<LayerOrigin>> = vec![None; total];
                for &(src, pos) in ins {
                    if src >= l {
                        return Err(CoreError::setting(
                            "positions",
                            format!(
                                "{src}@{pos}: source block {src} does not exist (the model has {l} layers: 0..{})",
                                l - 1
                            ),
                        ));
                    }
                    if pos >= total {
                        return Err(CoreError::setting(
                            "positions",
                            format!(
                                "{src}@{pos}: position {pos} is out of range (the expanded model has {total} layers: 0..{})",
                                total - 1
                            ),
                        ));
                    }
                    if slots[pos].is_some() {
                        return Err(CoreError::setting(
                            "positions",
                            format!("position {pos} is given twice"),
                        ));
                    }
                    slots[pos] = Some(copy(src));
                }
                let mut next = 0;
                slots
                    .into_iter()
                    .map(|s| {
                        s.unwrap_or_else(|| {
                            next += 1;
                            orig(next - 1)
                        })
                    })
                    .collect()
            }
        };
        Ok(LayerMap { layers })
    }

    /// Parse `--positions` values like `1@2,3@5` (`source@position`).
    pub fn parse_positions(s: &str) -> Result<Self> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('@').ok_or_else(|| {
                CoreError::setting(
                    "positions",
                    format!("{part:?}: expected SOURCE@POSITION, e.g. 3@4"),
                )
            })?;
            let num = |x: &str| {
                x.trim().parse::<usize>().map_err(|_| {
                    CoreError::setting("positions", format!("{part:?}: {x:?} is not a layer index"))
                })
            };
            v.push((num(a)?, num(b)?));
        }
        Ok(Self::Positions(v))
    }
}

/// Gives every parameter a fresh [`ParamId`] and optionally zeroes it: a block copy must not share
/// ids with its source (burn keeps ids on `clone`, and shared ids would merge gradients and
/// optimizer state).
struct FreshCopy;

impl<B: Backend> NamedMapper<B> for FreshCopy {
    fn map<const D: usize>(
        &mut self,
        name: &str,
        param: Param<Tensor<B, D>>,
    ) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        let zeroed = name.starts_with("self_attn.o_proj.") || name.starts_with("mlp.down_proj.");
        let tensor = if zeroed { tensor.zeros_like() } else { tensor };
        Param::from_mapped_value(ParamId::new(), tensor, mapper)
    }
}

/// A zero-initialised copy of `block`: same weights, fresh parameter ids, `self_attn.o_proj` and
/// `mlp.down_proj` (weights and biases) set to exactly zero.
pub fn zero_copy<B: Backend>(block: &DecoderLayer<B>) -> DecoderLayer<B> {
    map_named(block.clone(), &mut FreshCopy)
}

/// Expand a model in memory. Returns the grown model and its layer map (composed with
/// `previous`, the map of an already expanded model, so sources always refer to the base model).
pub fn expand_model<B: Backend>(
    model: LlamaForCausalLM<B>,
    plan: &ExpansionPlan,
    previous: Option<&LayerMap>,
) -> Result<(LlamaForCausalLM<B>, LayerMap)> {
    let l = model.config.num_hidden_layers;
    let map = plan.layer_map(l)?;
    let mut model = model;
    let old = std::mem::take(&mut model.model.layers);
    model.model.layers = map
        .layers
        .iter()
        .map(|o| {
            if o.new {
                zero_copy(&old[o.source])
            } else {
                old[o.source].clone()
            }
        })
        .collect();
    model.config.num_hidden_layers = map.len();
    let full = match previous {
        Some(p) => p.then(&map),
        None => map,
    };
    Ok((model, full))
}

/// The LLaMA Pro guarantee, checked: the largest |Δ| between the logits of `base` and
/// `expanded` on a fixed pseudo-random batch (2 sequences × 32 tokens, the same on every run and
/// platform). Zero means the expanded model computes bitwise what the base did.
///
/// # Errors
/// If the two models do not share a vocabulary.
pub fn verify_identity<B: Backend>(
    base: &LlamaForCausalLM<B>,
    expanded: &LlamaForCausalLM<B>,
) -> Result<f32> {
    use burn::tensor::{ElementConversion, Int, TensorData};
    let vocab = base.config.vocab_size;
    if expanded.config.vocab_size != vocab {
        return Err(CoreError::Invalid(format!(
            "identity check: the base has a vocabulary of {vocab} tokens, the expanded model {}",
            expanded.config.vocab_size
        )));
    }
    // splitmix64: independent of any RNG crate version.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let ids: Vec<i64> = (0..2 * 32)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab as u64) as i64
        })
        .collect();
    let device = base.model.embed_tokens.weight.val().device();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 32]), &device);
    let d = (base.forward(ids.clone()) - expanded.forward(ids))
        .abs()
        .max()
        .into_scalar();
    Ok(d.elem::<f32>())
}

/// [`verify_identity`] of two HuggingFace model directories, loaded in f32 on `device`.
pub fn verify_identity_dirs<B: Backend>(
    base: &std::path::Path,
    expanded: &std::path::Path,
    device: &B::Device,
) -> Result<f32> {
    let dtype = Some(crate::config::DType::F32);
    let (b, _) = LlamaForCausalLM::<B>::from_pretrained(base, device, dtype)?;
    let (e, _) = LlamaForCausalLM::<B>::from_pretrained(expanded, device, dtype)?;
    verify_identity(&b, &e)
}

/// What [`expand_checkpoint`] did.
#[derive(Debug, Clone)]
pub struct ExpandReport {
    /// The layer map of the output (composed with an earlier expansion, if any).
    pub map: LayerMap,
    /// Layers before.
    pub from_layers: usize,
    /// Layers after.
    pub to_layers: usize,
    /// Bytes of weights written.
    pub bytes_written: usize,
}

/// Expand a HuggingFace checkpoint on disk, tensor by tensor: every output tensor is either a
/// slice of the memory-mapped input or zeros, written as the file is streamed out, so memory use
/// is about one tensor whatever the model size. Dtypes are kept as they are.
///
/// The output `config.json` is the input's with `num_hidden_layers` updated, per-layer lists
/// (`layer_types`) remapped and the layer map recorded under [`CONFIG_KEY`].
///
/// Before a byte is written, the input is checked against its `config.json` from the headers
/// (every tensor present with its shape, nothing unknown), and the output may not be the input
/// or lie inside it (or the other way round).
pub fn expand_checkpoint(
    src_dir: &std::path::Path,
    out_dir: &std::path::Path,
    plan: &ExpansionPlan,
    opts: &crate::save::SaveOptions,
) -> Result<ExpandReport> {
    expand_checkpoint_checked(src_dir, out_dir, plan, opts, &mut |_| Ok(()))
}

/// [`expand_checkpoint`] that runs `check` on the written model in its temporary directory (the
/// identity check, say) and moves it into place only if the check passes: a failed check leaves
/// `out_dir` as it was.
pub fn expand_checkpoint_checked(
    src_dir: &std::path::Path,
    out_dir: &std::path::Path,
    plan: &ExpansionPlan,
    opts: &crate::save::SaveOptions,
    check: &mut dyn FnMut(&std::path::Path) -> Result<()>,
) -> Result<ExpandReport> {
    use crate::config::HfConfig;
    use crate::save::{LazyBytes, LazyTensor, paths_overlap, write_model_dir_checked};
    use crate::weights::Checkpoint;

    if paths_overlap(src_dir, out_dir) {
        return Err(CoreError::setting(
            "output",
            format!(
                "{} is the input model {} or inside it (or contains it): write the expansion elsewhere",
                out_dir.display(),
                src_dir.display()
            ),
        ));
    }
    let hf = HfConfig::from_path(src_dir)?;
    let l = hf.config.num_hidden_layers;
    let previous = LayerMap::from_config(&hf.raw, l, &hf.path)?;
    let map = plan.layer_map(l)?;
    let ckpt = Checkpoint::open(src_dir)?;
    ckpt.check_layout(&hf.config)?;

    // Every input tensor must be accounted for: layer tensors are remapped, the rest copied.
    let mut per_layer: Vec<Vec<String>> = vec![Vec::new(); l];
    let mut others = Vec::new();
    for name in ckpt.names() {
        match layer_of(name) {
            Some((i, _)) if i < l => per_layer[i].push(name.to_string()),
            Some((i, _)) => {
                return Err(CoreError::UnexpectedTensors {
                    path: ckpt.file_of(name),
                    names: vec![format!("{name} (layer {i} >= num_hidden_layers {l})")],
                });
            }
            None => others.push(name.to_string()),
        }
    }
    let lazy = |name: &str, zero: bool| -> Result<LazyTensor> {
        let meta = ckpt.meta(name).ok_or_else(|| CoreError::UnsupportedDtype {
            path: ckpt.file_of(name),
            name: name.to_string(),
            dtype: "non-float".into(),
        })?;
        let (path, offset, len) = ckpt.location(name)?;
        Ok(LazyTensor {
            dtype: meta.dtype,
            shape: meta.shape,
            data: if zero {
                LazyBytes::Zeros(len)
            } else {
                LazyBytes::File { path, offset, len }
            },
        })
    };
    let mut tensors: Vec<(String, LazyTensor)> = Vec::new();
    // Module order, as transformers writes: embeddings, layers, then the rest.
    for n in others
        .iter()
        .filter(|n| n.starts_with("model.embed_tokens."))
    {
        tensors.push((n.clone(), lazy(n, false)?));
    }
    for (new_idx, origin) in map.layers.iter().enumerate() {
        let src_prefix = format!("model.layers.{}.", origin.source);
        for name in &per_layer[origin.source] {
            let rest = &name[src_prefix.len()..];
            let zero = origin.new
                && (rest.starts_with("self_attn.o_proj.") || rest.starts_with("mlp.down_proj."));
            tensors.push((format!("model.layers.{new_idx}.{rest}"), lazy(name, zero)?));
        }
    }
    for n in others
        .iter()
        .filter(|n| !n.starts_with("model.embed_tokens."))
    {
        tensors.push((n.clone(), lazy(n, false)?));
    }
    let bytes_written = tensors
        .iter()
        .map(|(_, t)| crate::save::TensorSource::byte_len(t))
        .sum();

    let full = previous.then(&map);
    let base_layers = previous.len();
    let mut config = hf.config.clone();
    config.num_hidden_layers = map.len();
    let mut json = hf.to_json(&config);
    // Keep the stored dtype key as it was (to_json would rewrite it to the config's dtype anyway).
    if let Some(Value::Array(types)) = hf.raw.get("layer_types") {
        if types.len() == l {
            let remapped: Vec<Value> = map.layers.iter().map(|o| types[o.source].clone()).collect();
            json.insert("layer_types".into(), Value::Array(remapped));
        }
    }
    let plan_text = match hf
        .raw
        .get(CONFIG_KEY)
        .and_then(|v| v.get("plan"))
        .and_then(|p| p.as_str())
    {
        Some(prev) => format!("{prev}; then {plan}"),
        None => plan.to_string(),
    };
    let base = hf
        .raw
        .get(CONFIG_KEY)
        .and_then(|v| v.get("base_num_hidden_layers"))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(base_layers);
    json.insert(CONFIG_KEY.into(), full.to_config_value(&plan_text, base));
    write_model_dir_checked(out_dir, &json, tensors, Some(src_dir), opts, check)?;
    Ok(ExpandReport {
        map: full,
        from_layers: l,
        to_layers: map.len(),
        bytes_written,
    })
}

/// `model.layers.{i}.{rest}` → `(i, rest)`.
pub fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    Some((idx.parse().ok()?, rest))
}
