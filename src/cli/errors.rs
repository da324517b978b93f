//! Library errors as the command line shows them: a setting is named by its flag.

use llama_pro::core::CoreError;
use llama_pro::core::error::setting_text;
use llama_pro::train::TrainError;

/// The flag that sets a library key (`warmup_ratio` → `--warmup-ratio`).
fn flag(key: &str) -> String {
    match key {
        "stage" => "stage".into(),
        "token_cache" => "--no-token-cache".into(),
        k => format!("--{}", k.replace('_', "-")),
    }
}

/// The error text for the terminal: settings by flag, files with their paths, the whole cause
/// chain on one line.
pub fn describe(e: &anyhow::Error) -> String {
    let setting = |key: &str, message: &str| setting_text(&flag(key), message);
    if let Some(t) = e.downcast_ref::<TrainError>() {
        match t {
            TrainError::Setting { key, message } => return setting(key, message),
            TrainError::Core(CoreError::Setting { key, message }) => {
                return setting(key, message);
            }
            TrainError::Core(CoreError::OutputExists { path }) => return exists(path),
            _ => {}
        }
    }
    if let Some(c) = e.downcast_ref::<CoreError>() {
        match c {
            CoreError::Setting { key, message } => return setting(key, message),
            CoreError::OutputExists { path } => return exists(path),
            _ => {}
        }
    }
    format!("{e:#}")
}

fn exists(path: &std::path::Path) -> String {
    format!(
        "output directory {} exists and is not empty (pass --overwrite to replace it)",
        path.display()
    )
}
