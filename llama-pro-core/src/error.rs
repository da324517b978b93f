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
    /// Tensors the configuration implies that the checkpoint does not hold.
    #[error("missing tensor(s) {names:?} (looked in {files})")]
    MissingTensors {
        /// HF tensor names.
        names: Vec<String>,
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
    /// A setting with a value that cannot work, named by its key (`groups`, `device`,
    /// `trainable`, `temperature`...: the field of the library type, which is also the TOML key and,
    /// with dashes, the command-line flag).
    #[error("{}", setting_text(key, message))]
    Setting {
        /// The setting.
        key: String,
        /// The value given and what was expected.
        message: String,
    },
    /// A tensor with values that are not finite, or would not be in the dtype asked for.
    #[error("tensor {name:?}: {message}")]
    NonFinite {
        /// HF tensor name.
        name: String,
        /// How many values, which, and what to do.
        message: String,
    },
    /// An output directory that holds something and may not be replaced.
    #[error("output directory {path} exists and is not empty (allow overwriting to replace it)")]
    OutputExists {
        /// The directory.
        path: PathBuf,
    },
    /// A chat template that cannot be found, parsed or rendered.
    #[error("chat template ({origin}): {message}")]
    Template {
        /// Where the template came from (a file, or `built-in NAME`).
        origin: String,
        /// What went wrong (the template's own `raise_exception` message, or minijinja's).
        message: String,
    },
    /// A GGUF file that cannot be read, or holds something we cannot convert.
    #[error("{path}: GGUF: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What was found and what was expected.
        message: String,
    },
    /// Anything else, with a message naming the culprit.
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
    /// A [`CoreError::Setting`].
    pub fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting {
            key: key.into(),
            message: message.into(),
        }
    }
    pub(crate) fn gguf(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Gguf {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// How a setting error reads: `key "value": what is wrong` when the message starts with the
/// quoted or numeric value, else `key: message`. The command line passes `--flag` as `key`.
pub fn setting_text(key: &str, message: &str) -> String {
    let value_first =
        message.starts_with(['"', '-']) || message.starts_with(|c: char| c.is_ascii_digit());
    if value_first {
        format!("{key} {message}")
    } else {
        format!("{key}: {message}")
    }
}
