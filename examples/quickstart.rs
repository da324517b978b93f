//! The demo from Rust: LLaMA Pro against full fine-tuning, LoRA, prefix and suffix stacking on
//! the small model and corpora shipped in `data/` (the same as `llama-pro demo`).
//!
//!     cargo run --release --example quickstart            # about 2 minutes on 2 CPU cores
//!     cargo run --release --example quickstart -- --quick # about 25 seconds
//!
//! Writes `demo-output/` (runs, `forgetting.png`, `demo.json`) and prints the table.

use anyhow::{Result, ensure};
use llama_pro::train::demo::{DemoConfig, demo_table, run_demo};
use llama_pro::train::trainer::Event;

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        DemoConfig::quick()
    } else {
        DemoConfig::default()
    };
    // Print the demo's own lines (expansions, identity checks, each method's result).
    let mut observer = |e: &Event<'_>| {
        if let Event::Info(s) = e {
            println!("{s}");
        }
    };
    let report = run_demo(&cfg, &mut observer)?;
    println!("\n{}", demo_table(&report));
    for line in &report.verdict {
        println!("{line}");
    }
    ensure!(report.passed, "the LLaMA Pro checks failed");
    Ok(())
}
