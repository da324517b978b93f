//! Instruction data for supervised fine-tuning (the paper's LLaMA Pro - Instruct stage):
//! conversations in four formats, rendered with the model's chat template, tokenized, and
//! labelled so that the loss covers the assistant's tokens only.
//!
//! # Formats (one JSON object per line, detected from the file's first line or set with `format`)
//! - `messages` (OpenAI): `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`
//! - `sharegpt`: `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}], "system"?: "..."}`
//! - `alpaca`: `{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}`;
//!   the user turn is `instruction + "\n" + input` (just `instruction` when `input` is empty)
//! - `prompt-completion`: `{"prompt": "...", "completion": "..."}`
//! - `tokens`: `{"input_ids": [...], "labels"?: [...]}` already tokenized (−100 = not trained)
//!
//! # Labels (LLaMA-Factory's semantics)
//! The conversation is cut into segments by rendering message prefixes: for the assistant
//! message `i`, the text of `render(messages[..i], add_generation_prompt)` past what came before
//! is a prompt segment, and what `render(messages[..=i])` adds to it is the answer (with the
//! end-of-turn token the template emits). Each segment is tokenized on its own (no special
//! tokens added: the template writes them), the ids concatenated. Answers are trained, prompts
//! are not ([`LabelMode::Assistant`]); [`LabelMode::All`] trains every token
//! (`train_on_prompt`), [`LabelMode::Last`] only the last answer (`mask_history`).
//!
//! # Length
//! A conversation longer than `seq_len` tokens is cut at `seq_len` (its end is lost); one left
//! without a trained token is dropped. Both are counted ([`EncodeStats`]).

use std::path::Path;
use std::str::FromStr;

use llama_pro_core::{ChatTemplate, Message, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};

/// How lines of an instruction file are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChatFormat {
    /// From the keys of the file's first line.
    #[default]
    Auto,
    /// OpenAI `messages`.
    Messages,
    /// ShareGPT `conversations`.
    Sharegpt,
    /// Alpaca `instruction` / `input` / `output`.
    Alpaca,
    /// `prompt` / `completion`.
    PromptCompletion,
    /// Pre-tokenized `input_ids` (+ `labels`).
    Tokens,
}

impl ChatFormat {
    /// Every format, in the order help lists them.
    pub const ALL: [ChatFormat; 6] = [
        Self::Auto,
        Self::Messages,
        Self::Sharegpt,
        Self::Alpaca,
        Self::PromptCompletion,
        Self::Tokens,
    ];

    /// The name in settings and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Messages => "messages",
            Self::Sharegpt => "sharegpt",
            Self::Alpaca => "alpaca",
            Self::PromptCompletion => "prompt-completion",
            Self::Tokens => "tokens",
        }
    }

    /// The format a line's keys announce.
    pub fn detect(line: &Value) -> Option<Self> {
        let has = |k: &str| line.get(k).is_some();
        if has("messages") {
            Some(Self::Messages)
        } else if has("conversations") {
            Some(Self::Sharegpt)
        } else if has("instruction") {
            Some(Self::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(Self::PromptCompletion)
        } else if has("input_ids") {
            Some(Self::Tokens)
        } else {
            None
        }
    }
}

impl std::fmt::Display for ChatFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ChatFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        let alias = match s.as_str() {
            "openai" => "messages",
            "share-gpt" => "sharegpt",
            other => other,
        };
        Self::ALL
            .into_iter()
            .find(|f| f.name() == alias)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a data format; expected one of: {}",
                    Self::ALL.map(|f| f.name()).join(", ")
                )
            })
    }
}

/// Which tokens the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelMode {
    /// Every assistant answer (with the end-of-turn token its template emits).
    #[default]
    Assistant,
    /// Every token, prompts included (`train_on_prompt`).
    All,
    /// The last assistant answer only (`mask_history`).
    Last,
}

impl LabelMode {
    /// The mode of the `train_on_prompt` and `mask_history` settings.
    pub fn from_flags(train_on_prompt: bool, mask_history: bool) -> Result<Self> {
        match (train_on_prompt, mask_history) {
            (true, true) => Err(TrainError::setting(
                "mask_history",
                "cannot be combined with train_on_prompt (one trains every token, the other only the last answer)",
            )),
            (true, false) => Ok(Self::All),
            (false, true) => Ok(Self::Last),
            (false, false) => Ok(Self::Assistant),
        }
    }
}

/// One line of an instruction file.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A conversation.
    Chat(Vec<Message>),
    /// Pre-tokenized ids and labels (−100 = not trained).
    Tokens {
        /// Token ids.
        input_ids: Vec<u32>,
        /// Labels aligned with the ids.
        labels: Vec<i64>,
    },
}

/// Read every line of an instruction file (`.jsonl`; blank lines skipped) as `(line number,
/// record)`. The format is `format`, or detected from the first line; a line that does not fit
/// it is an error naming the file, the line and the missing key or unknown role.
pub fn read_records(path: &Path, format: ChatFormat) -> Result<Vec<(usize, Record)>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut format = format;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| data_error(path, n, message);
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(err("expected a JSON object".into()));
        }
        if format == ChatFormat::Auto {
            format = ChatFormat::detect(&v).ok_or_else(|| {
                err(format!(
                    "not an instruction record: expected the key \"messages\", \"conversations\", \"instruction\", \
                     \"prompt\" + \"completion\" or \"input_ids\"; found {}",
                    keys(&v)
                ))
            })?;
        }
        out.push((n, parse_record(&v, format).map_err(err)?));
    }
    if out.is_empty() {
        return Err(data_error(path, 0, "no conversation in the file".into()));
    }
    Ok(out)
}

fn data_error(path: &Path, line: usize, message: String) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        line,
        message,
    }
}

fn keys(v: &Value) -> String {
    match v.as_object() {
        Some(o) if !o.is_empty() => format!(
            "keys {}",
            o.keys()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => "no key".into(),
    }
}

/// One line in a known format (`format` is not `Auto`).
pub fn parse_record(v: &Value, format: ChatFormat) -> std::result::Result<Record, String> {
    let fmt = format.name();
    let field = |key: &str| -> std::result::Result<&Value, String> {
        v.get(key)
            .ok_or_else(|| format!("missing key {key:?} ({fmt} format; found {})", keys(v)))
    };
    let string = |x: &Value, what: &str| -> std::result::Result<String, String> {
        match x {
            Value::String(s) => Ok(s.clone()),
            // OpenAI content parts: the text parts, joined.
            Value::Array(parts) if parts.iter().all(|p| p.get("text").is_some()) => Ok(parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("")),
            other => Err(format!("{what} must be a string, found {other}")),
        }
    };
    let list = |key: &str| -> std::result::Result<&Vec<Value>, String> {
        field(key)?
            .as_array()
            .ok_or_else(|| format!("{key:?} must be a list ({fmt} format)"))
    };
    let chat = |messages: Vec<Message>| -> std::result::Result<Record, String> {
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(format!(
                "the conversation has no assistant message: nothing to train on ({fmt} format)"
            ));
        }
        Ok(Record::Chat(messages))
    };
    match format {
        ChatFormat::Auto => Err("the format must be known here".into()),
        ChatFormat::Messages => {
            let mut out = Vec::new();
            for (i, m) in list("messages")?.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                    format!("message {i}: missing key \"role\" (messages format)")
                })?;
                if !matches!(role, "system" | "user" | "assistant") {
                    return Err(format!(
                        "message {i}: unknown role {role:?}; expected system, user or assistant"
                    ));
                }
                let content = m.get("content").ok_or_else(|| {
                    format!("message {i}: missing key \"content\" (messages format)")
                })?;
                out.push(Message::new(
                    role,
                    string(content, &format!("message {i}: content"))?,
                ));
            }
            chat(out)
        }
        ChatFormat::Sharegpt => {
            let mut out = Vec::new();
            if let Some(s) = v.get("system") {
                let s = string(s, "\"system\"")?;
                if !s.is_empty() {
                    out.push(Message::new("system", s));
                }
            }
            for (i, m) in list("conversations")?.iter().enumerate() {
                let from = m
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("turn {i}: missing key \"from\" (sharegpt format)"))?;
                let role = match from {
                    "human" | "user" => "user",
                    "gpt" | "assistant" => "assistant",
                    "system" => "system",
                    other => {
                        return Err(format!(
                            "turn {i}: unknown role {other:?}; expected human, gpt or system"
                        ));
                    }
                };
                let value = m
                    .get("value")
                    .ok_or_else(|| format!("turn {i}: missing key \"value\" (sharegpt format)"))?;
                out.push(Message::new(
                    role,
                    string(value, &format!("turn {i}: value"))?,
                ));
            }
            chat(out)
        }
        ChatFormat::Alpaca => {
            let mut out = Vec::new();
            if let Some(s) = v.get("system") {
                let s = string(s, "\"system\"")?;
                if !s.is_empty() {
                    out.push(Message::new("system", s));
                }
            }
            if let Some(h) = v.get("history").filter(|h| !h.is_null()) {
                let pairs = h
                    .as_array()
                    .ok_or("\"history\" must be a list of [user, assistant] pairs")?;
                for (i, p) in pairs.iter().enumerate() {
                    match p.as_array().map(Vec::as_slice) {
                        Some([u, a]) => {
                            out.push(Message::new("user", string(u, "history")?));
                            out.push(Message::new("assistant", string(a, "history")?));
                        }
                        _ => {
                            return Err(format!(
                                "history entry {i} must be a [user, assistant] pair"
                            ));
                        }
                    }
                }
            }
            let instruction = string(field("instruction")?, "\"instruction\"")?;
            let input = match v.get("input") {
                Some(Value::Null) | None => String::new(),
                Some(x) => string(x, "\"input\"")?,
            };
            let output = string(field("output")?, "\"output\"")?;
            let user = if input.is_empty() {
                instruction
            } else {
                format!("{instruction}\n{input}")
            };
            out.push(Message::new("user", user));
            out.push(Message::new("assistant", output));
            chat(out)
        }
        ChatFormat::PromptCompletion => {
            let prompt = string(field("prompt")?, "\"prompt\"")?;
            let completion = string(field("completion")?, "\"completion\"")?;
            chat(vec![
                Message::new("user", prompt),
                Message::new("assistant", completion),
            ])
        }
        ChatFormat::Tokens => {
            let ids: Vec<u32> = serde_json::from_value(field("input_ids")?.clone())
                .map_err(|e| format!("\"input_ids\" must be a list of token ids: {e}"))?;
            let labels: Vec<i64> = match v.get("labels") {
                None | Some(Value::Null) => ids.iter().map(|&t| t as i64).collect(),
                Some(l) => serde_json::from_value(l.clone())
                    .map_err(|e| format!("\"labels\" must be a list of integers: {e}"))?,
            };
            if labels.len() != ids.len() {
                return Err(format!(
                    "\"labels\" has {} entries, \"input_ids\" {}",
                    labels.len(),
                    ids.len()
                ));
            }
            if let Some((i, l)) = labels
                .iter()
                .zip(&ids)
                .enumerate()
                .find(|(_, (l, t))| **l != -100 && **l != **t as i64)
                .map(|(i, (l, _))| (i, l))
            {
                return Err(format!(
                    "labels[{i}] = {l}: a label is either -100 or the token id at its position"
                ));
            }
            Ok(Record::Tokens {
                input_ids: ids,
                labels,
            })
        }
    }
}

/// A tokenized, labelled example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoded {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// transformers' labels: the id where trained, −100 elsewhere.
    pub labels: Vec<i64>,
}

impl Encoded {
    /// Per token: is it trained.
    pub fn targets(&self) -> Vec<bool> {
        self.labels.iter().map(|&l| l != -100).collect()
    }

    /// Number of trained tokens (the first token is never predicted).
    pub fn trained(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != -100).count()
    }
}

/// One piece of a rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// Whether its tokens are trained.
    pub trained: bool,
}

/// Renders and tokenizes conversations for one model.
#[derive(Debug)]
pub struct Encoder<'a> {
    /// The chat template.
    pub template: &'a ChatTemplate,
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Which tokens are trained.
    pub mode: LabelMode,
}

impl Encoder<'_> {
    /// The conversation cut into prompt and answer segments (see the module docs), trained
    /// according to the mode. Their texts concatenated are the whole rendering.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<Segment>> {
        let t = self.template;
        let answers: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
            .map(|(i, _)| i)
            .collect();
        let last = answers.last().copied();
        let mut out = Vec::new();
        let mut done = String::new();
        let unstable = |i: usize| {
            TrainError::Core(llama_pro_core::CoreError::Template {
                origin: t.origin().to_string(),
                message: format!(
                    "the template is not prefix-stable at message {i}: rendering the first messages does not \
                     start the rendering of more (it rewrites earlier turns), so answer tokens cannot be \
                     located; use another template (--template)"
                ),
            })
        };
        for &i in &answers {
            let prompt = t.render(&messages[..i], true)?;
            let full = t.render(&messages[..=i], false)?;
            if !prompt.starts_with(&done) || !full.starts_with(&prompt) {
                return Err(unstable(i));
            }
            out.push(Segment {
                text: prompt[done.len()..].to_string(),
                trained: self.mode == LabelMode::All,
            });
            out.push(Segment {
                text: full[prompt.len()..].to_string(),
                trained: match self.mode {
                    LabelMode::Assistant | LabelMode::All => true,
                    LabelMode::Last => Some(i) == last,
                },
            });
            done = full;
        }
        let all = t.render(messages, false)?;
        if !all.starts_with(&done) {
            return Err(unstable(messages.len()));
        }
        out.push(Segment {
            text: all[done.len()..].to_string(),
            trained: self.mode == LabelMode::All,
        });
        out.retain(|s| !s.text.is_empty());
        Ok(out)
    }

    /// Token ids and labels of a conversation (untruncated).
    pub fn encode(&self, messages: &[Message]) -> Result<Encoded> {
        let mut input_ids = Vec::new();
        let mut labels = Vec::new();
        for s in self.segments(messages)? {
            let ids = self.tokenizer.encode(&s.text, false)?;
            labels.extend(ids.iter().map(|&t| if s.trained { t as i64 } else { -100 }));
            input_ids.extend(ids);
        }
        Ok(Encoded { input_ids, labels })
    }

    /// A record (conversation or pre-tokenized) as ids and labels.
    pub fn encode_record(&self, record: &Record) -> Result<Encoded> {
        match record {
            Record::Chat(m) => self.encode(m),
            Record::Tokens { input_ids, labels } => Ok(Encoded {
                input_ids: input_ids.clone(),
                labels: labels.clone(),
            }),
        }
    }
}

/// What happened to the examples of a file on the way to training.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodeStats {
    /// Examples kept.
    pub kept: usize,
    /// Examples cut at `seq_len`.
    pub truncated: usize,
    /// Examples dropped: no trained token left after the cut (or none to begin with).
    pub dropped: usize,
    /// Trained tokens over the kept examples.
    pub trained_tokens: usize,
    /// All tokens over the kept examples.
    pub tokens: usize,
}

/// Read and encode an instruction file for training: every record tokenized and labelled, cut
/// at `seq_len`, dropped when no trained token is left. Token ids must be below `vocab_size`.
/// Without an encoder only pre-tokenized lines can be read; `missing` says why there is none.
pub fn load_examples(
    path: &Path,
    format: ChatFormat,
    encoder: Option<&Encoder<'_>>,
    missing: &str,
    vocab_size: usize,
    seq_len: usize,
) -> Result<(Vec<Encoded>, EncodeStats)> {
    let records = read_records(path, format)?;
    let mut stats = EncodeStats::default();
    let mut out = Vec::with_capacity(records.len());
    for (line, r) in records {
        let mut e = match (r, encoder) {
            (Record::Tokens { input_ids, labels }, _) => Encoded { input_ids, labels },
            (r @ Record::Chat(_), Some(enc)) => enc.encode_record(&r).map_err(|e| match e {
                TrainError::Core(c) => data_error(path, line, c.to_string()),
                other => other,
            })?,
            (Record::Chat(_), None) => {
                return Err(data_error(
                    path,
                    line,
                    format!(
                        "a conversation needs a chat template and the model's tokenizer: {missing}"
                    ),
                ));
            }
        };
        if let Some(bad) = e.input_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(data_error(
                path,
                line,
                format!("token id {bad} is out of range: the model's vocab_size is {vocab_size}"),
            ));
        }
        if e.input_ids.len() > seq_len {
            e.input_ids.truncate(seq_len);
            e.labels.truncate(seq_len);
            stats.truncated += 1;
        }
        if e.trained() == 0 {
            stats.dropped += 1;
            continue;
        }
        stats.kept += 1;
        stats.trained_tokens += e.trained();
        stats.tokens += e.input_ids.len();
        out.push(e);
    }
    if out.is_empty() {
        return Err(data_error(
            path,
            0,
            format!(
                "no example left to train on: {} dropped (no trained token within seq_len {seq_len})",
                stats.dropped
            ),
        ));
    }
    Ok((out, stats))
}
