//! Expand a model and train its new blocks from Rust, with the library's trainer.
//!
//!     cargo run --release --example expand_and_train [MODEL_DIR] [DATA.txt] [OUTPUT_DIR]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use llama_pro::core::burn::backend::{Autodiff, Flex};
use llama_pro::core::expand::{ExpansionPlan, expand_checkpoint};
use llama_pro::core::save::SaveOptions;
use llama_pro::train::config::{DataSource, TrainConfig};
use llama_pro::train::trainer::{Event, forgetting_table, train};

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let arg = |i: usize, default: PathBuf| {
        std::env::args()
            .nth(i)
            .map(PathBuf::from)
            .unwrap_or(default)
    };
    let base = arg(1, root.join("tests/fixtures/models/llama-mha-f32"));
    let data = arg(2, root.join("examples/data/code.txt"));
    let out = arg(3, std::env::temp_dir().join("llama-pro-expand-and-train"));

    // Grow 4 -> 6 blocks (one zero-initialised copy per group of 2), then train only the copies.
    let expanded = out.join("expanded");
    let opts = SaveOptions {
        overwrite: true,
        ..Default::default()
    };
    expand_checkpoint(
        &base,
        &expanded,
        &ExpansionPlan::Interleaved {
            groups: 2,
            copies: 1,
        },
        &opts,
    )?;
    let cfg = TrainConfig {
        model: expanded,
        data: vec![DataSource::new(data)],
        output: out.join("run"),
        max_steps: Some(40),
        seq_len: 64,
        lr: 3e-3,
        overwrite: true,      // replace the previous run of this example
        ..Default::default() // the paper's recipe: AdamW 0.9/0.95, cosine, 6% warmup, wd 0.1, clip 1.0
    };
    // What the run reports: set-up lines and every tenth step.
    let mut observer = |e: &Event<'_>| match e {
        Event::Info(s) => println!("{s}"),
        Event::Step(m) if m.step % 10 == 0 => println!("step {} loss {:.4}", m.step, m.loss),
        _ => {}
    };
    let stop = AtomicBool::new(false);
    let report = train::<Autodiff<Flex>>(cfg, &Default::default(), &mut observer, &stop)?;
    println!("\n{}", forgetting_table(&report));
    println!(
        "trained model: {}",
        report
            .model_dir
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}
