//! Errors of the core crate. Every variant names the file, tensor or key at fault.

use std::path::PathBuf;

/// Result alias for the core crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, building, expanding or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value that is missing, of the wrong type or not supported.
    #[error("{path}: {message}")]
    Config {
        /// The `config.json` (or other file) at fault.
        path: PathBuf,
        /// What is wrong and what was expected.
        message: String,
    },
    /// An architecture we do not implement.
    #[error(
        "{path}: unsupported architecture {found:?}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    )]
    UnsupportedArchitecture {
        /// The `config.json`.
        path: PathBuf,
        /// What `architectures` / `model_type` said.
        found: String,
    },
    /// A safetensors file that cannot be parsed (truncated, corrupt header...).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("missing tensor {name:?} (looked in {files})")]
    MissingTensor {
        /// HF tensor name.
        name: String,
        /// Files searched.
        files: String,
    },
    /// Tensors in the checkpoint that the model does not use.
    #[error("{path}: unexpected tensor(s) not used by the model: {names:?}")]
    UnexpectedTensors {
        /// The file holding the first of them.
        path: PathBuf,
        /// Their names.
        names: Vec<String>,
    },
    /// A tensor whose shape does not match the configuration.
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// HF tensor name.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A tensor stored in a dtype we cannot read.
    #[error("{path}: tensor {name:?} has dtype {dtype}, expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// HF tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tokenizer file that cannot be loaded or used.
    #[error("{path}: tokenizer error: {message}")]
    Tokenizer {
        /// `tokenizer.json`.
        path: PathBuf,
        /// The tokenizer's message.
        message: String,
    },
    /// An invalid argument (device string, generation option, expansion plan...).
    #[error("{0}")]
    Invalid(String),
}

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
