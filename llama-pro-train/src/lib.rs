//! # llama-pro-train
//!
//! Data (tokenization, sequence files), evaluation and the `llama-pro` command-line interface.
//! No model math lives here: the model, its loss and generation are in `llama-pro-core`.
#![warn(missing_docs)]

pub mod cli;
pub mod data;
pub mod error;
pub mod eval;

pub use error::{Result, TrainError};
