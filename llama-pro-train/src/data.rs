//! Reading token sequences from `.txt` and `.jsonl` files.
//!
//! - `.txt`: every non-empty line is one document, tokenized with the model's tokenizer
//!   (special tokens added as `tokenizer(text)` does, i.e. BOS for LLaMA).
//! - `.jsonl`: every non-empty line is `{"text": "..."}` (tokenized as above) or
//!   `{"input_ids": [..]}` (used exactly as given, no BOS added).

use std::path::{Path, PathBuf};

use llama_pro_core::Tokenizer;

use crate::error::{Result, TrainError};

/// Read one sequence per line, truncated to `max_len` tokens.
///
/// Errors name the file and line: invalid JSON, neither `text` nor `input_ids`, a token id
/// `>= vocab_size`, non-UTF-8 text, an empty file.
pub fn read_sequences(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    vocab_size: usize,
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let err = |line: usize, message: String| TrainError::Data {
        path: path.to_path_buf(),
        line,
        message,
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        err(line, "not valid UTF-8 text".into())
    })?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let jsonl = match ext {
        "jsonl" | "json" => true,
        "txt" | "text" | "md" => false,
        other => {
            return Err(err(
                0,
                format!("unsupported file type {other:?}: expected .txt or .jsonl"),
            ));
        }
    };
    let need_tok = |line: usize| -> Result<&Tokenizer> {
        tokenizer.ok_or_else(|| {
            err(
                line,
                "text needs a tokenizer, but the model directory has no tokenizer.json".into(),
            )
        })
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut ids: Vec<u32> = if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| err(n, format!("invalid JSON: {e}")))?;
            if let Some(ids) = v.get("input_ids") {
                let arr = ids
                    .as_array()
                    .ok_or_else(|| err(n, "`input_ids` must be a list of token ids".into()))?;
                arr.iter()
                    .map(|x| {
                        x.as_u64()
                            .filter(|&t| t <= u32::MAX as u64)
                            .map(|t| t as u32)
                            .ok_or_else(|| {
                                err(
                                    n,
                                    format!(
                                        "`input_ids` must hold non-negative integers, found {x}"
                                    ),
                                )
                            })
                    })
                    .collect::<Result<_>>()?
            } else if let Some(t) = v.get("text") {
                let t = t
                    .as_str()
                    .ok_or_else(|| err(n, "`text` must be a string".into()))?;
                need_tok(n)?.encode(t, true)?
            } else {
                return Err(err(
                    n,
                    "expected an object with \"text\" or \"input_ids\"".into(),
                ));
            }
        } else {
            need_tok(n)?.encode(line, true)?
        };
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(err(
                n,
                format!("token id {bad} is out of range: the model's vocab_size is {vocab_size}"),
            ));
        }
        ids.truncate(max_len);
        out.push(ids);
    }
    if out.is_empty() {
        return Err(err(0, "no sequences: the file is empty".into()));
    }
    Ok(out)
}

/// `path` with a helpful error if it does not exist.
pub fn existing(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(TrainError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        })
    }
}
