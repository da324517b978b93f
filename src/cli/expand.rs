//! `llama-pro expand`: block expansion of a checkpoint on disk, and the identity check.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use llama_pro::core::device::{DeviceSpec, check_device, verify_identity_on};
use llama_pro::core::expand::{CONFIG_KEY, ExpansionPlan, expand_checkpoint_checked};
use llama_pro::core::save::SaveOptions;
use llama_pro::core::{CoreError, HfConfig};
use llama_pro::train::data::existing;

use super::{human_bytes, human_count, parse_size};

/// `llama-pro expand`
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("layout").required(true).args(["groups", "top", "bottom", "positions"])))]
pub struct ExpandArgs {
    /// Input model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (written to a temporary directory, then renamed).
    #[arg(long)]
    pub output: PathBuf,
    /// Interleaved (the paper's layout): split the L blocks into N groups of L/N and add copies
    /// after each group (LLaMA-2-7B: --groups 8 turns 32 blocks into 40).
    #[arg(long, value_name = "N")]
    pub groups: Option<usize>,
    /// With --groups: copies per group, of the group's top P blocks.
    #[arg(long, value_name = "P", default_value_t = 1, requires = "groups")]
    pub copies: usize,
    /// Add K copies of the last block on top (the paper's suffix stacking).
    #[arg(long, value_name = "K")]
    pub top: Option<usize>,
    /// Add K copies of the first block at the bottom (the paper's prefix stacking).
    #[arg(long, value_name = "K")]
    pub bottom: Option<usize>,
    /// Explicit insertions SOURCE@POSITION,...: a copy of block SOURCE placed at POSITION of the
    /// expanded model (e.g. 3@4,7@9).
    #[arg(long, value_name = "LIST")]
    pub positions: Option<String>,
    /// Compare the logits of the expanded and original models before the output is moved into
    /// place (a failed check leaves no output): auto (models up to 1.5B parameters), always or
    /// never. The input's tensors are checked against its config.json in every case.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub identity_check: String,
    /// Device for the identity check.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Shard the weights above this size, e.g. 5GB.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: usize,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: &ExpandArgs) -> anyhow::Result<()> {
    let src = existing(&a.model)?;
    let plan = if let Some(n) = a.groups {
        ExpansionPlan::Interleaved {
            groups: n,
            copies: a.copies,
        }
    } else if let Some(k) = a.top {
        ExpansionPlan::Top { k }
    } else if let Some(k) = a.bottom {
        ExpansionPlan::Bottom { k }
    } else if let Some(p) = &a.positions {
        ExpansionPlan::parse_positions(p)?
    } else {
        bail!("give one of --groups, --top, --bottom or --positions");
    };
    let opts = SaveOptions {
        dtype: None,
        max_shard_bytes: a.max_shard_size,
        overwrite: a.overwrite,
    };
    let params = HfConfig::from_path(&src)?.config.num_params();
    let check = match a.identity_check.as_str() {
        "always" => true,
        "never" => false,
        _ => params <= 1_500_000_000,
    };
    if check {
        // The device must work before anything is written.
        check_device(a.device)?;
    }
    let start = std::time::Instant::now();
    let mut delta = None;
    let mut identity = |tmp: &std::path::Path| -> llama_pro::core::Result<()> {
        if !check {
            return Ok(());
        }
        let d = verify_identity_on(a.device, &src, tmp)?;
        delta = Some(d);
        if d != 0.0 {
            return Err(CoreError::Invalid(format!(
                "identity check failed: the expanded model's logits differ from the original's by {d}; nothing was written"
            )));
        }
        Ok(())
    };
    let report = expand_checkpoint_checked(&src, &a.output, &plan, &opts, &mut identity)?;
    println!(
        "expanded {} -> {} layers ({plan}) in {:.2}s, {} of weights written to {}",
        report.from_layers,
        report.to_layers,
        start.elapsed().as_secs_f64(),
        human_bytes(report.bytes_written),
        a.output.display()
    );
    println!("layer map (cN = zero-initialised copy of block N):");
    println!("  {}", report.map.compact());
    println!(
        "new layers {:?} (recorded in config.json under \"{CONFIG_KEY}\")",
        report.map.new_layers(),
    );
    if let Some(d) = delta {
        println!("identity check: max |Δlogits| = {d}");
    } else {
        println!(
            "identity check: skipped ({} parameters; pass --identity-check always to run it)",
            human_count(params)
        );
    }
    Ok(())
}
