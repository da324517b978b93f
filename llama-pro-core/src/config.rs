//! HuggingFace `config.json` → the configuration the model is built from.
//!
//! Two levels, as candle and torchtune do it: [`HfConfig`] keeps the file's JSON object untouched
//! (so an exported `config.json` preserves every key we do not understand) and resolves it into
//! [`LlamaConfig`], the plain description `init` uses. Both the transformers-4 layout
//! (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers-5 layout
//! (`rope_parameters`, `dtype`) are accepted. Anything we would silently get wrong (another
//! activation, a rope type we do not implement, an unknown architecture) is an error.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CoreError, Result};

/// The model families we implement (all are the LLaMA block with small variations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM` (`model_type: llama`).
    Llama,
    /// `MistralForCausalLM` (`model_type: mistral`): LLaMA with an optional sliding window.
    Mistral,
    /// `Qwen2ForCausalLM` (`model_type: qwen2`): LLaMA with q/k/v biases.
    Qwen2,
}

impl Architecture {
    /// The `architectures[0]` string transformers uses.
    pub fn hf_class(&self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Storage dtype of a checkpoint (and the dtype a model computes in). Written `f32`, `bf16`,
/// `f16` in configuration files (HF's `float32`, `bfloat16`, `float16` are read too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    /// IEEE float32.
    #[default]
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Parse `float32|float16|bfloat16` (HF spelling) or `f32|f16|bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "f32" | "fp32" => Some(Self::F32),
            "float16" | "f16" | "fp16" | "half" => Some(Self::F16),
            "bfloat16" | "bf16" => Some(Self::BF16),
            _ => None,
        }
    }
    /// HF spelling (`torch_dtype` / `dtype` value).
    pub fn hf_name(&self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
    /// Bytes per element.
    pub fn size(&self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }
    /// The burn dtype.
    pub fn burn(&self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::F16 => burn::tensor::DType::F16,
            Self::BF16 => burn::tensor::DType::BF16,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
            .ok_or_else(|| CoreError::setting("dtype", format!("{s:?}: expected f32, bf16 or f16")))
    }
}

impl Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        })
    }
}

/// How RoPE frequencies are scaled (`rope_type` in HF).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE (`default`).
    None,
    /// Position interpolation (`linear`): frequencies divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling (`llama3`).
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length of the original pretraining.
        original_max_position_embeddings: usize,
    },
}

/// The resolved configuration every module is built from. Field names are HuggingFace's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Number of decoder blocks L.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Per-head width (`head_dim`, default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Bias on q/k/v projections (Qwen2, or Llama `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// `lm_head` shares `embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// Mistral sliding-window attention width (`None` = full causal attention).
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    pub eos_token_ids: Vec<u32>,
    /// Dtype the checkpoint is stored in (`torch_dtype` / `dtype`).
    pub dtype: DType,
}

impl LlamaConfig {
    /// A tiny configuration for tests and examples (2 layers, width 64, GQA 4/2).
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 512,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            dtype: DType::F32,
        }
    }

    /// Every tensor a checkpoint of this configuration holds, by HF name with its shape, in
    /// module order (`lm_head.weight` only when untied). This is the list `LlamaConfig::load`
    /// asks a weight source for (a test checks that the two agree), without building a model.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        let linear = |out: &mut Vec<(String, Vec<usize>)>, name: String, o, i, bias: bool| {
            out.push((format!("{name}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{name}.bias"), vec![o]));
            }
        };
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            linear(
                &mut out,
                format!("{p}.self_attn.q_proj"),
                q,
                d,
                self.qkv_bias,
            );
            linear(
                &mut out,
                format!("{p}.self_attn.k_proj"),
                kv,
                d,
                self.qkv_bias,
            );
            linear(
                &mut out,
                format!("{p}.self_attn.v_proj"),
                kv,
                d,
                self.qkv_bias,
            );
            linear(&mut out, format!("{p}.self_attn.o_proj"), d, q, self.o_bias);
            linear(&mut out, format!("{p}.mlp.gate_proj"), f, d, self.mlp_bias);
            linear(&mut out, format!("{p}.mlp.up_proj"), f, d, self.mlp_bias);
            linear(&mut out, format!("{p}.mlp.down_proj"), d, f, self.mlp_bias);
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_word_embeddings {
            linear(&mut out, "lm_head".to_string(), v, d, false);
        }
        out
    }

    /// Parameters of one decoder block.
    pub fn block_params(&self) -> usize {
        let (d, h, kv, hd, f) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.intermediate_size,
        );
        let attn = d * h * hd + 2 * d * kv * hd + h * hd * d;
        let attn_b = if self.qkv_bias {
            h * hd + 2 * kv * hd
        } else {
            0
        } + if self.o_bias { d } else { 0 };
        let mlp = 3 * d * f + if self.mlp_bias { 2 * f + d } else { 0 };
        attn + attn_b + mlp + 2 * d
    }

    /// Total parameter count (tied `lm_head` counted once).
    pub fn num_params(&self) -> usize {
        let emb = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.hidden_size + self.num_hidden_layers * self.block_params()
    }
}

/// A parsed `config.json`: the original JSON object plus its resolution.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// Where it was read from (for error messages).
    pub path: PathBuf,
    /// The file's JSON object, every key preserved.
    pub raw: Map<String, Value>,
    /// The resolved configuration.
    pub config: LlamaConfig,
}

impl HfConfig {
    /// Read and resolve `config.json` (a file, or a model directory holding one).
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("config.json");
        }
        let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
            path: path.clone(),
            source,
        })?;
        let Value::Object(raw) = value else {
            return Err(CoreError::config(&path, "expected a JSON object"));
        };
        Self::from_map(path, raw)
    }

    /// Resolve an already parsed JSON object (`path` is only used in messages).
    pub fn from_map(path: PathBuf, raw: Map<String, Value>) -> Result<Self> {
        let config = resolve(&path, &raw)?;
        Ok(Self { path, raw, config })
    }

    /// Build the JSON object of a config from scratch (for a model made in Rust).
    pub fn from_config(config: &LlamaConfig) -> Self {
        let mut raw = Map::new();
        let c = config;
        let model_type = match c.architecture {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        };
        raw.insert(
            "architectures".into(),
            serde_json::json!([c.architecture.hf_class()]),
        );
        raw.insert("model_type".into(), model_type.into());
        for (k, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            raw.insert(k.into(), v.into());
        }
        raw.insert("hidden_act".into(), "silu".into());
        raw.insert("rms_norm_eps".into(), c.rms_norm_eps.into());
        raw.insert("rope_theta".into(), c.rope_theta.into());
        let scaling = match c.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}),
        };
        raw.insert("rope_scaling".into(), scaling);
        if c.architecture == Architecture::Llama {
            raw.insert("attention_bias".into(), (c.qkv_bias && c.o_bias).into());
            raw.insert("mlp_bias".into(), c.mlp_bias.into());
        }
        if c.architecture == Architecture::Mistral {
            raw.insert(
                "sliding_window".into(),
                c.sliding_window.map(Value::from).unwrap_or(Value::Null),
            );
        }
        raw.insert("tie_word_embeddings".into(), c.tie_word_embeddings.into());
        if let Some(b) = c.bos_token_id {
            raw.insert("bos_token_id".into(), b.into());
        }
        match c.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                raw.insert("eos_token_id".into(), (*e).into());
            }
            many => {
                raw.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        raw.insert("torch_dtype".into(), c.dtype.hf_name().into());
        raw.insert("use_cache".into(), true.into());
        Self {
            path: PathBuf::from("config.json"),
            raw,
            config: config.clone(),
        }
    }

    /// The JSON to write for `config`: the original keys, with the counts and dtype that describe
    /// `config` (used by the saver and by expansion, which changes `num_hidden_layers`).
    pub fn to_json(&self, config: &LlamaConfig) -> Map<String, Value> {
        let mut raw = self.raw.clone();
        raw.insert("num_hidden_layers".into(), config.num_hidden_layers.into());
        raw.insert("vocab_size".into(), config.vocab_size.into());
        raw.insert(
            "tie_word_embeddings".into(),
            config.tie_word_embeddings.into(),
        );
        // Keep whichever dtype key the file used (transformers 5 writes `dtype`).
        if raw.contains_key("dtype") {
            raw.insert("dtype".into(), config.dtype.hf_name().into());
        }
        if raw.contains_key("torch_dtype") || !raw.contains_key("dtype") {
            raw.insert("torch_dtype".into(), config.dtype.hf_name().into());
        }
        raw
    }
}

fn get_usize(path: &Path, raw: &Map<String, Value>, key: &str) -> Result<usize> {
    match raw.get(key) {
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or(0) as usize),
        Some(other) => Err(CoreError::config(
            path,
            format!("`{key}` must be a non-negative integer, found {other}"),
        )),
        None => Err(CoreError::config(
            path,
            format!("missing required key `{key}`"),
        )),
    }
}

fn opt_usize(path: &Path, raw: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => get_usize(path, raw, key).map(Some),
    }
}

fn opt_f64(path: &Path, raw: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(CoreError::config(
            path,
            format!("`{key}` must be a number, found {other}"),
        )),
    }
}

fn opt_bool(path: &Path, raw: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(CoreError::config(
            path,
            format!("`{key}` must be true or false, found {other}"),
        )),
    }
}

fn token_ids(path: &Path, raw: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(vec![n.as_u64().unwrap_or(0) as u32]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64().map(|x| x as u32).ok_or_else(|| {
                    CoreError::config(path, format!("`{key}` must hold token ids, found {v}"))
                })
            })
            .collect(),
        Some(other) => Err(CoreError::config(
            path,
            format!("`{key}` must be a token id or a list, found {other}"),
        )),
    }
}

fn resolve(path: &Path, raw: &Map<String, Value>) -> Result<LlamaConfig> {
    let arch_name = raw
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .map(str::to_string);
    let model_type = raw.get("model_type").and_then(|m| m.as_str());
    let architecture = match (arch_name.as_deref(), model_type) {
        (Some("LlamaForCausalLM"), _) | (None, Some("llama")) => Architecture::Llama,
        (Some("MistralForCausalLM"), _) | (None, Some("mistral")) => Architecture::Mistral,
        (Some("Qwen2ForCausalLM"), _) | (None, Some("qwen2")) => Architecture::Qwen2,
        (a, m) => {
            return Err(CoreError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: a
                    .or(m)
                    .unwrap_or("<none: no `architectures` or `model_type`>")
                    .to_string(),
            });
        }
    };

    let hidden_size = get_usize(path, raw, "hidden_size")?;
    let num_attention_heads = get_usize(path, raw, "num_attention_heads")?;
    if num_attention_heads == 0 {
        return Err(CoreError::config(path, "`num_attention_heads` must be > 0"));
    }
    let num_key_value_heads =
        opt_usize(path, raw, "num_key_value_heads")?.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(CoreError::config(
            path,
            format!(
                "`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
            ),
        ));
    }
    let head_dim = match opt_usize(path, raw, "head_dim")? {
        Some(h) => h,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(CoreError::config(
                    path,
                    format!(
                        "`hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` ({num_attention_heads}) and no `head_dim` is given"
                    ),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(CoreError::config(
            path,
            format!("`head_dim` ({head_dim}) must be even for RoPE"),
        ));
    }

    if let Some(act) = raw
        .get("hidden_act")
        .or_else(|| raw.get("hidden_activation"))
    {
        if act.as_str() != Some("silu") {
            return Err(CoreError::config(
                path,
                format!("unsupported `hidden_act` {act}: only \"silu\" (SwiGLU) is implemented"),
            ));
        }
    }

    // RoPE: transformers 5 nests everything under `rope_parameters`; 4 has `rope_theta` + `rope_scaling`.
    let rope_params = raw.get("rope_parameters").filter(|v| !v.is_null());
    let scaling_obj = match rope_params {
        Some(Value::Object(o)) => Some(o.clone()),
        Some(other) => {
            return Err(CoreError::config(
                path,
                format!("`rope_parameters` must be an object, found {other}"),
            ));
        }
        None => match raw.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(o.clone()),
            Some(other) => {
                return Err(CoreError::config(
                    path,
                    format!("`rope_scaling` must be an object or null, found {other}"),
                ));
            }
        },
    };
    let mut rope_theta = opt_f64(path, raw, "rope_theta")?;
    let mut rope_scaling = RopeScaling::None;
    if let Some(o) = &scaling_obj {
        let key = if rope_params.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        if let Some(t) = opt_f64(path, o, "rope_theta")? {
            rope_theta = Some(t);
        }
        let rope_type = o
            .get("rope_type")
            .or_else(|| o.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let factor = || {
            opt_f64(path, o, "factor")?.ok_or_else(|| {
                CoreError::config(
                    path,
                    format!("`{key}` of type {rope_type:?} needs a `factor`"),
                )
            })
        };
        rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: opt_f64(path, o, "low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: opt_f64(path, o, "high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: opt_usize(
                    path,
                    o,
                    "original_max_position_embeddings",
                )?
                .ok_or_else(|| {
                    CoreError::config(
                        path,
                        format!(
                            "`{key}` of type \"llama3\" needs `original_max_position_embeddings`"
                        ),
                    )
                })?,
            },
            other => {
                return Err(CoreError::config(
                    path,
                    format!(
                        "unsupported RoPE type {other:?} in `{key}`: implemented are \"default\", \"linear\" and \"llama3\""
                    ),
                ));
            }
        };
    }
    let rope_theta = rope_theta.unwrap_or(10000.0);

    let (qkv_bias, o_bias, mlp_bias) = match architecture {
        Architecture::Qwen2 => (true, false, false),
        _ => {
            let ab = opt_bool(path, raw, "attention_bias")?.unwrap_or(false);
            (ab, ab, opt_bool(path, raw, "mlp_bias")?.unwrap_or(false))
        }
    };

    let sliding_window = match architecture {
        Architecture::Mistral => opt_usize(path, raw, "sliding_window")?,
        // Qwen2 only slides when `use_sliding_window` is true, and then only in some layers.
        Architecture::Qwen2 => {
            if opt_bool(path, raw, "use_sliding_window")?.unwrap_or(false) {
                return Err(CoreError::config(
                    path,
                    "Qwen2 `use_sliding_window: true` is not supported yet (per-layer sliding windows)",
                ));
            }
            None
        }
        Architecture::Llama => None,
    };

    let dtype_value = raw.get("dtype").or_else(|| raw.get("torch_dtype"));
    let dtype = match dtype_value {
        None | Some(Value::Null) => DType::F32,
        Some(Value::String(s)) => DType::parse(s).ok_or_else(|| {
            CoreError::config(
                path,
                format!("unsupported dtype {s:?}: expected float32, float16 or bfloat16"),
            )
        })?,
        Some(other) => {
            return Err(CoreError::config(
                path,
                format!("`dtype` must be a string, found {other}"),
            ));
        }
    };

    let config = LlamaConfig {
        architecture,
        vocab_size: get_usize(path, raw, "vocab_size")?,
        hidden_size,
        intermediate_size: get_usize(path, raw, "intermediate_size")?,
        num_hidden_layers: get_usize(path, raw, "num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: opt_f64(path, raw, "rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        max_position_embeddings: opt_usize(path, raw, "max_position_embeddings")?.unwrap_or(2048),
        qkv_bias,
        o_bias,
        mlp_bias,
        tie_word_embeddings: opt_bool(path, raw, "tie_word_embeddings")?.unwrap_or(false),
        sliding_window,
        bos_token_id: token_ids(path, raw, "bos_token_id")?.first().copied(),
        eos_token_ids: token_ids(path, raw, "eos_token_id")?,
        dtype,
    };
    if config.vocab_size == 0 || config.hidden_size == 0 || config.num_hidden_layers == 0 {
        return Err(CoreError::config(
            path,
            "`vocab_size`, `hidden_size` and `num_hidden_layers` must be > 0",
        ));
    }
    Ok(config)
}
