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
    /// The CI-sized run (about 25 s on 2 CPU cores) instead of the default (about 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Directory with base/ and {general,domain}-{train,valid}.jsonl (default: the repository's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory: runs/, models/, forgetting.png, demo.json.
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
    c.seed = a.seed;
    c.device = a.device;
    let start = std::time::Instant::now();
    let mut progress = DemoProgress::new(c.steps * c.methods.len());
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
        bail!("the demo's LLaMA Pro checks failed (see above)");
    }
    Ok(())
}
