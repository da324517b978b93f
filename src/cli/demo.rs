//! `llama-pro demo`: the paper's claim at toy scale on the shipped data.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use llama_pro::core::device::DeviceSpec;
use llama_pro::train::demo::{DemoConfig, DemoMethod, demo_table, run_demo};

use super::choice;
use super::progress::DemoProgress;

/// `llama-pro demo`
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The CI-sized run (about 35 s on 2 CPU cores) instead of the default (about 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Directory with base/, {general,domain}-{train,valid}.jsonl and instruct-{train,valid}.jsonl
    /// (default: the repository's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory: runs/ (sft-* for the SFT stage), models/, forgetting.png, demo.json.
    #[arg(long, default_value = "demo-output")]
    pub output: PathBuf,
    /// Methods to compare, comma-separated (default: all five).
    #[arg(long, value_delimiter = ',', value_parser = choice::<DemoMethod>(DemoMethod::ALL.map(|m| m.key())))]
    pub methods: Vec<DemoMethod>,
    /// Optimizer steps per method (default 150; --quick 30).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate of every method (default 2e-4, the paper's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Fail if LLaMA Pro's general loss rises by more than this many percent (default 5).
    #[arg(long)]
    pub max_general_change: Option<f64>,
    /// Skip the SFT stage (LLaMA Pro - Instruct: LLaMA Pro's model and the base fine-tuned on
    /// data/instruct-train.jsonl, held-out answer loss before and after, greedy answers).
    #[arg(long)]
    pub no_sft: bool,
    /// SFT optimizer steps of each model (default 60; --quick 30).
    #[arg(long)]
    pub sft_steps: Option<usize>,
    /// SFT peak learning rate (default 1e-3: the paper's 2e-5 is for an 8 B model).
    #[arg(long)]
    pub sft_lr: Option<f64>,
    /// Seed of the data order and adapter init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, wgpu[:N] or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

pub fn run(a: &DemoArgs) -> anyhow::Result<()> {
    let mut c = if a.quick {
        DemoConfig::quick()
    } else {
        DemoConfig::default()
    };
    if let Some(d) = &a.data_dir {
        c.data_dir = d.clone();
    }
    c.output = a.output.clone();
    if !a.methods.is_empty() {
        c.methods = a.methods.clone();
    }
    if let Some(s) = a.steps {
        c.steps = s;
    }
    if let Some(lr) = a.lr {
        c.lr = lr;
    }
    if let Some(g) = a.max_general_change {
        c.max_general_change_pct = g;
    }
    c.sft = !a.no_sft;
    if let Some(s) = a.sft_steps {
        c.sft_steps = s;
    }
    if let Some(lr) = a.sft_lr {
        c.sft_lr = lr;
    }
    c.seed = a.seed;
    c.device = a.device;
    let start = std::time::Instant::now();
    let mut progress = DemoProgress::new(c.total_steps());
    let r = run_demo(&c, &mut progress);
    progress.finish();
    let r = r?;
    println!("\n{}", demo_table(&r));
    for v in &r.verdict {
        println!("{v}");
    }
    println!(
        "\nplot: {}\nreport: {}\n({:.0} s in all)",
        c.output.join("forgetting.png").display(),
        c.output.join("demo.json").display(),
        start.elapsed().as_secs_f64()
    );
    if !r.passed {
        bail!("the demo's checks failed (see above)");
    }
    Ok(())
}
