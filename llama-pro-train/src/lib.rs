//! # llama-pro-train
//!
//! Data (tokenization, packing, mixtures), the training loop (AdamW, warmup + decay, global
//! clipping, accumulation, checkpoints with exact resume), evaluation and the `llama-pro`
//! command-line interface.
//! No model math lives here: the model, its loss and generation are in `llama-pro-core`.
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod data;
pub mod dataset;
pub mod demo;
pub mod error;
pub mod eval;
pub mod flops;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tokenizer_train;
pub mod trainer;

pub use error::{Result, TrainError};
