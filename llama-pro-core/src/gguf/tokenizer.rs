//! Tokenizers between GGUF metadata (`tokenizer.ggml.*`) and HuggingFace files
//! (`tokenizer.json`, `tokenizer_config.json`).
//!
//! **Import** ([`tokenizer_from_gguf`]) rebuilds the `tokenizer.json` transformers builds when it
//! loads a GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=…)`, transformers 5:
//! `integrations/gguf/gguf_tokenizer_mapping.py`), so that the `tokenizers` crate gives the same
//! ids as transformers:
//!
//! - `tokenizer.ggml.model = "llama"` (SentencePiece-style BPE: Llama 2, Mistral, Phi-3): BPE with
//!   byte fallback over the vocabulary as stored, `▁` `Metaspace` pre-tokenizer (prepend on the
//!   first piece only; Phi-3 files get a `Prepend`/`Replace` normalizer instead, by
//!   architecture), the merges of the file or, as there are usually none, the ones the scores
//!   imply (transformers' `generate_merges`), BOS added unless `tokenizer.ggml.add_bos_token` is
//!   false.
//! - `"gpt2"` (byte-level BPE: Llama 3, Qwen2, SmolLM): GPT-2's byte alphabet, the file's merges,
//!   the split regex picked by `tokenizer.ggml.pre` (`llama-bpe`/`llama3`… → Llama 3's, `qwen2` →
//!   Qwen2's, …); a value transformers has no regex for (`smollm`, `gpt-2`, `starcoder`, …) gets
//!   GPT-2's byte-level regex, as in transformers.
//!
//! Tokens typed CONTROL (3) become special added tokens, USER_DEFINED (4) plain added tokens, and
//! the BOS/EOS/UNK/PAD tokens special ones. Where transformers disagrees with llama.cpp we follow
//! transformers (llama.cpp's own test vocabularies: `llama-spm` differs on 15 of 46 strings, all
//! with leading or repeated spaces, where transformers' `Metaspace` adds no `▁` before a leading
//! space; the `gpt2` ones differ only where llama.cpp isolates digits or numerals, e.g. `½`),
//! except where transformers gives ids past the model's vocabulary: it adds GPT-2's
//! `<|endoftext|>` to a byte-level vocabulary that lacks it (Llama 3), which we do not, and it
//! appends the special tokens the byte alphabet cannot spell (DeepSeek's `<｜begin▁of▁sentence｜>`,
//! stored as text by convert) as new tokens, where we keep them at their ids under their
//! re-spelled names (so BOS is id 100000 as in llama.cpp, not 102401).
//!
//! **Export** ([`gguf_tokenizer_metadata`]) writes what llama.cpp's `convert_hf_to_gguf.py`
//! writes for a LLaMA/Mistral/Qwen2 directory, key for key and in its order: `tokenizer.model`
//! (SentencePiece protobuf) when present → `_set_vocab_sentencepiece`; a SentencePiece-style BPE
//! `tokenizer.json` → `_set_vocab_llama_hf`; any other → `_set_vocab_gpt2`, with
//! `tokenizer.ggml.pre` from the sha256 of the ids of convert's check text; then gguf-py's
//! `SpecialVocab` (merges, special ids, `add_*_token`, chat template). Two choices of ours where
//! convert would fail or lose the tokenizer: a check hash missing from convert's table (which
//! makes convert stop) is resolved from the pre-tokenizer's structure, and `_set_vocab_llama_hf`'s
//! placeholder scores (-1000) are replaced by merge ranks (see `set_vocab_llama_hf`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};

use super::{ArrayValue, GgufFile, Value};
use crate::chat::read_json;
use crate::error::{CoreError, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`, gguf-py's `TokenType`).
pub mod token_type {
    /// An ordinary token.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A special token (`<s>`, `<|im_start|>`).
    pub const CONTROL: i32 = 3;
    /// An added token that is not special (`<think>`).
    pub const USER_DEFINED: i32 = 4;
    /// A filler (`[PAD123]`).
    pub const UNUSED: i32 = 5;
    /// A byte-fallback token (`<0x0A>`).
    pub const BYTE: i32 = 6;
}
use token_type::*;

/// HuggingFace tokenizer files rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
#[derive(Debug, Clone)]
pub struct HfTokenizerFiles {
    /// `tokenizer.json`
    pub tokenizer_json: Json,
    /// `tokenizer_config.json` (bos/eos/unk/pad tokens, add_bos_token/add_eos_token, chat_template
    /// when present, model_max_length if known, tokenizer_class)
    pub tokenizer_config: Json,
    /// Special token ids for config.json / generation_config.json.
    pub bos_token_id: Option<u32>,
    /// End of sequence.
    pub eos_token_id: Option<u32>,
    /// Padding.
    pub pad_token_id: Option<u32>,
    /// The chat template string (`tokenizer.chat_template`), if any.
    pub chat_template: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte → character table (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the others for U+0100 onwards.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut printable = [false; 256];
    for b in (0x21..=0x7Eu32).chain(0xA1..=0xAC).chain(0xAE..=0xFF) {
        printable[b as usize] = true;
        table[b as usize] = char::from_u32(b).expect("Latin-1");
    }
    let mut n = 0;
    for b in 0..256usize {
        if !printable[b] {
            table[b] = char::from_u32(256 + n).expect("valid");
            n += 1;
        }
    }
    table
}

/// Llama 3's split (llama.cpp `LLAMA3`, transformers `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (`Qwen2Tokenizer.PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split (also Llama 4).
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values with a split regex of their own, as transformers'
/// `GGUF_PRE_TOKENIZER_SPLITS`.
const PRE_SPLITS: &[(&str, &str)] = &[
    ("llama3", LLAMA3_SPLIT),
    ("llama-v3", LLAMA3_SPLIT),
    ("llama-bpe", LLAMA3_SPLIT),
    ("falcon3", LLAMA3_SPLIT),
    ("falcon-h1", LLAMA3_SPLIT),
    ("pixtral", LLAMA3_SPLIT),
    ("midm-2.0", LLAMA3_SPLIT),
    ("lfm2", LLAMA3_SPLIT),
    ("jina-v5-nano", LLAMA3_SPLIT),
    ("dbrx", LLAMA3_SPLIT),
    ("smaug-bpe", LLAMA3_SPLIT),
    ("tekken", TEKKEN_SPLIT),
    ("qwen2", QWEN2_SPLIT),
    ("deepseek-r1-qwen", QWEN2_SPLIT),
    ("kormo", QWEN2_SPLIT),
    ("f2llmv2", QWEN2_SPLIT),
    ("megrez", QWEN2_SPLIT),
    ("qwen35", QWEN35_SPLIT),
    ("gpt-4o", GPT4O_SPLIT),
    ("llama4", GPT4O_SPLIT),
    ("kanana2", GPT4O_SPLIT),
    ("talkie", GPT4O_SPLIT),
    ("minimax-m2", GPT4O_SPLIT),
];

/// `tokenizer.ggml.pre` values llama.cpp splits with GPT-2's regex (some after isolating
/// digits), for which transformers' default byte-level pre-tokenizer is the intended one.
const GPT2_LIKE_PRE: &[&str] = &[
    "gpt-2",
    "gpt2",
    "default",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "exaone4",
    "minerva-7b",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "granite-docling",
    "phi-2",
    "roberta-bpe",
    "jina-v1-en",
    "jina-v2-code",
    "jina-es",
    "jina-de",
    "jina-v2-es",
    "jina-v2-de",
    "gigachat",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "mellum2",
];

/// gguf-py's `SpecialVocab` key of a special token kind (`None`: convert writes nothing for it).
fn special_id_key(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Import: GGUF → HF
// ---------------------------------------------------------------------------------------------

/// The `tokenizer.*` metadata of a GGUF file, checked.
struct GgufVocab<'a> {
    path: &'a Path,
    model: &'a str,
    pre: Option<&'a str>,
    arch: Option<&'a str>,
    tokens: &'a [String],
    types: Option<Vec<i32>>,
    scores: Option<Vec<f32>>,
    merges: Option<&'a [String]>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    add_space_prefix: Option<bool>,
    chat_template: Option<&'a str>,
    context_length: Option<u64>,
}

fn bad(path: &Path, key: &str, v: &Value, expected: &str) -> CoreError {
    CoreError::gguf(
        path,
        format!("{key} = {} (expected {expected})", v.summary()),
    )
}

fn get_str<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad(file.path(), key, v, "a string")),
    }
}

fn get_bool(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        // Some writers store flags as integers.
        Some(v) => match v.as_u64() {
            Some(n @ (0 | 1)) => Ok(Some(n == 1)),
            _ => Err(bad(file.path(), key, v, "a bool")),
        },
    }
}

/// A token id: an integer below `n`; out of range it is ignored with a warning, as llama.cpp
/// does (transformers would fail).
fn get_id(file: &GgufFile, key: &str, n: usize) -> Result<Option<u32>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    match v {
        Value::I8(x) if *x < 0 => return Ok(None),
        Value::I16(x) if *x < 0 => return Ok(None),
        Value::I32(x) if *x < 0 => return Ok(None),
        Value::I64(x) if *x < 0 => return Ok(None),
        _ => {}
    }
    let id = v
        .as_u64()
        .ok_or_else(|| bad(file.path(), key, v, "an integer token id"))?;
    if id >= n as u64 {
        log::warn!(
            "{}: {key} = {id} is not a token of the {n}-token vocabulary; ignored",
            file.path().display()
        );
        return Ok(None);
    }
    Ok(Some(id as u32))
}

fn int_array(path: &Path, key: &str, v: &Value) -> Result<Vec<i32>> {
    match v {
        Value::Array(ArrayValue::I32(a)) => Ok(a.clone()),
        Value::Array(ArrayValue::U32(a)) => Ok(a.iter().map(|&x| x as i32).collect()),
        Value::Array(ArrayValue::Other(_, a)) => a
            .iter()
            .map(|x| match *x {
                Value::I8(v) => Some(v as i32),
                Value::I16(v) => Some(v as i32),
                Value::I64(v) => i32::try_from(v).ok(),
                ref o => o.as_u64().and_then(|u| i32::try_from(u).ok()),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad(path, key, v, "an array of integers")),
        _ => Err(bad(path, key, v, "an array of integers")),
    }
}

fn float_array(path: &Path, key: &str, v: &Value) -> Result<Vec<f32>> {
    match v {
        Value::Array(ArrayValue::F32(a)) => Ok(a.clone()),
        Value::Array(ArrayValue::Other(_, a)) => a
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad(path, key, v, "an array of floats")),
        _ => Err(bad(path, key, v, "an array of floats")),
    }
}

impl<'a> GgufVocab<'a> {
    fn read(file: &'a GgufFile) -> Result<Self> {
        let path = file.path();
        let model = get_str(file, "tokenizer.ggml.model")?.ok_or_else(|| {
            CoreError::gguf(
                path,
                "missing metadata key \"tokenizer.ggml.model\": the file carries no tokenizer",
            )
        })?;
        if model != "llama" && model != "gpt2" {
            return Err(CoreError::gguf(
                path,
                format!(
                    "tokenizer.ggml.model = {model:?} is not supported; supported: \"llama\" \
                     (SentencePiece-style BPE: Llama 2, Mistral, Phi-3) and \"gpt2\" (byte-level \
                     BPE: Llama 3, Qwen2, SmolLM)"
                ),
            ));
        }
        let tokens = match file.get("tokenizer.ggml.tokens") {
            Some(Value::Array(ArrayValue::String(t))) => t.as_slice(),
            Some(v) => return Err(bad(path, "tokenizer.ggml.tokens", v, "an array of strings")),
            None => {
                return Err(CoreError::gguf(
                    path,
                    "missing metadata key \"tokenizer.ggml.tokens\" (the vocabulary)",
                ));
            }
        };
        if tokens.is_empty() {
            return Err(CoreError::gguf(path, "tokenizer.ggml.tokens is empty"));
        }
        let n = tokens.len();
        let types = match file.get("tokenizer.ggml.token_type") {
            None => None,
            Some(v) => Some(int_array(path, "tokenizer.ggml.token_type", v)?),
        };
        let scores = match file.get("tokenizer.ggml.scores") {
            None => None,
            Some(v) => Some(float_array(path, "tokenizer.ggml.scores", v)?),
        };
        for (key, len) in [
            ("tokenizer.ggml.token_type", types.as_ref().map(Vec::len)),
            ("tokenizer.ggml.scores", scores.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len
                && len != n
            {
                return Err(CoreError::gguf(
                    path,
                    format!("{key} has {len} entries for {n} tokens (expected one per token)"),
                ));
            }
        }
        let merges = match file.get("tokenizer.ggml.merges") {
            None => None,
            Some(Value::Array(ArrayValue::String(m))) => Some(m.as_slice()),
            // An empty array may come typed otherwise.
            Some(Value::Array(a)) if a.is_empty() => Some(&[][..]),
            Some(v) => return Err(bad(path, "tokenizer.ggml.merges", v, "an array of strings")),
        };
        let arch = get_str(file, "general.architecture")?;
        let context_length = arch
            .and_then(|a| file.get(&format!("{a}.context_length")))
            .and_then(Value::as_u64);
        Ok(Self {
            path,
            model,
            pre: get_str(file, "tokenizer.ggml.pre")?,
            arch,
            tokens,
            types,
            scores,
            merges,
            bos: get_id(file, "tokenizer.ggml.bos_token_id", n)?,
            eos: get_id(file, "tokenizer.ggml.eos_token_id", n)?,
            unk: get_id(file, "tokenizer.ggml.unknown_token_id", n)?,
            pad: get_id(file, "tokenizer.ggml.padding_token_id", n)?,
            add_bos: get_bool(file, "tokenizer.ggml.add_bos_token")?,
            add_eos: get_bool(file, "tokenizer.ggml.add_eos_token")?,
            add_space_prefix: get_bool(file, "tokenizer.ggml.add_space_prefix")?,
            chat_template: get_str(file, "tokenizer.chat_template")?,
            context_length,
        })
    }

    fn token_type(&self, i: usize) -> i32 {
        self.types.as_ref().map_or(NORMAL, |t| t[i])
    }
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into two
/// tokens, best score first (then shorter left, shorter right), ties in vocabulary order.
fn generate_merges(
    keys: &[String],
    vocab: &HashMap<&str, u32>,
    scores: &[f32],
) -> Vec<(String, String)> {
    // `dict(zip(tokens, scores))`: first position, last score.
    let mut order: Vec<&str> = Vec::with_capacity(keys.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(keys.len());
    for (k, &s) in keys.iter().zip(scores) {
        if score.insert(k.as_str(), s).is_none() {
            order.push(k.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    for merge in order {
        let s = score[merge];
        let mut local: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
        let mut n_left = 0usize;
        let total = merge.chars().count();
        for (at, _) in merge.char_indices().skip(1) {
            n_left += 1;
            let (l, r) = merge.split_at(at);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push((l, r, s, n_left, total - n_left));
            }
        }
        local.sort_by_key(|&(l, r, ..)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // `sorted(..., key=(score, len(l), len(r)), reverse=True)`: stable, so ties keep their order.
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
    });
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect()
}

/// An entry of `added_tokens` as transformers writes it.
fn added_token(id: u32, content: &str, special: bool) -> Json {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// transformers' `update_post_processor`: `[bos:0] $A:0 [eos:0]` / `… [bos:1] $B:1 [eos:1]`.
fn template_processing(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some((b, _)) = bos {
        single.push(special(b, 0));
    }
    single.push(seq("A", 0));
    if let Some((e, _)) = eos {
        single.push(special(e, 0));
    }
    pair.extend(single.iter().cloned());
    if let Some((b, _)) = bos {
        pair.push(special(b, 1));
    }
    pair.push(seq("B", 1));
    if let Some((e, _)) = eos {
        pair.push(special(e, 1));
    }
    let mut tokens = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
}

/// The HuggingFace tokenizer files of a GGUF file's tokenizer, as transformers builds them when
/// it loads the file (see the module documentation for what is supported and the differences).
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<HfTokenizerFiles> {
    let v = GgufVocab::read(file)?;
    let path = v.path;
    let byte_level = v.model == "gpt2";
    if !byte_level
        && let Some(arch) = v.arch
        && arch.starts_with("gemma")
    {
        return Err(CoreError::gguf(
            path,
            format!(
                "a SentencePiece tokenizer (tokenizer.ggml.model = \"llama\") of architecture \
                 {arch:?} (general.architecture): Gemma's tokenizers are not supported; supported: \
                 those of llama, mistral, qwen2, phi3 and other LLaMA-style files"
            ),
        ));
    }

    // The vocabulary: byte-level tokens that use characters outside GPT-2's alphabet are
    // re-spelled from their UTF-8 bytes (transformers' `byte_level_tokenizer`).
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let keys: Vec<String> = v
        .tokens
        .iter()
        .map(|t| {
            if !byte_level || spelled(t) {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            }
        })
        .collect();
    // `{token: index}`: a repeated token keeps its last id.
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        vocab.insert(k.as_str(), i as u32);
    }

    let merges: Vec<(String, String)> = match v.merges {
        Some(m) => m
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // llama.cpp splits at the first space after the first character.
                let at = s.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(at, _)| at);
                match at {
                    Some(at) => Ok((s[..at].to_string(), s[at + 1..].to_string())),
                    None => Err(CoreError::gguf(
                        path,
                        format!(
                            "tokenizer.ggml.merges[{i}] = {s:?} (expected two tokens separated by a space)"
                        ),
                    )),
                }
            })
            .collect::<Result<_>>()?,
        None => {
            let scores = v.scores.as_ref().ok_or_else(|| {
                CoreError::gguf(
                    path,
                    "neither tokenizer.ggml.merges nor tokenizer.ggml.scores: cannot recover the \
                     BPE merges",
                )
            })?;
            generate_merges(&keys, &vocab, scores)
        }
    };

    // Added tokens: CONTROL → special, USER_DEFINED → plain, then the named special tokens. A
    // special token the byte alphabet cannot spell (convert writes added tokens as text) keeps
    // its id under its re-spelled name, which no text produces: transformers skips it as a
    // mislabel, or, for BOS/EOS/UNK/PAD, appends it past the vocabulary.
    let mut added: BTreeMap<u32, (String, bool)> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        if v.token_type(i) == CONTROL {
            added.insert(vocab[k.as_str()], (k.clone(), true));
        }
    }
    for (i, tok) in v.tokens.iter().enumerate() {
        if v.token_type(i) == USER_DEFINED
            && let Some(&id) = vocab.get(tok.as_str())
        {
            added.entry(id).or_insert_with(|| (tok.clone(), false));
        }
    }
    let name_of = |id: Option<u32>| id.map(|i| keys[i as usize].as_str());
    for id in [v.bos, v.eos, v.unk, v.pad].into_iter().flatten() {
        let k = keys[id as usize].as_str();
        added.insert(vocab[k], (k.to_string(), true));
    }
    let add_bos = v.add_bos.unwrap_or(!byte_level);
    let add_eos = v.add_eos.unwrap_or(false);
    let bos = name_of(v.bos).filter(|_| add_bos).map(|t| (t, vocab[t]));
    let eos = name_of(v.eos).filter(|_| add_eos).map(|t| (t, vocab[t]));

    // convert's `[PAD{id}]` fillers of a byte-level vocabulary (UNUSED) are left out, unlike
    // transformers (no text reaches them either way), so that an export writes them as fillers
    // again rather than as ordinary tokens.
    let mut vocab_json = Map::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        if byte_level
            && v.token_type(i) == UNUSED
            && *k == format!("[PAD{i}]")
            && !added.contains_key(&(i as u32))
        {
            continue;
        }
        vocab_json.insert(k.clone(), json!(vocab[k.as_str()]));
    }
    let merges_json: Vec<Json> = merges.into_iter().map(|(l, r)| json!([l, r])).collect();

    let (normalizer, pre_tokenizer, decoder, model) = if byte_level {
        let pre = match v.pre.and_then(|p| PRE_SPLITS.iter().find(|(n, _)| *n == p)) {
            Some((_, regex)) => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
                ],
            }),
            None => {
                match v.pre {
                    Some(p) if GPT2_LIKE_PRE.contains(&p) => {}
                    other => log::warn!(
                        "{}: tokenizer.ggml.pre = {other:?} has no known split regex; using \
                         GPT-2's byte-level one, as transformers does (known: {})",
                        path.display(),
                        PRE_SPLITS
                            .iter()
                            .map(|(n, _)| *n)
                            .chain(GPT2_LIKE_PRE.iter().copied())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
        };
        (
            Json::Null,
            pre,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab_json,
                "merges": merges_json,
            }),
        )
    } else {
        let phi3 = v.arch == Some("phi3");
        let (normalizer, pre) = if phi3 {
            (
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
                ]}),
                Json::Null,
            )
        } else {
            (
                Json::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
            )
        };
        (
            normalizer,
            pre,
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]}),
            json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": vocab_json,
                "merges": merges_json,
            }),
        )
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.iter().map(|(&id, (c, s))| added_token(id, c, *s)).collect::<Vec<_>>(),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": template_processing(bos, eos),
        "decoder": decoder,
        "model": model,
    });
    // Fail here, with the file named, rather than when the directory is loaded.
    if let Err(e) = tokenizers::Tokenizer::from_str(&tokenizer_json.to_string()) {
        return Err(CoreError::gguf(
            path,
            format!("the tokenizer rebuilt from tokenizer.ggml.* does not load: {e}"),
        ));
    }

    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (name, id) in [
        ("bos_token", v.bos),
        ("eos_token", v.eos),
        ("unk_token", v.unk),
        ("pad_token", v.pad),
    ] {
        if let Some(t) = name_of(id) {
            config.insert(name.into(), json!(t));
        }
    }
    // transformers assumes BOS for SentencePiece files that do not say; kept so that a new
    // export writes the flag again.
    if v.add_bos.is_some() || !byte_level {
        config.insert("add_bos_token".into(), json!(add_bos));
    }
    if let Some(e) = v.add_eos {
        config.insert("add_eos_token".into(), json!(e));
    }
    // `false` for byte-level files only, as the pre-tokenizer written above does (convert writes
    // the GGUF flag back from this key); transformers ignores the flag otherwise, and `true` would
    // make it add a space to the byte-level pre-tokenizer.
    if byte_level && v.add_space_prefix == Some(false) {
        config.insert("add_prefix_space".into(), json!(false));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(n) = v.context_length {
        config.insert("model_max_length".into(), json!(n));
    }
    if let Some(t) = v.chat_template {
        config.insert("chat_template".into(), json!(t));
    }
    Ok(HfTokenizerFiles {
        tokenizer_json,
        tokenizer_config: Json::Object(config),
        bos_token_id: v.bos,
        eos_token_id: v.eos,
        pad_token_id: v.pad,
        chat_template: v.chat_template.map(str::to_string),
    })
}

// ---------------------------------------------------------------------------------------------
// Export: HF → GGUF
// ---------------------------------------------------------------------------------------------

/// Metadata in the order written, a repeated key overwriting in place (gguf-py's `GGUFWriter`).
#[derive(Default)]
struct Kv(Vec<(String, Value)>);

impl Kv {
    fn set(&mut self, key: &str, v: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.0.push((key.to_string(), v)),
        }
    }
    fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }
    fn strings(&mut self, key: &str, v: Vec<String>) {
        self.set(key, Value::Array(ArrayValue::String(v)));
    }
}

/// convert's check text (`get_vocab_base_pre`'s `chktxt`).
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫\u{fe0f} (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 ក\u{17b6}ន\u{17cb}ត\u{17c2}ព\u{17b7}ស\u{17c1}សអ\u{17b6}ច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// convert's `get_vocab_base_pre` table, sha256 of `str(tokenizer.encode(chktxt))` →
/// `tokenizer.ggml.pre` (97 entries in convert, the later of a repeated hash kept, as there).
#[rustfmt::skip]
const CHKHSH_PRE: &[(&str, &str)] = &[
    ("b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b", "chatglm-bpe"), // THUDM/glm-4-9b-chat
    ("81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516", "chatglm-bpe"), // THUDM/glm-4-9b-chat
    ("a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2", "glm4"), // THUDM/glm-4-9b-hf
    ("9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902", "glm4"), // zai-org/GLM-4.5-Air
    ("cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267", "glm4"), // zai-org/GLM-4.7-Flash
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b"), // sapienzanlp/Minerva-7B-base-v1.0
    ("7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664", "hunyuan"), // tencent/Hunyuan-A13B-Instruct
    ("bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6", "hunyuan-dense"), // tencent/Hunyuan-4B-Instruct
    ("e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c", "hy_v4"), // tencent/Hy4-preview
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"), // tiiuae/Falcon-H1-0.5B-Base
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"), // tiiuae/Falcon-H1-1B-Base
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"), // tiiuae/Falcon-H1-7B-Base
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"), // tiiuae/Falcon-H1-34B-Base
    ("81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890", "kimi-k2"), // moonshotai/Kimi-K2-Base
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"), // Qwen/Qwen3-Embedding-0.6B
    ("1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f", "qwen35"), // openbmb/MiniCPM-V-4_6
    ("66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273", "grok-2"), // alvarobartt/grok-2-tokenizer
    ("b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df", "jina-v2-de"), // aari1995/German_Semantic_V3
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"), // evilfreelancer/ruGPT3XL
    ("9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7", "lfm2"), // LiquidAI/LFM2.5-8B-A1B
    ("846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252", "gemma4"), // danish-foundation-models/DFM-Mimir
    ("0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed", "spark2_5"), // XHToken/Spark-X2.5-1.7B
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"), // meta-llama/Meta-Llama-3-8B
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm"), // deepseek-ai/deepseek-llm-7b-base
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder"), // deepseek-ai/deepseek-coder-6.7b-base
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon"), // tiiuae/falcon-7b
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "jina-v2-en"), // jinaai/jina-embeddings-v2-base-en
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"), // tiiuae/Falcon3-7B-Base
    ("8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7", "bert-bge-large"), // BAAI/bge-large-zh-v1.5
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"), // allenai/OLMo-1.7-7B-hf
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"), // bigcode/starcoder2-3b
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"), // openai-community/gpt2
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"), // stabilityai/stablelm-2-zephyr-1_6b
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"), // smallcloudai/Refact-1_6-base
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"), // CohereForAI/c4ai-command-r-v01
    ("d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1", "tiny_aya"), // CohereLabs/tiny-aya-base
    ("52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e", "cohere2moe"), // CohereLabs/North-Mini-Code-1.0
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"), // Qwen/Qwen1.5-7B
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"), // databricks/dbrx-base
    ("c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448", "jina-v1-en"), // jinaai/jina-reranker-v1-tiny-en
    ("171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643", "jina-v2-es"), // jinaai/jina-embeddings-v2-base-es
    ("27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6", "jina-v2-de"), // jinaai/jina-embeddings-v2-base-de
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano"), // jinaai/jina-embeddings-v5-text-nano
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"), // abacusai/Smaug-Llama-3-70B-Instruct
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat"), // LumiOpen/Poro-34B-chat
    ("7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a", "jina-v2-code"), // jinaai/jina-embeddings-v2-base-code
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking"), // LumiOpen/Viking-7B
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais"), // core42/jais-13b
    ("bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a", "jais-2"), // inceptionai/Jais-2-8B-Chat
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell"), // WisdomShell/CodeShell-7B
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"), // mistralai/Mistral-Nemo-Base-2407
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"), // HuggingFaceTB/SmolLM-135M
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"), // bigscience/bloom
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish"), // TurkuNLP/gpt3-finnish-small
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone"), // LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"), // microsoft/phi-2
    ("60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450", "chameleon"), // facebook/chameleon-7b
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe"), // sentence-transformers/stsb-roberta-base
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat"), // ai-sage/GigaChat-20B-A3B-instruct
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"), // Infinigence/Megrez-3B-Instruct
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"), // deepseek-ai/DeepSeek-V3
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"), // deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"), // Xenova/gpt-4o
    ("7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f", "superbpe"), // UW/OLMo2-8B-SuperBPE-t180k
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion"), // trillionlabs/Trillion-7B-preview
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe"), // inclusionAI/Ling-lite
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"), // meta-llama/Llama-4-Scout-17B-16E-Instruct
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"), // mistral-community/pixtral-12b
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"), // ByteDance-Seed/Seed-Coder-8B-Base
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0"), // skt/A.X-4.0
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"), // K-intelligence/Midm-2.0-Base-Instruct
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"), // LiquidAI/LFM2.5-350M
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4"), // LGAI-EXAONE/EXAONE-4.0-32B
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum"), // JetBrains/Mellum-4b-base
    ("a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152", "modern-bert"), // answerdotai/ModernBERT-base
    ("49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df", "afmoe"), // arcee-ai/Trinity-Tokenizer
    ("9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206", "bailingmoe2"), // inclusionAI/Ling-mini-base-2.0
    ("53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e", "granite-docling"), // ibm-granite/granite-docling-258M
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2"), // MiniMaxAI/MiniMax-M2
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo"), // KORMo-Team/KORMo-tokenizer
    ("9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1", "youtu"), // tencent/Youtu-LLM-2B
    ("16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91", "solar-open"), // upstage/Solar-Open-100B
    ("6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f", "exaone-moe"), // LGAI-EXAONE/K-EXAONE-236B-A23B
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"), // Qwen/Qwen3.5-9B-Instruct
    ("b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d", "joyai-llm"), // jdopensource/JoyAI-LLM-Flash
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2"), // kakaocorp/kanana-2-30b-a3b-instruct-2601
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2"), // codefuse-ai/F2LLM-v2-4B
    ("62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57", "sarvam-moe"), // sarvamai/sarvam-30b
    ("f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af", "talkie"), // lewtun/talkie-1930-13b-it-hf
    ("36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4", "minicpm5"), // openbmb/MiniCPM5-1B
    ("f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60", "granite-embed-multi-97m"), // ibm-granite/granite-embedding-97m-multilingual-r2
    ("789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669", "granite-embed-multi-311m"), // ibm-granite/granite-embedding-311m-multilingual-r2
    ("9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d", "mellum2"), // JetBrains/Mellum2-12B-A2.5B-Base
    ("972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac", "laguna"), // poolside/Laguna-XS.2
    ("653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd", "ufakzeka"), // ufakai/ufakzeka-1
];

/// The files of an HF model directory the tokenizer export reads.
struct HfDir {
    dir: PathBuf,
    /// `tokenizer.json`
    tokenizer: Option<Json>,
    /// `tokenizer_config.json`
    tokenizer_config: Option<Map<String, Json>>,
    /// `config.json`
    config: Option<Map<String, Json>>,
}

fn read_object(path: &Path) -> Result<Option<Map<String, Json>>> {
    match read_json(path)? {
        None => Ok(None),
        Some(Json::Object(m)) => Ok(Some(m)),
        Some(_) => Err(CoreError::Tokenizer {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        }),
    }
}

/// Python's truthiness of a JSON value.
fn truthy(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64() != Some(0.0),
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
    }
}

/// The text of a token entry of `tokenizer_config.json` (a string or an `AddedToken` object).
fn token_content(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// convert's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

impl HfDir {
    fn load(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer: read_json(&dir.join("tokenizer.json"))?,
            tokenizer_config: read_object(&dir.join("tokenizer_config.json"))?,
            config: read_object(&dir.join("config.json"))?,
        })
    }

    fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    fn tokenizer(&self) -> Result<&Json> {
        self.tokenizer.as_ref().ok_or_else(|| CoreError::Tokenizer {
            path: self.tokenizer_path(),
            message: "file not found: exporting the tokenizer needs a HuggingFace fast tokenizer \
                      (tokenizer.json) or a SentencePiece tokenizer.model"
                .into(),
        })
    }

    fn tok_err(&self, message: impl Into<String>) -> CoreError {
        CoreError::Tokenizer {
            path: self.tokenizer_path(),
            message: message.into(),
        }
    }

    /// `config.json`'s `vocab_size` (`hparams["vocab_size"]`).
    fn vocab_size(&self) -> Option<usize> {
        self.config
            .as_ref()?
            .get("vocab_size")?
            .as_u64()
            .map(|v| v as usize)
    }

    /// `model.vocab` of `tokenizer.json` (BPE or WordPiece: token → id).
    fn model_vocab(&self) -> Result<Vec<(&str, u32)>> {
        let tj = self.tokenizer()?;
        let vocab = tj
            .get("model")
            .and_then(|m| m.get("vocab"))
            .and_then(Json::as_object)
            .ok_or_else(|| {
                self.tok_err(format!(
                    "model.vocab is not a token → id map (model type {}); only BPE tokenizers are supported",
                    tj.get("model").and_then(|m| m.get("type")).unwrap_or(&Json::Null)
                ))
            })?;
        vocab
            .iter()
            .map(|(k, v)| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .map(|id| (k.as_str(), id))
                    .ok_or_else(|| {
                        self.tok_err(format!("model.vocab[{k:?}] = {v} (expected a token id)"))
                    })
            })
            .collect()
    }

    /// `added_tokens` of `tokenizer.json`: (id, content, special, normalized).
    fn added_tokens(&self) -> Result<Vec<(u32, &str, bool, bool)>> {
        let tj = self.tokenizer()?;
        let Some(list) = tj.get("added_tokens").and_then(Json::as_array) else {
            return Ok(Vec::new());
        };
        list.iter()
            .map(|a| {
                let id = a
                    .get("id")
                    .and_then(Json::as_u64)
                    .and_then(|i| u32::try_from(i).ok());
                let content = a.get("content").and_then(Json::as_str);
                match (id, content) {
                    (Some(id), Some(c)) => Ok((
                        id,
                        c,
                        a.get("special").and_then(Json::as_bool).unwrap_or(false),
                        a.get("normalized").and_then(Json::as_bool).unwrap_or(true),
                    )),
                    _ => Err(self.tok_err(format!("added_tokens entry {a} has no id or content"))),
                }
            })
            .collect()
    }

    /// Whether `config.json` describes a Qwen2 model (convert's `Qwen2Model`, whose `set_vocab`
    /// has no SentencePiece-BPE path and no `add_prefix_space` handling).
    fn is_qwen2(&self) -> bool {
        let Some(c) = &self.config else { return false };
        let arch = c
            .get("architectures")
            .and_then(Json::as_array)
            .and_then(|a| a.first())
            .and_then(Json::as_str);
        match arch {
            Some(a) => a.starts_with("Qwen2") && !a.starts_with("Qwen2Moe"),
            None => c.get("model_type").and_then(Json::as_str) == Some("qwen2"),
        }
    }
}

/// The `tokenizer.*` metadata llama.cpp's `convert_hf_to_gguf.py` writes for the HF model
/// directory `dir` (tokenizer.json + tokenizer_config.json [+ chat_template.jinja /
/// chat_template.json] + config.json's special ids), in the same key order convert writes them.
pub fn gguf_tokenizer_metadata(dir: &Path) -> Result<Vec<(String, Value)>> {
    let hf = HfDir::load(dir)?;
    let mut kv = Kv::default();
    let sp_model = dir.join("tokenizer.model");
    if hf.is_qwen2() {
        // `Qwen2Model.set_vocab`
        if sp_model.is_file() {
            set_vocab_sentencepiece(&hf, &sp_model, &mut kv)?;
        } else {
            set_vocab_gpt2(&hf, &mut kv)?;
        }
        return Ok(kv.0);
    }
    // `LlamaModel.set_vocab`
    if let Some(Json::Bool(p)) = hf
        .tokenizer_config
        .as_ref()
        .and_then(|c| c.get("add_prefix_space"))
    {
        kv.set("tokenizer.ggml.add_space_prefix", Value::Bool(*p));
    }
    if sp_model.is_file() {
        set_vocab_sentencepiece(&hf, &sp_model, &mut kv)?;
    } else if is_llama_hf(hf.tokenizer()?) {
        set_vocab_llama_hf(&hf, &mut kv)?;
    } else {
        set_vocab_gpt2(&hf, &mut kv)?;
    }
    match hf.vocab_size() {
        // CodeLlama's infill tokens: only EOT has a GGUF key.
        Some(32016) => {
            let mut sv =
                SpecialVocab::new(&hf, false, &["prefix", "suffix", "middle", "eot"], None)?;
            for (kind, id) in [
                ("prefix", 32007),
                ("suffix", 32008),
                ("middle", 32009),
                ("eot", 32010),
            ] {
                sv.set_special_token(kind, id)?;
            }
            sv.add_to(&mut kv);
        }
        // Granite's small models (and SmolLM's 49152-token vocabulary).
        Some(49152) => kv.set("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        _ => {}
    }
    Ok(kv.0)
}

/// gguf-py's `LlamaHfVocab` accepts the tokenizer (else convert falls back to `_set_vocab_gpt2`).
fn is_llama_hf(tj: &Json) -> bool {
    let model = tj.get("model");
    let field = |k: &str| model.and_then(|m| m.get(k));
    let is_bpe = field("type").and_then(Json::as_str) == Some("BPE");
    let is_llama3 = is_bpe
        && field("ignore_merges")
            .and_then(Json::as_bool)
            .unwrap_or(false)
        && !field("byte_fallback")
            .and_then(Json::as_bool)
            .unwrap_or(true);
    !is_llama3
        && is_bpe
        && field("byte_fallback")
            .and_then(Json::as_bool)
            .unwrap_or(false)
        && tj
            .get("decoder")
            .and_then(|d| d.get("type"))
            .and_then(Json::as_str)
            == Some("Sequence")
}

/// `_set_vocab_gpt2`: `get_vocab_base` (tokens in id order, `[PAD{i}]` holes, types) and
/// `SpecialVocab(load_merges=True)`.
fn set_vocab_gpt2(hf: &HfDir, kv: &mut Kv) -> Result<()> {
    let tj = hf.tokenizer()?;
    let model_vocab = hf.model_vocab()?;
    let mut added = hf.added_tokens()?;
    // `tokenizer.vocab`: the model's tokens and the added ones.
    let mut full: HashMap<&str, u32> = model_vocab.iter().copied().collect();
    for &(id, c, ..) in &added {
        full.insert(c, id);
    }
    // transformers 5 loads a Qwen2 directory with `Qwen2Tokenizer`, whose UNK/EOS/PAD default to
    // `<|endoftext|>`: a vocabulary without it gets it appended (as `tokenizers` numbers a new
    // token) when tokenizer_config.json leaves one of them unset.
    const EOT: &str = "<|endoftext|>";
    let defaults_used = ["unk_token", "eos_token", "pad_token"].iter().any(|k| {
        hf.tokenizer_config
            .as_ref()
            .is_none_or(|c| !c.contains_key(*k))
    });
    if hf.is_qwen2() && defaults_used && !full.contains_key(EOT) {
        let base = model_vocab.len() as u32;
        let id = match added.iter().map(|a| a.0).max() {
            Some(max) if max >= base || base == 0 => max + 1,
            _ => base,
        };
        full.insert(EOT, id);
        added.push((id, EOT, true, false));
    }
    let vocab_size = hf.vocab_size().unwrap_or(full.len());
    if let Some(max) = full.values().max()
        && *max as usize >= vocab_size
    {
        return Err(hf.tok_err(format!(
            "token id {max} is not below config.json's vocab_size {vocab_size}"
        )));
    }
    let tk = load_tokenizer(hf, tj)?;
    let pre = vocab_base_pre(hf, tj, &tk)?;
    let mut reverse: HashMap<u32, &str> = model_vocab.iter().map(|&(t, id)| (id, t)).collect();
    let mut added_by_content: HashMap<&str, (bool, bool)> = HashMap::new();
    let mut added_by_id: HashMap<u32, (bool, bool)> = HashMap::new();
    for &(id, c, special, normalized) in &added {
        reverse.insert(id, c);
        added_by_content.insert(c, (special, normalized));
        added_by_id.insert(id, (special, normalized));
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for i in 0..vocab_size as u32 {
        let Some(&tok) = reverse.get(&i) else {
            tokens.push(format!("[PAD{i}]"));
            types.push(UNUSED);
            continue;
        };
        match added_by_content.get(tok) {
            Some(&by_content) => {
                let (special, normalized) = added_by_id.get(&i).copied().unwrap_or(by_content);
                // convert writes a non-normalized added token as the tokenizer decodes it
                // (`decode(encode(token))`): a byte-level re-spelling becomes its text again.
                let tok = if normalized {
                    tok.to_string()
                } else {
                    let ids = tk.encode(tok, false).map_err(|e| {
                        hf.tok_err(format!("cannot encode added token {tok:?}: {e}"))
                    })?;
                    tk.decode(ids.get_ids(), false).map_err(|e| {
                        hf.tok_err(format!("cannot decode added token {tok:?}: {e}"))
                    })?
                };
                if special || looks_special(&tok) {
                    tokens.push(tok);
                    types.push(CONTROL);
                } else {
                    tokens.push(tok.replace('\u{2581}', " "));
                    types.push(USER_DEFINED);
                }
            }
            None => {
                tokens.push(tok.to_string());
                types.push(NORMAL);
            }
        }
    }
    kv.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    kv.set("tokenizer.ggml.pre", Value::String(pre));
    kv.strings("tokenizer.ggml.tokens", tokens);
    kv.set(
        "tokenizer.ggml.token_type",
        Value::Array(ArrayValue::I32(types)),
    );
    SpecialVocab::new(hf, true, &[], None)?.add_to(kv);
    Ok(())
}

/// The pre-tokenizer a `tokenizer.json` implements, from its structure, for check hashes that
/// convert's table lacks.
fn infer_pre(tj: &Json) -> Option<&'static str> {
    let pre = tj.get("pre_tokenizer")?;
    let ty = |p: &Json| p.get("type").and_then(Json::as_str).map(str::to_string);
    let byte_level_regex = |p: &Json, regex: bool| {
        ty(p).as_deref() == Some("ByteLevel")
            && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == regex
            && !p
                .get("add_prefix_space")
                .and_then(Json::as_bool)
                .unwrap_or(false)
    };
    if byte_level_regex(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre.get("pretokenizers").and_then(Json::as_array)?;
    match parts.as_slice() {
        [digits, bl]
            if ty(digits).as_deref() == Some("Digits")
                && digits.get("individual_digits").and_then(Json::as_bool) == Some(true)
                && byte_level_regex(bl, true) =>
        {
            Some("smollm")
        }
        [split, bl] if ty(split).as_deref() == Some("Split") && byte_level_regex(bl, false) => {
            let regex = split.get("pattern")?.get("Regex")?.as_str()?;
            let known = [
                (LLAMA3_SPLIT, "llama-bpe"),
                (QWEN2_SPLIT, "qwen2"),
                (QWEN35_SPLIT, "qwen35"),
                (TEKKEN_SPLIT, "tekken"),
                (GPT4O_SPLIT, "gpt-4o"),
            ];
            known.iter().find(|(r, _)| *r == regex).map(|(_, n)| *n)
        }
        _ => None,
    }
}

/// `tokenizer.json` loaded by the `tokenizers` crate (transformers' backend).
fn load_tokenizer(hf: &HfDir, tj: &Json) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_str(&tj.to_string())
        .map_err(|e| hf.tok_err(format!("does not load: {e}")))
}

/// convert's `chkhsh`: sha256 of `str(tokenizer.encode(chktxt))` (`[1, 2, 3]`).
fn check_hash(hf: &HfDir, tok: &tokenizers::Tokenizer) -> Result<String> {
    let enc = tok
        .encode(CHKTXT, true)
        .map_err(|e| hf.tok_err(format!("cannot encode convert's check text: {e}")))?;
    let ids: Vec<String> = enc.get_ids().iter().map(u32::to_string).collect();
    Ok(Sha256::digest(format!("[{}]", ids.join(", ")).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `get_vocab_base_pre`: sha256 of the ids of [`CHKTXT`] (BOS included, as `tokenizer.encode`
/// adds it) looked up in convert's table.
///
/// For a hash the table lacks, convert raises `NotImplementedError`. We instead recognise the
/// pre-tokenizers llama.cpp implements from the `tokenizer.json` structure (GPT-2's byte-level
/// regex, SmolLM's digits + byte-level, Llama 3's, Qwen2's, … split regexes), with a warning,
/// so that a retrained or trimmed vocabulary (as our test models have) still exports; any other
/// structure is an error naming the hash.
fn vocab_base_pre(hf: &HfDir, tj: &Json, tok: &tokenizers::Tokenizer) -> Result<String> {
    let chkhsh = check_hash(hf, tok)?;
    if let Some((_, pre)) = CHKHSH_PRE.iter().rev().find(|(h, _)| *h == chkhsh) {
        return Ok(pre.to_string());
    }
    match infer_pre(tj) {
        Some(pre) => {
            log::warn!(
                "{}: the BPE pre-tokenizer's check hash {chkhsh} is not in llama.cpp's table \
                 (convert_hf_to_gguf.py would stop here); its structure is {pre:?}'s, written as \
                 tokenizer.ggml.pre = {pre:?}",
                hf.tokenizer_path().display()
            );
            Ok(pre.to_string())
        }
        None => Err(hf.tok_err(format!(
            "the BPE pre-tokenizer was not recognized: check hash {chkhsh} is not in llama.cpp's \
             table and the pre_tokenizer is none of GPT-2's, SmolLM's, Llama 3's, Qwen2's, \
             Qwen3.5's, Tekken's or GPT-4o's; llama.cpp could not tokenize as this tokenizer does"
        ))),
    }
}

/// `_set_vocab_llama_hf` (gguf-py `LlamaHfVocab`): a SentencePiece-style BPE `tokenizer.json`
/// without `tokenizer.model` (Llama 2 / Mistral, or one we imported from a GGUF), as `llama`
/// with no merges.
///
/// One deliberate difference: convert writes every score as -1000, a placeholder with which
/// llama.cpp's SentencePiece tokenizer, which merges the best-scored pair first, cannot rank the
/// merges (on llama.cpp's `llama-spm` vocabulary exported so, it tokenizes 31 of 78 test strings
/// differently from the original file). We write the score of a token a merge produces as minus
/// the rank of its first merge, and of any other token as minus (number of merges + its id), so
/// that llama.cpp merges in `tokenizer.json`'s order (78 of 78 identical), and so does
/// transformers' importer, which rebuilds the merges from the scores. Without merges in
/// `tokenizer.json`, -1000 as convert.
fn set_vocab_llama_hf(hf: &HfDir, kv: &mut Kv) -> Result<()> {
    let model_vocab = hf.model_vocab()?;
    let added = hf.added_tokens()?;
    let base = model_vocab.len() as u32;
    let mut full: HashMap<&str, u32> = model_vocab.iter().copied().collect();
    let mut reverse: HashMap<u32, &str> = model_vocab.iter().map(|&(t, id)| (id, t)).collect();
    for &(id, c, ..) in &added {
        full.insert(c, id);
        reverse.insert(id, c);
    }
    // `tokenizer.all_special_tokens`: the named ones of tokenizer_config.json and its extra ones.
    let mut specials: Vec<&str> = Vec::new();
    if let Some(tc) = &hf.tokenizer_config {
        for name in [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ] {
            specials.extend(token_content(tc.get(name)));
        }
        for list in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Json::Array(a)) = tc.get(list) {
                specials.extend(a.iter().filter_map(|t| token_content(Some(t))));
            }
        }
    }
    let special_ids: HashSet<u32> = specials
        .iter()
        .filter_map(|t| full.get(t).copied())
        .collect();
    let is_byte = |t: &str| {
        let b = t.as_bytes();
        b.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && b[3].is_ascii_hexdigit()
            && b[4].is_ascii_hexdigit()
    };
    let mut tokens = Vec::new();
    let mut types = Vec::new();
    for id in 0..base {
        let t = reverse.get(&id).ok_or_else(|| {
            hf.tok_err(format!(
                "no token has id {id} (the {base}-token vocabulary has a hole)"
            ))
        })?;
        tokens.push(t.to_string());
        types.push(if is_byte(t) {
            BYTE
        } else if special_ids.contains(&id) {
            CONTROL
        } else {
            NORMAL
        });
    }
    let mut extra: Vec<(u32, &str)> = added
        .iter()
        .filter(|a| a.0 >= base)
        .map(|a| (a.0, a.1))
        .collect();
    extra.sort_by_key(|a| a.0);
    extra.dedup_by_key(|a| a.1);
    for (_, t) in extra {
        tokens.push(t.to_string());
        types.push(if specials.contains(&t) {
            CONTROL
        } else {
            USER_DEFINED
        });
    }
    let scores = merge_rank_scores(hf, &tokens)?;
    put_llama_vocab(kv, hf, tokens, scores, types)
}

/// Scores from the merge ranks of `tokenizer.json` (see [`set_vocab_llama_hf`]).
fn merge_rank_scores(hf: &HfDir, tokens: &[String]) -> Result<Vec<f32>> {
    let tj = hf.tokenizer()?;
    let merges = match tj
        .get("model")
        .and_then(|m| m.get("merges"))
        .and_then(Json::as_array)
    {
        Some(m) if !m.is_empty() => m,
        _ => return Ok(vec![-1000.0; tokens.len()]),
    };
    let mut first_rank: HashMap<String, usize> = HashMap::with_capacity(merges.len());
    for (rank, m) in merges.iter().enumerate() {
        let merged = match m {
            Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Some(format!("{a}{b}")),
                _ => None,
            },
            _ => None,
        }
        .ok_or_else(|| {
            hf.tok_err(format!(
                "model.merges[{rank}] = {m} is not a pair of tokens"
            ))
        })?;
        first_rank.entry(merged).or_insert(rank);
    }
    let n = merges.len();
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(i, t)| -(first_rank.get(t).copied().unwrap_or(n + i) as f32))
        .collect())
}

/// The pieces of a SentencePiece `ModelProto` (`tokenizer.model`): (piece, score, type).
fn parse_sentencepiece(path: &Path) -> Result<Vec<(String, f32, i32)>> {
    let buf = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    let err = |m: &str| CoreError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("not a SentencePiece model: {m}"),
    };
    fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*pos)?;
            *pos += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// Calls `f(field, wire type, varint value, bytes)` for each field of a message.
    fn fields(b: &[u8], mut f: impl FnMut(u64, u64, u64, &[u8])) -> Option<()> {
        let mut pos = 0;
        while pos < b.len() {
            let key = varint(b, &mut pos)?;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    let v = varint(b, &mut pos)?;
                    f(field, wire, v, &[]);
                }
                1 => {
                    let s = b.get(pos..pos + 8)?;
                    pos += 8;
                    f(field, wire, 0, s);
                }
                2 => {
                    let n = varint(b, &mut pos)? as usize;
                    let s = b.get(pos..pos.checked_add(n)?)?;
                    pos += n;
                    f(field, wire, 0, s);
                }
                5 => {
                    let s = b.get(pos..pos + 4)?;
                    pos += 4;
                    f(field, wire, 0, s);
                }
                _ => return None,
            }
        }
        Some(())
    }
    let mut pieces = Vec::new();
    let mut bad_piece = false;
    fields(&buf, |field, wire, _, bytes| {
        if field != 1 || wire != 2 {
            return;
        }
        let (mut piece, mut score, mut ty) = (None, 0f32, 1i32);
        let ok = fields(bytes, |f, w, v, b| match (f, w) {
            (1, 2) => piece = std::str::from_utf8(b).ok().map(str::to_string),
            (2, 5) => score = f32::from_le_bytes(b.try_into().expect("4 bytes")),
            (3, 0) => ty = v as i32,
            _ => {}
        });
        match (ok, piece) {
            (Some(()), Some(p)) => pieces.push((p, score, ty)),
            _ => bad_piece = true,
        }
    })
    .ok_or_else(|| err("malformed protobuf"))?;
    if bad_piece || pieces.is_empty() {
        return Err(err("no valid pieces"));
    }
    Ok(pieces)
}

/// `_set_vocab_sentencepiece` (`_create_vocab_sentencepiece`): the pieces of `tokenizer.model`
/// with their scores and types, `added_tokens.json`, the added tokens of tokenizer_config.json.
/// The `llama` (SentencePiece-style) vocabulary keys, in convert's order, and the special ids.
fn put_llama_vocab(
    kv: &mut Kv,
    hf: &HfDir,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
) -> Result<()> {
    let n = tokens.len();
    kv.set("tokenizer.ggml.model", Value::String("llama".into()));
    kv.set("tokenizer.ggml.pre", Value::String("default".into()));
    kv.strings("tokenizer.ggml.tokens", tokens);
    kv.set(
        "tokenizer.ggml.scores",
        Value::Array(ArrayValue::F32(scores)),
    );
    kv.set(
        "tokenizer.ggml.token_type",
        Value::Array(ArrayValue::I32(types)),
    );
    SpecialVocab::new(hf, false, &[], Some(n))?.add_to(kv);
    Ok(())
}

fn set_vocab_sentencepiece(hf: &HfDir, sp_path: &Path, kv: &mut Kv) -> Result<()> {
    let pieces = parse_sentencepiece(sp_path)?;
    let vocab_size = hf.vocab_size().unwrap_or(pieces.len());
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, (piece, score, ty)) in pieces.into_iter().enumerate() {
        if id >= vocab_size {
            log::warn!(
                "{}: pieces from id {id} on are past vocab_size {vocab_size}; ignored",
                sp_path.display()
            );
            break;
        }
        tokens[id] = piece;
        scores[id] = score;
        // SentencePiece's UNKNOWN 2, CONTROL 3, UNUSED 5, BYTE 6; NORMAL and USER_DEFINED → NORMAL.
        types[id] = match ty {
            2 | 3 | 5 | 6 => ty,
            _ => NORMAL,
        };
    }
    let added_path = hf.dir.join("added_tokens.json");
    if let Some(added) = read_object(&added_path)? {
        for (key, id) in added {
            let Some(id) = id.as_u64().map(|i| i as usize) else {
                continue;
            };
            if id >= vocab_size {
                log::warn!(
                    "{}: token {id} is past vocab_size {vocab_size}; ignored",
                    added_path.display()
                );
                continue;
            }
            tokens[id] = key;
            scores[id] = -1000.0;
            types[id] = USER_DEFINED;
        }
    }
    if let Some(decoder) = hf
        .tokenizer_config
        .as_ref()
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Json::as_object)
    {
        for (id, data) in decoder {
            let (Ok(id), Some(content)) = (
                id.parse::<usize>(),
                data.get("content").and_then(Json::as_str),
            ) else {
                continue;
            };
            if id >= vocab_size {
                log::warn!("added token {id} is past vocab_size {vocab_size}; ignored");
                continue;
            }
            let special = data.get("special").and_then(Json::as_bool).unwrap_or(false);
            if special || looks_special(content) {
                tokens[id] = content.to_string();
                types[id] = CONTROL;
            } else {
                tokens[id] = content.replace('\u{2581}', " ");
                types[id] = USER_DEFINED;
            }
            scores[id] = -1000.0;
        }
    }
    put_llama_vocab(kv, hf, tokens, scores, types)
}

/// A chat template as gguf-py takes it: one, or named ones (`default` first).
enum ChatTemplate {
    One(String),
    Named(Vec<(String, String)>),
}

/// gguf-py's `SpecialVocab`: merges, special token ids, `add_*_token` flags, chat template and
/// normalizer flags from tokenizer.json, tokenizer_config.json, chat_template.{jinja,json} and
/// config.json.
struct SpecialVocab {
    merges: Vec<String>,
    load_merges: bool,
    /// kind → id, in insertion order.
    ids: Vec<(String, u32)>,
    /// kind → flag, in insertion order.
    add: Vec<(String, bool)>,
    chat_template: Option<ChatTemplate>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
    kinds: Vec<String>,
    n_vocab: Option<usize>,
}

impl SpecialVocab {
    fn new(hf: &HfDir, load_merges: bool, kinds: &[&str], n_vocab: Option<usize>) -> Result<Self> {
        let kinds = if kinds.is_empty() {
            &["bos", "eos", "unk", "sep", "pad", "cls", "mask"][..]
        } else {
            kinds
        };
        let mut sv = Self {
            merges: Vec::new(),
            load_merges,
            ids: Vec::new(),
            add: Vec::new(),
            chat_template: None,
            lowercase: None,
            strip_accents: None,
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            n_vocab,
        };
        sv.load_from_tokenizer_json(hf)?;
        sv.load_from_config_json(hf)?;
        if sv.load_merges && sv.merges.is_empty() {
            sv.load_merges_txt(&hf.dir.join("merges.txt"))?;
        }
        Ok(sv)
    }

    fn set_add(&mut self, kind: &str, v: bool) {
        match self.add.iter_mut().find(|(k, _)| k == kind) {
            Some(e) => e.1 = v,
            None => self.add.push((kind.to_string(), v)),
        }
    }

    fn set_add_default(&mut self, kind: &str, v: bool) {
        if !self.add.iter().any(|(k, _)| k == kind) {
            self.add.push((kind.to_string(), v));
        }
    }

    /// `_set_special_token`: the first id of a kind wins; ids past `n_vocab` are skipped.
    fn set_special_token(&mut self, kind: &str, id: i64) -> Result<()> {
        if id < 0 {
            return Err(CoreError::Invalid(format!(
                "invalid value for special token type {kind}: {id}"
            )));
        }
        if self.n_vocab.is_none_or(|n| (id as u64) < n as u64) {
            if !self.ids.iter().any(|(k, _)| k == kind) {
                self.ids.push((kind.to_string(), id as u32));
            }
        } else {
            log::warn!(
                "special token type {kind}, id {id} out of range, must be under {} - skipping",
                self.n_vocab.unwrap_or(0)
            );
        }
        Ok(())
    }

    fn parse_normalizer(&mut self, n: &Json) {
        match n.get("type").and_then(Json::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = n.get("lowercase") {
                    self.lowercase = v.as_bool();
                }
                if let Some(v) = n.get("strip_accents") {
                    self.strip_accents = v.as_bool();
                }
            }
            Some("Sequence") => {
                for m in n
                    .get("normalizers")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.parse_normalizer(m);
                }
            }
            _ => {}
        }
    }

    fn load_merges_txt(&mut self, path: &Path) -> Result<()> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CoreError::io(path, e)),
        };
        let mut lines = text.lines().peekable();
        if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
            lines.next();
        }
        for line in lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                [] => {}
                [a, b] => self.merges.push(format!("{a} {b}")),
                _ => log::warn!("{}: malformed merge {line:?} ignored", path.display()),
            }
        }
        Ok(())
    }

    /// `_try_load_from_tokenizer_json`.
    fn load_from_tokenizer_json(&mut self, hf: &HfDir) -> Result<()> {
        let tokenizer = hf.tokenizer.as_ref();
        let mut added_tokens: Vec<(Option<i64>, Option<&str>)> = Vec::new();
        if let Some(tj) = tokenizer {
            if self.load_merges
                && let Some(Json::Array(merges)) = tj.get("model").and_then(|m| m.get("merges"))
                && let Some(first) = merges.first()
            {
                if first.is_string() {
                    self.merges = merges
                        .iter()
                        .filter_map(|m| m.as_str().map(str::to_string))
                        .collect();
                } else if first
                    .as_array()
                    .is_some_and(|p| p.len() == 2 && p[0].is_string())
                {
                    // Spaces inside a pair's tokens are written as U+0120, as gguf-py does.
                    self.merges = merges
                        .iter()
                        .map(|pair| {
                            pair.as_array()
                                .into_iter()
                                .flatten()
                                .map(|p| p.as_str().unwrap_or("").replace(' ', "\u{120}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .collect();
                } else {
                    return Err(hf.tok_err("unknown tokenizer merges format"));
                }
            }
            if let Some(n) = tj.get("normalizer")
                && truthy(Some(n))
            {
                self.parse_normalizer(n);
            }
            if let Some(Json::Array(a)) = tj.get("added_tokens") {
                added_tokens = a
                    .iter()
                    .map(|t| {
                        (
                            t.get("id").and_then(Json::as_i64),
                            t.get("content").and_then(Json::as_str),
                        )
                    })
                    .collect();
            }
        }
        let mut tc: Option<Map<String, Json>> = hf.tokenizer_config.clone();
        if let Some(tj) = tokenizer {
            self.parse_post_processor(tj, &mut tc);
        }
        let tc = match tc {
            Some(tc) if !tc.is_empty() => tc,
            _ => return Ok(()),
        };
        let alt = self.chat_template_files(&hf.dir)?;
        let template = match tc.get("chat_template") {
            Some(v) => Some(v.clone()),
            None => alt,
        };
        match template {
            None | Some(Json::Null) => self.chat_template = None,
            Some(Json::String(s)) => self.chat_template = Some(ChatTemplate::One(s)),
            Some(Json::Array(list)) => {
                self.chat_template = Some(ChatTemplate::Named(
                    list.iter()
                        .filter_map(|c| {
                            let name = c.get("name").and_then(Json::as_str).unwrap_or("");
                            Some((name.to_string(), c.get("template")?.as_str()?.to_string()))
                        })
                        .collect(),
                ))
            }
            Some(_) => log::warn!("bad type for chat_template in tokenizer_config.json - ignoring"),
        }
        for kind in self.kinds.clone() {
            if let Some(Json::Bool(b)) = tc.get(&format!("add_{kind}_token")) {
                match self.add.iter().find(|(k, _)| *k == kind) {
                    None => self.set_add(&kind, *b),
                    Some((_, v)) if v != b => log::warn!(
                        "mismatch between tokenizer_config add_{kind}_token ({b}) and the post \
                         processor ({v}) - opting for the latter"
                    ),
                    _ => {}
                }
            }
            let Some(content) = token_content(tc.get(&format!("{kind}_token"))) else {
                continue;
            };
            let id = added_tokens
                .iter()
                .find(|(_, c)| *c == Some(content))
                .and_then(|(id, _)| *id);
            if let Some(id) = id {
                self.set_special_token(&kind, id)?;
            }
        }
        Ok(())
    }

    /// chat_template.jinja (with additional_chat_templates/*.jinja) or chat_template.json.
    fn chat_template_files(&self, dir: &Path) -> Result<Option<Json>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let t = std::fs::read_to_string(&jinja).map_err(|e| CoreError::io(&jinja, e))?;
            let extra_dir = dir.join("additional_chat_templates");
            let mut extra: Vec<PathBuf> = std::fs::read_dir(&extra_dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                        .collect()
                })
                .unwrap_or_default();
            if extra.is_empty() {
                return Ok(Some(Json::String(t)));
            }
            extra.sort();
            let mut list = vec![json!({"name": "default", "template": t})];
            for p in extra {
                let body = std::fs::read_to_string(&p).map_err(|e| CoreError::io(&p, e))?;
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                list.push(json!({"name": stem, "template": body}));
            }
            return Ok(Some(Json::Array(list)));
        }
        let json_path = dir.join("chat_template.json");
        Ok(read_object(&json_path)?.and_then(|o| o.get("chat_template").cloned()))
    }

    /// The `post_processor` part of `_try_load_from_tokenizer_json` (BOS/EOS/SEP flags,
    /// special tokens implied by a template), which may edit the tokenizer config.
    fn parse_post_processor(&mut self, tj: &Json, tc: &mut Option<Map<String, Json>>) {
        let get =
            |tc: &Option<Map<String, Json>>, k: &str| tc.as_ref().and_then(|m| m.get(k)).cloned();
        let mut special_bos = get(tc, "bos_token");
        let mut special_cls = get(tc, "cls_token");
        let mut special_eos = get(tc, "eos_token");
        let mut special_sep = get(tc, "sep_token");
        let tc_truthy = |tc: &Option<Map<String, Json>>| tc.as_ref().is_some_and(|m| !m.is_empty());
        if !truthy(special_bos.as_ref()) && truthy(special_cls.as_ref()) && tc_truthy(tc) {
            special_bos = special_cls.clone();
            tc.as_mut().expect("truthy").insert(
                "bos_token".into(),
                special_bos.clone().unwrap_or(Json::Null),
            );
        }
        if !truthy(special_eos.as_ref()) && truthy(special_sep.as_ref()) && tc_truthy(tc) {
            special_eos = special_sep.clone();
            tc.as_mut().expect("truthy").insert(
                "eos_token".into(),
                special_eos.clone().unwrap_or(Json::Null),
            );
        }
        let Some(pp) = tj.get("post_processor").filter(|p| truthy(Some(p))) else {
            return;
        };
        let processors: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![pp],
        };
        let is = |v: &Option<Json>, s: &str| v.as_ref().and_then(Json::as_str) == Some(s);
        let special_id = |e: Option<&Json>| {
            e.and_then(|e| e.get("SpecialToken"))
                .and_then(|s| s.get("id"))
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let seq_id = |e: &Json| {
            e.get("Sequence")
                .and_then(|s| s.get("id"))
                .and_then(Json::as_str)
                .map(str::to_string)
        };
        for p in processors {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    self.set_add_default("bos", false);
                    self.set_add_default("eos", false);
                }
                Some("RobertaProcessing") => {
                    self.set_add("bos", true);
                    self.set_add("eos", true);
                    self.set_add("sep", true);
                    if !truthy(special_cls.as_ref()) && tc_truthy(tc) {
                        let cls = p
                            .get("cls")
                            .and_then(|c| c.get(0))
                            .cloned()
                            .or_else(|| special_bos.clone())
                            .unwrap_or(Json::Null);
                        special_cls = Some(cls.clone());
                        tc.as_mut().expect("truthy").insert("cls_token".into(), cls);
                    }
                    if !truthy(special_sep.as_ref()) && tc_truthy(tc) {
                        let sep = p
                            .get("sep")
                            .and_then(|c| c.get(0))
                            .cloned()
                            .or_else(|| special_eos.clone())
                            .unwrap_or(Json::Null);
                        special_sep = Some(sep.clone());
                        tc.as_mut().expect("truthy").insert("sep_token".into(), sep);
                    }
                }
                Some("TemplateProcessing") => {
                    let empty = Vec::new();
                    let single = p.get("single").and_then(Json::as_array).unwrap_or(&empty);
                    let pair = p.get("pair").and_then(Json::as_array).unwrap_or(&empty);
                    let mut special_first = None;
                    let mut special_last = None;
                    if single.len() > 1 {
                        special_first = special_id(single.first());
                        if let Some(first) = &special_first {
                            if !tc_truthy(tc) {
                                special_bos = Some(Json::String(first.clone()));
                            } else if !is(&special_bos, first) && !is(&special_cls, first) {
                                if !truthy(special_bos.as_ref()) {
                                    special_bos = Some(Json::String(first.clone()));
                                    tc.as_mut()
                                        .expect("truthy")
                                        .insert("bos_token".into(), json!(first));
                                }
                                if !truthy(special_cls.as_ref()) {
                                    special_cls = Some(Json::String(first.clone()));
                                    tc.as_mut()
                                        .expect("truthy")
                                        .insert("cls_token".into(), json!(first));
                                }
                            }
                            let known = is(&special_bos, first) || is(&special_cls, first);
                            self.set_add("bos", known);
                            if !known {
                                log::warn!(
                                    "unknown leading special token {first:?} in TemplateProcessing<single>"
                                );
                            }
                        }
                        special_last = special_id(single.last());
                        if let Some(last) = &special_last {
                            if !tc_truthy(tc) {
                                special_eos = Some(Json::String(last.clone()));
                            } else if !is(&special_eos, last) {
                                let m = tc.as_mut().expect("truthy");
                                if !self.kinds.iter().any(|k| k == "eot") {
                                    self.kinds.push("eot".into());
                                    m.insert(
                                        "eot_token".into(),
                                        special_eos.clone().unwrap_or(Json::Null),
                                    );
                                } else if !self.kinds.iter().any(|k| k == "eom") {
                                    self.kinds.push("eom".into());
                                    m.insert(
                                        "eom_token".into(),
                                        special_eos.clone().unwrap_or(Json::Null),
                                    );
                                } else {
                                    log::warn!(
                                        "overriding EOS token with {last:?} without EOT/EOM fallback"
                                    );
                                }
                                special_eos = Some(Json::String(last.clone()));
                                m.insert("eos_token".into(), json!(last));
                            }
                            let known = is(&special_eos, last);
                            self.set_add("eos", known);
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(
                            special_first.is_some() && special_id(pair.first()) == special_first,
                        );
                        let stop_trim =
                            special_last.is_some() && special_id(pair.last()) == special_last;
                        let end = if stop_trim {
                            pair.len().saturating_sub(1)
                        } else {
                            pair.len()
                        };
                        let rest = if start < end {
                            &pair[start..end]
                        } else {
                            &[][..]
                        };
                        if !rest.is_empty() {
                            let a = seq_id(&rest[0]);
                            let b = seq_id(&rest[rest.len() - 1]);
                            if a.as_deref() == Some("A")
                                && b.as_deref() == Some("B")
                                && rest.len() > 2
                            {
                                let middle = &rest[1..rest.len() - 1];
                                let mut add_sep = false;
                                if let Some(entry) = special_id(middle.first())
                                    && (is(&special_sep, &entry) || is(&special_eos, &entry))
                                    && special_last.is_none()
                                {
                                    add_sep = true;
                                }
                                if middle.len() == 2
                                    && let Some(entry) = special_id(middle.get(1))
                                    && (is(&special_sep, &entry) || is(&special_eos, &entry))
                                {
                                    add_sep = true;
                                }
                                self.set_add("sep", add_sep);
                                if add_sep && !truthy(special_sep.as_ref()) && tc_truthy(tc) {
                                    tc.as_mut().expect("truthy").insert(
                                        "sep_token".into(),
                                        special_eos.clone().unwrap_or(Json::Null),
                                    );
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// `_try_load_from_config_json`: `{kind}_token_id` of config.json (or its `text_config`).
    fn load_from_config_json(&mut self, hf: &HfDir) -> Result<()> {
        let Some(config) = &hf.config else {
            return Ok(());
        };
        for kind in self.kinds.clone() {
            let key = format!("{kind}_token_id");
            let v = match config.get(&key) {
                Some(v) if !v.is_null() => Some(v),
                _ => config.get("text_config").and_then(|t| t.get(&key)),
            };
            // Only an int: a list of EOS ids is skipped, as there.
            if let Some(id) = v.and_then(|v| {
                if v.is_i64() || v.is_u64() {
                    v.as_i64()
                } else {
                    None
                }
            }) {
                self.set_special_token(&kind, id)?;
            }
        }
        Ok(())
    }

    /// `add_to_gguf`.
    fn add_to(&self, kv: &mut Kv) {
        if !self.merges.is_empty() {
            kv.strings("tokenizer.ggml.merges", self.merges.clone());
        } else if self.load_merges {
            log::warn!("adding merges requested but no merges found, output may be non-functional");
        }
        for (kind, id) in &self.ids {
            match special_id_key(kind) {
                Some(key) => kv.set(key, Value::U32(*id)),
                None => {
                    log::debug!("no GGUF key for special token type {kind} (id {id}) - skipping")
                }
            }
        }
        for (kind, v) in &self.add {
            if matches!(kind.as_str(), "bos" | "eos" | "sep") {
                kv.set(&format!("tokenizer.ggml.add_{kind}_token"), Value::Bool(*v));
            }
        }
        match &self.chat_template {
            None => kv.remove("tokenizer.chat_template"),
            Some(ChatTemplate::One(t)) => {
                kv.set("tokenizer.chat_template", Value::String(t.clone()))
            }
            Some(ChatTemplate::Named(list)) => {
                let mut default = None;
                let mut names = Vec::new();
                for (name, template) in list {
                    let name: String = name
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(template.clone());
                    } else {
                        if !names.contains(&name) {
                            names.push(name.clone());
                        }
                        kv.set(
                            &format!("tokenizer.chat_template.{name}"),
                            Value::String(template.clone()),
                        );
                    }
                }
                if !names.is_empty() {
                    kv.strings("tokenizer.chat_templates", names);
                }
                if let Some(t) = default {
                    kv.set("tokenizer.chat_template", Value::String(t));
                }
            }
        }
        if let Some(v) = self.lowercase {
            kv.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(v));
        }
        if let Some(v) = self.strip_accents {
            kv.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn check_text_is_converts() {
        // sha256 of the UTF-8 of convert's `chktxt` (350 characters), computed with Python.
        assert_eq!(CHKTXT.chars().count(), 350);
        let h: String = Sha256::digest(CHKTXT.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            h,
            "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
        );
    }

    #[test]
    fn merges_from_scores_as_transformers() {
        let keys: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let vocab: HashMap<&str, u32> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i as u32))
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = generate_merges(&keys, &vocab, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // Python: generate_merges({...}, {...}) → [('a','b'), ('b','c'), ('ab','c'), ('a','bc')]
        assert_eq!(m, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}

/// Manual checks against transformers and llama.cpp (see the integration tests for the
/// automatic ones): `LP_TOK_IMPORT="a.gguf=outdir;…"` writes the rebuilt files,
/// `LP_TOK_EXPORT="hfdir=out.json;…"` the exported metadata as JSON.
#[cfg(test)]
mod dump {
    use super::*;

    fn meta_json(kv: &[(String, Value)]) -> Json {
        let v = |v: &Value| -> Json {
            match v {
                Value::String(s) => json!(s),
                Value::Bool(b) => json!(b),
                Value::F32(f) => json!(f),
                Value::Array(ArrayValue::String(a)) => json!(a),
                Value::Array(ArrayValue::I32(a)) => json!(a),
                Value::Array(ArrayValue::F32(a)) => json!(a),
                Value::Array(ArrayValue::U32(a)) => json!(a),
                v => json!(v.as_u64()),
            }
        };
        Json::Array(
            kv.iter()
                .map(|(k, x)| {
                    let sub = match x {
                        Value::Array(ArrayValue::String(_)) => 8,
                        Value::Array(ArrayValue::I32(_)) => 5,
                        Value::Array(ArrayValue::F32(_)) => 6,
                        Value::Array(ArrayValue::U32(_)) => 4,
                        _ => -1,
                    };
                    json!([k, x.type_code(), sub, v(x)])
                })
                .collect(),
        )
    }

    #[test]
    #[ignore]
    fn dump() {
        for item in std::env::var("LP_TOK_IMPORT")
            .unwrap_or_default()
            .split(';')
            .filter(|s| !s.is_empty())
        {
            let (g, out) = item.split_once('=').unwrap();
            let f = GgufFile::open(g).unwrap();
            let t0 = std::time::Instant::now();
            let files = tokenizer_from_gguf(&f).unwrap();
            eprintln!("{g}: {:?}", t0.elapsed());
            std::fs::create_dir_all(out).unwrap();
            std::fs::write(
                format!("{out}/tokenizer.json"),
                files.tokenizer_json.to_string(),
            )
            .unwrap();
            std::fs::write(
                format!("{out}/tokenizer_config.json"),
                serde_json::to_string_pretty(&files.tokenizer_config).unwrap(),
            )
            .unwrap();
        }
        for item in std::env::var("LP_TOK_EXPORT")
            .unwrap_or_default()
            .split(';')
            .filter(|s| !s.is_empty())
        {
            let (d, out) = item.split_once('=').unwrap();
            if let Ok(hf) = HfDir::load(Path::new(d))
                && let Some(tj) = &hf.tokenizer
            {
                eprintln!(
                    "{d}: chkhsh {:?}",
                    load_tokenizer(&hf, tj)
                        .and_then(|t| check_hash(&hf, &t))
                        .map_err(|e| e.to_string())
                );
            }
            match gguf_tokenizer_metadata(Path::new(d)) {
                Ok(kv) => std::fs::write(out, meta_json(&kv).to_string()).unwrap(),
                Err(e) => std::fs::write(out, json!({"error": e.to_string()}).to_string()).unwrap(),
            }
        }
    }
}
