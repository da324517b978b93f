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
    /// Anything else, with a message naming the culprit.
    #[error("{0}")]
    Invalid(String),
}
