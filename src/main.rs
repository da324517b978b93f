//! The `llama-pro` command-line tool.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    llama_pro::core::device::tune_allocator();
    let cli = llama_pro::train::cli::Cli::parse();
    match llama_pro::train::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line; no backtrace for user errors.
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
