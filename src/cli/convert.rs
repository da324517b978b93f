//! `llama-pro convert`: read a model and write it back (dtype, sharding).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use llama_pro::core::save::{SaveOptions, save_pretrained};
use llama_pro::core::weights::Checkpoint;
use llama_pro::core::{DType, HfConfig, LlamaForCausalLM};
use llama_pro::train::data::existing;

use super::{dtype_parser, parse_size};

/// `llama-pro convert`
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (written to a temporary directory, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Storage dtype of the output (default: same as the input).
    #[arg(long, value_parser = dtype_parser())]
    pub dtype: Option<DType>,
    /// Shard the weights above this size, e.g. 5GB, 500MB, 200KB.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: usize,
    /// Replace the output directory if it exists (never the input: the output may not be the
    /// model directory, nor lie inside it).
    #[arg(long)]
    pub overwrite: bool,
}

/// The CPU backend of this build (any backend computes the same; conversion is host work).
#[cfg(feature = "cpu")]
type Host = llama_pro::core::burn::backend::Flex;
#[cfg(all(not(feature = "cpu"), feature = "wgpu"))]
type Host = llama_pro::core::device::WgpuBackend;
#[cfg(all(not(feature = "cpu"), not(feature = "wgpu"), feature = "cuda"))]
type Host = llama_pro::core::burn::backend::Cuda;

pub fn run(a: &ConvertArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    if llama_pro::core::save::paths_overlap(&dir, &a.output) {
        bail!(
            "--output {} is the input model {} or inside it (or contains it): convert into another directory",
            a.output.display(),
            dir.display()
        );
    }
    let hf = HfConfig::from_path(&dir)?;
    let device = Default::default();
    // Load in f32: exact for every input dtype, so re-saving in the input dtype is bitwise.
    let ckpt = Checkpoint::open(&dir)?;
    let model = LlamaForCausalLM::<Host>::from_checkpoint(&hf.config, &ckpt, &device, DType::F32)?;
    let opts = SaveOptions {
        dtype: a.dtype,
        max_shard_bytes: a.max_shard_size,
        overwrite: a.overwrite,
    };
    save_pretrained(&model, &hf, Some(&dir), &a.output, &opts)?;
    println!("wrote {}", a.output.display());
    Ok(())
}
