//! Checkpoints (the trainable weights, both optimizers' state, the data position, the run's
//! manifest and history, written to a temporary directory, synced and renamed), resume with a
//! compatibility check, and the final export.
//!
//! Layout of `OUTPUT/checkpoints/step-N/`: `model.safetensors` (trainable tensors, f32, HF names),
//! `optimizer-decay.bin` and `optimizer-plain.bin` (burn's AdamW records under ids derived from
//! the parameter names, since burn's `ParamId`s are new random numbers each time a model is
//! loaded), `state.json` (step, data cursor, configuration, trainable names, the manifest that
//! identifies the run's model and data, the loss and evaluation history).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Param, ParamId};
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use llama_pro_core::burn;
use llama_pro_core::params::{NamedMapper, map_named};
use llama_pro_core::save::{
    OwnedTensor, SaveOptions, begin_atomic_dir, commit_atomic_dir, resolve, save_pretrained,
    write_file_atomic, write_json, write_weights,
};
use llama_pro_core::weights::Checkpoint;
use llama_pro_core::{DType, LlamaForCausalLM};
use serde::{Deserialize, Serialize};

use crate::config::{Resume, TrainConfig};
use crate::data::FileDigest;
use crate::dataset::DataCursor;
use crate::error::{Result, TrainError};
use crate::eval::EvalResult;

use super::rundir::RunDir;
use super::setup::OptRecord;
use super::{EvalPoint, TrainReport, Trainer, report};

/// What identifies a run: a checkpoint may only be resumed by a run with the same model and data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Shared by every checkpoint of a run (resumes keep it); pruning touches only these.
    pub run_id: String,
    /// SHA-256 of the configuration as written in `state.json` (a record; the comparison on
    /// resume is key by key).
    pub config_sha256: String,
    /// The starting weights' fingerprint (see `ModelInfo::fingerprint`).
    pub model: String,
    /// The training files, in order, with their mixture weights and digests.
    pub data: Vec<DataEntry>,
}

/// One training file of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataEntry {
    /// As given.
    pub path: PathBuf,
    /// Mixture weight.
    pub weight: f64,
    /// Size and SHA-256.
    pub digest: FileDigest,
}

/// The loss and evaluation history up to a checkpoint (so a resumed run reports the whole run).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct History {
    losses: Vec<f64>,
    evals: Vec<EvalPoint>,
    tokens: usize,
    seconds: f64,
}

/// State saved next to the weights in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    step: usize,
    cursor: DataCursor,
    eval_before: BTreeMap<String, EvalResult>,
    /// Task scores before training (absent before `eval_tasks` existed).
    #[serde(default)]
    tasks_before: BTreeMap<String, crate::tasks::McResult>,
    config: TrainConfig,
    trainable_names: Vec<String>,
    /// Absent in checkpoints of llama-pro before the manifest existed.
    #[serde(default)]
    manifest: Option<Manifest>,
    #[serde(default)]
    history: History,
    /// Data-parallel workers of the run that wrote it (its global batch is `batch_size` x
    /// workers x `grad_accum`).
    #[serde(default = "one")]
    workers: usize,
    /// When written (milliseconds since 1970): the newest checkpoint is the one to continue, even
    /// when an earlier one was resumed and the run branched.
    #[serde(default)]
    saved_at: u64,
}

fn one() -> usize {
    1
}

const OPTIMIZER_FILES: [&str; 2] = ["optimizer-decay", "optimizer-plain"];

/// A checkpoint read from disk, not yet applied.
struct Loaded<B: AutodiffBackend> {
    dir: PathBuf,
    state: RunState,
    weights: Checkpoint,
    records: [OptRecord<B>; 2],
}

impl<B: AutodiffBackend> Trainer<B> {
    /// The checkpoint directory of this run.
    fn checkpoints(&self) -> PathBuf {
        self.config.output.join("checkpoints")
    }

    /// Take the output directory for this run (once; [`Trainer::save`] and [`Trainer::export`]
    /// call it): lock it against other processes, remove the temporary files of interrupted
    /// writes, refuse (or with `overwrite` remove) an earlier run in a fresh run's directory, and
    /// write the configuration to `train.toml`. Returns what it removed.
    pub fn claim_output(&mut self) -> Result<Vec<PathBuf>> {
        // A data-parallel run's outputs are written by the worker of rank 0 alone.
        if self.run_dir.is_some() || self.collective.rank() != 0 {
            return Ok(Vec::new());
        }
        let out = &self.config.output;
        // A resumed run continues in the directory of its checkpoint; resuming a checkpoint from
        // elsewhere starts this directory afresh.
        let fresh = match &self.resumed {
            Some((dir, _)) => !resolve(dir).starts_with(resolve(out)),
            None => true,
        };
        let (dir, removed) = RunDir::claim(out, fresh, self.config.overwrite)?;
        write_file_atomic(&out.join("train.toml"), self.config.to_toml()?.as_bytes())?;
        self.run_dir = Some(dir);
        Ok(removed)
    }

    /// Write a checkpoint of the current step to `OUTPUT/checkpoints/step-N` (a temporary
    /// directory, synced, renamed into place) and keep the `keep` newest checkpoints of this run
    /// (other runs' checkpoints are left alone). Returns its path.
    pub fn save(&mut self) -> Result<PathBuf> {
        self.claim_output()?;
        let root = self.checkpoints();
        if self.collective.rank() != 0 {
            // The worker of rank 0 writes it; the others hold the same state.
            let out = root.join(format!("step-{}", self.step));
            self.last_checkpoint = Some(out.clone());
            return Ok(out);
        }
        std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
        let out = root.join(format!("step-{}", self.step));
        let tmp = begin_atomic_dir(&out, true)?;
        let trainable = &self.info.summary.trainable_names;
        let named = self.model().named_parameters();
        let to_stable: HashMap<ParamId, ParamId> =
            named.iter().map(|p| (p.id, stable_id(&p.name))).collect();
        let tensors: Vec<(String, OwnedTensor)> = named
            .into_iter()
            .filter(|p| trainable.contains(&p.name))
            .map(|p| {
                let data = p.value.into_data().convert::<f32>();
                let tensor = OwnedTensor {
                    dtype: DType::F32,
                    shape: p.shape,
                    bytes: data.as_bytes().to_vec(),
                };
                (p.name, tensor)
            })
            .collect();
        write_weights(&tmp, tensors, usize::MAX)?;
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        let records = [self.optim.decay.to_record(), self.optim.plain.to_record()];
        for (file, rec) in OPTIMIZER_FILES.iter().zip(records) {
            let remapped: OptRecord<B> = rec
                .into_iter()
                .filter_map(|(k, v)| to_stable.get(&k).map(|s| (*s, v)))
                .collect();
            recorder.record(remapped, tmp.join(file)).map_err(|e| {
                TrainError::Invalid(format!("writing optimizer state to {}: {e}", tmp.display()))
            })?;
        }
        let state = RunState {
            step: self.step,
            cursor: self.data.stream.cursor().clone(),
            eval_before: self.eval_before.clone(),
            tasks_before: self.tasks_before.clone(),
            config: self.config.clone(),
            trainable_names: trainable.clone(),
            manifest: Some(self.manifest.clone()),
            workers: self.collective.world(),
            history: History {
                losses: self.losses.clone(),
                evals: self.evals.clone(),
                tokens: self.tokens,
                seconds: self.seconds(),
            },
            saved_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        write_json(&tmp.join("state.json"), &to_json(&state)?)?;
        commit_atomic_dir(&tmp, &out)?;
        self.last_checkpoint = Some(out.clone());
        // Keep this run's `keep` newest checkpoints.
        let mut ours: Vec<Listed> = list_checkpoints(&root)
            .into_iter()
            .filter(|c| c.run_id.as_deref() == Some(self.manifest.run_id.as_str()))
            .collect();
        ours.sort_by_key(|c| (c.saved_at, c.step));
        while ours.len() > self.config.keep {
            let c = ours.remove(0);
            if c.dir != out {
                let _ = std::fs::remove_dir_all(&c.dir);
            }
        }
        Ok(out)
    }

    /// Continue from a checkpoint: trainable weights, optimizer state, data position, step and
    /// history. `latest` takes the newest checkpoint that can be read, passing over unreadable
    /// ones (noted); a checkpoint of a different run (model, data, settings) is refused with what
    /// changed, or with `force` accepted where a resumed run can survive the change.
    pub(super) fn resume(&mut self, from: &Resume) -> Result<()> {
        let root = self.checkpoints();
        let candidates: Vec<PathBuf> = match from {
            Resume::Latest => {
                let mut all = list_checkpoints(&root);
                all.sort_by_key(|c| std::cmp::Reverse((c.saved_at, c.step)));
                all.into_iter().map(|c| c.dir).collect()
            }
            Resume::From(dir) => vec![dir.clone()],
        };
        if candidates.is_empty() {
            return Err(TrainError::setting(
                "resume",
                format!("latest: no checkpoint in {}", root.display()),
            ));
        }
        let mut unreadable = Vec::new();
        let loaded = candidates
            .iter()
            .find_map(|dir| match self.read_checkpoint(dir) {
                Ok(l) => Some(l),
                Err(e) => {
                    unreadable.push(format!("{}: {e}", dir.display()));
                    None
                }
            });
        let Some(loaded) = loaded else {
            return Err(TrainError::setting(
                "resume",
                format!("no readable checkpoint: {}", unreadable.join("; ")),
            ));
        };
        for u in unreadable {
            self.notes
                .push(format!("skipped an unreadable checkpoint: {u}"));
        }
        self.check_compatible(&loaded)?;
        let Loaded {
            dir,
            state,
            weights,
            records,
        } = loaded;
        let model = match self.model.take() {
            Some(m) => load_trainable(m, &weights, &self.device)?,
            None => unreachable!("the model is only taken inside an optimizer step"),
        };
        let by_stable: HashMap<ParamId, ParamId> = model
            .named_parameters()
            .iter()
            .map(|p| (stable_id(&p.name), p.id))
            .collect();
        self.model = Some(model);
        for (opt, rec) in [&mut self.optim.decay, &mut self.optim.plain]
            .into_iter()
            .zip(records)
        {
            let rec = rec
                .into_iter()
                .filter_map(|(k, v)| by_stable.get(&k).map(|id| (*id, v)))
                .collect();
            *opt = opt.clone().load_record(rec);
        }
        self.data.stream.restore(state.cursor)?;
        self.step = state.step;
        self.eval_before = state.eval_before;
        self.tasks_before = state.tasks_before;
        if let Some(m) = state.manifest {
            self.manifest.run_id = m.run_id;
        }
        self.losses = state.history.losses;
        self.evals = state.history.evals;
        self.tokens = state.history.tokens;
        self.seconds_before = state.history.seconds;
        self.last_checkpoint = Some(dir.clone());
        self.resumed = Some((dir, state.step));
        Ok(())
    }

    /// Read a checkpoint's state, weights' headers and optimizer records without applying them.
    fn read_checkpoint(&self, dir: &Path) -> Result<Loaded<B>> {
        let state: RunState = read_json(&dir.join("state.json"))?;
        let weights = Checkpoint::open(dir)?;
        // Names and shapes against the model, so that applying them cannot fail half-way.
        let shapes: HashMap<String, Vec<usize>> = self
            .model()
            .named_parameters()
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        for name in weights.names() {
            let found = weights.meta(name).map(|m| m.shape);
            if found.as_ref() != shapes.get(name) {
                return Err(TrainError::Invalid(format!(
                    "{}: tensor {name:?} has shape {found:?}, the model's is {:?}",
                    dir.display(),
                    shapes.get(name)
                )));
            }
        }
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        let read = |file: &str| -> Result<OptRecord<B>> {
            let path = dir.join(file);
            recorder.load(path.clone(), &self.device).map_err(|e| {
                TrainError::Invalid(format!(
                    "{}: cannot read optimizer state: {e}",
                    path.display()
                ))
            })
        };
        let records = [read(OPTIMIZER_FILES[0])?, read(OPTIMIZER_FILES[1])?];
        Ok(Loaded {
            dir: dir.to_path_buf(),
            state,
            weights,
            records,
        })
    }

    /// Refuse a checkpoint written by a different run; list what differs.
    fn check_compatible(&mut self, loaded: &Loaded<B>) -> Result<()> {
        let (state, dir) = (&loaded.state, &loaded.dir);
        if state.step > self.total_steps() {
            return Err(TrainError::setting(
                "resume",
                format!(
                    "{} is at step {}, past the end of this run ({} steps): give more steps \
                     (max_steps) to continue it",
                    dir.display(),
                    state.step,
                    self.total_steps()
                ),
            ));
        }
        let trainable = &self.info.summary.trainable_names;
        let changes = changes(
            state,
            &self.config,
            self.collective.world(),
            &self.manifest,
            trainable,
        )?;
        if changes.is_empty() {
            return Ok(());
        }
        let refused = changes.iter().any(|c| !(c.forceable && self.config.force));
        let lines: Vec<String> = changes
            .iter()
            .map(|c| {
                format!(
                    "  - {} ({})",
                    c.what,
                    if c.forceable {
                        "accepted with force"
                    } else {
                        "cannot be resumed"
                    }
                )
            })
            .collect();
        if refused {
            return Err(TrainError::setting(
                "resume",
                format!(
                    "{} (step {}) was written by a different run; what changed:\n{}",
                    dir.display(),
                    state.step,
                    lines.join("\n")
                ),
            ));
        }
        self.notes.push(format!(
            "resuming {} with changes accepted by force:\n{}",
            dir.display(),
            lines.join("\n")
        ));
        Ok(())
    }

    /// Write the trained model as a HuggingFace directory to `OUTPUT/model` (LoRA adapters merged;
    /// mixed precision exports in the compute dtype, as the base usually is), `report.json` and the
    /// model's README. Call after the last step (and [`Trainer::evaluate`], for the "after" of the
    /// report); [`Trainer::finish`] does all three.
    pub fn export(&mut self) -> Result<TrainReport> {
        self.claim_output()?;
        let mut report = self.report(false);
        if let Some((_, r)) = self.latest_eval.as_ref().filter(|(s, _)| *s == self.step) {
            report.eval_after = r.clone();
        }
        let out = self.config.output.join("model");
        if self.collective.rank() != 0 {
            // The worker of rank 0 writes it (on its node).
            return Ok(report);
        }
        let dtype = self.config.dtype;
        save_pretrained(
            &self.model().valid().merge_lora(),
            &self.info.hf,
            Some(&self.info.dir),
            &out,
            &SaveOptions {
                overwrite: true,
                dtype: (dtype != DType::F32).then_some(dtype),
                ..Default::default()
            },
        )?;
        // A model fine-tuned on conversations through a template it did not have (built-in or
        // a file) carries that template, so that `chat`, transformers' `apply_chat_template`
        // and the next stage render conversations as training did.
        if self.config.stage == crate::config::Stage::Sft
            && let Some(choice) = &self.config.template
        {
            let t = llama_pro_core::ChatTemplate::load(&self.info.dir, Some(choice))?;
            write_file_atomic(&out.join("chat_template.jinja"), t.source().as_bytes())?;
        }
        report.model_dir = Some(out.clone());
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| TrainError::Invalid(format!("serializing the report: {e}")))?;
        write_file_atomic(&self.config.output.join("report.json"), json.as_bytes())?;
        let selection = self.info.selection.to_string();
        report::write_run_readme(&out, &self.config, &selection, &report)?;
        Ok(report)
    }
}

/// A difference between the run that wrote a checkpoint and the run that resumes it.
struct Change {
    what: String,
    forceable: bool,
}

/// Settings that decide which windows the data stream yields or which parameters exist: a
/// resumed run with another value would not continue the same run.
pub(super) const NEVER: &[&str] = &[
    "method",
    "random_init",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "trainable",
    "seq_len",
    "packing",
    "stage",
    "format",
    "template",
    "train_on_prompt",
    "mask_history",
    "seed",
    "val_fraction",
];

/// Settings a resumed run survives (the optimizer state and data position stay meaningful), but
/// that make it differ from an uninterrupted run: accepted with `force`.
pub(super) const WITH_FORCE: &[&str] = &[
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "lr_schedule",
    "warmup_ratio",
    "min_lr",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "clip_grad_norm",
    "lr_scale",
    "dtype",
];

fn changes(
    state: &RunState,
    config: &TrainConfig,
    workers: usize,
    manifest: &Manifest,
    trainable: &[String],
) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let never = |what: String| Change {
        what,
        forceable: false,
    };
    if state.trainable_names != trainable {
        out.push(never(format!(
            "the trainable parameters: {} in the checkpoint, {} now",
            state.trainable_names.len(),
            trainable.len()
        )));
    }
    let (old_cfg, new_cfg) = (to_json(&state.config)?, to_json(config)?);
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    for key in NEVER.iter().chain(WITH_FORCE) {
        let (a, b) = (old_cfg.get(key), new_cfg.get(key));
        if *key == "batch_size" {
            // What continues the run is the global batch: any number of workers may resume it.
            let (x, y) = (state.config.batch_size, config.batch_size);
            if x * state.workers != y * workers {
                let what = if state.workers == 1 && workers == 1 {
                    format!("batch_size: {x} -> {y}")
                } else {
                    format!(
                        "the batch (batch_size x workers): {x} x {} = {} -> {y} x {workers} = {}",
                        state.workers,
                        x * state.workers,
                        y * workers
                    )
                };
                out.push(Change {
                    what,
                    forceable: true,
                });
            }
            continue;
        }
        if a == b {
            continue;
        }
        let wd = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_f64()).unwrap_or(0.0) > 0.0;
        // Weight decay on or off moves parameters between the two optimizers (and their state).
        let forceable = WITH_FORCE.contains(key) && !(*key == "weight_decay" && wd(a) != wd(b));
        out.push(Change {
            what: format!("{key}: {} -> {}", show(a), show(b)),
            forceable,
        });
    }
    match &state.manifest {
        Some(m) => {
            if m.model != manifest.model {
                out.push(never(format!(
                    "the model: {} is not the model the checkpoint trained (fingerprint {} -> {})",
                    config.model.display(),
                    short(&m.model),
                    short(&manifest.model)
                )));
            }
            if m.data.len() != manifest.data.len() {
                out.push(never(format!(
                    "the data: {} files -> {}",
                    m.data.len(),
                    manifest.data.len()
                )));
            }
            for (i, (a, b)) in m.data.iter().zip(&manifest.data).enumerate() {
                if a.digest != b.digest {
                    out.push(never(format!(
                        "data file {i} ({}): its contents differ ({} bytes, sha256 {} -> {} bytes, sha256 {})",
                        b.path.display(),
                        a.digest.bytes,
                        short(&a.digest.sha256),
                        b.digest.bytes,
                        short(&b.digest.sha256)
                    )));
                }
                if a.weight != b.weight {
                    out.push(Change {
                        what: format!(
                            "data file {i} ({}): weight {} -> {}",
                            b.path.display(),
                            a.weight,
                            b.weight
                        ),
                        forceable: true,
                    });
                }
            }
        }
        // A checkpoint from before manifests: the files as named.
        None => {
            let (a, b) = (old_cfg.get("data"), new_cfg.get("data"));
            if a != b {
                out.push(never(format!("data: {} -> {}", show(a), show(b))));
            }
        }
    }
    Ok(out)
}

fn short(s: &str) -> &str {
    let tail = s.rsplit(':').next().unwrap_or(s);
    &tail[..tail.len().min(12)]
}

/// Stable id of a parameter across runs (FNV-1a of its HF name): optimizer state is saved under
/// it, because burn's `ParamId`s are fresh random numbers every time a model is loaded.
fn stable_id(name: &str) -> ParamId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ParamId::from(h)
}

/// Replace the parameters stored in `ckpt` (keeping ids and trainability).
fn load_trainable<B: AutodiffBackend>(
    model: LlamaForCausalLM<B>,
    ckpt: &Checkpoint,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>> {
    struct M<'a, B: AutodiffBackend> {
        ckpt: &'a Checkpoint,
        device: B::Device,
        err: Option<TrainError>,
        loaded: usize,
    }
    impl<B: AutodiffBackend> NamedMapper<B> for M<'_, B> {
        fn map<const D: usize>(
            &mut self,
            name: &str,
            param: Param<Tensor<B, D>>,
        ) -> Param<Tensor<B, D>> {
            if self.ckpt.meta(name).is_none() {
                return param;
            }
            let shape: Vec<usize> = param.shape().dims::<D>().to_vec();
            match self.ckpt.read_f32(name, &shape) {
                Ok(values) => {
                    self.loaded += 1;
                    let (id, old, mapper) = param.consume();
                    let rg = old.is_require_grad();
                    let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), &self.device)
                        .set_require_grad(rg);
                    Param::from_mapped_value(id, t, mapper)
                }
                Err(e) => {
                    self.err.get_or_insert(e.into());
                    param
                }
            }
        }
    }
    let mut m = M::<B> {
        ckpt,
        device: device.clone(),
        err: None,
        loaded: 0,
    };
    let model = map_named(model, &mut m);
    if let Some(e) = m.err {
        return Err(e);
    }
    let expected = ckpt.names().count();
    if m.loaded != expected {
        return Err(TrainError::Invalid(format!(
            "{}: {} tensors in the checkpoint but {} matched the model",
            ckpt.dir().display(),
            expected,
            m.loaded
        )));
    }
    Ok(model)
}

/// A checkpoint under `checkpoints/` (committed: it has `state.json`).
struct Listed {
    dir: PathBuf,
    step: usize,
    run_id: Option<String>,
    saved_at: u64,
}

/// Checkpoints under `root`, with what their `state.json` says of the run (`run_id` `None` when
/// it cannot be read or predates manifests).
fn list_checkpoints(root: &Path) -> Vec<Listed> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        manifest: Option<IdOnly>,
        #[serde(default)]
        saved_at: u64,
    }
    #[derive(Deserialize)]
    struct IdOnly {
        run_id: String,
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            let state = e.path().join("state.json");
            if !state.exists() {
                return None;
            }
            let head: Option<Head> = std::fs::read_to_string(&state)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            Some(Listed {
                dir: e.path(),
                step,
                run_id: head
                    .as_ref()
                    .and_then(|h| h.manifest.as_ref().map(|m| m.run_id.clone())),
                saved_at: head.map_or(0, |h| h.saved_at),
            })
        })
        .collect()
}

/// The checkpoint to continue under `root`: the most recently written one (by its `state.json`),
/// the highest step among equals.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(root)
        .into_iter()
        .max_by_key(|c| (c.saved_at, c.step))
        .map(|c| c.dir))
}

fn to_json(v: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| TrainError::Invalid(format!("serializing a report: {e}")))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: path.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })
}
