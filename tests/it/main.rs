//! Integration tests (one binary, as CI builds it once).
//!
//! Fixtures under `tests/fixtures` were made by `scripts/make_fixtures.py` with transformers
//! (versions in `tests/fixtures/VERSIONS.txt`); no Python is needed to run these tests.

mod backends;
pub mod cli;
mod common;
mod demo;
mod expansion;
mod generation;
mod gguf;
mod gguf_tokenizer;
mod io;
mod kernels;
mod memory;
mod parallel;
pub mod parity;
mod reliability;
mod serve;
mod sft;
mod training;
