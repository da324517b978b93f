//! `llama-pro demo`: the paper's claim at toy scale on the shipped data.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use llama_pro::core::DType;
use llama_pro::core::device::DeviceSpec;
use llama_pro::train::config::EvalSet;
use llama_pro::train::demo::{DemoConfig, DemoMethod, demo_table, run_demo};

use super::progress::DemoProgress;
use super::{choice, dtype_parser};

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
    /// Run the comparison on this HuggingFace model directory (config.json, *.safetensors,
    /// tokenizer.json; its chat template for the SFT stage) instead of the shipped toy base;
    /// the data stays the shipped corpora unless --data-dir is given.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Interleaved expansion: N groups, each followed by --copies identity blocks (prefix and
    /// suffix stacking add as many). Default: 2 for the shipped toy (4 -> 6 blocks); with --model
    /// the paper's ratio, one new block per four (the divisor of the layer count nearest to a
    /// quarter of it: 32 -> 40, 30 -> 36).
    #[arg(long, value_name = "N")]
    pub groups: Option<usize>,
    /// Identity blocks added after each group (default 1, the paper's).
    #[arg(long, value_name = "P")]
    pub copies: Option<usize>,
    /// Tokens per training sequence (default 128).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per optimizer step (default 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Held-out windows (of --seq-len tokens) evaluated per set (default 48; --quick 16).
    #[arg(long, value_name = "N", conflicts_with = "eval_tokens")]
    pub eval_sequences: Option<usize>,
    /// Held-out tokens evaluated per set: --eval-sequences as a token budget (rounded up to
    /// whole windows).
    #[arg(long, value_name = "N")]
    pub eval_tokens: Option<usize>,
    /// Evaluations during each run, besides before and after (default 5; --quick 2).
    #[arg(long, value_name = "N")]
    pub evals_during: Option<usize>,
    /// An extra held-out general set, reported beside `general` (table columns, plot panel,
    /// demo.json, and LLaMA Pro's general-loss bound). Repeatable.
    #[arg(long, value_name = "NAME=FILE")]
    pub general_eval: Vec<EvalSet>,
    /// Compute dtype of every run: f32, or bf16/f16 mixed precision (f32 master weights).
    #[arg(long, value_parser = dtype_parser())]
    pub dtype: Option<DType>,
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
    /// SFT peak learning rate (default 1e-3 for the toy: the paper's 2e-5 is for an 8 B model;
    /// with --model, the paper's 2e-5).
    #[arg(long)]
    pub sft_lr: Option<f64>,
    /// SFT chat template: chatml, llama3, mistral or a .jinja file (default: the model's own;
    /// chatml for a model without one, as the toy).
    #[arg(long)]
    pub template: Option<String>,
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
    if let Some(m) = &a.model {
        c.model = Some(m.clone());
        // The paper's ratio and SFT learning rate, not the toy's.
        c.groups = 0;
        c.sft_lr = 2e-5;
    }
    if let Some(g) = a.groups {
        if g == 0 {
            bail!("--groups must be at least 1");
        }
        c.groups = g;
    }
    if let Some(p) = a.copies {
        c.copies = p;
    }
    if let Some(n) = a.seq_len {
        c.seq_len = n;
    }
    if let Some(n) = a.batch_size {
        c.batch_size = n;
    }
    if let Some(n) = a.eval_sequences {
        c.eval_sequences = n;
    }
    if let Some(t) = a.eval_tokens {
        c.eval_sequences = t.div_ceil(c.seq_len.max(1)).max(1);
    }
    if let Some(n) = a.evals_during {
        c.evals_during = n;
    }
    c.general_eval = a.general_eval.clone();
    if let Some(d) = a.dtype {
        c.dtype = d;
    }
    if a.template.is_some() {
        c.template = a.template.clone();
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
