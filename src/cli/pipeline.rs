//! `llama-pro pipeline RECIPE.toml`: the paper's whole recipe in one run — expand the base
//! model, post-pretrain the new blocks on a domain corpus, instruction-tune all blocks, and
//! leave a HuggingFace model.
//!
//! ```toml
//! model = "base-model"          # HF directory
//! output = "runs/pro"           # stages write expanded/, pretrain/, sft/ under it
//! device = "cpu"                # optional: the default device of every stage
//!
//! [expand]                      # one of groups (+ copies), top, bottom, positions
//! groups = 8
//!
//! [pretrain]                    # any `train` key (TOML names); model and output are set
//! data = ["domain.jsonl"]
//! max_steps = 1000
//!
//! [sft]                         # any key, over the SFT defaults (`llama-pro sft`)
//! data = ["chat.jsonl"]
//! template = "chatml"
//! ```
//!
//! Each stage may be left out (no `[expand]`: `model` is trained as it is). A stage whose model
//! is already exported is skipped; one with checkpoints resumes from the latest, so running the
//! recipe again after an interruption continues where it stopped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use llama_pro::core::device::DeviceSpec;
use llama_pro::train::config::{Resume, TrainConfig};
use llama_pro::train::trainer::latest_checkpoint;

use super::expand::ExpandArgs;

/// `llama-pro pipeline`
#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// The recipe (TOML; see `llama-pro pipeline --help` and the README).
    pub recipe: PathBuf,
}

const TOP_KEYS: &[&str] = &["model", "output", "device", "expand", "pretrain", "sft"];
const EXPAND_KEYS: &[&str] = &["groups", "copies", "top", "bottom", "positions"];

pub fn run(a: &PipelineArgs) -> anyhow::Result<ExitCode> {
    let path = &a.recipe;
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut recipe: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow!("{}: invalid recipe: {e}", path.display()))?;
    let bad = |m: String| anyhow!("{}: {m}", path.display());
    if let Some(k) = recipe.keys().find(|k| !TOP_KEYS.contains(&k.as_str())) {
        bail!(bad(format!(
            "unknown key {k:?}; a recipe has {}",
            TOP_KEYS.join(", ")
        )));
    }
    let string = |t: &toml::Table, k: &str| -> anyhow::Result<Option<String>> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(format!("{k} must be a string, found {v}"))),
        }
    };
    let base = PathBuf::from(
        string(&recipe, "model")?
            .ok_or_else(|| bad("model (the base model directory) is required".into()))?,
    );
    let output = PathBuf::from(
        string(&recipe, "output")?
            .ok_or_else(|| bad("output (the run directory) is required".into()))?,
    );
    let device = string(&recipe, "device")?;
    if let Some(d) = &device {
        d.parse::<DeviceSpec>()
            .map_err(|e| bad(format!("device: {e}")))?;
    }
    let mut table = |k: &str| -> anyhow::Result<Option<toml::Table>> {
        match recipe.remove(k) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(v) => Err(bad(format!("[{k}] must be a table, found {v}"))),
        }
    };
    let (expand, pretrain, sft) = (table("expand")?, table("pretrain")?, table("sft")?);
    if pretrain.is_none() && sft.is_none() {
        bail!(bad("give a [pretrain] and/or an [sft] stage".into()));
    }
    // Every stage's settings are checked before the first one starts.
    let mut model = base.clone();
    let expand_args = match expand {
        Some(t) => {
            let args = expand_args(&t, &base, &output.join("expanded"), device.as_deref())
                .map_err(|e| bad(format!("[expand]: {e}")))?;
            model = args.output.clone();
            Some(args)
        }
        None => None,
    };
    let mut stages: Vec<(&str, TrainConfig)> = Vec::new();
    for (name, t, sft_stage) in [("pretrain", pretrain, false), ("sft", sft, true)] {
        let Some(mut t) = t else { continue };
        for key in ["model", "output"] {
            if t.contains_key(key) {
                bail!(bad(format!(
                    "[{name}] {key}: set by the pipeline, leave it out"
                )));
            }
        }
        let out = output.join(name);
        t.insert("model".into(), model.display().to_string().into());
        t.insert("output".into(), out.display().to_string().into());
        if let Some(d) = &device
            && !t.contains_key("device")
        {
            t.insert("device".into(), d.clone().into());
        }
        let defaults = if sft_stage {
            TrainConfig::sft()
        } else {
            TrainConfig::default()
        };
        let dtype_given = t.contains_key("dtype");
        let mut cfg = TrainConfig::from_table(t, Some(defaults))
            .map_err(|e| bad(format!("[{name}]: {e}")))?;
        if sft_stage && !dtype_given {
            cfg.dtype = TrainConfig::sft_dtype(cfg.primary_device());
        }
        cfg.validate().map_err(|e| bad(format!("[{name}]: {e}")))?;
        model = out.join("model");
        stages.push((name, cfg));
    }

    if let Some(args) = expand_args {
        if args.output.join("config.json").is_file() {
            eprintln!("== expand: {} exists, skipped", args.output.display());
        } else {
            eprintln!("== expand: {} -> {}", base.display(), args.output.display());
            super::expand::run(&args)?;
        }
    }
    for (name, mut cfg) in stages {
        let exported = cfg.output.join("model").join("config.json");
        if exported.is_file() {
            eprintln!(
                "== {name}: {} exists, skipped",
                cfg.output.join("model").display()
            );
            continue;
        }
        if latest_checkpoint(&cfg.output.join("checkpoints"))?.is_some() {
            cfg.resume = Some(Resume::Latest);
            eprintln!(
                "== {name}: resuming from the latest checkpoint in {}",
                cfg.output.display()
            );
        } else {
            eprintln!(
                "== {name}: {} -> {}",
                cfg.model.display(),
                cfg.output.display()
            );
        }
        let command = if name == "sft" { "sft" } else { "train" };
        let report = super::train::run_resolved(&cfg, command)?;
        if report.interrupted {
            eprintln!(
                "pipeline stopped during {name}; run `llama-pro pipeline {}` again to continue",
                path.display()
            );
            return Ok(ExitCode::from(130));
        }
    }
    println!(
        "pipeline done: the final model (HuggingFace format) is {}",
        model.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn expand_args(
    t: &toml::Table,
    base: &Path,
    output: &Path,
    device: Option<&str>,
) -> anyhow::Result<ExpandArgs> {
    if let Some(k) = t.keys().find(|k| !EXPAND_KEYS.contains(&k.as_str())) {
        bail!("unknown key {k:?}; expected {}", EXPAND_KEYS.join(", "));
    }
    let int = |k: &str| -> anyhow::Result<Option<usize>> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if *n > 0 => Ok(Some(*n as usize)),
            Some(v) => Err(anyhow!("{k} must be a positive integer, found {v}")),
        }
    };
    let layouts = ["groups", "top", "bottom", "positions"]
        .iter()
        .filter(|k| t.contains_key(**k))
        .count();
    if layouts != 1 {
        bail!("give exactly one of groups, top, bottom, positions");
    }
    Ok(ExpandArgs {
        model: base.to_path_buf(),
        output: output.to_path_buf(),
        groups: int("groups")?,
        copies: int("copies")?.unwrap_or(1),
        top: int("top")?,
        bottom: int("bottom")?,
        positions: match t.get("positions") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(v) => bail!("positions must be a string like \"3@4,7@9\", found {v}"),
        },
        identity_check: "auto".into(),
        device: match device {
            Some(d) => d.parse().map_err(|e| anyhow!("device: {e}"))?,
            None => DeviceSpec::Cpu,
        },
        max_shard_size: 5_000_000_000,
        overwrite: false,
    })
}
