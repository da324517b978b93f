//! # llama-pro-core
//!
//! The LLaMA model family (LLaMA, Mistral, Qwen2) as burn modules generic over `B: Backend`,
//! numerically identical to transformers' `LlamaForCausalLM`, with HuggingFace config and
//! safetensors I/O, tokenization and generation. Block expansion (LLaMA Pro, arXiv 2401.02415,
//! §3.2) and freezing build on these modules. There is no training loop here.
//!
//! Module fields are named after HuggingFace tensor paths (`model.layers.3.self_attn.o_proj.weight`),
//! so a reader can hold this crate next to `modeling_llama.py`.
#![warn(missing_docs)]

pub mod attention;
pub mod block;
pub mod chat;
pub mod config;
pub mod device;
pub mod embedding;
pub mod error;
pub mod expand;
pub mod freeze;
pub mod generate;
pub mod gguf;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod norm;
pub mod ops;
pub mod params;
pub mod rope;
pub mod save;
pub mod score;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatTemplate, Message};
pub use config::{Architecture, DType, HfConfig, LlamaConfig, RopeScaling};
pub use error::{CoreError, Result};
pub use model::{KvCache, LlamaForCausalLM, LlamaModel};
pub use tokenizer::Tokenizer;

/// Re-export of the burn version this crate is built on.
pub use burn;
