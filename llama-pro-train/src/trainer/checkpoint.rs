//! Checkpoints (the trainable weights, both optimizers' state, the data position and the run's
//! state, written to a temporary directory and renamed), exact resume, and the final export.
//!
//! Layout of `OUTPUT/checkpoints/step-N/`: `model.safetensors` (trainable tensors, f32, HF names),
//! `optimizer-decay.bin` and `optimizer-plain.bin` (burn's AdamW records under ids derived from
//! the parameter names, since burn's `ParamId`s are new random numbers each time a model is
//! loaded), `state.json` (step, data cursor, the evaluation before training, the configuration,
//! the trainable names).

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
    OwnedTensor, SaveOptions, begin_atomic_dir, commit_atomic_dir, save_pretrained, write_json,
    write_weights,
};
use llama_pro_core::weights::Checkpoint;
use llama_pro_core::{DType, LlamaForCausalLM};
use serde::{Deserialize, Serialize};

use crate::config::{Resume, TrainConfig};
use crate::dataset::DataCursor;
use crate::error::{Result, TrainError};
use crate::eval::EvalResult;

use super::setup::OptRecord;
use super::{TrainReport, Trainer, report};

/// State saved next to the weights in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    step: usize,
    cursor: DataCursor,
    eval_before: BTreeMap<String, EvalResult>,
    config: TrainConfig,
    trainable_names: Vec<String>,
}

const OPTIMIZER_FILES: [&str; 2] = ["optimizer-decay", "optimizer-plain"];

impl<B: AutodiffBackend> Trainer<B> {
    /// The checkpoint directory of this run.
    fn checkpoints(&self) -> PathBuf {
        self.config.output.join("checkpoints")
    }

    /// Write a checkpoint of the current step to `OUTPUT/checkpoints/step-N` (a temporary
    /// directory renamed into place) and keep the newest `keep` checkpoints. Returns its path.
    pub fn save(&mut self) -> Result<PathBuf> {
        let root = self.checkpoints();
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
            config: self.config.clone(),
            trainable_names: trainable.clone(),
        };
        write_json(&tmp.join("state.json"), &to_json(&state)?)?;
        commit_atomic_dir(&tmp, &out)?;
        // Keep the newest `keep` checkpoints.
        let mut all = list_checkpoints(&root);
        all.sort();
        while all.len() > self.config.keep {
            let (_, p) = all.remove(0);
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(out)
    }

    /// Continue from a checkpoint: trainable weights, optimizer state, data position, step.
    pub(super) fn resume(&mut self, from: &Resume) -> Result<()> {
        let root = self.checkpoints();
        let dir = match from {
            Resume::Latest => latest_checkpoint(&root)?.ok_or_else(|| {
                TrainError::setting(
                    "resume",
                    format!("latest: no checkpoint in {}", root.display()),
                )
            })?,
            Resume::From(dir) => dir.clone(),
        };
        let state: RunState = read_json(&dir.join("state.json"))?;
        if state.trainable_names != self.info.summary.trainable_names {
            return Err(TrainError::Invalid(format!(
                "{}: the checkpoint trained other parameters than this run's selection ({})",
                dir.display(),
                self.info.selection
            )));
        }
        // Called by `Trainer::new` only: on an error the trainer is dropped with its model.
        let model = match self.model.take() {
            Some(m) => load_trainable(m, &Checkpoint::open(&dir)?, &self.device)?,
            None => unreachable!("the model is only taken inside an optimizer step"),
        };
        let by_stable: HashMap<ParamId, ParamId> = model
            .named_parameters()
            .iter()
            .map(|p| (stable_id(&p.name), p.id))
            .collect();
        self.model = Some(model);
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        for (file, opt) in OPTIMIZER_FILES
            .iter()
            .zip([&mut self.optim.decay, &mut self.optim.plain])
        {
            let path = dir.join(file);
            let rec: OptRecord<B> = recorder.load(path.clone(), &self.device).map_err(|e| {
                TrainError::Invalid(format!(
                    "{}: cannot read optimizer state: {e}",
                    path.display()
                ))
            })?;
            let rec = rec
                .into_iter()
                .filter_map(|(k, v)| by_stable.get(&k).map(|id| (*id, v)))
                .collect();
            *opt = opt.clone().load_record(rec);
        }
        self.data.stream.restore(state.cursor)?;
        self.step = state.step;
        self.eval_before = state.eval_before;
        self.resumed = Some((dir, state.step));
        Ok(())
    }

    /// Write the trained model as a HuggingFace directory to `OUTPUT/model` (LoRA adapters merged;
    /// mixed precision exports in the compute dtype, as the base usually is), `report.json` and the
    /// model's README. Call after the last step (and [`Trainer::evaluate`], for the "after" of the
    /// report); [`Trainer::finish`] does all three.
    pub fn export(self) -> Result<TrainReport> {
        let mut report = self.report(false);
        if let Some((_, r)) = self.latest_eval.as_ref().filter(|(s, _)| *s == self.step) {
            report.eval_after = r.clone();
        }
        let out = self.config.output.join("model");
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
        report.model_dir = Some(out.clone());
        write_json(&self.config.output.join("report.json"), &to_json(&report)?)?;
        let selection = self.info.selection.to_string();
        report::write_run_readme(&out, &self.config, &selection, &report)?;
        Ok(report)
    }
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

/// Checkpoints under `root` as (step, directory); those without `state.json` (not committed) are
/// left out.
fn list_checkpoints(root: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            e.path().join("state.json").exists().then(|| (n, e.path()))
        })
        .collect()
}

/// The checkpoint with the highest step under `root`.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(root).into_iter().max().map(|(_, p)| p))
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
