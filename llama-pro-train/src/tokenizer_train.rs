//! Training a byte-level BPE tokenizer (GPT-2/LLaMA-3 style) with the `tokenizers` crate, written
//! as a HuggingFace `tokenizer.json` plus `tokenizer_config.json` that transformers loads with
//! `AutoTokenizer`.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::error::{Result, TrainError};

/// Beginning-of-sequence token (id 0) added by the post-processor, as LLaMA's tokenizer does.
pub const BOS: &str = "<s>";
/// End-of-sequence token (id 1): the document separator when packing.
pub const EOS: &str = "</s>";

/// Settings of [`train_tokenizer`].
#[derive(Debug, Clone)]
pub struct TokenizerTrainConfig {
    /// Vocabulary size, special tokens included.
    pub vocab_size: usize,
    /// Merges need a pair seen at least this often.
    pub min_frequency: u64,
}

impl Default for TokenizerTrainConfig {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            min_frequency: 2,
        }
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

/// Train on the documents of `files` (`.txt`: one per line; `.jsonl`: `{"text": ...}` per line)
/// and write `tokenizer.json` and `tokenizer_config.json` into `out_dir`. Returns the file.
pub fn train_tokenizer(
    files: &[PathBuf],
    cfg: &TokenizerTrainConfig,
    out_dir: &Path,
) -> Result<PathBuf> {
    if cfg.vocab_size < 256 + 2 {
        return Err(TrainError::setting(
            "vocab_size",
            format!(
                "{}: a byte-level BPE needs at least 258 (256 bytes + <s> + </s>)",
                cfg.vocab_size
            ),
        ));
    }
    let mut docs: Vec<String> = Vec::new();
    for f in files {
        docs.extend(crate::data::read_texts(&crate::data::existing(f)?)?);
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .special_tokens(vec![
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let file = out_dir.join("tokenizer.json");
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        TemplateProcessing,
        ByteLevelDecoder,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
    .with_decoder(Some(ByteLevelDecoder::default()))
    .build()
    .map_err(|e| tok_err(&file, e))?;
    tok.train(&mut trainer, docs.iter())
        .map_err(|e| tok_err(&file, e))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| tok_err(&file, e))?
        .special_tokens(vec![(BOS, 0u32)])
        .build()
        .map_err(|e| tok_err(&file, e))?;
    tok.with_post_processor(Some(post));
    std::fs::create_dir_all(out_dir).map_err(|source| TrainError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let tmp = out_dir.join(".tokenizer.json.tmp");
    tok.save(&tmp, false).map_err(|e| tok_err(&file, e))?;
    std::fs::rename(&tmp, &file).map_err(|source| TrainError::Io {
        path: file.clone(),
        source,
    })?;
    let tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": true,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000u64,
    });
    llama_pro_core::save::write_json(&out_dir.join("tokenizer_config.json"), &tc)?;
    Ok(file)
}
