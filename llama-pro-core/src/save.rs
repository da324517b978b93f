//! Write a HuggingFace model directory that `transformers` loads.
//!
//! `config.json` (every original key kept, counts and dtype updated), `model.safetensors` or
//! shards plus `model.safetensors.index.json` above a size threshold, tokenizer and generation
//! files copied from the source directory. A tied `lm_head` is not written (transformers re-ties
//! it). Everything is written into a temporary sibling directory which is then renamed, so a
//! crash never leaves a half-written model behind.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use half::{bf16, f16};
use safetensors::Dtype as StDtype;
use serde_json::{Map, Value};

use crate::config::{DType, HfConfig};
use crate::error::{CoreError, Result};
use crate::model::LlamaForCausalLM;

/// Files copied verbatim from the source model directory when present.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Options of [`save_pretrained`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Storage dtype; `None` keeps the dtype of the source checkpoint (`config.dtype`).
    pub dtype: Option<DType>,
    /// Shard when the weights exceed this many bytes (transformers' default is 5 GB).
    pub max_shard_bytes: usize,
    /// Replace an existing non-empty output directory.
    pub overwrite: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: 5_000_000_000,
            overwrite: false,
        }
    }
}

/// A tensor ready to be written: little-endian bytes in its storage dtype.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    /// Storage dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
}

/// A tensor to be written: dtype, shape and a way to produce its bytes.
///
/// We write safetensors files ourselves (the header through the `safetensors` crate's
/// [`Metadata`](safetensors::tensor::Metadata)) instead of `safetensors::serialize_to_file`,
/// because its `View::data` cannot fail and must return a whole tensor at once: streaming a
/// checkpoint from disk needs fallible, chunked reads to keep memory bounded.
pub trait TensorSource {
    /// Storage dtype.
    fn dtype(&self) -> DType;
    /// Shape.
    fn shape(&self) -> &[usize];
    /// Number of bytes.
    fn byte_len(&self) -> usize;
    /// Write the little-endian bytes.
    fn write_to(&self, w: &mut dyn Write) -> Result<()>;
}

impl TensorSource for OwnedTensor {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn byte_len(&self) -> usize {
        self.bytes.len()
    }
    fn write_to(&self, w: &mut dyn Write) -> Result<()> {
        w.write_all(&self.bytes)
            .map_err(|e| CoreError::io("<output>", e))
    }
}

/// The number of values in little-endian `bytes` of `dtype` that are NaN or ±inf.
pub fn count_non_finite(bytes: &[u8], dtype: DType) -> usize {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
            .count(),
        // The exponent bits all set: inf or NaN.
        DType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80)
            .count(),
        DType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00)
            .count(),
    }
}

/// [`f32_to_bytes`], refusing values that are not finite or that `dtype` cannot hold (float16
/// overflows to ±inf above 65504): the error names the tensor, how many values and the largest.
pub fn f32_to_finite_bytes(name: &str, values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(CoreError::NonFinite {
            name: name.to_string(),
            message: format!("{bad} of {} values are NaN or infinite", values.len()),
        });
    }
    let bytes = f32_to_bytes(values, dtype);
    let over = count_non_finite(&bytes, dtype);
    if over > 0 {
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        return Err(CoreError::NonFinite {
            name: name.to_string(),
            message: format!(
                "{over} of {} values overflow {dtype} (largest |value| {max}; {dtype} holds up to {}): \
                 write bf16 or f32 instead",
                values.len(),
                match dtype {
                    DType::F16 => f16::MAX.to_f32(),
                    DType::BF16 => bf16::MAX.to_f32(),
                    DType::F32 => f32::MAX,
                }
            ),
        });
    }
    Ok(bytes)
}

/// Convert f32 values to little-endian bytes of `dtype` (round to nearest even, as torch).
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Save `model` as a HuggingFace directory at `out`.
///
/// `hf` supplies the original `config.json` keys; `source_dir` (usually the directory the model
/// was loaded from) supplies tokenizer and generation files. Every value must be finite in the
/// output dtype (a NaN weight, or a value float16 cannot hold, is an error naming the tensor,
/// and nothing is written).
pub fn save_pretrained<B: Backend>(
    model: &LlamaForCausalLM<B>,
    hf: &HfConfig,
    source_dir: Option<&Path>,
    out: &Path,
    opts: &SaveOptions,
) -> Result<()> {
    if let Some(src) = source_dir.filter(|s| paths_overlap(s, out)) {
        return Err(CoreError::setting(
            "output",
            format!(
                "{} is the source model {} or inside it (or contains it): write elsewhere",
                out.display(),
                src.display()
            ),
        ));
    }
    let dtype = opts.dtype.unwrap_or(model.config.dtype);
    let mut tensors = Vec::new();
    for p in model.named_parameters() {
        let data = p.value.into_data();
        let bytes = match (data.dtype, dtype) {
            (burn::tensor::DType::F32, DType::F32)
            | (burn::tensor::DType::BF16, DType::BF16)
            | (burn::tensor::DType::F16, DType::F16) => {
                let bytes = data.as_bytes().to_vec();
                let bad = count_non_finite(&bytes, dtype);
                if bad > 0 {
                    return Err(CoreError::NonFinite {
                        name: p.name,
                        message: format!("{bad} values are NaN or infinite"),
                    });
                }
                bytes
            }
            _ => {
                let values = data
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| CoreError::Invalid(format!("reading {}: {e:?}", p.name)))?;
                f32_to_finite_bytes(&p.name, &values, dtype)?
            }
        };
        tensors.push((
            p.name,
            OwnedTensor {
                dtype,
                shape: p.shape,
                bytes,
            },
        ));
    }
    let mut config = model.config.clone();
    config.dtype = dtype;
    let json = hf.to_json(&config);
    write_model_dir(out, &json, tensors, source_dir, opts)
}

/// Write config, weights and copied files into `out` atomically (temp dir + rename).
pub fn write_model_dir<T: TensorSource>(
    out: &Path,
    config_json: &Map<String, Value>,
    tensors: Vec<(String, T)>,
    source_dir: Option<&Path>,
    opts: &SaveOptions,
) -> Result<()> {
    write_model_dir_checked(out, config_json, tensors, source_dir, opts, &mut |_| Ok(()))
}

/// [`write_model_dir`] that runs `check` on the complete temporary directory before renaming it
/// into place: when the check fails, the temporary directory is removed and `out` is left as it
/// was.
pub fn write_model_dir_checked<T: TensorSource>(
    out: &Path,
    config_json: &Map<String, Value>,
    tensors: Vec<(String, T)>,
    source_dir: Option<&Path>,
    opts: &SaveOptions,
    check: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = begin_atomic_dir(out, opts.overwrite)?;
    let result = (|| {
        write_json(
            &tmp.join("config.json"),
            &Value::Object(config_json.clone()),
        )?;
        write_weights(&tmp, tensors, opts.max_shard_bytes)?;
        if let Some(src) = source_dir {
            copy_support_files(src, &tmp)?;
        }
        check(&tmp)
    })();
    match result {
        Ok(()) => commit_atomic_dir(&tmp, out),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Copy tokenizer and generation files that exist in `src` into `dst`.
pub fn copy_support_files(src: &Path, dst: &Path) -> Result<()> {
    for f in COPIED_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dst.join(f)).map_err(|e| CoreError::io(&from, e))?;
        }
    }
    Ok(())
}

/// Write `value` as pretty JSON.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| CoreError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| CoreError::io(path, e))
}

/// Write `bytes` to `path` through a temporary sibling, synced, then renamed: the file is either
/// the old one or the new one, never half of each.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |e| CoreError::io(path, e);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_parent(path)
}

/// A tensor whose bytes are produced only when the file is written: read in chunks from a
/// range of an existing file, or zeros. Streaming expansion uses it, so memory stays at one
/// chunk whatever the model size.
#[derive(Debug, Clone)]
pub struct LazyTensor {
    /// Storage dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Where the bytes come from.
    pub data: LazyBytes,
}

/// Bytes of a [`LazyTensor`].
#[derive(Debug, Clone)]
pub enum LazyBytes {
    /// `len` bytes at `offset` of `path`.
    File {
        /// The file.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: usize,
    },
    /// `n` zero bytes (exact zeros in every float format).
    Zeros(usize),
}

const CHUNK: usize = 16 << 20;

impl TensorSource for LazyTensor {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn byte_len(&self) -> usize {
        match &self.data {
            LazyBytes::File { len, .. } => *len,
            LazyBytes::Zeros(n) => *n,
        }
    }
    fn write_to(&self, w: &mut dyn Write) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.data {
            LazyBytes::File { path, offset, len } => {
                let f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
                let mut buf = vec![0u8; CHUNK.min(*len)];
                let mut done = 0;
                while done < *len {
                    let n = CHUNK.min(len - done);
                    f.read_exact_at(&mut buf[..n], offset + done as u64)
                        .map_err(|e| CoreError::io(path, e))?;
                    w.write_all(&buf[..n])
                        .map_err(|e| CoreError::io("<output>", e))?;
                    done += n;
                }
            }
            LazyBytes::Zeros(n) => {
                let buf = vec![0u8; CHUNK.min(*n)];
                let mut done = 0;
                while done < *n {
                    let k = CHUNK.min(n - done);
                    w.write_all(&buf[..k])
                        .map_err(|e| CoreError::io("<output>", e))?;
                    done += k;
                }
            }
        }
        Ok(())
    }
}

/// Write one safetensors file with the tensors in the given order.
pub fn write_safetensors<T: TensorSource>(path: &Path, tensors: &[(String, T)]) -> Result<()> {
    use safetensors::tensor::{Metadata, TensorInfo};
    let st_err = |m: String| CoreError::Safetensors {
        path: path.to_path_buf(),
        message: m,
    };
    let mut offset = 0;
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let n = t.byte_len();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: match t.dtype() {
                    DType::F32 => StDtype::F32,
                    DType::F16 => StDtype::F16,
                    DType::BF16 => StDtype::BF16,
                },
                shape: t.shape().to_vec(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let metadata = Metadata::new(Some(meta), infos).map_err(|e| st_err(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| st_err(e.to_string()))?;
    // The data section starts 8-byte aligned, as the reference writer does.
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(path).map_err(|e| CoreError::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| CoreError::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (_, t) in tensors {
        t.write_to(&mut w)?;
    }
    w.flush().map_err(io)?;
    w.get_ref().sync_all().map_err(io)?;
    Ok(())
}

/// Write safetensors weights into `dir`: one `model.safetensors` if they fit in
/// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards (greedy, in the given order,
/// as transformers does) with `model.safetensors.index.json`. Returns the files written.
pub fn write_weights<T: TensorSource>(
    dir: &Path,
    tensors: Vec<(String, T)>,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    let total: usize = tensors.iter().map(|(_, t)| t.byte_len()).sum();
    if total <= max_shard_bytes {
        let path = dir.join("model.safetensors");
        write_safetensors(&path, &tensors)?;
        return Ok(vec![path]);
    }
    let mut shards: Vec<Vec<(String, T)>> = vec![vec![]];
    let mut size = 0;
    for t in tensors {
        let n = t.1.byte_len();
        if size > 0 && size + n > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(t);
        }
        size += n;
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        for (n, _) in shard {
            weight_map.insert(n.clone(), Value::String(name.clone()));
        }
        let path = dir.join(&name);
        write_safetensors(&path, shard)?;
        files.push(path);
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let index_path = dir.join("model.safetensors.index.json");
    write_json(&index_path, &index)?;
    files.push(index_path);
    Ok(files)
}

/// Create an empty temporary directory next to `out` (same filesystem, so the final rename is
/// atomic). Fails if `out` exists, is not empty and `overwrite` is false.
pub fn begin_atomic_dir(out: &Path, overwrite: bool) -> Result<PathBuf> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map_err(|e| CoreError::io(out, e))?
            .next()
            .is_none();
        if !empty && !overwrite {
            return Err(CoreError::OutputExists {
                path: out.to_path_buf(),
            });
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| CoreError::io(&parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    // Temporary directories of earlier processes that died while writing this output.
    remove_stale_temps(&parent, Some(&name));
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    Ok(tmp)
}

/// Move a finished temporary directory to `out`, replacing what was there: every file and the
/// directory are synced to disk first, the swap is atomic where the system allows it (Linux's
/// `renameat2(RENAME_EXCHANGE)`), and the parent directory is synced after, so that after a
/// crash or power loss `out` is the old or the new directory, complete.
pub fn commit_atomic_dir(tmp: &Path, out: &Path) -> Result<()> {
    sync_tree(tmp)?;
    if out.exists() {
        if !exchange(tmp, out) {
            let mut old = tmp.as_os_str().to_os_string();
            old.push(".old");
            let old = PathBuf::from(old);
            std::fs::rename(out, &old).map_err(|e| CoreError::io(out, e))?;
            std::fs::rename(tmp, out).map_err(|e| CoreError::io(out, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            // `tmp` now holds the old directory.
            let _ = std::fs::remove_dir_all(tmp);
        }
    } else {
        std::fs::rename(tmp, out).map_err(|e| CoreError::io(out, e))?;
    }
    sync_parent(out)
}

/// Swap two directories atomically (Linux); false where the system cannot.
fn exchange(a: &Path, b: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(ca), Ok(cb)) = (
            std::ffi::CString::new(a.as_os_str().as_bytes()),
            std::ffi::CString::new(b.as_os_str().as_bytes()),
        ) else {
            return false;
        };
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        false
    }
}

/// fsync every file below `dir` and the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    let io = |p: &Path, e| CoreError::io(p, e);
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&path, e))?;
        }
    }
    sync_dir(dir)
}

/// fsync a directory (its entries: names created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| CoreError::io(dir, e))?;
    }
    let _ = dir;
    Ok(())
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Remove the temporary directories and files (`.NAME.tmp-PID`, `.NAME.tmp-PID.old`) that
/// processes which no longer run left in `dir` while writing `NAME` (any name when `None`).
/// Those of running processes are left alone.
pub fn remove_stale_temps(dir: &Path, name: Option<&str>) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in rd.flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix('.') else {
            continue;
        };
        let rest = rest.strip_suffix(".old").unwrap_or(rest);
        let Some((stem, pid)) = rest.rsplit_once(".tmp-") else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if name.is_some_and(|n| n != stem) || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let ok = if path.is_dir() {
            std::fs::remove_dir_all(&path).is_ok()
        } else {
            std::fs::remove_file(&path).is_ok()
        };
        if ok {
            removed.push(path);
        }
    }
    removed
}

/// Whether a process with this id runs (conservatively true where it cannot be told).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        // SAFETY: signal 0 sends nothing; it only checks that the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// `a` and `b` name the same directory, or one lies inside the other (after resolving links and
/// `..`; a path that does not exist yet is resolved through its nearest existing parent).
pub fn paths_overlap(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolve(a), resolve(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// `path` made absolute and canonical as far as it exists.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            return tail.iter().rev().fold(c, |p, t| p.join(t));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(p), Some(n)) => {
                tail.push(n.to_os_string());
                cur = p;
            }
            _ => return abs,
        }
    }
}
