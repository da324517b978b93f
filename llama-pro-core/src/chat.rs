//! Chat templates: the model's own Jinja `chat_template`, rendered as transformers'
//! `apply_chat_template` renders it.
//!
//! The template comes from the model directory (`chat_template.jinja`, which transformers 5
//! writes, else `chat_template` in `tokenizer_config.json`: a string, or a list of named
//! templates of which `default` is used) or is a built-in one ([`ChatTemplate::BUILTIN`]) for a
//! model without one.
//!
//! Rendering uses `minijinja` (the engine text-generation-inference and mistral.rs use) set up
//! like transformers' sandboxed Jinja environment: `trim_blocks`, `lstrip_blocks`, loop
//! controls, Python's string methods (`minijinja-contrib`'s `pycompat`), and the globals
//! transformers adds: `raise_exception`, `strftime_now` and a `tojson` that prints what
//! Python's `json.dumps` prints. The template sees `messages`, `add_generation_prompt`, `tools`
//! and `documents` (none) and the tokenizer's special tokens (`bos_token`, `eos_token`, …) from
//! `tokenizer_config.json`. transformers' `{% generation %}` tag (assistant masks) is removed
//! before parsing: masks are derived from message prefixes instead (see `llama-pro-train`'s
//! `sft` module).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (a template may accept others).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with this role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    special: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

/// The name the template is registered under in its environment.
const NAME: &str = "chat";

/// A built-in template: name, source, the model family's special tokens.
type Builtin = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Built-in templates.
const BUILTINS: &[Builtin] = &[
    (
        "chatml",
        include_str!("chat_templates/chatml.jinja"),
        &[("eos_token", "<|im_end|>")],
    ),
    (
        "llama3",
        include_str!("chat_templates/llama3.jinja"),
        &[
            ("bos_token", "<|begin_of_text|>"),
            ("eos_token", "<|eot_id|>"),
        ],
    ),
    (
        "mistral",
        include_str!("chat_templates/mistral.jinja"),
        &[("bos_token", "<s>"), ("eos_token", "</s>")],
    ),
];

/// The special-token keys of `tokenizer_config.json` that transformers passes to templates.
const SPECIAL_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

impl ChatTemplate {
    /// Names of the built-in templates (`--template`).
    pub const BUILTIN: &'static [&'static str] = &["chatml", "llama3", "mistral"];

    /// Compile `source`. `origin` names where it came from in errors; `special` are the special
    /// tokens the template sees (`bos_token`, `eos_token`, …).
    pub fn new(
        source: impl Into<String>,
        origin: impl Into<String>,
        special: BTreeMap<String, String>,
    ) -> Result<Self> {
        let source: String = source.into();
        let origin: String = origin.into();
        let cleaned = strip_generation_tags(&source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, cleaned)
            .map_err(|e| template_error(&origin, &e))?;
        Ok(Self {
            env,
            source,
            origin,
            special,
        })
    }

    /// The template of the model in `dir`, if it has one: `chat_template.jinja`, else
    /// `chat_template.json`'s or `tokenizer_config.json`'s `chat_template` (a string, or a list
    /// of `{name, template}` of which `default` is taken). Special tokens come from
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let special = config.as_ref().map(special_tokens).unwrap_or_default();
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| CoreError::io(&jinja, e))?;
            return Self::new(source, jinja.display().to_string(), special).map(Some);
        }
        for (path, value) in [
            (
                dir.join("chat_template.json"),
                read_json(&dir.join("chat_template.json"))?,
            ),
            (config_path, config),
        ] {
            let Some(t) = value.as_ref().and_then(|v| v.get("chat_template")) else {
                continue;
            };
            let source = template_source(t, &path)?;
            return Self::new(source, path.display().to_string(), special).map(Some);
        }
        Ok(None)
    }

    /// A built-in template by name ([`Self::BUILTIN`]); the special tokens are the model
    /// family's usual ones, replaced by those of `dir`'s `tokenizer_config.json` when given.
    pub fn builtin(name: &str, dir: Option<&Path>) -> Result<Self> {
        let Some((_, source, tokens)) = BUILTINS.iter().find(|(n, _, _)| *n == name) else {
            return Err(CoreError::setting(
                "template",
                format!(
                    "{name:?} is not a built-in chat template; built-in: {}",
                    Self::BUILTIN.join(", ")
                ),
            ));
        };
        let mut special: BTreeMap<String, String> = tokens
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(dir) = dir
            && let Some(config) = read_json(&dir.join("tokenizer_config.json"))?
        {
            special.extend(special_tokens(&config));
        }
        Self::new(*source, format!("built-in {name}"), special)
    }

    /// The template for the model in `dir`: `choice` (a built-in name or a path to a `.jinja`
    /// file) if given, else the model's own. An error says what to do when there is none.
    pub fn load(dir: &Path, choice: Option<&str>) -> Result<Self> {
        if let Some(c) = choice {
            let path = Path::new(c);
            if Self::BUILTIN.contains(&c) {
                return Self::builtin(c, Some(dir));
            }
            if path.is_file() {
                let source = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
                let special = read_json(&dir.join("tokenizer_config.json"))?
                    .as_ref()
                    .map(special_tokens)
                    .unwrap_or_default();
                return Self::new(source, path.display().to_string(), special);
            }
            return Err(CoreError::setting(
                "template",
                format!(
                    "{c:?} is neither a built-in chat template ({}) nor a template file",
                    Self::BUILTIN.join(", ")
                ),
            ));
        }
        Self::from_dir(dir)?.ok_or_else(|| {
            CoreError::setting(
                "template",
                format!(
                    "the model in {} has no chat template (no chat_template.jinja, no chat_template in \
                     tokenizer_config.json); pick a built-in one with --template ({}) or give a .jinja file",
                    dir.display(),
                    Self::BUILTIN.join(", ")
                ),
            )
        })
    }

    /// Render `messages` as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.origin, &e))?;
        tmpl.render(Value::from(ctx))
            .map_err(|e| template_error(&self.origin, &e))
    }

    /// The template's source, as found.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file, or `built-in NAME`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The special tokens the template sees.
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special
    }

    /// The strings that end an assistant turn: the `eos_token` the template sees and what the
    /// template writes right after an answer (`<|im_end|>`, `<|eot_id|>`, `</s>`…, found by
    /// rendering a probe conversation), which may differ from the model's `eos_token` (a
    /// built-in template on another model). Generation stops at them.
    pub fn turn_ends(&self) -> Vec<String> {
        let mut out: Vec<String> = self.special.get("eos_token").cloned().into_iter().collect();
        const MARK: &str = "\u{E000}answer\u{E000}";
        let probe = [
            Message::new("user", "question"),
            Message::new("assistant", MARK),
        ];
        if let Ok(text) = self.render(&probe, false)
            && let Some(i) = text.rfind(MARK)
        {
            let after = text[i + MARK.len()..].trim();
            if !after.is_empty() && !out.iter().any(|e| e == after) {
                out.push(after.to_string());
            }
        }
        out
    }
}

/// A JSON file, `None` when it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| CoreError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CoreError::io(path, e)),
    }
}

/// The special tokens of a `tokenizer_config.json` (strings or `{"content": ...}` objects).
fn special_tokens(config: &serde_json::Value) -> BTreeMap<String, String> {
    SPECIAL_KEYS
        .iter()
        .filter_map(|k| {
            let v = config.get(*k)?;
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            Some((k.to_string(), s))
        })
        .collect()
}

fn template_source(t: &serde_json::Value, path: &Path) -> Result<String> {
    match t {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(list) => {
            let named: Vec<(&str, &str)> = list
                .iter()
                .filter_map(|e| Some((e.get("name")?.as_str()?, e.get("template")?.as_str()?)))
                .collect();
            named
                .iter()
                .find(|(n, _)| *n == "default")
                .map(|(_, t)| t.to_string())
                .ok_or_else(|| {
                    CoreError::config(
                        path,
                        format!(
                            "chat_template is a list of named templates without \"default\" (found: {:?})",
                            named.iter().map(|(n, _)| *n).collect::<Vec<_>>()
                        ),
                    )
                })
        }
        _ => Err(CoreError::config(
            path,
            "chat_template must be a string or a list of {name, template}",
        )),
    }
}

/// Remove transformers' `{% generation %}` / `{% endgeneration %}` tags (minijinja does not
/// know them; they only mark assistant text for `return_assistant_tokens_mask`).
fn strip_generation_tags(source: &str) -> String {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}").expect("valid regex"))
        .replace_all(source, "")
        .into_owned()
}

fn template_error(origin: &str, e: &JinjaError) -> CoreError {
    let message = match (e.kind(), e.detail()) {
        // The template's own message, as transformers shows it.
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with("raise_exception: ") => {
            d["raise_exception: ".len()..].to_string()
        }
        _ => {
            let mut m = e.to_string();
            if let Some(line) = e.line() {
                let _ = write!(m, " (template line {line})");
            }
            m
        }
    };
    CoreError::Template {
        origin: origin.to_string(),
        message,
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// `datetime.now().strftime(format)` (local time), through the C library's `strftime`.
fn strftime_now(format: String) -> std::result::Result<Value, JinjaError> {
    let c_format = std::ffi::CString::new(format)
        .map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, "NUL in strftime format"))?;
    let mut buf = vec![0u8; 256];
    // SAFETY: `time` and `localtime_r` fill `tm`; `strftime` writes at most `buf.len()` bytes
    // (including the NUL) and returns how many it wrote before the NUL.
    let n = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm)
    };
    buf.truncate(n);
    Ok(Value::from(String::from_utf8_lossy(&buf).into_owned()))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` (Python's separators, not compact JSON).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let (item, key) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let mut out = String::new();
    py_dumps(
        &json,
        indent,
        sort_keys.unwrap_or(false),
        &item,
        &key,
        0,
        &mut out,
    );
    Ok(Value::from_safe_string(out))
}

fn py_dumps(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    item: &str,
    key: &str,
    level: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        J::Array(a) if a.is_empty() => out.push_str("[]"),
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                py_dumps(x, indent, sort, item, key, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(o) if o.is_empty() => out.push_str("{}"),
        J::Object(o) => {
            let mut entries: Vec<(&String, &J)> = o.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(key);
                py_dumps(x, indent, sort, item, key, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}
