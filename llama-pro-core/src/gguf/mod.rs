//! GGUF, the file format of llama.cpp, Ollama and LM Studio: reading (metadata, tensor table,
//! dequantisation) and writing (streamed, tensor by tensor), and the conversion of a LLaMA-family
//! model between GGUF and a HuggingFace directory ([`import`], [`export`]).
//!
//! The format (version 3, little-endian) is specified in ggml's `docs/gguf.md`: a header, typed
//! key/value metadata, a tensor table (name, dimensions innermost first, ggml type, offset), then
//! the tensor data, each tensor aligned to `general.alignment` (32 by default).
//!
//! Written by hand rather than with a crate: the Rust GGUF readers on crates.io come with a tensor
//! library (candle) or do not dequantise the k-quants; the format is small, and our dequantisers
//! are tested bit for bit against gguf-py's (the reference transformers also uses) on random
//! blocks of every type (`tests/fixtures/gguf/quants.gguf`).

pub mod convert;
pub mod quant;
pub mod tokenizer;

use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{CoreError, Result};

pub use quant::GgmlType;

/// `GGUF` in little-endian.
const MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `UINT8`
    U8(u8),
    /// `INT8`
    I8(i8),
    /// `UINT16`
    U16(u16),
    /// `INT16`
    I16(i16),
    /// `UINT32`
    U32(u32),
    /// `INT32`
    I32(i32),
    /// `FLOAT32`
    F32(f32),
    /// `BOOL`
    Bool(bool),
    /// `STRING` (UTF-8)
    String(String),
    /// `ARRAY` of one element type (nested arrays are allowed by the format, not used here).
    Array(ArrayValue),
    /// `UINT64`
    U64(u64),
    /// `INT64`
    I64(i64),
    /// `FLOAT64`
    F64(f64),
}

/// An array value: element type and elements. Kept typed, because token lists are large.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayValue {
    /// Strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    String(Vec<String>),
    /// `INT32` (`tokenizer.ggml.token_type`).
    I32(Vec<i32>),
    /// `FLOAT32` (`tokenizer.ggml.scores`).
    F32(Vec<f32>),
    /// `UINT32`.
    U32(Vec<u32>),
    /// Any other element type, as scalar values.
    Other(u32, Vec<Value>),
}

impl ArrayValue {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::String(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::Other(_, v) => v.len(),
        }
    }
    /// No elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Value {
    /// The value as an unsigned integer, whatever its integer type (negative → `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float (integers too).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&ArrayValue> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The GGUF type code.
    pub fn type_code(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
    /// A short rendering for listings (arrays as their type and length).
    pub fn summary(&self) -> String {
        match self {
            Self::String(s) if s.len() > 80 => {
                format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(77)], s.len())
            }
            Self::String(s) => format!("{s:?}"),
            Self::Array(a) => format!(
                "[{} × {}]",
                a.len(),
                match a {
                    ArrayValue::String(_) => "string",
                    ArrayValue::I32(_) => "i32",
                    ArrayValue::F32(_) => "f32",
                    ArrayValue::U32(_) => "u32",
                    ArrayValue::Other(..) => "value",
                }
            ),
            Self::Bool(b) => b.to_string(),
            Self::F32(v) => v.to_string(),
            Self::F64(v) => v.to_string(),
            v => v
                .as_u64()
                .map(|x| x.to_string())
                .unwrap_or_else(|| format!("{v:?}")),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF name (`blk.3.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (contiguous) first, the reverse of PyTorch's.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// The shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    /// Bytes of the stored data.
    pub fn byte_len(&self) -> usize {
        self.ggml_type.row_bytes(self.numel())
    }
}

/// A memory-mapped GGUF file: metadata in file order and the tensor table.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len().saturating_sub(self.pos) < n {
            return Err(CoreError::gguf(
                self.path,
                format!(
                    "truncated header: needed {n} bytes at offset {} of a {}-byte file",
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // Every element takes at least one byte: a larger count is a corrupt file, not an
        // allocation to attempt.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(CoreError::gguf(
                self.path,
                format!(
                    "truncated or corrupt header: {what} length {n} at offset {} exceeds the \
                     {}-byte file",
                    self.pos - 8,
                    self.buf.len()
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len("string")?;
        let at = self.pos;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| CoreError::gguf(self.path, format!("string at offset {at} is not UTF-8")))
    }
    fn scalar(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            9 => {
                let elem = self.u32()?;
                let n = self.len("array")?;
                Value::Array(match elem {
                    8 => ArrayValue::String((0..n).map(|_| self.string()).collect::<Result<_>>()?),
                    5 => ArrayValue::I32(
                        (0..n)
                            .map(|_| Ok(i32::from_le_bytes(self.arr()?)))
                            .collect::<Result<_>>()?,
                    ),
                    4 => ArrayValue::U32((0..n).map(|_| self.u32()).collect::<Result<_>>()?),
                    6 => ArrayValue::F32(
                        (0..n)
                            .map(|_| Ok(f32::from_le_bytes(self.arr()?)))
                            .collect::<Result<_>>()?,
                    ),
                    t => {
                        ArrayValue::Other(t, (0..n).map(|_| self.scalar(t)).collect::<Result<_>>()?)
                    }
                })
            }
            t => {
                return Err(CoreError::gguf(
                    self.path,
                    format!("unknown metadata value type {t} at offset {}", self.pos - 4),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Open and parse a GGUF file (the tensor data stays on disk, memory-mapped).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
        // SAFETY: read-only map of a file we do not write; see `weights::MappedFile`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CoreError::io(path, e))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        if mmap.len() < 4 || c.u32()? != MAGIC {
            return Err(CoreError::gguf(
                path,
                "not a GGUF file (it does not start with the bytes `GGUF`)",
            ));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(CoreError::gguf(
                path,
                format!("format version {version}; versions 2 and 3 are supported"),
            ));
        }
        let n_tensors = c.len("tensor count")?;
        let n_kv = c.len("metadata count")?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.scalar(ty).map_err(|e| match e {
                CoreError::Gguf { path, message } => CoreError::Gguf {
                    path,
                    message: format!("metadata key {key:?}: {message}"),
                },
                e => e,
            })?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 4 {
                return Err(CoreError::gguf(
                    path,
                    format!("tensor {name:?} has {n_dims} dimensions (at most 4)"),
                ));
            }
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let code = c.u32()?;
            let ggml_type = GgmlType::from_code(code).ok_or_else(|| {
                CoreError::gguf(
                    path,
                    format!("tensor {name:?} has unknown ggml type {code}"),
                )
            })?;
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let header_end = c.pos;
        let mut this = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start: 0,
            mmap,
        };
        let align = this.alignment()?;
        this.data_start = header_end.next_multiple_of(align);
        for t in &this.tensors {
            if !t.ggml_type.is_supported() {
                continue;
            }
            let block = t.ggml_type.block_size();
            if !t.numel().is_multiple_of(block)
                || t.dims.first().is_some_and(|&d| d as usize % block != 0)
            {
                return Err(CoreError::gguf(
                    path,
                    format!(
                        "tensor {:?}: rows of {} elements are not a multiple of {}'s block of {block}",
                        t.name,
                        t.dims.first().copied().unwrap_or(0),
                        t.ggml_type.name()
                    ),
                ));
            }
            let end = this.data_start as u64 + t.offset + t.byte_len() as u64;
            if end > this.mmap.len() as u64 {
                return Err(CoreError::gguf(
                    path,
                    format!(
                        "tensor {:?} ends at byte {end}, past the end of the file ({} bytes): truncated download?",
                        t.name,
                        this.mmap.len()
                    ),
                ));
            }
        }
        Ok(this)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> Result<usize> {
        match self.get("general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => Ok(a as usize),
                _ => Err(CoreError::gguf(
                    &self.path,
                    format!(
                        "general.alignment = {} (expected a power of two)",
                        v.summary()
                    ),
                )),
            },
        }
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A metadata value that must be there, as an unsigned integer.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| CoreError::gguf(&self.path, format!("missing metadata key {key:?}")))?;
        v.as_u64().ok_or_else(|| {
            CoreError::gguf(
                &self.path,
                format!(
                    "metadata key {key:?} = {} (expected an unsigned integer)",
                    v.summary()
                ),
            )
        })
    }

    /// A tensor of the table.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_start + t.offset as usize;
        &self.mmap[start..start + t.byte_len()]
    }

    /// A tensor dequantised to f32, in PyTorch element order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        if !t.ggml_type.is_supported() {
            return Err(CoreError::gguf(
                &self.path,
                format!(
                    "tensor {:?} is stored as {}, which we cannot dequantise (supported: {})",
                    t.name,
                    t.ggml_type.name(),
                    GgmlType::supported_names()
                ),
            ));
        }
        let mut out = vec![0f32; t.numel()];
        quant::dequantize(t.ggml_type, self.tensor_bytes(t), &mut out);
        Ok(out)
    }
}

fn write_string(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn write_value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => w.push(*x),
        Value::I8(x) => w.push(*x as u8),
        Value::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => w.push(*x as u8),
        Value::String(s) => write_string(w, s),
        Value::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            let (code, n) = match a {
                ArrayValue::String(v) => (8u32, v.len()),
                ArrayValue::I32(v) => (5, v.len()),
                ArrayValue::F32(v) => (6, v.len()),
                ArrayValue::U32(v) => (4, v.len()),
                ArrayValue::Other(t, v) => (*t, v.len()),
            };
            w.extend_from_slice(&code.to_le_bytes());
            w.extend_from_slice(&(n as u64).to_le_bytes());
            match a {
                ArrayValue::String(v) => v.iter().for_each(|s| write_string(w, s)),
                ArrayValue::I32(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
                ArrayValue::F32(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
                ArrayValue::U32(v) => v.iter().for_each(|x| w.extend_from_slice(&x.to_le_bytes())),
                ArrayValue::Other(_, v) => v.iter().for_each(|x| write_value(w, x)),
            }
        }
    }
}

/// A tensor to write: its table entry (the offset is computed) and a way to produce its bytes.
pub struct PendingTensor<'a> {
    /// GGUF name.
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Produces exactly `ggml_type.row_bytes(numel)` bytes, called once, in table order.
    pub data: Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>,
}

/// Write a GGUF v3 file at `path` through a temporary sibling that is renamed into place once
/// complete and synced: the header first, then each tensor as its producer returns it, so memory
/// holds one tensor at a time. `progress` is called after each tensor with (done, total).
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: Vec<PendingTensor<'_>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let align = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .map(|a| a as usize)
        .unwrap_or(DEFAULT_ALIGNMENT);
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        write_string(&mut header, k);
        header.extend_from_slice(&v.type_code().to_le_bytes());
        write_value(&mut header, v);
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in &tensors {
        write_string(&mut header, &t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&t.ggml_type.code().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        let n = t
            .ggml_type
            .row_bytes(t.dims.iter().product::<u64>() as usize);
        sizes.push(n);
        offset += (n as u64).next_multiple_of(align as u64);
    }
    header.resize(header.len().next_multiple_of(align), 0);

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let io = |e| CoreError::io(&tmp, e);
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        w.write_all(&header).map_err(io)?;
        let total = tensors.len();
        for (i, (t, n)) in tensors.into_iter().zip(sizes).enumerate() {
            let tname = t.name.clone();
            let bytes = (t.data)()?;
            if bytes.len() != n {
                return Err(CoreError::Invalid(format!(
                    "GGUF writer: tensor {tname:?} produced {} bytes, expected {n}",
                    bytes.len()
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            let pad = n.next_multiple_of(align) - n;
            w.write_all(&vec![0u8; pad]).map_err(io)?;
            progress(i + 1, total);
        }
        w.flush().map_err(io)?;
        w.get_ref().sync_all().map_err(io)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, path).map_err(|e| CoreError::io(path, e))?;
            if let Some(dir) = path.parent() {
                let _ = crate::save::sync_dir(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                });
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
