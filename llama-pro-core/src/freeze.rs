//! Freeze by parameter group: one explicit selection over HuggingFace parameter names decides
//! what trains; everything else is frozen by construction (torchtune's `set_trainable_params`).
//!
//! # Selection syntax
//! Terms joined left to right by `+` (add) and `-` (remove):
//!
//! | term | selects |
//! |---|---|
//! | `expanded` | the new blocks (from the layer map in `config.json`) |
//! | `original` | the blocks that were in the base model |
//! | `layers[1,5,9]` | the named blocks |
//! | `interleaved[N]` | N blocks spread like LLaMA-Factory's `freeze_trainable_layers` with `use_llama_pro` (stride L/N, the last of each group) |
//! | `all` | every parameter |
//! | `embed_tokens`, `lm_head`, `norm` | the embeddings, the output head, the final norm |
//! | `lora` | the LoRA adapters (`*.lora_a`, `*.lora_b`), when attached |
//! | `/regex/` | parameters whose HF name matches |
//!
//! A block term can be narrowed to a sub-module: `expanded.attn`, `expanded.mlp`,
//! `layers[3].norms`. LLaMA-Factory's knobs: new blocks only = `expanded` (the default);
//! `freeze_extra_modules: embed_tokens,lm_head` = `expanded+embed_tokens+lm_head`;
//! `freeze_trainable_modules: mlp` = `expanded.mlp`; the no-expansion baseline that trains N
//! original interleaved blocks = `interleaved[N]`.
//!
//! Frozen parameters are detached from autodiff (`require_grad = false`): they get no gradient,
//! hence no optimizer state, and burn does no backward work for them nor below the lowest
//! trainable block.

use burn::module::Param;
use burn::tensor::{Tensor, backend::Backend};
use regex::Regex;

use crate::error::{CoreError, Result};
use crate::expand::{LayerMap, layer_of};
use crate::model::LlamaForCausalLM;
use crate::params::{NamedMapper, map_named};

/// Part of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `self_attn.*`
    Attn,
    /// `mlp.*`
    Mlp,
    /// `input_layernorm.*`, `post_attention_layernorm.*`
    Norms,
}

#[derive(Debug, Clone)]
enum Blocks {
    Expanded,
    Original,
    List(Vec<usize>),
    Interleaved(usize),
}

#[derive(Debug, Clone)]
enum Term {
    Blocks(Blocks, Option<Part>),
    All,
    EmbedTokens,
    LmHead,
    Norm,
    Lora,
    Regex(Regex),
}

/// A parsed selection (see the module docs for the syntax).
#[derive(Debug, Clone)]
pub struct Selection {
    terms: Vec<(bool, Term)>,
    text: String,
}

/// What a selection is evaluated against.
#[derive(Debug, Clone)]
pub struct SelectContext<'a> {
    /// Which layers are new.
    pub map: &'a LayerMap,
    /// `lm_head` is tied to `embed_tokens`.
    pub tied: bool,
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Selection {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl std::str::FromStr for Selection {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl serde::Serialize for Selection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Selection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn err(spec: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::setting("trainable", format!("{spec:?}: {msg}"))
}

impl Selection {
    /// Parse a selection such as `expanded+embed_tokens` or `all-/.*norm.*/`.
    pub fn parse(spec: &str) -> Result<Self> {
        let s = spec.trim();
        if s.is_empty() {
            return Err(err(spec, "empty selection"));
        }
        let chars: Vec<char> = s.chars().collect();
        let mut i = 0;
        let mut terms = Vec::new();
        let mut add = true;
        loop {
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            let start = i;
            if i < chars.len() && chars[i] == '/' {
                // Regex up to the next unescaped '/'.
                i += 1;
                let mut pat = String::new();
                while i < chars.len() && chars[i] != '/' {
                    if chars[i] == '\\' && i + 1 < chars.len() && chars[i + 1] == '/' {
                        i += 1;
                    }
                    pat.push(chars[i]);
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(err(spec, "unterminated /regex/"));
                }
                i += 1;
                let re = Regex::new(&pat)
                    .map_err(|e| err(spec, format!("invalid regex /{pat}/: {e}")))?;
                terms.push((add, Term::Regex(re)));
            } else {
                let mut depth = 0;
                while i < chars.len() {
                    match chars[i] {
                        '[' => depth += 1,
                        ']' => depth -= 1,
                        '+' | '-' if depth == 0 => break,
                        _ => {}
                    }
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                terms.push((add, parse_term(spec, word.trim())?));
            }
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if i >= chars.len() {
                break;
            }
            add = match chars[i] {
                '+' => true,
                '-' => false,
                c => {
                    return Err(err(
                        spec,
                        format!("expected + or - between terms, found {c:?}"),
                    ));
                }
            };
            i += 1;
        }
        Ok(Self {
            terms,
            text: s.to_string(),
        })
    }

    /// Whether parameter `name` (HF name) is selected.
    pub fn matches(&self, name: &str, ctx: &SelectContext<'_>) -> bool {
        let mut sel = false;
        for (add, term) in &self.terms {
            if term_matches(term, name, ctx) {
                sel = *add;
            }
        }
        sel
    }

    /// Check the selection against a model: indices in range, `interleaved[N]` divides the
    /// layer count, `lm_head` not asked for on a tied model.
    pub fn validate(&self, ctx: &SelectContext<'_>) -> Result<()> {
        let l = ctx.map.len();
        for (_, t) in &self.terms {
            match t {
                Term::Blocks(Blocks::List(v), _) => {
                    if let Some(i) = v.iter().find(|&&i| i >= l) {
                        return Err(err(
                            &self.text,
                            format!("layer {i} does not exist (the model has {l} layers)"),
                        ));
                    }
                }
                Term::Blocks(Blocks::Interleaved(n), _) => {
                    if *n == 0 || l % n != 0 {
                        return Err(err(
                            &self.text,
                            format!("interleaved[{n}]: N must divide the {l} layers"),
                        ));
                    }
                }
                Term::Blocks(Blocks::Expanded, _) if ctx.map.new_layers().is_empty() => {
                    return Err(err(
                        &self.text,
                        "this model has no expanded blocks (its config.json has no `llama_pro` layer map): \
                         expand it first (`llama-pro expand`, or `expand_checkpoint` from Rust), or train original blocks \
                         with interleaved[N] or layers[..]",
                    ));
                }
                Term::LmHead if ctx.tied => {
                    return Err(err(
                        &self.text,
                        "lm_head is tied to embed_tokens in this model: select embed_tokens instead",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn parse_term(spec: &str, w: &str) -> Result<Term> {
    let (head, part) = match w.rsplit_once('.') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (w, None),
    };
    let part = match part {
        None => None,
        Some("attn") | Some("self_attn") => Some(Part::Attn),
        Some("mlp") => Some(Part::Mlp),
        Some("norms") => Some(Part::Norms),
        Some(p) => {
            return Err(err(
                spec,
                format!("unknown block part {p:?}: expected attn, mlp or norms"),
            ));
        }
    };
    let list = |h: &str, name: &str| -> Result<Vec<usize>> {
        let inner = h
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| err(spec, format!("expected {name}[..] in {h:?}")))?;
        inner
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| err(spec, format!("{x:?} is not a layer index")))
            })
            .collect()
    };
    let blocks = match head {
        "expanded" | "new" => Some(Blocks::Expanded),
        "original" => Some(Blocks::Original),
        h if h.starts_with("layers[") => Some(Blocks::List(list(h, "layers")?)),
        h if h.starts_with("interleaved[") => {
            let v = list(h, "interleaved")?;
            if v.len() != 1 {
                return Err(err(spec, "interleaved[N] takes one number"));
            }
            Some(Blocks::Interleaved(v[0]))
        }
        _ => None,
    };
    if let Some(b) = blocks {
        return Ok(Term::Blocks(b, part));
    }
    if part.is_some() {
        return Err(err(
            spec,
            format!("{head:?} has no block parts (only block terms take .attn/.mlp/.norms)"),
        ));
    }
    Ok(match w {
        "all" => Term::All,
        "embed_tokens" | "embeddings" => Term::EmbedTokens,
        "lm_head" => Term::LmHead,
        "norm" => Term::Norm,
        "lora" => Term::Lora,
        other => {
            return Err(err(
                spec,
                format!(
                    "unknown term {other:?}: expected expanded, original, layers[..], interleaved[N], all, embed_tokens, lm_head, norm, lora or /regex/"
                ),
            ));
        }
    })
}

fn term_matches(term: &Term, name: &str, ctx: &SelectContext<'_>) -> bool {
    match term {
        Term::All => true,
        Term::EmbedTokens => name.starts_with("model.embed_tokens."),
        Term::LmHead => name.starts_with("lm_head."),
        Term::Norm => name.starts_with("model.norm."),
        Term::Regex(re) => re.is_match(name),
        Term::Lora => is_lora(name),
        Term::Blocks(b, part) => {
            let Some((i, rest)) = layer_of(name) else {
                return false;
            };
            let in_blocks = match b {
                Blocks::Expanded => ctx.map.layers.get(i).is_some_and(|o| o.new),
                Blocks::Original => ctx.map.layers.get(i).is_some_and(|o| !o.new),
                Blocks::List(v) => v.contains(&i),
                Blocks::Interleaved(n) => {
                    let l = ctx.map.len();
                    // LLaMA-Factory: range(stride - 1, L + stride - 1, stride), stride = L // N.
                    *n > 0 && l % n == 0 && (i + 1) % (l / n) == 0
                }
            };
            in_blocks
                && match part {
                    None => true,
                    Some(Part::Attn) => rest.starts_with("self_attn."),
                    Some(Part::Mlp) => rest.starts_with("mlp."),
                    Some(Part::Norms) => {
                        rest.starts_with("input_layernorm.")
                            || rest.starts_with("post_attention_layernorm.")
                    }
                }
        }
    }
}

/// Trainable and total parameters of one group in a [`TrainableSummary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupCount {
    /// Group name (`embed_tokens`, `original blocks`, `expanded blocks`, `norm`, `lm_head`).
    pub group: String,
    /// Parameters in the group.
    pub total: usize,
    /// Of which trainable.
    pub trainable: usize,
}

/// Count and share of trainable parameters per group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrainableSummary {
    /// Per-group counts.
    pub groups: Vec<GroupCount>,
    /// HF names of the trainable parameters.
    pub trainable_names: Vec<String>,
}

impl TrainableSummary {
    /// All parameters.
    pub fn total(&self) -> usize {
        self.groups.iter().map(|g| g.total).sum()
    }
    /// Trainable parameters.
    pub fn trainable(&self) -> usize {
        self.groups.iter().map(|g| g.trainable).sum()
    }
}

impl std::fmt::Display for TrainableSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.total().max(1);
        writeln!(
            f,
            "{:<18} {:>14} {:>14} {:>8}",
            "group", "parameters", "trainable", "share"
        )?;
        for g in &self.groups {
            writeln!(
                f,
                "{:<18} {:>14} {:>14} {:>7.2}%",
                g.group,
                g.total,
                g.trainable,
                100.0 * g.trainable as f64 / total as f64
            )?;
        }
        write!(
            f,
            "{:<18} {:>14} {:>14} {:>7.2}%",
            "total",
            self.total(),
            self.trainable(),
            100.0 * self.trainable() as f64 / total as f64
        )
    }
}

/// A LoRA adapter parameter (see [`crate::linear::Linear::with_lora`]).
pub fn is_lora(name: &str) -> bool {
    name.ends_with(".lora_a") || name.ends_with(".lora_b")
}

fn group_of(name: &str, map: &LayerMap) -> &'static str {
    if is_lora(name) {
        return "lora adapters";
    }
    match layer_of(name) {
        Some((i, _)) if map.layers.get(i).is_some_and(|o| o.new) => "expanded blocks",
        Some(_) => "original blocks",
        None if name.starts_with("model.embed_tokens.") => "embed_tokens",
        None if name.starts_with("lm_head.") => "lm_head",
        None if name.starts_with("model.norm.") => "norm",
        None => "other",
    }
}

impl TrainableSummary {
    fn add(&mut self, name: &str, n: usize, trainable: bool, map: &LayerMap) {
        let group = group_of(name, map);
        match self.groups.iter_mut().find(|g| g.group == group) {
            Some(g) => {
                g.total += n;
                g.trainable += if trainable { n } else { 0 };
            }
            None => self.groups.push(GroupCount {
                group: group.to_string(),
                total: n,
                trainable: if trainable { n } else { 0 },
            }),
        }
        if trainable {
            self.trainable_names.push(name.to_string());
        }
    }

    fn finish(mut self, selection: &Selection) -> Result<Self> {
        if self.trainable() == 0 {
            return Err(err(&selection.text, "selects no parameter of this model"));
        }
        let order = [
            "embed_tokens",
            "original blocks",
            "expanded blocks",
            "norm",
            "lm_head",
            "lora adapters",
            "other",
        ];
        self.groups
            .sort_by_key(|g| order.iter().position(|o| *o == g.group));
        Ok(self)
    }
}

/// The summary [`set_trainable`] would give, from parameter names and sizes only (no model is
/// built: cheap for any checkpoint size).
pub fn summarize<'a>(
    params: impl IntoIterator<Item = (&'a str, usize)>,
    selection: &Selection,
    ctx: &SelectContext<'_>,
) -> Result<TrainableSummary> {
    selection.validate(ctx)?;
    let mut s = TrainableSummary {
        groups: Vec::new(),
        trainable_names: Vec::new(),
    };
    for (name, n) in params {
        s.add(name, n, selection.matches(name, ctx), ctx.map);
    }
    s.finish(selection)
}

struct SetTrainable<'a> {
    selection: &'a Selection,
    ctx: &'a SelectContext<'a>,
    summary: TrainableSummary,
}

impl<B: Backend> NamedMapper<B> for SetTrainable<'_> {
    fn map<const D: usize>(
        &mut self,
        name: &str,
        param: Param<Tensor<B, D>>,
    ) -> Param<Tensor<B, D>> {
        let trainable = self.selection.matches(name, self.ctx);
        self.summary
            .add(name, param.shape().num_elements(), trainable, self.ctx.map);
        param.set_require_grad(trainable)
    }
}

/// Make exactly the parameters selected by `selection` trainable and freeze every other one.
/// Errors if the selection is invalid for this model or selects nothing.
pub fn set_trainable<B: Backend>(
    model: LlamaForCausalLM<B>,
    selection: &Selection,
    map: &LayerMap,
) -> Result<(LlamaForCausalLM<B>, TrainableSummary)> {
    if map.len() != model.config.num_hidden_layers {
        return Err(CoreError::Invalid(format!(
            "layer map has {} layers but the model has {}",
            map.len(),
            model.config.num_hidden_layers
        )));
    }
    let ctx = SelectContext {
        map,
        tied: model.config.tie_word_embeddings,
    };
    selection.validate(&ctx)?;
    let mut mapper = SetTrainable {
        selection,
        ctx: &ctx,
        summary: TrainableSummary {
            groups: Vec::new(),
            trainable_names: Vec::new(),
        },
    };
    let model = map_named(model, &mut mapper);
    Ok((model, mapper.summary.finish(selection)?))
}
