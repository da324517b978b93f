//! Tokenization through the `tokenizers` crate (`tokenizer.json`), with BOS/EOS ids from the
//! model's config, `generation_config.json` and `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// A HuggingFace fast tokenizer plus the special ids generation needs.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Token that ends generation (all of them, e.g. Llama 3 instruct has several).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
}

impl Tokenizer {
    /// Load `tokenizer.json` from a model directory. EOS ids come from `generation_config.json`
    /// when present, else from `config.json` (`eos_ids_from_config`), else from the
    /// `eos_token` of `tokenizer_config.json`.
    pub fn from_dir(
        dir: impl AsRef<Path>,
        bos_from_config: Option<u32>,
        eos_ids_from_config: &[u32],
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(CoreError::Tokenizer {
                path,
                message: "file not found (only HuggingFace fast tokenizers, tokenizer.json, are supported)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| CoreError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut eos: Vec<u32> = Vec::new();
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| CoreError::Json {
                    path: gen_path.clone(),
                    source,
                })?;
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
        if eos.is_empty() {
            eos.extend_from_slice(eos_ids_from_config);
        }
        if eos.is_empty() {
            let tc = dir.join("tokenizer_config.json");
            if let Ok(text) = std::fs::read_to_string(&tc) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let tok = match v.get("eos_token") {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        Some(serde_json::Value::Object(o)) => o
                            .get("content")
                            .and_then(|c| c.as_str())
                            .map(str::to_string),
                        _ => None,
                    };
                    if let Some(id) = tok.and_then(|t| inner.token_to_id(&t)) {
                        eos.push(id);
                    }
                }
            }
        }
        Ok(Self {
            inner,
            path,
            eos_token_ids: eos,
            bos_token_id: bos_from_config,
        })
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor adds what
    /// the model expects (BOS for LLaMA), exactly as `tokenizer(text)` in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| CoreError::Tokenizer {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| CoreError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Number of tokens in the vocabulary (with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
