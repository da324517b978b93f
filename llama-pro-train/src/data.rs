//! Reading token sequences from `.txt` and `.jsonl` files.
//!
//! - `.txt`: every non-empty line is one document, tokenized with the model's tokenizer
//!   (special tokens added as `tokenizer(text)` does, i.e. BOS for LLaMA).
//! - `.jsonl`: every non-empty line is `{"text": "..."}` (tokenized as above) or
//!   `{"input_ids": [..]}` (used exactly as given, no BOS added).

use std::path::{Path, PathBuf};

use llama_pro_core::Tokenizer;

use crate::error::{Result, TrainError};
use crate::trainer::{Event, Observer};

/// One document of a data file, as written.
enum RawDoc {
    /// Text to tokenize.
    Text(String),
    /// Token ids used as given.
    Ids(Vec<u32>),
}

/// Parse a `.txt`/`.jsonl` file into (line number, document), with errors naming the file and line.
fn read_raw(path: &Path) -> Result<Vec<(usize, RawDoc)>> {
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
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            out.push((n, RawDoc::Text(line.to_string())));
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(n, format!("invalid JSON: {e}")))?;
        let doc = if let Some(ids) = v.get("input_ids") {
            let arr = ids
                .as_array()
                .ok_or_else(|| err(n, "`input_ids` must be a list of token ids".into()))?;
            RawDoc::Ids(
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
                    .collect::<Result<_>>()?,
            )
        } else if let Some(t) = v.get("text") {
            RawDoc::Text(
                t.as_str()
                    .ok_or_else(|| err(n, "`text` must be a string".into()))?
                    .to_string(),
            )
        } else {
            return Err(err(
                n,
                "expected an object with \"text\" or \"input_ids\"".into(),
            ));
        };
        out.push((n, doc));
    }
    if out.is_empty() {
        return Err(err(0, "no sequences: the file is empty".into()));
    }
    Ok(out)
}

/// The text documents of a `.txt` (one per line) or `.jsonl` (`{"text": ...}`) file, untokenized
/// (for training a tokenizer). Pre-tokenized lines are an error.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    read_raw(path)?
        .into_iter()
        .map(|(n, d)| match d {
            RawDoc::Text(t) => Ok(t),
            RawDoc::Ids(_) => Err(TrainError::Data {
                path: path.to_path_buf(),
                line: n,
                message: "expected text, found pre-tokenized `input_ids`".into(),
            }),
        })
        .collect()
}

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
    read_sequences_with(path, tokenizer, vocab_size, max_len, &mut |_, _| {})
}

/// [`read_sequences`] calling `progress(done, total)` as documents are tokenized (every 256
/// documents and at the end).
pub fn read_sequences_with(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    vocab_size: usize,
    max_len: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<u32>>> {
    let err = |line: usize, message: String| TrainError::Data {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut out = Vec::new();
    let raw = read_raw(path)?;
    let total = raw.len();
    for (i, (n, doc)) in raw.into_iter().enumerate() {
        if i % 256 == 0 {
            progress(i, total);
        }
        let mut ids = match doc {
            RawDoc::Ids(ids) => ids,
            RawDoc::Text(t) => tokenizer
                .ok_or_else(|| {
                    err(
                        n,
                        "text needs a tokenizer, but the model directory has no tokenizer.json"
                            .into(),
                    )
                })?
                .encode(&t, true)?,
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
    progress(total, total);
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

/// A file's size and SHA-256 (what a checkpoint records of its training data).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, hex.
    pub sha256: String,
}

/// The [`FileDigest`] of `path`, read in 1 MiB blocks.
pub fn file_digest(path: &Path) -> Result<FileDigest> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |e| TrainError::io(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(FileDigest { bytes, sha256 })
}

/// Where tokenized data is cached: `$LLAMA_PRO_CACHE`, else `~/.cache/llama-pro/tokens`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLAMA_PRO_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("llama-pro").join("tokens")
}

const CACHE_MAGIC: &[u8; 8] = b"LPTOK001";

/// [`read_sequences`] (untruncated) through a binary cache keyed by the SHA-256 of the data file,
/// the tokenizer file and the vocabulary size: the first run tokenizes (reporting progress to
/// `observer`) and writes `<key>.bin` (temp file + rename); later runs memory-map it.
///
/// Layout: magic, document count `n` (u64), `n + 1` offsets (u64), then the ids (u32), little-endian.
pub fn read_documents_cached(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    tokenizer_file: Option<&Path>,
    vocab_size: usize,
    cache_dir: &Path,
    observer: &mut dyn Observer,
) -> Result<Vec<Vec<u32>>> {
    let digest = file_digest(path)?;
    read_documents_cached_as(
        path,
        &digest,
        tokenizer,
        tokenizer_file,
        vocab_size,
        cache_dir,
        observer,
    )
}

/// [`read_documents_cached`] for a file whose digest is already known.
pub(crate) fn read_documents_cached_as(
    path: &Path,
    digest: &FileDigest,
    tokenizer: Option<&Tokenizer>,
    tokenizer_file: Option<&Path>,
    vocab_size: usize,
    cache_dir: &Path,
    observer: &mut dyn Observer,
) -> Result<Vec<Vec<u32>>> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(CACHE_MAGIC);
    h.update(digest.sha256.as_bytes());
    if let Some(t) = tokenizer_file {
        h.update(file_digest(t)?.sha256.as_bytes());
    }
    h.update((vocab_size as u64).to_le_bytes());
    let key: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = cache_dir.join(format!("{key}.bin"));
    if let Ok(docs) = read_cache(&file) {
        return Ok(docs);
    }
    observer.on_event(&Event::Info(&format!(
        "tokenizing {} (cached afterwards in {})",
        path.display(),
        file.display()
    )));
    let docs = read_sequences_with(
        path,
        tokenizer,
        vocab_size,
        usize::MAX,
        &mut |done, total| observer.on_event(&Event::Tokenizing { path, done, total }),
    )?;
    // A cache that cannot be written only costs time next run; the data is still good.
    if std::fs::create_dir_all(cache_dir).is_ok() {
        let tmp = cache_dir.join(format!(".{key}.tmp-{}", std::process::id()));
        let mut bytes = Vec::with_capacity(
            16 + 8 * (docs.len() + 1) + 4 * docs.iter().map(Vec::len).sum::<usize>(),
        );
        bytes.extend_from_slice(CACHE_MAGIC);
        bytes.extend_from_slice(&(docs.len() as u64).to_le_bytes());
        let mut off = 0u64;
        bytes.extend_from_slice(&off.to_le_bytes());
        for d in &docs {
            off += d.len() as u64;
            bytes.extend_from_slice(&off.to_le_bytes());
        }
        for d in &docs {
            for t in d {
                bytes.extend_from_slice(&t.to_le_bytes());
            }
        }
        if std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &file);
        }
    }
    Ok(docs)
}

fn read_cache(file: &Path) -> std::io::Result<Vec<Vec<u32>>> {
    let f = std::fs::File::open(file)?;
    // SAFETY: read-only map of a file we wrote with an atomic rename; never modified in place.
    let m = unsafe { memmap2::Mmap::map(&f)? };
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt token cache");
    if m.len() < 16 || &m[..8] != CACHE_MAGIC {
        return Err(bad());
    }
    let u64_at = |i: usize| -> std::io::Result<u64> {
        m.get(i..i + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .ok_or_else(bad)
    };
    let n = u64_at(8)? as usize;
    let ids_start = 16 + 8 * (n + 1);
    let total = u64_at(16 + 8 * n)? as usize;
    if m.len() != ids_start + 4 * total {
        return Err(bad());
    }
    let mut docs = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = (
            u64_at(16 + 8 * i)? as usize,
            u64_at(16 + 8 * (i + 1))? as usize,
        );
        if a > b || b > total {
            return Err(bad());
        }
        docs.push(
            m[ids_start + 4 * a..ids_start + 4 * b]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Ok(docs)
}
