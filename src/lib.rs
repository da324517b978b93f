//! # llama-pro
//!
//! LLaMA Pro post-pretraining with block expansion, in pure Rust on burn.
//! This crate re-exports [`core`] (model, HF I/O, expansion, freezing, generation) and
//! [`train`] (data, training loop, CLI).
#![warn(missing_docs)]

pub use llama_pro_core as core;
pub use llama_pro_train as train;
