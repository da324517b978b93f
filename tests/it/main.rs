//! Integration tests (one binary, as CI builds it once).
//!
//! Fixtures under `tests/fixtures` were made by `scripts/make_fixtures.py` with transformers
//! (versions in `tests/fixtures/VERSIONS.txt`); no Python is needed to run these tests.

mod cli;
mod common;
mod expansion;
mod generation;
mod io;
mod parity;
mod training;

/// Loss of `model` on `data` through the CLI's `eval --json`.
pub fn cli_eval_loss(model: &std::path::Path, data: &std::path::Path) -> f64 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llama-pro"))
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    v["loss"].as_f64().unwrap()
}
