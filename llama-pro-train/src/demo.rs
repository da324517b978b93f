//! `llama-pro demo`: the paper's claim at toy scale, on the data shipped in `data/`.
//!
//! A small LLaMA pretrained on general text (the King James Bible) learns a new domain (Python
//! source code) with the same token budget five ways: LLaMA Pro block expansion (interleaved
//! identity blocks, only they train), full fine-tuning, LoRA, and the paper's prefix and suffix
//! stacking (the same number of identity blocks, all at the bottom or all at the top). Every
//! run is evaluated on held-out general and domain text before, during and after training.
//!
//! Then the paper's second stage (LLaMA Pro - Instruct): the LLaMA Pro model and the base are
//! each fine-tuned on the same small instruction set (`instruct-train.jsonl`, made by
//! `scripts/make_instruct.py` from the same corpora) with the library's SFT recipe, and their
//! loss on the answers of held-out conversations (`instruct-valid.jsonl`) is compared before and
//! after, with a few greedy answers. The result is a table, a PNG of the losses and a JSON report.
//!
//! The same comparison runs on any HuggingFace model directory ([`DemoConfig::model`]) with its
//! own tokenizer and chat template, on the shipped corpora or others, with extra held-out general
//! sets reported beside the shipped one ([`DemoConfig::general_eval`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use llama_pro_core::burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn::tensor::backend::Backend;
use llama_pro_core::device::{
    DeviceSpec, OnAutodiffBackend, OnBackend, dispatch, dispatch_autodiff, verify_identity_on,
};
use llama_pro_core::expand::{ExpansionPlan, expand_checkpoint};
use llama_pro_core::generate::{GenerationConfig, generate};
use llama_pro_core::save::{SaveOptions, write_json};
use llama_pro_core::{ChatTemplate, DType, HfConfig, LlamaForCausalLM, Message, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::{DataSource, EvalSet, Method, TrainConfig};
use crate::error::{Result, TrainError};
use crate::sft::{ChatFormat, Record, read_records};
use crate::trainer::{EvalPoint, Event, Observer, TrainReport, train};

/// A way of adding the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoMethod {
    /// LLaMA Pro: interleaved identity blocks, only they train.
    Pro,
    /// Full fine-tuning of the base model.
    Full,
    /// LoRA on every linear layer of the base model.
    Lora,
    /// The same number of identity blocks stacked below the base blocks (paper Table 6).
    Prefix,
    /// The same number of identity blocks stacked on top of the base blocks (paper Table 6).
    Suffix,
}

impl DemoMethod {
    /// Every method, in the demo's order.
    pub const ALL: [DemoMethod; 5] = [
        Self::Pro,
        Self::Full,
        Self::Lora,
        Self::Prefix,
        Self::Suffix,
    ];

    /// The name in settings and on the command line.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Pro => "pro",
            Self::Full => "full",
            Self::Lora => "lora",
            Self::Prefix => "prefix",
            Self::Suffix => "suffix",
        }
    }

    /// Name in tables and files.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pro => "llama-pro",
            Self::Full => "full-ft",
            Self::Lora => "lora",
            Self::Prefix => "prefix",
            Self::Suffix => "suffix",
        }
    }
}

impl std::str::FromStr for DemoMethod {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.key() == s).ok_or_else(|| {
            TrainError::setting(
                "methods",
                format!("{s:?}: expected pro, full, lora, prefix or suffix"),
            )
        })
    }
}

/// Settings of the demo. [`DemoConfig::default`] is the ~2-minute run, [`DemoConfig::quick`]
/// the ~35-second one (CI), on 2 CPU cores (each with the SFT stage).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DemoConfig {
    /// Directory with `base/`, `{general,domain}-{train,valid}.jsonl` and (for the SFT stage)
    /// `instruct-{train,valid}.jsonl`.
    pub data_dir: PathBuf,
    /// The base model: a HuggingFace model directory (config, weights, tokenizer). `None`: the
    /// toy model shipped in `data_dir/base`.
    pub model: Option<PathBuf>,
    /// Extra held-out general sets (`NAME=FILE`), evaluated and reported beside `general` (the
    /// data directory's `general-valid.jsonl`).
    pub general_eval: Vec<EvalSet>,
    /// Where runs, the plot and the report go.
    pub output: PathBuf,
    /// Methods, in order.
    pub methods: Vec<DemoMethod>,
    /// Optimizer steps per method (the same token budget for every method).
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate (every method).
    pub lr: f64,
    /// Interleaved expansion: groups (`copies` identity blocks after each group's top block);
    /// prefix and suffix stacking add as many blocks. 0: the paper's ratio, one new block per
    /// four base blocks (LLaMA-2 7B: 32 -> 40), as the divisor of the layer count nearest to
    /// a quarter of it ([`paper_groups`]).
    pub groups: usize,
    /// Identity blocks added per group.
    pub copies: usize,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Evaluations during each run (besides before and after).
    pub evals_during: usize,
    /// Windows (of `seq_len` tokens) of each evaluation set.
    pub eval_sequences: usize,
    /// Compute dtype of every run: f32, or bf16/f16 mixed precision (f32 master weights).
    pub dtype: DType,
    /// The run fails if LLaMA Pro's general loss rises by more than this many percent.
    pub max_general_change_pct: f64,
    /// Seed of data order and adapter init.
    pub seed: u64,
    /// The device.
    pub device: DeviceSpec,
    /// Run the SFT stage (LLaMA Pro - Instruct) after the post-pretraining methods.
    pub sft: bool,
    /// SFT: optimizer steps of each fine-tuned model (the same budget for both; `batch_size`
    /// rows of `sft_seq_len` tokens, conversations neat-packed).
    pub sft_steps: usize,
    /// SFT: tokens per row.
    pub sft_seq_len: usize,
    /// SFT: peak learning rate (the paper's 2e-5 is for a 8 B model; this toy model needs more).
    pub sft_lr: f64,
    /// SFT: chat template (a built-in name or a `.jinja` file). `None`: the model's own, or the
    /// built-in chatml for a model without one (the toy).
    pub template: Option<String>,
    /// SFT: held-out conversations evaluated (`None`: all of `instruct-valid.jsonl`).
    pub sft_eval_conversations: Option<usize>,
    /// SFT: greedy answers to the first held-out prompts.
    pub sft_answers: usize,
    /// SFT: new tokens at most per answer.
    pub sft_answer_tokens: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            model: None,
            general_eval: Vec::new(),
            output: PathBuf::from("demo-output"),
            methods: DemoMethod::ALL.to_vec(),
            steps: 150,
            batch_size: 8,
            seq_len: 128,
            // The paper's learning rate, for every method (see the README for 5e-4 and 1e-3).
            lr: 2e-4,
            groups: 2,
            copies: 1,
            lora_rank: 8,
            evals_during: 5,
            eval_sequences: 48,
            dtype: DType::F32,
            max_general_change_pct: 5.0,
            seed: 0,
            device: DeviceSpec::Cpu,
            sft: true,
            sft_steps: 60,
            sft_seq_len: 256,
            sft_lr: 1e-3,
            template: None,
            sft_eval_conversations: None,
            sft_answers: 3,
            sft_answer_tokens: 24,
        }
    }
}

impl DemoConfig {
    /// The CI-sized demo (~35 s on 2 CPU cores).
    pub fn quick() -> Self {
        Self {
            steps: 30,
            evals_during: 2,
            eval_sequences: 16,
            sft_steps: 30,
            ..Self::default()
        }
    }

    /// Models the SFT stage fine-tunes: LLaMA Pro's (when it is among the methods) and the base;
    /// none with `sft` off.
    pub fn sft_models(&self) -> usize {
        match self.sft {
            true => 1 + usize::from(self.methods.contains(&DemoMethod::Pro)),
            false => 0,
        }
    }

    /// Optimizer steps of the whole demo (every method, then the SFT stage): for a progress bar.
    pub fn total_steps(&self) -> usize {
        self.steps * self.methods.len() + self.sft_steps * self.sft_models()
    }

    /// The base model directory: [`DemoConfig::model`], else the shipped toy in `data_dir/base`.
    pub fn base_dir(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| self.data_dir.join("base"))
    }

    /// The held-out general sets: `general` (the data directory's `general-valid.jsonl`), then
    /// [`DemoConfig::general_eval`].
    pub fn general_sets(&self) -> Vec<String> {
        std::iter::once(GENERAL.to_string())
            .chain(self.general_eval.iter().map(|e| e.name.clone()))
            .collect()
    }

    /// Groups of the interleaved expansion of a base with `layers` blocks (resolving 0).
    pub fn groups_for(&self, layers: usize) -> usize {
        match self.groups {
            0 => paper_groups(layers),
            g => g,
        }
    }
}

/// The paper's expansion ratio for a base of `layers` blocks: one new block per four (LLaMA-2
/// 7B: 8 groups of 4, 32 -> 40 blocks), as the divisor of `layers` nearest to `layers / 4`
/// (the smaller one on a tie). SmolLM2-135M's 30 blocks: 6 groups (30 -> 36).
pub fn paper_groups(layers: usize) -> usize {
    let target = layers as f64 / 4.0;
    (1..=layers.max(1))
        .filter(|g| layers % g == 0)
        .min_by(|a, b| {
            let (da, db) = ((*a as f64 - target).abs(), (*b as f64 - target).abs());
            da.total_cmp(&db)
        })
        .unwrap_or(1)
}

/// The evaluation set of the data directory's held-out general text.
const GENERAL: &str = "general";
/// The evaluation set of the held-out domain text.
const DOMAIN: &str = "domain";

/// `data/` of the repository: `./data` if it has the base model, else the one next to this
/// crate's sources (so `cargo run` works from any directory of the checkout).
pub fn default_data_dir() -> PathBuf {
    let local = PathBuf::from("data");
    if local.join("base").join("config.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("data")
}

/// One method's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoRun {
    /// Method name.
    pub method: String,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters (adapters included).
    pub total_params: usize,
    /// Layers of the trained model.
    pub layers: usize,
    /// max |Δlogits| between the expanded model and the base before training (expansions only).
    pub identity_max_abs_diff: Option<f32>,
    /// Loss per evaluation set before training.
    pub before: BTreeMap<String, f64>,
    /// Loss per evaluation set after training.
    pub after: BTreeMap<String, f64>,
    /// Every evaluation of the run.
    pub evals: Vec<EvalPoint>,
    /// Training loss per step.
    pub train_losses: Vec<f64>,
    /// Wall time of the run (training and its evaluations), seconds.
    pub seconds: f64,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
}

impl DemoRun {
    /// Relative change of an evaluation set's loss, in percent.
    pub fn change_pct(&self, set: &str) -> f64 {
        let (b, a) = (loss_of(&self.before, set), loss_of(&self.after, set));
        100.0 * (a - b) / b
    }
}

/// A greedy answer to a held-out prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftAnswer {
    /// The user's message.
    pub prompt: String,
    /// The held-out conversation's answer.
    pub reference: String,
    /// What the model answered: its first line, cut at the end-of-turn marker (every answer of
    /// the instruction set is one line).
    pub answer: String,
    /// Everything it generated (at most `sft_answer_tokens` tokens), the end-of-turn marker
    /// included when it wrote one.
    pub generated: String,
}

/// One model's supervised fine-tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftRun {
    /// Which model: `llama-pro` (the output of the `pro` method) or `base`.
    pub model: String,
    /// The directory it started from.
    pub from: PathBuf,
    /// The fine-tuned model (HuggingFace directory).
    pub model_dir: Option<PathBuf>,
    /// Trainable parameters (every one: the SFT recipe is full fine-tuning).
    pub trainable_params: usize,
    /// Layers.
    pub layers: usize,
    /// Loss on the answers of the held-out conversations before SFT.
    pub answer_loss_before: f64,
    /// The same after SFT.
    pub answer_loss_after: f64,
    /// Every evaluation of the run (set `answers`).
    pub evals: Vec<EvalPoint>,
    /// Training loss per step (on the answers of the training conversations).
    pub train_losses: Vec<f64>,
    /// Tokens trained on (non-padding positions of every row).
    pub tokens: usize,
    /// Wall time of the run, seconds.
    pub seconds: f64,
    /// Greedy answers of the fine-tuned model to the first held-out prompts.
    pub answers: Vec<SftAnswer>,
}

impl SftRun {
    /// Relative change of the held-out answer loss, in percent.
    pub fn change_pct(&self) -> f64 {
        100.0 * (self.answer_loss_after - self.answer_loss_before) / self.answer_loss_before
    }
}

/// The SFT stage (LLaMA Pro - Instruct): every model fine-tuned on the same conversations with
/// the same recipe and budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftReport {
    /// Training conversations.
    pub train_file: PathBuf,
    /// Held-out conversations.
    pub valid_file: PathBuf,
    /// The recipe: [`TrainConfig::sft`] with the demo's steps, batch, row length and lr.
    pub steps: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Chat template.
    pub template: String,
    /// Runs in order: LLaMA Pro's model (when the `pro` method ran), then the base.
    pub runs: Vec<SftRun>,
}

/// The demo's result (also written as `demo.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    /// Settings.
    pub config: DemoConfig,
    /// Tokens each method trained on.
    pub tokens_per_method: usize,
    /// Runs in order.
    pub runs: Vec<DemoRun>,
    /// The SFT stage (`None` when switched off).
    #[serde(default)]
    pub sft: Option<SftReport>,
    /// Whether the checks passed: LLaMA Pro's (identity before training, general-loss bound)
    /// and the SFT stage's (every fine-tuned model's held-out answer loss went down).
    pub passed: bool,
    /// What the checks found.
    pub verdict: Vec<String>,
}

/// One training run (a method, or a model's SFT); only its steps reach the demo's observer (its
/// set-up messages would repeat for every run).
struct DemoTrain<'a> {
    cfg: TrainConfig,
    observer: &'a mut dyn Observer,
}

impl OnAutodiffBackend for DemoTrain<'_> {
    /// The report and the tokens trained on.
    type Output = Result<(TrainReport, usize)>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let stop = AtomicBool::new(false);
        let outer = self.observer;
        let mut tokens = 0;
        let mut steps = |e: &Event<'_>| {
            if let Event::Step(m) = e {
                tokens += m.tokens;
                outer.on_event(e)
            }
        };
        let r = train::<B>(self.cfg, &device, &mut steps, &stop)?;
        Ok((r, tokens))
    }
}

/// The answer in a generated text: its first line, up to the end-of-turn marker. ChatML's
/// markers are plain text for the demo's tokenizer (several tokens each), which a briefly tuned
/// model may write incompletely: the answer ends at the first `<|` or line break.
pub fn answer_of(generated: &str) -> &str {
    let end = ["<|", "\n"]
        .iter()
        .filter_map(|m| generated.find(m))
        .min()
        .unwrap_or(generated.len());
    generated[..end].trim()
}

/// Greedy answers of a model directory to user prompts, through a chat template.
struct Answers<'a> {
    dir: &'a Path,
    /// `None`: the model's own.
    template: Option<&'a str>,
    prompts: &'a [String],
    max_new_tokens: usize,
}

impl OnBackend for Answers<'_> {
    /// Per prompt: the whole generated text.
    type Output = Result<Vec<String>>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (model, hf) = LlamaForCausalLM::<B>::from_pretrained(self.dir, &device, None)?;
        let tok = Tokenizer::from_dir(self.dir, hf.config.bos_token_id, &hf.config.eos_token_ids)?;
        let template = ChatTemplate::load(self.dir, self.template)?;
        let cfg = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: 0.0,
            eos_token_ids: tok.eos_token_ids.clone(),
            ..Default::default()
        };
        let mut out = Vec::new();
        for q in self.prompts {
            let text = template.render(&[Message::new("user", q.as_str())], true)?;
            let ids = tok.encode(&text, false)?;
            let mut new = generate(&model, &ids, &cfg, &device, |_| {})?;
            new.retain(|t| !cfg.eos_token_ids.contains(t));
            out.push(tok.decode(&new)?);
        }
        Ok(out)
    }
}

/// Checks that `dir` is a HuggingFace model directory the demo can start from: its config,
/// weights and tokenizer are there.
fn model_dir(dir: &Path) -> Result<PathBuf> {
    let bad = |what: String| {
        Err(TrainError::setting(
            "model",
            format!("{}: {what}", dir.display()),
        ))
    };
    if !dir.is_dir() {
        return bad(
            "no such directory (give a HuggingFace model directory: config.json, \
             *.safetensors, tokenizer.json; `llama-pro import-gguf` makes one from a GGUF file)"
                .into(),
        );
    }
    if !dir.join("config.json").is_file() {
        return bad("no config.json: not a HuggingFace model directory".into());
    }
    let weights = std::fs::read_dir(dir)
        .map_err(|source| TrainError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    if !weights {
        return bad(
            "no *.safetensors weights (a PyTorch .bin checkpoint: re-save it as \
             safetensors; a GGUF file: `llama-pro import-gguf`)"
                .into(),
        );
    }
    if !dir.join("tokenizer.json").is_file() {
        return bad(
            "no tokenizer.json: the demo needs the model's own (fast) tokenizer to read \
             its corpora"
                .into(),
        );
    }
    Ok(dir.to_path_buf())
}

fn data_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        return Err(TrainError::setting(
            "data_dir",
            format!(
                "{}: missing; the demo needs the data shipped in the repository's data/",
                p.display()
            ),
        ));
    }
    Ok(p)
}

/// Run the demo: expansions with identity checks, one training run per method, evaluation,
/// then (with `sft`) the SFT stage on LLaMA Pro's trained model and the base, table, plot (with
/// the `plot` feature) and report, telling `observer` what happens (an [`Event::Phase`] per
/// run, then its steps). The report says whether LLaMA Pro's expanded model was the identity,
/// its general loss stayed within the configured bound and SFT lowered the held-out answer
/// loss.
pub fn run_demo(cfg: &DemoConfig, observer: &mut dyn Observer) -> Result<DemoReport> {
    let base = match &cfg.model {
        Some(dir) => model_dir(dir)?,
        None => data_file(&cfg.data_dir, "base")?,
    };
    let domain_train = data_file(&cfg.data_dir, "domain-train.jsonl")?;
    let general_valid = data_file(&cfg.data_dir, "general-valid.jsonl")?;
    let domain_valid = data_file(&cfg.data_dir, "domain-valid.jsonl")?;
    let instruct = if cfg.sft {
        let file = |name: &str| {
            let p = cfg.data_dir.join(name);
            match p.exists() {
                true => Ok(p),
                false => Err(TrainError::setting(
                    "sft",
                    format!(
                        "{}: missing; the SFT stage needs the instruction set shipped in the repository's \
                         data/ (python3 scripts/make_instruct.py writes it), or switch it off (--no-sft)",
                        p.display()
                    ),
                )),
            }
        };
        Some((file("instruct-train.jsonl")?, file("instruct-valid.jsonl")?))
    } else {
        None
    };
    let device = cfg.device;
    if cfg.methods.is_empty() {
        return Err(TrainError::setting("methods", "give at least one method"));
    }
    if cfg.steps == 0 {
        return Err(TrainError::setting("steps", "must be at least 1"));
    }
    if cfg.copies == 0 {
        return Err(TrainError::setting("copies", "must be at least 1"));
    }
    let mut eval = vec![
        EvalSet {
            name: GENERAL.into(),
            path: general_valid.clone(),
        },
        EvalSet {
            name: DOMAIN.into(),
            path: domain_valid.clone(),
        },
    ];
    for e in &cfg.general_eval {
        if eval.iter().any(|x| x.name == e.name) {
            return Err(TrainError::setting(
                "general_eval",
                format!(
                    "{:?}: taken (the names must differ from each other and from general and domain)",
                    e.name
                ),
            ));
        }
        if !e.path.is_file() {
            return Err(TrainError::setting(
                "general_eval",
                format!("{}={}: no such file", e.name, e.path.display()),
            ));
        }
        eval.push(e.clone());
    }
    if cfg.sft && cfg.sft_steps == 0 {
        return Err(TrainError::setting(
            "sft_steps",
            "must be at least 1 (or switch the SFT stage off)",
        ));
    }
    std::fs::create_dir_all(&cfg.output).map_err(|source| TrainError::Io {
        path: cfg.output.clone(),
        source,
    })?;
    let base_cfg = llama_pro_core::HfConfig::from_path(&base)?.config;
    let l = base_cfg.num_hidden_layers;
    let groups = cfg.groups_for(l);
    if l % groups != 0 {
        return Err(TrainError::setting(
            "groups",
            format!("{groups}: must divide the base model's {l} layers"),
        ));
    }
    let added = groups * cfg.copies;
    let tokens = cfg.steps * cfg.batch_size * cfg.seq_len;
    observer.on_event(&Event::Info(&format!(
        "base model {} ({} layers, {} parameters); every method trains on {} domain tokens ({} steps x {} x {})",
        base.display(),
        l,
        base_cfg.num_params(),
        tokens,
        cfg.steps,
        cfg.batch_size,
        cfg.seq_len
    )));

    let mut runs = Vec::new();
    let mut verdict = Vec::new();
    let mut passed = true;
    // LLaMA Pro's trained model: where the SFT stage starts.
    let mut pro_model = None;
    for &m in &cfg.methods {
        let name = m.name();
        observer.on_event(&Event::Phase(name));
        let plan = match m {
            DemoMethod::Pro => Some(ExpansionPlan::Interleaved {
                groups,
                copies: cfg.copies,
            }),
            DemoMethod::Prefix => Some(ExpansionPlan::Bottom { k: added }),
            DemoMethod::Suffix => Some(ExpansionPlan::Top { k: added }),
            DemoMethod::Full | DemoMethod::Lora => None,
        };
        let (model_dir, identity) = match &plan {
            Some(plan) => {
                let dir = cfg.output.join("models").join(format!("{name}-init"));
                observer.on_event(&Event::Info(&format!(
                    "{name}: expanding the base ({plan})"
                )));
                expand_checkpoint(
                    &base,
                    &dir,
                    plan,
                    &SaveOptions {
                        overwrite: true,
                        ..Default::default()
                    },
                )?;
                let d = verify_identity_on(device, &base, &dir)?;
                let ok = d == 0.0;
                let line = format!(
                    "{name}: expanded model {} the base before training (max |Δlogits| = {d})",
                    if ok {
                        "is bitwise identical to"
                    } else {
                        "DIFFERS from"
                    }
                );
                observer.on_event(&Event::Info(&line));
                if !ok {
                    passed = false;
                    verdict.push(format!("FAIL {line}"));
                } else if m == DemoMethod::Pro {
                    verdict.push(format!("ok   {line}"));
                }
                (dir, Some(d))
            }
            None => (base.clone(), None),
        };
        let out = cfg.output.join("runs").join(name);
        let train_cfg = TrainConfig {
            model: model_dir,
            data: vec![DataSource::new(&domain_train)],
            output: out.clone(),
            method: match m {
                DemoMethod::Full => Method::Full,
                DemoMethod::Lora => Method::Lora,
                _ => Method::Pro,
            },
            lora_rank: cfg.lora_rank,
            lora_alpha: 2.0 * cfg.lora_rank as f64,
            max_steps: Some(cfg.steps),
            batch_size: cfg.batch_size,
            seq_len: cfg.seq_len,
            lr: cfg.lr,
            dtype: cfg.dtype,
            eval: eval.clone(),
            eval_max_sequences: Some(cfg.eval_sequences),
            eval_every: (cfg.steps / (cfg.evals_during + 1)).max(1),
            log_every: 0,
            keep: 1,
            // The demo owns its output directory: a rerun replaces the earlier runs.
            overwrite: true,
            seed: cfg.seed,
            device,
            ..TrainConfig::default()
        };
        let start = Instant::now();
        let (r, _) = dispatch_autodiff(
            device,
            DemoTrain {
                cfg: train_cfg,
                observer: &mut *observer,
            },
        )??;
        let seconds = start.elapsed().as_secs_f64();
        if m == DemoMethod::Pro {
            pro_model = r.model_dir.clone();
        }
        let run = DemoRun {
            method: name.into(),
            trainable_params: r.trainable_params,
            total_params: r.total_params,
            layers: l + plan.as_ref().map_or(0, |_| added),
            identity_max_abs_diff: identity,
            // A fresh run logs the evaluation before (step 0) first and after (last step) last.
            before: r.evals.first().map(|e| e.loss.clone()).unwrap_or_default(),
            after: r.evals.last().map(|e| e.loss.clone()).unwrap_or_default(),
            evals: r.evals,
            train_losses: r.losses,
            seconds,
            tokens_per_sec: r.tokens_per_sec,
        };
        let general: String = cfg
            .general_sets()
            .iter()
            .map(|set| {
                format!(
                    ", {set} {:.3} -> {:.3} ({:+.2}%)",
                    loss_of(&run.before, set),
                    loss_of(&run.after, set),
                    run.change_pct(set)
                )
            })
            .collect();
        observer.on_event(&Event::Info(&format!(
            "{name}: domain {:.3} -> {:.3}{general}, {seconds:.0} s",
            loss_of(&run.before, DOMAIN),
            loss_of(&run.after, DOMAIN),
        )));
        if m == DemoMethod::Pro {
            for set in cfg.general_sets() {
                let g = run.change_pct(&set);
                let ok = g.is_finite() && g <= cfg.max_general_change_pct;
                let what = match set.as_str() {
                    GENERAL => "general loss".to_string(),
                    _ => format!("general loss on {set}"),
                };
                let line = format!(
                    "{name}: {what} changed {g:+.2}% (bound: at most +{}%)",
                    cfg.max_general_change_pct
                );
                passed &= ok;
                verdict.push(format!("{} {line}", if ok { "ok  " } else { "FAIL" }));
            }
        }
        runs.push(run);
    }
    let sft = match &instruct {
        Some((train_file, valid_file)) => {
            let mut models = Vec::new();
            if let Some(dir) = &pro_model {
                models.push((DemoMethod::Pro.name(), dir.clone()));
            }
            models.push(("base", base.clone()));
            let s = run_sft(cfg, &base, train_file, valid_file, &models, observer)?;
            for run in &s.runs {
                let ok = run.answer_loss_after < run.answer_loss_before;
                let line = format!(
                    "sft {}: held-out answer loss {:.3} -> {:.3} ({:+.1}%)",
                    run.model,
                    run.answer_loss_before,
                    run.answer_loss_after,
                    run.change_pct()
                );
                passed &= ok;
                verdict.push(format!("{} {line}", if ok { "ok  " } else { "FAIL" }));
            }
            Some(s)
        }
        None => None,
    };
    let report = DemoReport {
        config: cfg.clone(),
        tokens_per_method: tokens,
        runs,
        sft,
        passed,
        verdict,
    };
    let json = serde_json::to_value(&report)
        .map_err(|e| TrainError::Invalid(format!("serializing the demo report: {e}")))?;
    write_json(&cfg.output.join("demo.json"), &json)?;
    #[cfg(feature = "plot")]
    plot_demo(&report, &cfg.output.join("forgetting.png"))?;
    Ok(report)
}

/// The name of the SFT evaluation set: the answers of the held-out conversations.
const ANSWERS: &str = "answers";

/// The SFT stage: each model of `models` (name, directory) fine-tuned on `train_file` with the
/// library's recipe ([`TrainConfig::sft`]: every parameter, cosine, 3% warmup, clipping, neat
/// packing, loss on the answers) and the same budget, evaluated on the answers of `valid_file`
/// before and after; greedy answers of each fine-tuned model to the first held-out prompts.
fn run_sft(
    cfg: &DemoConfig,
    base: &Path,
    train_file: &Path,
    valid_file: &Path,
    models: &[(&str, PathBuf)],
    observer: &mut dyn Observer,
) -> Result<SftReport> {
    // The chosen template, else the model's own (the expanded and trained models carry the
    // base's tokenizer files), else chatml.
    let choice = match &cfg.template {
        Some(t) => Some(t.clone()),
        None if ChatTemplate::from_dir(base)?.is_some() => None,
        None => Some("chatml".to_string()),
    };
    let template = choice.as_deref().unwrap_or("the model's own");
    // The first held-out conversations: prompts for the greedy answers.
    let held_out: Vec<(String, String)> = read_records(valid_file, ChatFormat::Auto)?
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Chat(m) => {
                let q = m.iter().find(|m| m.role == "user")?;
                let a = m.iter().find(|m| m.role == "assistant")?;
                Some((q.content.clone(), a.content.clone()))
            }
            Record::Tokens { .. } => None,
        })
        .take(cfg.sft_answers)
        .collect();
    let prompts: Vec<String> = held_out.iter().map(|(q, _)| q.clone()).collect();
    observer.on_event(&Event::Info(&format!(
        "SFT (LLaMA Pro - Instruct): {} fine-tuned on {} ({} steps x {} rows of {} tokens, conversations \
         neat-packed, {template} template, lr {:e}, every parameter); held-out answer loss on {}",
        models
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" and "),
        train_file.display(),
        cfg.sft_steps,
        cfg.batch_size,
        cfg.sft_seq_len,
        cfg.sft_lr,
        valid_file.display()
    )));
    let mut runs = Vec::new();
    for (name, dir) in models {
        observer.on_event(&Event::Phase(&format!("sft {name}")));
        let train_cfg = TrainConfig {
            model: dir.clone(),
            data: vec![DataSource::new(train_file)],
            output: cfg.output.join("runs").join(format!("sft-{name}")),
            template: choice.clone(),
            max_steps: Some(cfg.sft_steps),
            batch_size: cfg.batch_size,
            seq_len: cfg.sft_seq_len,
            lr: cfg.sft_lr,
            dtype: cfg.dtype,
            eval: vec![EvalSet {
                name: ANSWERS.into(),
                path: valid_file.to_path_buf(),
            }],
            eval_max_sequences: cfg.sft_eval_conversations,
            eval_every: 0,
            log_every: 0,
            keep: 1,
            overwrite: true,
            seed: cfg.seed,
            device: cfg.device,
            ..TrainConfig::sft()
        };
        let start = Instant::now();
        let (r, tokens) = dispatch_autodiff(
            cfg.device,
            DemoTrain {
                cfg: train_cfg,
                observer: &mut *observer,
            },
        )??;
        let seconds = start.elapsed().as_secs_f64();
        let answers = match &r.model_dir {
            Some(out) if !prompts.is_empty() => dispatch(
                cfg.device,
                Answers {
                    dir: out,
                    template: choice.as_deref(),
                    prompts: &prompts,
                    max_new_tokens: cfg.sft_answer_tokens,
                },
            )??,
            _ => vec![],
        };
        let loss = |e: Option<&EvalPoint>| e.map_or(f64::NAN, |e| loss_of(&e.loss, ANSWERS));
        let run = SftRun {
            model: name.to_string(),
            from: dir.clone(),
            model_dir: r.model_dir.clone(),
            trainable_params: r.trainable_params,
            layers: HfConfig::from_path(dir)?.config.num_hidden_layers,
            answer_loss_before: loss(r.evals.first()),
            answer_loss_after: loss(r.evals.last()),
            evals: r.evals,
            train_losses: r.losses,
            tokens,
            seconds,
            answers: held_out
                .iter()
                .zip(answers)
                .map(|((q, a), generated)| SftAnswer {
                    prompt: q.clone(),
                    reference: a.clone(),
                    answer: answer_of(&generated).to_string(),
                    generated,
                })
                .collect(),
        };
        observer.on_event(&Event::Info(&format!(
            "sft {name}: held-out answer loss {:.3} -> {:.3} ({:+.1}%), {seconds:.0} s",
            run.answer_loss_before,
            run.answer_loss_after,
            run.change_pct()
        )));
        runs.push(run);
    }
    Ok(SftReport {
        train_file: train_file.to_path_buf(),
        valid_file: valid_file.to_path_buf(),
        steps: cfg.sft_steps,
        batch_size: cfg.batch_size,
        seq_len: cfg.sft_seq_len,
        lr: cfg.sft_lr,
        template: template.into(),
        runs,
    })
}

/// Loss of evaluation set `k` (NaN when missing).
fn loss_of(m: &BTreeMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(f64::NAN)
}

/// The results table: per method, the held-out domain loss and every held-out general set's
/// (`general`, then [`DemoConfig::general_eval`]) before and after, and the time.
pub fn demo_table(r: &DemoReport) -> String {
    let sets = r.config.general_sets();
    let mut s = format!(
        "{:<10} {:>10} {:>6} | {:>7} {:>7} {:>8} |",
        "method", "trainable", "layers", DOMAIN, "after", "change"
    );
    for set in &sets {
        s += &format!(" {set:>7} {:>7} {:>8} |", "after", "change");
    }
    s += &format!(" {:>6}\n", "time");
    let width = 69 + sets.iter().map(|n| n.len().max(7) + 20).sum::<usize>();
    s += &format!("{}\n", "-".repeat(width));
    for run in &r.runs {
        s += &format!(
            "{:<10} {:>10} {:>6} | {:>7.3} {:>7.3} {:>+7.1}% |",
            run.method,
            run.trainable_params,
            run.layers,
            loss_of(&run.before, DOMAIN),
            loss_of(&run.after, DOMAIN),
            run.change_pct(DOMAIN),
        );
        for set in &sets {
            let w = set.len().max(7);
            s += &format!(
                " {:>w$.3} {:>7.3} {:>+7.2}% |",
                loss_of(&run.before, set),
                loss_of(&run.after, set),
                run.change_pct(set),
            );
        }
        s += &format!(" {:>5.0}s\n", run.seconds);
    }
    if let Some(sft) = &r.sft {
        s += "\n";
        s += &sft_table(sft);
    }
    s
}

/// The SFT stage's table (held-out answer loss before and after) and the greedy answers.
pub fn sft_table(r: &SftReport) -> String {
    let mut s = format!(
        "SFT (LLaMA Pro - Instruct): {} steps x {} x {} tokens, lr {:e}, every parameter\n",
        r.steps, r.batch_size, r.seq_len, r.lr
    );
    s += &format!(
        "{:<10} {:>10} {:>6} | {:>12} {:>7} {:>8} | {:>8} | {:>6}\n",
        "model", "trainable", "layers", "answer loss", "after", "change", "tokens", "time"
    );
    s += &format!("{}\n", "-".repeat(80));
    for run in &r.runs {
        s += &format!(
            "{:<10} {:>10} {:>6} | {:>12.3} {:>7.3} {:>+7.1}% | {:>8} | {:>5.0}s\n",
            run.model,
            run.trainable_params,
            run.layers,
            run.answer_loss_before,
            run.answer_loss_after,
            run.change_pct(),
            run.tokens,
            run.seconds
        );
    }
    let Some(first) = r.runs.first() else {
        return s;
    };
    let one_line = |t: &str| t.replace('\n', " | ");
    for (i, a) in first.answers.iter().enumerate() {
        s += &format!(
            "\nQ: {}\n   reference: {}\n",
            one_line(&a.prompt),
            a.reference
        );
        for run in &r.runs {
            if let Some(b) = run.answers.get(i) {
                s += &format!(
                    "   {:<10} {}\n",
                    format!("{}:", run.model),
                    one_line(&b.answer)
                );
            }
        }
    }
    s
}

/// Three panels: domain loss and general loss over the steps, and the path of every method in
/// the (domain loss, general loss) plane.
#[cfg(feature = "plot")]
pub fn plot_demo(r: &DemoReport, path: &Path) -> Result<()> {
    use crate::plot::{Panel, Series, write_png};
    let series = |f: &dyn Fn(&EvalPoint) -> Option<(f64, f64)>| -> Vec<Series> {
        r.runs
            .iter()
            .map(|run| Series {
                label: run.method.clone(),
                points: run.evals.iter().filter_map(f).collect(),
            })
            .collect()
    };
    let sets = r.config.general_sets();
    let mut panels = vec![Panel {
        title: "domain loss (held-out code)".into(),
        x_label: "optimizer step".into(),
        y_label: "loss".into(),
        series: series(&|e| e.loss.get(DOMAIN).map(|l| (e.step as f64, *l))),
    }];
    for set in &sets {
        panels.push(Panel {
            title: match set.as_str() {
                GENERAL => "general loss (held-out prose)".into(),
                _ => format!("general loss (held-out {set})"),
            },
            x_label: "optimizer step".into(),
            y_label: "loss".into(),
            series: series(&|e| e.loss.get(set).map(|l| (e.step as f64, *l))),
        });
    }
    // With several general sets: their mean loss.
    let general = |e: &EvalPoint| -> Option<f64> {
        let l: Option<Vec<f64>> = sets.iter().map(|s| e.loss.get(s).copied()).collect();
        l.map(|l| l.iter().sum::<f64>() / l.len() as f64)
    };
    panels.push(Panel {
        title: "forgetting: general vs domain".into(),
        x_label: "domain loss".into(),
        y_label: match sets.len() {
            1 => "general loss".into(),
            _ => format!("mean general loss ({})", sets.join(", ")),
        },
        series: series(&|e| match (e.loss.get(DOMAIN), general(e)) {
            (Some(d), Some(g)) => Some((*d, g)),
            _ => None,
        }),
    });
    write_png(path, &panels, (560, 420))
}
