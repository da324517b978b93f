//! The `llama-pro` command-line tool.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    llama_pro::core::device::tune_allocator();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // The whole cause chain on one line; settings named by their flag; no backtrace for
            // user errors.
            eprintln!("error: {}", cli::errors::describe(&e));
            ExitCode::FAILURE
        }
    }
}
