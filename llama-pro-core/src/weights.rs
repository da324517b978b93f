//! Where a model's tensors come from: random initialisation or a HuggingFace checkpoint.
//!
//! Every module is built by asking a [`WeightSource`] for its tensors by HF name and shape, so the
//! shapes are declared exactly once and random init and checkpoint loading share one code path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::tensor::{Tensor, TensorCreationOptions, TensorData, backend::Backend};
use half::{bf16, f16};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype as StDtype, SafeTensors, tensor::Metadata};

use crate::config::DType;
use crate::error::{CoreError, Result};

/// How a tensor is initialised when it does not come from a checkpoint (HF `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std) (`initializer_range`, 0.02 in HF).
    Normal(f64),
    /// All ones (RMSNorm weights).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// A provider of named tensors.
pub trait WeightSource<B: Backend> {
    /// The tensor called `name` (HF name) with the given shape.
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>>;

    /// The same, wrapped as a trainable parameter with a fresh id (tracked by autodiff until
    /// frozen with [`crate::freeze::set_trainable`]).
    fn param<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::initialized(
            ParamId::new(),
            self.tensor(name, shape, init)?.require_grad(),
        ))
    }
}

/// Seeded random initialisation on the host.
///
/// Values are drawn in a fixed order (the order modules ask for them) from ChaCha8, so the same
/// seed gives the same model on every backend and in every run. Parameters are materialised
/// right away rather than lazily (burn's lazy init makes the draw order depend on first use).
pub struct RandomInit<B: Backend> {
    device: B::Device,
    dtype: DType,
    rng: ChaCha8Rng,
}

impl<B: Backend> RandomInit<B> {
    /// A source on `device` producing `dtype` tensors from `seed`.
    pub fn new(device: &B::Device, dtype: DType, seed: u64) -> Self {
        Self {
            device: device.clone(),
            dtype,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl<B: Backend> WeightSource<B> for RandomInit<B> {
    fn tensor<const D: usize>(
        &mut self,
        _name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Normal(std) => (0..n)
                .map(|_| {
                    // Box–Muller: two uniforms in (0, 1] give one standard normal.
                    let u1: f64 = 1.0 - self.rng.random::<f64>();
                    let u2: f64 = self.rng.random::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
                })
                .collect(),
        };
        Ok(tensor_from_f32(values, shape, self.dtype, &self.device))
    }
}

/// Build a module from a seeded f32 [`RandomInit`] (seed 0).
///
/// # Panics
/// Never in practice: random initialisation has no failure mode; a panic here is a bug.
pub(crate) fn random<B: Backend, M>(
    device: &B::Device,
    build: impl FnOnce(&mut RandomInit<B>) -> Result<M>,
) -> M {
    let mut src = RandomInit::<B>::new(device, DType::F32, 0);
    match build(&mut src) {
        Ok(m) => m,
        Err(e) => unreachable!("random initialisation failed: {e}"),
    }
}

/// Build a tensor of `dtype` on `device` from f32 host values.
pub fn tensor_from_f32<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    let data = match dtype {
        DType::F32 => TensorData::new(values, shape),
        DType::F16 => TensorData::new(
            values.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        DType::BF16 => TensorData::new(
            values.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
    };
    Tensor::from_data(
        data,
        TensorCreationOptions::new(device.clone()).with_dtype(dtype.burn()),
    )
}

/// The float dtypes we read (`None` for integer, bool, f64, fp8... tensors).
fn float_dtype(dtype: StDtype) -> Option<DType> {
    match dtype {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
        // SAFETY: the file is opened read-only and we never hand out references that outlive the
        // map; a concurrent writer truncating it could fault, as with every mmap-based loader
        // (transformers and candle do the same).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CoreError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| CoreError::Safetensors {
                path: path.to_path_buf(),
                message: format!("{e}"),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header_len,
            metadata,
        })
    }
}

/// The tensors of a HuggingFace checkpoint: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`, memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// tensor name → index in `files`
    index: BTreeMap<String, usize>,
}

/// What a checkpoint tensor holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// Storage dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// The file it is in.
    pub file: PathBuf,
}

impl Checkpoint {
    /// Open the safetensors weights of a model directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| CoreError::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| CoreError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    CoreError::config(
                        &index_path,
                        "expected an object `weight_map` {tensor name: shard file}",
                    )
                })?;
            let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    CoreError::config(
                        &index_path,
                        format!("`weight_map[{name:?}]` must be a file name"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                    return Err(CoreError::config(
                        &index_path,
                        format!("shard name {file:?} must be a plain file name"),
                    ));
                }
                let id = match shard_ids.get(file) {
                    Some(&id) => id,
                    None => {
                        let id = files.len();
                        files.push(MappedFile::open(&dir.join(file))?);
                        shard_ids.insert(file.to_string(), id);
                        id
                    }
                };
                if files[id].metadata.info(name).is_none() {
                    return Err(CoreError::MissingTensor {
                        name: name.clone(),
                        files: format!(
                            "{} (listed there by {})",
                            dir.join(file).display(),
                            index_path.display()
                        ),
                    });
                }
                index.insert(name.clone(), id);
            }
            // A shard may hold tensors the index does not list: they would be silently ignored.
            for f in &files {
                let unlisted: Vec<String> = f
                    .metadata
                    .tensors()
                    .keys()
                    .filter(|k| !index.contains_key(*k))
                    .cloned()
                    .collect();
                if !unlisted.is_empty() {
                    return Err(CoreError::config(
                        &index_path,
                        format!(
                            "shard {} holds tensors the index does not list: {unlisted:?}",
                            f.path.display()
                        ),
                    ));
                }
            }
        } else if single.exists() {
            let f = MappedFile::open(&single)?;
            for name in f.metadata.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            files.push(f);
        } else {
            return Err(CoreError::config(
                &dir,
                "no model.safetensors or model.safetensors.index.json in this directory (only safetensors checkpoints are supported)",
            ));
        }
        Ok(Self { dir, files, index })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Dtype, shape and file of a tensor.
    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        let f = &self.files[*self.index.get(name)?];
        let info = f.metadata.info(name)?;
        Some(TensorMeta {
            dtype: float_dtype(info.dtype)?,
            shape: info.shape.clone(),
            file: f.path.clone(),
        })
    }

    /// The file holding `name`, its header entry and the absolute byte range of its data.
    fn lookup(
        &self,
        name: &str,
    ) -> Result<(
        &MappedFile,
        &safetensors::tensor::TensorInfo,
        std::ops::Range<usize>,
    )> {
        let missing = |files: String| CoreError::MissingTensor {
            name: name.to_string(),
            files,
        };
        let f = &self.files[*self
            .index
            .get(name)
            .ok_or_else(|| missing(self.file_list()))?];
        let info = f
            .metadata
            .info(name)
            .ok_or_else(|| missing(f.path.display().to_string()))?;
        let (a, b) = info.data_offsets;
        Ok((f, info, 8 + f.header_len + a..8 + f.header_len + b))
    }

    /// Raw little-endian bytes, safetensors dtype and shape of a tensor (no copy).
    pub fn raw(&self, name: &str) -> Result<(&[u8], StDtype, &[usize])> {
        let (f, info, range) = self.lookup(name)?;
        Ok((&f.mmap[range], info.dtype, &info.shape))
    }

    /// File, byte offset and length of a tensor's data (for streaming copies).
    pub fn location(&self, name: &str) -> Result<(PathBuf, u64, usize)> {
        let (f, _, range) = self.lookup(name)?;
        Ok((f.path.clone(), range.start as u64, range.len()))
    }

    /// The file holding `name` (for messages).
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.index
            .get(name)
            .map(|&i| self.files[i].path.clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Check, from the headers only, that this checkpoint is a model of `config`: every tensor
    /// the configuration implies is present in a float dtype with its shape, and nothing else is
    /// (besides old RoPE buffers and the redundant `lm_head` of a tied model). The errors name
    /// the tensors and files, as loading would, but nothing is read or allocated.
    pub fn check_layout(&self, config: &crate::config::LlamaConfig) -> Result<()> {
        let expected = config.tensor_shapes();
        let missing: Vec<String> = expected
            .iter()
            .filter(|(n, _)| !self.index.contains_key(n))
            .map(|(n, _)| n.clone())
            .collect();
        if !missing.is_empty() {
            return Err(CoreError::MissingTensors {
                names: missing,
                files: self.file_list(),
            });
        }
        for (name, shape) in &expected {
            let (_, st_dtype, found) = self.raw(name)?;
            if float_dtype(st_dtype).is_none() {
                return Err(CoreError::UnsupportedDtype {
                    path: self.file_of(name),
                    name: name.clone(),
                    dtype: format!("{st_dtype:?}"),
                });
            }
            if found != shape.as_slice() {
                return Err(CoreError::ShapeMismatch {
                    path: self.file_of(name),
                    name: name.clone(),
                    found: found.to_vec(),
                    expected: shape.clone(),
                });
            }
        }
        let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let tied = config.tie_word_embeddings;
        let unexpected: Vec<String> = self
            .names()
            .filter(|n| !known.contains(n))
            .filter(|n| !(n.ends_with("rotary_emb.inv_freq") || (tied && *n == "lm_head.weight")))
            .map(str::to_string)
            .collect();
        if let Some(first) = unexpected.first() {
            return Err(CoreError::UnexpectedTensors {
                path: self.file_of(first),
                names: unexpected,
            });
        }
        Ok(())
    }

    /// A fingerprint of the weights (SHA-256, hex): every tensor's name, dtype and shape and up
    /// to 64 KiB of its bytes (16 evenly spaced 4 KiB samples; all of a smaller tensor). Two
    /// different models differ in it with near certainty; it reads a few MB whatever the model's
    /// size, so it does not prove that every byte is the same.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for name in self.names() {
            let (bytes, dtype, shape) = self.raw(name)?;
            h.update(name.as_bytes());
            h.update(format!("{dtype:?}{shape:?}").as_bytes());
            const CHUNK: usize = 4096;
            if bytes.len() <= 16 * CHUNK {
                h.update(bytes);
            } else {
                let stride = (bytes.len() - CHUNK) / 15;
                for k in 0..16 {
                    h.update(&bytes[k * stride..k * stride + CHUNK]);
                }
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// An error naming the first tensor that holds NaN or infinite values, and how many tensors
    /// do. Reads every tensor's bytes once (memory-mapped; no conversion).
    pub fn check_finite(&self) -> Result<()> {
        let mut bad = Vec::new();
        for name in self.names() {
            let (bytes, st_dtype, _) = self.raw(name)?;
            if let Some(dtype) = float_dtype(st_dtype) {
                let n = crate::save::count_non_finite(bytes, dtype);
                if n > 0 {
                    bad.push((name.to_string(), n));
                }
            }
        }
        match bad.first() {
            None => Ok(()),
            Some((name, n)) => Err(CoreError::NonFinite {
                name: name.clone(),
                message: format!(
                    "{n} values are NaN or infinite in {}{}",
                    self.file_of(name).display(),
                    match bad.len() {
                        1 => String::new(),
                        k => format!(" ({k} tensors have such values)"),
                    }
                ),
            }),
        }
    }

    /// Read a tensor into host f32 values, checking its shape.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (bytes, dtype, shape) = self.raw(name)?;
        if shape != expected {
            return Err(CoreError::ShapeMismatch {
                path: self.file_of(name),
                name: name.to_string(),
                found: shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(match dtype {
            StDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(CoreError::UnsupportedDtype {
                    path: self.file_of(name),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        })
    }
}

/// A [`WeightSource`] reading a [`Checkpoint`] into tensors of the compute dtype, recording which
/// tensors were used so that leftovers are reported.
pub struct CheckpointSource<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    device: B::Device,
    dtype: DType,
    used: BTreeSet<String>,
}

impl<'a, B: Backend> CheckpointSource<'a, B> {
    /// Read from `ckpt` onto `device`, converting to `dtype`.
    pub fn new(ckpt: &'a Checkpoint, device: &B::Device, dtype: DType) -> Self {
        Self {
            ckpt,
            device: device.clone(),
            dtype,
            used: BTreeSet::new(),
        }
    }

    /// Error if the checkpoint holds tensors the model did not ask for (besides `ignore`d ones).
    pub fn finish(self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let unused: Vec<String> = self
            .ckpt
            .names()
            .filter(|n| !self.used.contains(*n) && !ignore(n))
            .map(str::to_string)
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(CoreError::UnexpectedTensors {
                path: self.ckpt.file_of(&unused[0]),
                names: unused,
            })
        }
    }
}

impl<B: Backend> WeightSource<B> for CheckpointSource<'_, B> {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        _init: Init,
    ) -> Result<Tensor<B, D>> {
        let (bytes, st_dtype, found) = self.ckpt.raw(name)?;
        if found != shape {
            return Err(CoreError::ShapeMismatch {
                path: self.ckpt.file_of(name),
                name: name.to_string(),
                found: found.to_vec(),
                expected: shape.to_vec(),
            });
        }
        self.used.insert(name.to_string());
        let file_dtype = float_dtype(st_dtype).ok_or_else(|| CoreError::UnsupportedDtype {
            path: self.ckpt.file_of(name),
            name: name.to_string(),
            dtype: format!("{st_dtype:?}"),
        })?;
        let opts = TensorCreationOptions::new(self.device.clone()).with_dtype(self.dtype.burn());
        if file_dtype == self.dtype {
            // Same dtype: hand the bytes over as they are (bitwise round trip).
            let data =
                TensorData::from_bytes_vec(bytes.to_vec(), shape.to_vec(), self.dtype.burn());
            return Ok(Tensor::from_data(data, opts));
        }
        let values = self.ckpt.read_f32(name, &shape)?;
        Ok(tensor_from_f32(values, shape, self.dtype, &self.device))
    }
}
