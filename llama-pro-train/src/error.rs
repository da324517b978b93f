//! Errors of the training crate.

use std::path::PathBuf;

/// Result alias for the training crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What can go wrong with data, evaluation and training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// From the core crate (model, config, checkpoint, tokenizer).
    #[error(transparent)]
    Core(#[from] llama_pro_core::CoreError),
    /// A data file problem at a given line.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number (0 for the whole file).
        line: usize,
        /// What is wrong and what was expected.
        message: String,
    },
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value that cannot work, named by its key (the field of
    /// [`TrainConfig`](crate::config::TrainConfig), which is the TOML key and, with dashes, the
    /// command-line flag).
    #[error("{}", llama_pro_core::error::setting_text(key, message))]
    Setting {
        /// The key.
        key: String,
        /// The value given and what was expected.
        message: String,
    },
    /// Data-parallel training: a worker failed, or the others did not answer in time.
    #[error("{0}")]
    Collective(String),
    /// Anything else, with a message naming the culprit.
    #[error("{0}")]
    Invalid(String),
}

impl TrainError {
    /// A [`TrainError::Setting`].
    pub fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting {
            key: key.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
