//! LLaMA-family models between GGUF and HuggingFace directories.
//!
//! Import ([`import_gguf`]): the configuration from the `{arch}.*` metadata, every tensor renamed
//! (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`), dequantised to f32 and
//! stored in the dtype asked for, the row permutation of Q and K that llama.cpp's converter
//! applies to LLaMA models undone, and the tokenizer files rebuilt ([`super::tokenizer`]).
//!
//! Export ([`export_gguf`]): what llama.cpp's `convert_hf_to_gguf.py` writes for the same
//! directory: the same metadata keys in the same order, the same tensor names, types and bytes
//! (1-D tensors stay F32, as there), streamed one tensor at a time.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::quant::{self, GgmlType};
use super::tokenizer::{gguf_tokenizer_metadata, tokenizer_from_gguf};
use super::{GgufFile, PendingTensor, TensorInfo, Value, write_gguf};
use crate::config::{Architecture, DType, HfConfig, LlamaConfig, RopeScaling};
use crate::error::{CoreError, Result};
use crate::save::{self, SaveOptions, TensorSource};
use crate::weights::Checkpoint;

/// The HF name of a GGUF tensor name (`None` for names we do not map).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let m = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{m}.{kind}"))
}

/// The GGUF name of an HF tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let m = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{m}.{kind}"))
}

/// Which permutation of rows a tensor gets (llama.cpp's `LlamaModel.permute`): LLaMA (not Qwen2)
/// stores Q and K with the two halves of every head's rotary pairs interleaved, because ggml's
/// "normal" RoPE rotates adjacent pairs where HF rotates `(i, i + d/2)`.
fn permute_heads(config: &LlamaConfig, hf: &str) -> Option<usize> {
    if config.architecture == Architecture::Qwen2 {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
        Some(config.num_attention_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Reorder the rows of a `[rows, cols]` tensor (`cols` = 1 for a bias) between HF's layout and
/// llama.cpp's. Within each head of `hd = rows / heads` rows, GGUF row `2i + j` is HF row
/// `j·hd/2 + i`. `to_gguf` applies convert's permutation; `!to_gguf` undoes it.
pub fn permute_rows(values: &[f32], rows: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let cols = values.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let g = h * hd + 2 * i + j;
                let f = h * hd + j * half + i;
                let (src, dst) = if to_gguf { (f, g) } else { (g, f) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn arch_of(file: &GgufFile) -> Result<(String, Architecture)> {
    let arch = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CoreError::gguf(file.path(), "missing metadata key \"general.architecture\"")
        })?
        .to_string();
    let a = match arch.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(CoreError::gguf(
                file.path(),
                format!(
                    "architecture {other:?} (general.architecture) is not supported; \
                     supported: llama (LLaMA 1-3, Mistral, SmolLM…), mistral, qwen2"
                ),
            ));
        }
    };
    Ok((arch, a))
}

/// Shortest decimal that reads back as the same f32 (`1e-5`, not `9.999999747378752e-06`):
/// GGUF stores ε and θ as f32, while configs hold the decimal the model was published with.
fn f32_decimal(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// Llama 3.1's frequency-dependent RoPE scaling, recovered from the `rope_freqs.weight` divisors
/// convert writes for it (the metadata keeps only the factor): the standard parameters that
/// reproduce the divisors exactly.
fn llama3_scaling(file: &GgufFile, config: &LlamaConfig) -> Result<Option<RopeScaling>> {
    let Some(t) = file.tensor("rope_freqs.weight") else {
        return Ok(None);
    };
    let divisors = file.dequantize(t)?;
    let factor = divisors.iter().fold(1f32, |m, &v| m.max(v)) as f64;
    let hd = config.head_dim;
    let freqs: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / hd as f64))
        .collect();
    // Any parameters that reproduce the divisors give the same RoPE; try the published ones
    // first, then a grid.
    // The thresholds scale with orig / low and orig / high, so parameters are only defined up
    // to a common factor: low = 1 (every published Llama 3.x) comes first.
    let mut origs = vec![8192usize];
    origs.extend((4..=20).map(|p| 1usize << p));
    origs.push(config.max_position_embeddings);
    let mut pairs = vec![(1.0f64, 4.0f64)];
    for low in [1.0, 0.25, 0.5, 2.0, 4.0] {
        for high in [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0] {
            if high > low {
                pairs.push((low, high));
            }
        }
    }
    for &(low, high) in &pairs {
        for &orig in &origs {
            let low_wl = orig as f64 / low;
            let high_wl = orig as f64 / high;
            let ok = freqs.iter().zip(&divisors).all(|(&f, &d)| {
                let wl = 2.0 * std::f64::consts::PI / f;
                let want = if wl < high_wl {
                    1.0
                } else if wl > low_wl {
                    factor
                } else {
                    let smooth = (orig as f64 / wl - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                ((want as f32) - d).abs() <= 1e-6 * d.abs().max(1.0)
            });
            if ok {
                return Ok(Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: orig,
                }));
            }
        }
    }
    Err(CoreError::gguf(
        file.path(),
        format!(
            "rope_freqs.weight (Llama-3.1-style RoPE scaling, factor {factor}) does not match the \
             standard low/high frequency factors and original context lengths; cannot write \
             `rope_scaling`"
        ),
    ))
}

/// The model configuration a GGUF file describes.
pub fn config_from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    let (arch, architecture) = arch_of(file)?;
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| file.require_u64(&key(k)).map(|v| v as usize);
    let opt_u = |k: &str| {
        file.get(&key(k))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let opt_f = |k: &str| {
        file.get(&key(k)).map(|v| match v {
            Value::F32(x) => f32_decimal(*x),
            v => v.as_f64().unwrap_or(f64::NAN),
        })
    };
    let hidden_size = u("embedding_length")?;
    let num_attention_heads = u("attention.head_count")?;
    if num_attention_heads == 0 {
        return Err(CoreError::gguf(
            file.path(),
            format!("{} is 0", key("attention.head_count")),
        ));
    }
    let num_key_value_heads = opt_u("attention.head_count_kv").unwrap_or(num_attention_heads);
    let head_dim = opt_u("attention.key_length").unwrap_or(hidden_size / num_attention_heads);
    let embed = file.tensor("token_embd.weight").ok_or_else(|| {
        CoreError::gguf(
            file.path(),
            "missing tensor \"token_embd.weight\" (the embeddings)",
        )
    })?;
    let vocab_size = embed.shape()[0];
    let has = |n: &str| file.tensor(n).is_some();
    let qkv_bias = has("blk.0.attn_q.bias");
    let o_bias = has("blk.0.attn_output.bias");
    let mlp_bias = has("blk.0.ffn_up.bias");
    if architecture == Architecture::Llama && qkv_bias != o_bias {
        return Err(CoreError::gguf(
            file.path(),
            "a llama model with biases on q/k/v but not on the output projection (or the reverse): \
             transformers' `attention_bias` sets both",
        ));
    }
    let tok = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let mut config = LlamaConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        rope_theta: opt_f("rope.freq_base").unwrap_or(10000.0),
        rope_scaling: RopeScaling::None,
        max_position_embeddings: opt_u("context_length").unwrap_or(2048),
        qkv_bias,
        o_bias,
        mlp_bias,
        tie_word_embeddings: !has("output.weight"),
        sliding_window: None,
        bos_token_id: tok("tokenizer.ggml.bos_token_id"),
        eos_token_ids: tok("tokenizer.ggml.eos_token_id").into_iter().collect(),
        dtype: DType::F32,
    };
    if let Some(t) = file.get(&key("rope.scaling.type")).and_then(Value::as_str) {
        let factor = opt_f("rope.scaling.factor").unwrap_or(1.0);
        match t {
            "none" => {}
            "linear" => config.rope_scaling = RopeScaling::Linear { factor },
            other => {
                return Err(CoreError::gguf(
                    file.path(),
                    format!(
                        "{} = {other:?}: only linear RoPE scaling is supported",
                        key("rope.scaling.type")
                    ),
                ));
            }
        }
    }
    if let Some(s) = llama3_scaling(file, &config)? {
        config.rope_scaling = s;
    }
    if let Some(w) = opt_u("attention.sliding_window") {
        config.sliding_window = Some(w);
    }
    Ok(config)
}

/// Options of [`import_gguf`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Storage dtype of the HF weights; `None`: F16 or BF16 when the GGUF's matrices are stored
    /// so, else F32 (dequantised values are exact in f32, not in 16 bits).
    pub dtype: Option<DType>,
    /// Replace a non-empty output directory.
    pub overwrite: bool,
}

/// What [`import_gguf`] did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The configuration written.
    pub config: LlamaConfig,
    /// Tensors per GGUF storage type.
    pub types: BTreeMap<String, usize>,
    /// `tokenizer.ggml.model` (`gpt2`, `llama`).
    pub tokenizer_model: String,
    /// `tokenizer.ggml.pre`, when present.
    pub tokenizer_pre: Option<String>,
    /// Whether a chat template was written.
    pub chat_template: bool,
    /// `general.name`, when present.
    pub name: Option<String>,
}

struct GgufTensorSource<'a> {
    file: &'a GgufFile,
    info: &'a TensorInfo,
    shape: Vec<usize>,
    dtype: DType,
    permute: Option<usize>,
    hf_name: String,
    done: Option<&'a std::cell::Cell<usize>>,
    total: usize,
    progress: Option<&'a dyn Fn(usize, usize)>,
}

impl TensorSource for GgufTensorSource<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn byte_len(&self) -> usize {
        self.info.numel() * self.dtype.size()
    }
    fn write_to(&self, w: &mut dyn Write) -> Result<()> {
        let mut values = self.file.dequantize(self.info)?;
        if let Some(heads) = self.permute {
            values = permute_rows(&values, self.shape[0], heads, false);
        }
        let bytes = save::f32_to_finite_bytes(&self.hf_name, &values, self.dtype)?;
        w.write_all(&bytes)
            .map_err(|e| CoreError::io("<output>", e))?;
        if let (Some(done), Some(p)) = (self.done, self.progress) {
            done.set(done.get() + 1);
            p(done.get(), self.total);
        }
        Ok(())
    }
}

/// Write a HuggingFace model directory (config, safetensors, tokenizer, generation config) from
/// a GGUF file of the LLaMA family, atomically. `progress(done, total)` follows the tensors.
pub fn import_gguf(
    path: &Path,
    out: &Path,
    opts: &ImportOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<ImportReport> {
    let file = GgufFile::open(path)?;
    let mut config = config_from_gguf(&file)?;
    let mut types = BTreeMap::new();
    for t in &file.tensors {
        *types.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
    }
    let unsupported: Vec<String> = file
        .tensors
        .iter()
        .filter(|t| !t.ggml_type.is_supported())
        .map(|t| format!("{} ({})", t.name, t.ggml_type.name()))
        .collect();
    if !unsupported.is_empty() {
        return Err(CoreError::gguf(
            path,
            format!(
                "{} tensor(s) stored in types we cannot dequantise: {}{}; supported: {}",
                unsupported.len(),
                unsupported[..unsupported.len().min(5)].join(", "),
                if unsupported.len() > 5 { ", …" } else { "" },
                GgmlType::supported_names()
            ),
        ));
    }
    config.dtype = opts.dtype.unwrap_or_else(|| {
        let matrix_types: Vec<GgmlType> = file
            .tensors
            .iter()
            .filter(|t| t.dims.len() == 2)
            .map(|t| t.ggml_type)
            .collect();
        if !matrix_types.is_empty() && matrix_types.iter().all(|&t| t == GgmlType::BF16) {
            DType::BF16
        } else if !matrix_types.is_empty() && matrix_types.iter().all(|&t| t == GgmlType::F16) {
            DType::F16
        } else {
            DType::F32
        }
    });

    // Every tensor the configuration needs, with its shape; nothing left over.
    let mut by_hf: BTreeMap<String, &TensorInfo> = BTreeMap::new();
    let mut unknown = Vec::new();
    for t in &file.tensors {
        if t.name == "rope_freqs.weight" {
            continue;
        }
        match hf_name(&t.name) {
            Some(n) => {
                by_hf.insert(n, t);
            }
            None => unknown.push(t.name.clone()),
        }
    }
    if !unknown.is_empty() {
        return Err(CoreError::gguf(
            path,
            format!(
                "tensor(s) that a {} model does not have: {:?}",
                config.architecture.hf_class(),
                &unknown[..unknown.len().min(8)]
            ),
        ));
    }
    let mut tensors = Vec::new();
    let mut missing = Vec::new();
    for (name, shape) in config.tensor_shapes() {
        let Some(info) = by_hf.remove(&name) else {
            missing.push(gguf_name(&name).unwrap_or(name));
            continue;
        };
        if info.shape() != shape {
            return Err(CoreError::gguf(
                path,
                format!(
                    "tensor {:?} has shape {:?} (GGUF dims {:?}), expected {shape:?} from the metadata",
                    info.name,
                    info.shape(),
                    info.dims
                ),
            ));
        }
        tensors.push((
            name.clone(),
            GgufTensorSource {
                file: &file,
                info,
                permute: permute_heads(&config, &name),
                shape,
                dtype: config.dtype,
                hf_name: name,
                done: None,
                total: 0,
                progress: None,
            },
        ));
    }
    if !missing.is_empty() {
        return Err(CoreError::gguf(
            path,
            format!("missing tensor(s) {:?}", &missing[..missing.len().min(8)]),
        ));
    }
    if let Some((extra, _)) = by_hf.into_iter().next() {
        return Err(CoreError::gguf(
            path,
            format!(
                "tensor {:?} is not used by the model the metadata describes",
                gguf_name(&extra).unwrap_or(extra)
            ),
        ));
    }

    let tok = tokenizer_from_gguf(&file)?;
    if let Some(b) = tok.bos_token_id {
        config.bos_token_id = Some(b);
    }
    if let Some(e) = tok.eos_token_id {
        config.eos_token_ids = vec![e];
    }
    let hf = HfConfig::from_config(&config);
    let mut json = hf.to_json(&config);
    if let Some(p) = tok.pad_token_id {
        json.insert("pad_token_id".into(), p.into());
    }
    let source_files = TokenizerFiles {
        tokenizer_json: tok.tokenizer_json.clone(),
        tokenizer_config: tok.tokenizer_config.clone(),
        generation: generation_config(&config, tok.pad_token_id),
    };
    let opts_save = SaveOptions {
        dtype: Some(config.dtype),
        overwrite: opts.overwrite,
        ..SaveOptions::default()
    };
    let total = tensors.len();
    for (_, t) in &mut tensors {
        t.total = total;
    }
    let done = std::cell::Cell::new(0usize);
    for (_, t) in &mut tensors {
        t.done = Some(&done);
        t.progress = Some(progress);
    }
    save::write_model_dir_checked(out, &json, tensors, None, &opts_save, &mut |tmp| {
        source_files.write(tmp)
    })?;
    Ok(ImportReport {
        config,
        types,
        tokenizer_model: file
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        tokenizer_pre: file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .map(str::to_string),
        chat_template: tok.chat_template.is_some(),
        name: file
            .get("general.name")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

fn generation_config(config: &LlamaConfig, pad: Option<u32>) -> Json {
    let mut g = Map::new();
    if let Some(b) = config.bos_token_id {
        g.insert("bos_token_id".into(), b.into());
    }
    match config.eos_token_ids.as_slice() {
        [] => {}
        [e] => {
            g.insert("eos_token_id".into(), (*e).into());
        }
        many => {
            g.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    if let Some(p) = pad {
        g.insert("pad_token_id".into(), p.into());
    }
    Json::Object(g)
}

struct TokenizerFiles {
    tokenizer_json: Json,
    tokenizer_config: Json,
    generation: Json,
}

impl TokenizerFiles {
    fn write(&self, dir: &Path) -> Result<()> {
        save::write_json(&dir.join("tokenizer.json"), &self.tokenizer_json)?;
        save::write_json(&dir.join("tokenizer_config.json"), &self.tokenizer_config)?;
        save::write_json(&dir.join("generation_config.json"), &self.generation)
    }
}

/// Options of [`export_gguf`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Storage type of the matrices: F32, F16, BF16 or Q8_0 (1-D tensors stay F32, as in
    /// llama.cpp's converter).
    pub ggml_type: GgmlType,
    /// `general.name` (default: the model directory's name, as convert does).
    pub name: Option<String>,
    /// Replace an existing output file.
    pub overwrite: bool,
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The model's configuration.
    pub config: LlamaConfig,
    /// Tensors per storage type.
    pub types: BTreeMap<String, usize>,
    /// Bytes of the file.
    pub bytes: u64,
    /// Parameters written.
    pub params: usize,
    /// Metadata keys written.
    pub metadata_keys: usize,
    /// Things llama.cpp will not do as transformers does (sliding window…), for the user.
    pub warnings: Vec<String>,
}

/// llama.cpp's `LlamaFileType` of an output type (`general.file_type`).
fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        _ => 0,
    }
}

/// gguf-py's `model_weight_count_rounded_notation` (`general.size_label`): `135M`, `1.2B`.
pub fn size_label(params: usize) -> String {
    let n = params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round() as u64);
    let digits = digits.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// Write a GGUF file for the HF model in `model_dir`: the metadata and tensors llama.cpp's
/// `convert_hf_to_gguf.py` writes, through a temporary file renamed when complete.
pub fn export_gguf(
    model_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport> {
    if !matches!(
        opts.ggml_type,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return Err(CoreError::setting(
            "dtype",
            format!(
                "{} is not an export type; expected f32, f16, bf16 or q8_0",
                opts.ggml_type.name()
            ),
        ));
    }
    if out.exists() && !opts.overwrite {
        return Err(CoreError::Invalid(format!(
            "{} exists (allow overwriting to replace it)",
            out.display()
        )));
    }
    let hf = HfConfig::from_path(model_dir)?;
    let config = hf.config.clone();
    let raw = &hf.raw;
    let ckpt = Checkpoint::open(model_dir)?;
    ckpt.check_layout(&config)?;
    let arch = match config.architecture {
        Architecture::Qwen2 => "qwen2",
        // convert_hf_to_gguf.py writes Mistral models as `llama` (llama.cpp has no sliding
        // window for that architecture).
        Architecture::Llama | Architecture::Mistral => "llama",
    };
    let mut warnings = Vec::new();
    if let Some(w) = config.sliding_window
        && w < config.max_position_embeddings
    {
        warnings.push(format!(
            "sliding_window {w} is not stored: llama.cpp attends over the whole context (as \
             convert_hf_to_gguf.py does for Mistral), so outputs differ past {w} tokens"
        ));
    }

    // The tensors, in the order of the checkpoint's layout, with their GGUF types.
    let mut plan: Vec<(String, String, Vec<usize>, GgmlType)> = Vec::new();
    if let RopeScaling::Llama3 { .. } = config.rope_scaling {
        plan.push((
            String::new(),
            "rope_freqs.weight".into(),
            vec![config.head_dim / 2],
            GgmlType::F32,
        ));
    }
    for (name, shape) in config.tensor_shapes() {
        let g = gguf_name(&name)
            .ok_or_else(|| CoreError::Invalid(format!("tensor {name:?} has no GGUF name")))?;
        let mut ty = if shape.len() <= 1 || g.ends_with("_norm.weight") {
            GgmlType::F32
        } else {
            opts.ggml_type
        };
        // gguf-py raises QuantError for rows that are not whole blocks; convert falls back to F16.
        if !shape
            .last()
            .copied()
            .unwrap_or(0)
            .is_multiple_of(ty.block_size())
        {
            warnings.push(format!(
                "{g}: rows of {} are not blocks of {}, written as F16",
                shape[shape.len() - 1],
                ty.block_size()
            ));
            ty = GgmlType::F16;
        }
        plan.push((name, g, shape, ty));
    }
    let params: usize = plan.iter().map(|p| p.2.iter().product::<usize>()).sum();

    let mut meta: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| meta.push((k.to_string(), v));
    put("general.architecture", Value::String(arch.into()));
    put("general.type", Value::String("model".into()));
    // gguf-py's `Metadata.load` reads sampling defaults from generation_config.json.
    let gcfg: Map<String, Json> = std::fs::read_to_string(model_dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let num = |k: &str| gcfg.get(k).and_then(Json::as_f64);
    let int = |k: &str| gcfg.get(k).and_then(Json::as_i64);
    if let Some(v) = gcfg.get("sequence").and_then(Json::as_str) {
        put("general.sampling.sequence", Value::String(v.into()));
    }
    if let Some(v) = int("top_k") {
        put("general.sampling.top_k", Value::I32(v as i32));
    }
    for (k, g) in [
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("xtc_probability", "xtc_probability"),
        ("xtc_threshold", "xtc_threshold"),
        ("temperature", "temp"),
    ] {
        if let Some(v) = num(k) {
            put(&format!("general.sampling.{g}"), Value::F32(v as f32));
        }
    }
    if let Some(v) = int("penalty_last_n") {
        put("general.sampling.penalty_last_n", Value::I32(v as i32));
    }
    if let Some(v) = num("penalty_repeat").or_else(|| num("repetition_penalty")) {
        put("general.sampling.penalty_repeat", Value::F32(v as f32));
    }
    if let Some(v) = int("mirostat") {
        put("general.sampling.mirostat", Value::I32(v as i32));
    }
    for (k, g) in [
        ("mirostat_tau", "mirostat_tau"),
        ("mirostat_eta", "mirostat_eta"),
    ] {
        if let Some(v) = num(k) {
            put(&format!("general.sampling.{g}"), Value::F32(v as f32));
        }
    }
    let name = opts.name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(model_dir)
            .unwrap_or_else(|_| model_dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into())
    });
    put("general.name", Value::String(name));
    put("general.size_label", Value::String(size_label(params)));
    let a = |k: &str| format!("{arch}.{k}");
    put(
        &a("block_count"),
        Value::U32(config.num_hidden_layers as u32),
    );
    put(
        &a("context_length"),
        Value::U32(config.max_position_embeddings as u32),
    );
    put(
        &a("embedding_length"),
        Value::U32(config.hidden_size as u32),
    );
    put(
        &a("feed_forward_length"),
        Value::U32(config.intermediate_size as u32),
    );
    put(
        &a("attention.head_count"),
        Value::U32(config.num_attention_heads as u32),
    );
    if raw.get("num_key_value_heads").is_some_and(|v| !v.is_null()) {
        put(
            &a("attention.head_count_kv"),
            Value::U32(config.num_key_value_heads as u32),
        );
    }
    if let RopeScaling::Linear { factor } = config.rope_scaling {
        put(&a("rope.scaling.type"), Value::String("linear".into()));
        put(&a("rope.scaling.factor"), Value::F32(factor as f32));
    }
    let theta_given = raw.get("rope_theta").is_some_and(|v| !v.is_null())
        || raw
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .is_some_and(|v| !v.is_null());
    if theta_given {
        put(&a("rope.freq_base"), Value::F32(config.rope_theta as f32));
    }
    if raw.get("rms_norm_eps").is_some_and(|v| !v.is_null()) {
        put(
            &a("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        );
    }
    if raw.get("head_dim").is_some_and(|v| !v.is_null()) {
        put(
            &a("attention.key_length"),
            Value::U32(config.head_dim as u32),
        );
        put(
            &a("attention.value_length"),
            Value::U32(config.head_dim as u32),
        );
    }
    put("general.file_type", Value::U32(file_type(opts.ggml_type)));
    if arch == "llama" {
        put(&a("vocab_size"), Value::U32(config.vocab_size as u32));
        put(
            &a("rope.dimension_count"),
            Value::U32(config.head_dim as u32),
        );
    }
    put("general.quantization_version", Value::U32(2));
    meta.extend(gguf_tokenizer_metadata(model_dir)?);
    let metadata_keys = meta.len();

    let mut types = BTreeMap::new();
    for p in &plan {
        *types.entry(p.3.name().to_string()).or_insert(0) += 1;
    }
    let ckpt = &ckpt;
    let config_ref = &config;
    let tensors: Vec<PendingTensor<'_>> = plan
        .into_iter()
        .map(|(hf_name, g, shape, ty)| {
            let dims = shape.iter().rev().map(|&d| d as u64).collect();
            let is_rope = g == "rope_freqs.weight";
            let data: Box<dyn FnOnce() -> Result<Vec<u8>> + '_> = Box::new(move || {
                let values = if is_rope {
                    rope_freqs(config_ref)
                } else {
                    let v = ckpt.read_f32(&hf_name, &shape)?;
                    match permute_heads(config_ref, &hf_name) {
                        Some(heads) => permute_rows(&v, shape[0], heads, true),
                        None => v,
                    }
                };
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(CoreError::NonFinite {
                        name: hf_name,
                        message: format!("element {i} is {}: not exported", values[i]),
                    });
                }
                Ok(quant::quantize(ty, &values))
            });
            PendingTensor {
                name: g,
                dims,
                ggml_type: ty,
                data,
            }
        })
        .collect();
    write_gguf(out, &meta, tensors, progress)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(ExportReport {
        config,
        types,
        bytes,
        params,
        metadata_keys,
        warnings,
    })
}

/// The divisors llama.cpp applies to RoPE frequencies for Llama 3.1 scaling (convert's
/// `generate_extra_tensors`).
fn rope_freqs(config: &LlamaConfig) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = config.rope_scaling
    else {
        return vec![1.0; config.head_dim / 2];
    };
    let hd = config.head_dim;
    let orig = original_max_position_embeddings as f64;
    let low_wl = orig / low_freq_factor;
    let high_wl = orig / high_freq_factor;
    (0..hd / 2)
        .map(|i| {
            let f = 1.0 / config.rope_theta.powf((2 * i) as f64 / hd as f64);
            let wl = 2.0 * std::f64::consts::PI / f;
            let r = if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor
            } else {
                let smooth = (orig / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            r as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.12.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(n).unwrap()).unwrap(), n);
        }
    }

    #[test]
    fn permutation_is_inverted() {
        let (rows, cols, heads) = (24, 3, 3);
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let g = permute_rows(&v, rows, heads, true);
        assert_ne!(g, v);
        // convert's reshape(n_head, 2, hd/2, cols).swapaxes(1, 2): row 1 of head 0 is HF row hd/2.
        assert_eq!(&g[cols..2 * cols], &v[4 * cols..5 * cols]);
        assert_eq!(permute_rows(&g, rows, heads, false), v);
    }

    #[test]
    fn size_labels_as_gguf_py() {
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_235_814_400), "1.2B");
        assert_eq!(size_label(8_030_261_248), "8.0B");
        assert_eq!(size_label(2_560_000), "2.6M");
    }
}
