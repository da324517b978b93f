//! # llama-pro-train
//!
//! Data (tokenization, packing, mixtures), the trainer (AdamW, warmup + decay, global clipping,
//! accumulation, checkpoints with exact resume, data parallelism), evaluation and the demo. No model math lives
//! here: the model, its loss and generation are in `llama-pro-core`. No terminal either: runs
//! report to an [`Observer`](trainer::Observer); the `llama-pro` binary owns the command line.
//!
//! Features: `cpu` (default), `wgpu`, `cuda` make backends available; `plot` draws PNG loss
//! plots (`loss.png`, the demo's `forgetting.png`) with plotters; `collective` trains on several
//! devices and machines ([`parallel`], burn-collective).
#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod dataset;
pub mod demo;
pub mod error;
pub mod eval;
pub mod flops;
pub mod memory;
pub mod optim;
pub mod parallel;
#[cfg(feature = "plot")]
pub mod plot;
pub mod schedule;
pub mod sft;
pub mod tasks;
pub mod tokenizer_train;
pub mod trainer;

pub use error::{Result, TrainError};
