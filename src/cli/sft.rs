//! `llama-pro sft-preview`: how a conversation becomes a training example — the rendered text
//! with the trained tokens marked, and the counts (or ids and labels as JSON).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;
use llama_pro::core::{ChatTemplate, Tokenizer};
use llama_pro::train::data::existing;
use llama_pro::train::sft::{Encoded, Encoder, LabelMode, Record, read_records};

use super::train::ChatDataArgs;

/// `llama-pro sft-preview`
#[derive(Args, Debug)]
pub struct PreviewArgs {
    /// Model directory (tokenizer.json; its chat template unless --template).
    #[arg(long)]
    pub model: PathBuf,
    /// Instruction data file (.jsonl).
    #[arg(long)]
    pub data: PathBuf,
    /// Which record (0 = the first).
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub chat: ChatDataArgs,
    /// Print `{"input_ids": [...], "labels": [...]}` (−100 where not trained) instead.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &PreviewArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    let data = existing(&a.data)?;
    let tok = Tokenizer::from_dir(&dir, None, &[])?;
    let records = read_records(&data, a.chat.format.unwrap_or_default())?;
    let (line, record) = records.get(a.index).ok_or_else(|| {
        anyhow!(
            "--index {}: {} has {} records (0..{})",
            a.index,
            data.display(),
            records.len(),
            records.len()
        )
    })?;
    let mode = LabelMode::from_flags(a.chat.train_on_prompt, a.chat.mask_history)?;
    let ctx = || format!("{}:{line}", data.display());
    // (text, trained) pieces and the encoding.
    let (pieces, encoded): (Vec<(String, bool)>, Encoded) = match record {
        Record::Chat(messages) => {
            let template = ChatTemplate::load(&dir, a.chat.template.as_deref())?;
            let enc = Encoder {
                template: &template,
                tokenizer: &tok,
                mode,
            };
            let segments = enc.segments(messages).with_context(ctx)?;
            let encoded = enc.encode(messages).with_context(ctx)?;
            if !a.json {
                eprintln!("template: {}", template.origin());
            }
            (
                segments.into_iter().map(|s| (s.text, s.trained)).collect(),
                encoded,
            )
        }
        Record::Tokens { input_ids, labels } => {
            // Runs of equal trainedness, decoded.
            let mut pieces: Vec<(String, bool)> = Vec::new();
            let mut start = 0;
            for i in 1..=input_ids.len() {
                if i == input_ids.len() || (labels[i] != -100) != (labels[start] != -100) {
                    let text = tok
                        .inner()
                        .decode(&input_ids[start..i], false)
                        .map_err(|e| anyhow!("{}: decoding: {e}", ctx()))?;
                    pieces.push((text, labels[start] != -100));
                    start = i;
                }
            }
            (
                pieces,
                Encoded {
                    input_ids: input_ids.clone(),
                    labels: labels.clone(),
                },
            )
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"input_ids": encoded.input_ids, "labels": encoded.labels})
        );
        return Ok(());
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = String::new();
    for (text, trained) in &pieces {
        match (trained, colour) {
            (true, true) => out.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
            (true, false) => out.push_str(&format!("[[{text}]]")),
            (false, _) => out.push_str(text),
        }
    }
    println!("{out}");
    let trained = encoded.trained();
    let total = encoded.input_ids.len();
    println!(
        "--\nrecord {} (line {line}): {total} tokens, {trained} trained, {} masked{}",
        a.index,
        total - trained,
        if colour {
            "; trained text in green"
        } else {
            "; trained text in [[ ]]"
        }
    );
    Ok(())
}
