//! Setting a run up: the model (loaded or randomly initialised, adapters, trainable selection,
//! mixed precision), the data (training sources, evaluation sets or a held-out split), the
//! parameter groups, the optimizer and the FLOPs estimate.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::optim::Optimizer;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use llama_pro_core::burn;
use llama_pro_core::expand::{LayerMap, layer_of};
use llama_pro_core::freeze::{SelectContext, Selection, TrainableSummary, set_trainable};
use llama_pro_core::model::LlamaForCausalLM;
use llama_pro_core::weights::Checkpoint;
use llama_pro_core::{DType, HfConfig, Tokenizer};

use crate::config::{DataSource, Method, PackMode, Stage, TrainConfig};
use crate::dataset::{
    ChatData, DataContext, Example, ExampleStream, Source, load_source, pack_neat, split_validation,
};
use crate::error::{Result, TrainError};
use crate::optim::FusedAdamW;
use crate::sft::{Encoder, LabelMode};
use llama_pro_core::ChatTemplate;

use super::{Event, Observer};

/// The model of a run, ready to train: weights loaded (or randomly initialised), LoRA adapters
/// attached, exactly the selected parameters trainable, frozen ones cast for mixed precision.
pub struct TrainModel<B: AutodiffBackend> {
    /// The model.
    pub model: LlamaForCausalLM<B>,
    /// Where it came from and what trains.
    pub info: ModelInfo,
}

/// Everything about a run's model besides its weights.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Its configuration (exported with the trained weights).
    pub hf: HfConfig,
    /// The model directory it came from (tokenizer and support files are copied from there).
    pub dir: PathBuf,
    /// Which blocks are new (from `config.json`).
    pub map: LayerMap,
    /// What trains.
    pub selection: Selection,
    /// Trainable and total parameters per group, and the trainable names.
    pub summary: TrainableSummary,
    /// The model's tokenizer, if the directory has one.
    pub tokenizer: Option<Tokenizer>,
    /// Its `tokenizer.json`.
    tokenizer_file: Option<PathBuf>,
    /// What identifies the starting weights (a resumed run must start from the same): the
    /// checkpoint's sampled fingerprint, or one of the configuration and seed for a random
    /// initialisation, or of the parameters for a model given in memory.
    pub fingerprint: String,
}

impl<B: AutodiffBackend> TrainModel<B> {
    /// Load `config.model` onto `device` (or initialise it randomly with `config.random_init`)
    /// and prepare it as [`TrainModel::new`] does.
    pub fn load(
        config: &TrainConfig,
        device: &B::Device,
        observer: &mut dyn Observer,
    ) -> Result<Self> {
        let dir = crate::data::existing(&config.model)?;
        let (model, hf, fingerprint) = if config.random_init {
            let hf = HfConfig::from_path(&dir)?;
            let mut c = hf.config.clone();
            c.dtype = DType::F32;
            observer.on_event(&Event::Info(&format!(
                "random initialisation of {} ({} parameters, seed {})",
                hf.path.display(),
                c.num_params(),
                config.seed
            )));
            let fingerprint = format!("random-init:{}", crate::data::file_digest(&hf.path)?.sha256);
            (c.init::<B>(device, config.seed), hf, fingerprint)
        } else {
            let ckpt = Checkpoint::open(&dir)?;
            if config.check_finite {
                ckpt.check_finite()?;
            }
            let hf = HfConfig::from_path(&dir)?;
            let model =
                LlamaForCausalLM::<B>::from_checkpoint(&hf.config, &ckpt, device, DType::F32)?;
            let fingerprint = format!("checkpoint:{}", ckpt.fingerprint()?);
            (model, hf, fingerprint)
        };
        let map = LayerMap::from_config(&hf.raw, hf.config.num_hidden_layers, &hf.path)?;
        Self::prepare(config, model, hf, map, &dir, fingerprint, observer)
    }

    /// Prepare a model that is already in memory (f32 weights), e.g. one expanded with
    /// [`expand_model`](llama_pro_core::expand::expand_model): LoRA adapters attached for
    /// `Method::Lora`, exactly the configured selection trainable (new blocks per `map`), frozen
    /// weights cast for mixed precision. `hf` is the configuration exported with the trained
    /// weights (its `num_hidden_layers` and layer map should describe `model`); `dir` the
    /// directory whose tokenizer and support files go with the export.
    pub fn new(
        config: &TrainConfig,
        model: LlamaForCausalLM<B>,
        hf: HfConfig,
        map: LayerMap,
        dir: &Path,
        observer: &mut dyn Observer,
    ) -> Result<Self> {
        let fingerprint = format!("memory:{}", parameters_fingerprint(&model)?);
        Self::prepare(config, model, hf, map, dir, fingerprint, observer)
    }

    fn prepare(
        config: &TrainConfig,
        model: LlamaForCausalLM<B>,
        hf: HfConfig,
        map: LayerMap,
        dir: &Path,
        fingerprint: String,
        observer: &mut dyn Observer,
    ) -> Result<Self> {
        let device = model.model.embed_tokens.weight.val().device();
        let model = match config.method {
            Method::Lora => {
                let lora = llama_pro_core::linear::LoraConfig {
                    rank: config.lora_rank,
                    alpha: config.lora_alpha,
                    targets: config.lora_targets.clone(),
                };
                model.with_lora(&lora, config.seed)?
            }
            _ => model,
        };
        let selection = config.selection(model.config.num_hidden_layers)?;
        let (mut model, summary) = set_trainable(model, &selection, &map)?;
        observer.on_event(&Event::Info(&format!(
            "trainable parameters ({selection}):\n{summary}"
        )));
        if config.dtype != DType::F32 {
            check_dtype_support::<B>(&device, config.dtype)?;
            model = model.mixed_precision(config.dtype);
            observer.on_event(&Event::Info(&format!(
                "mixed precision: frozen weights and activations in {}, trainable weights and AdamW state in f32",
                config.dtype
            )));
        }
        if config.activation_checkpointing
            && config.dtype == DType::F32
            && llama_pro_core::ops::has_kernels::<B>()
        {
            observer.on_event(&Event::Warning(
                "activation checkpointing saves no memory on the CPU in f32: the fused CPU kernels \
                 already keep only what their backward needs (it applies to the GPU backends and to bf16/f16)",
            ));
        }
        let tokenizer_file = Some(dir.join("tokenizer.json")).filter(|f| f.exists());
        let tokenizer = match &tokenizer_file {
            Some(_) => {
                let c = &hf.config;
                Some(Tokenizer::from_dir(dir, c.bos_token_id, &c.eos_token_ids)?)
            }
            None => None,
        };
        let info = ModelInfo {
            hf,
            dir: dir.to_path_buf(),
            map,
            selection,
            summary,
            tokenizer,
            tokenizer_file,
            fingerprint,
        };
        Ok(Self { model, info })
    }
}

impl ModelInfo {
    /// How data files are read for this model (tokenizer, vocabulary, EOS) under `config`,
    /// through the token cache in `cache` if given.
    pub fn data_context<'a>(
        &'a self,
        config: &TrainConfig,
        cache: Option<&'a Path>,
    ) -> DataContext<'a> {
        let c = &self.hf.config;
        DataContext {
            tokenizer: self.tokenizer.as_ref(),
            tokenizer_file: self.tokenizer_file.as_deref(),
            vocab_size: c.vocab_size,
            seq_len: config.seq_len,
            packing: config.packing,
            chat: None,
            eos: self
                .tokenizer
                .as_ref()
                .and_then(|t| t.eos_token_ids.first().copied())
                .or(c.eos_token_ids.first().copied()),
            cache,
        }
    }
}

/// SHA-256 over every parameter's name, shape and up to 16 samples of 1024 of its values.
fn parameters_fingerprint<B: AutodiffBackend>(model: &LlamaForCausalLM<B>) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in model.named_parameters() {
        h.update(p.name.as_bytes());
        h.update(format!("{:?}", p.shape).as_bytes());
        let values = p
            .value
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Invalid(format!("reading {}: {e:?}", p.name)))?;
        let chunk = 1024.min(values.len());
        let stride = (values.len() - chunk) / 15;
        for k in 0..16 {
            for v in &values[k * stride..k * stride + chunk] {
                h.update(v.to_le_bytes());
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fail with a clear error if the backend cannot compute in `dtype` (burn panics on an
/// unsupported dtype deep inside a kernel): a small matmul, cast and reduction, forward only.
fn check_dtype_support<B: AutodiffBackend>(device: &B::Device, dtype: DType) -> Result<()> {
    let device = device.clone();
    let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let a = Tensor::<B::InnerBackend, 2>::ones([4, 4], &device)
            .cast(burn::tensor::FloatDType::from(dtype.burn()));
        let s = a
            .clone()
            .matmul(a)
            .exp()
            .sum()
            .cast(burn::tensor::FloatDType::F32);
        burn::tensor::ElementConversion::elem::<f64>(s.into_scalar())
    }));
    match probe {
        Ok(v) if v.is_finite() => Ok(()),
        _ => Err(TrainError::setting(
            "dtype",
            format!(
                "{dtype}: this backend ({}) cannot compute in {}; use f32{}",
                std::any::type_name::<B::InnerBackend>(),
                dtype.hf_name(),
                if dtype == DType::F16 {
                    " or bf16"
                } else {
                    " or f16"
                }
            ),
        )),
    }
}

/// The data of a run: the stream of training examples and the evaluation sets.
pub struct TrainData {
    /// Training examples in a seeded, resumable order.
    pub stream: ExampleStream,
    /// Evaluation sets by name: examples read like the training data (never packed).
    pub eval_sets: Vec<(String, Vec<Example>)>,
}

impl TrainData {
    /// Read the training files and evaluation sets of `config` for `model` (through the token
    /// cache when `config.token_cache`). Without evaluation sets, `config.val_fraction` of the
    /// training windows is held out as the set `val`.
    pub fn load<B: AutodiffBackend>(
        config: &TrainConfig,
        model: &TrainModel<B>,
        observer: &mut dyn Observer,
    ) -> Result<Self> {
        let cache = config.token_cache.then(crate::data::default_cache_dir);
        let mut ctx = model.info.data_context(config, cache.as_deref());
        // Supervised fine-tuning: conversations through the model's chat template. A model
        // without one can still train on pre-tokenized `input_ids` + `labels` lines: the reason
        // is kept for the first conversation met.
        let (template, missing) = match config.stage {
            Stage::Sft => match ChatTemplate::load(&config.model, config.template.as_deref()) {
                Ok(t) => (Some(t), String::new()),
                Err(e) => (None, e.to_string()),
            },
            Stage::Pretrain => (None, String::new()),
        };
        let mode = LabelMode::from_flags(config.train_on_prompt, config.mask_history)?;
        let encoder = match (&template, model.info.tokenizer.as_ref()) {
            (Some(template), Some(tokenizer)) => Some(Encoder {
                template,
                tokenizer,
                mode,
            }),
            _ => None,
        };
        let missing = if template.is_some() && encoder.is_none() {
            format!(
                "the model directory {} has no tokenizer.json",
                config.model.display()
            )
        } else {
            missing
        };
        if let (Some(e), Some(t)) = (&encoder, &template) {
            observer.on_event(&Event::Info(&format!(
                "chat template: {}; loss on {}",
                t.origin(),
                match e.mode {
                    LabelMode::Assistant => "every answer",
                    LabelMode::All => "every token (train_on_prompt)",
                    LabelMode::Last => "the last answer (mask_history)",
                }
            )));
        }
        if config.stage == Stage::Sft {
            ctx.chat = Some(ChatData {
                encoder: encoder.as_ref(),
                format: config.format,
                missing: &missing,
            });
        }
        let mut sources: Vec<Source> = config
            .data
            .iter()
            .map(|d| load_source(d, &ctx, observer))
            .collect::<Result<_>>()?;
        let mut eval_sets = Vec::new();
        for e in &config.eval {
            let windows = load_source(&DataSource::new(&e.path), &ctx, observer)?.windows;
            eval_sets.push((e.name.clone(), spread(windows, config.eval_max_sequences)));
        }
        if eval_sets.is_empty() {
            let (val, taken) = split_validation(&mut sources, config.val_fraction, config.seed);
            for (s, k) in sources.iter().zip(&taken) {
                let n = s.windows.len() + k;
                let line = if *k > 0 {
                    format!(
                        "held out {k} of the {n} training windows of {} as the evaluation set `val` (val_fraction {})",
                        s.path.display(),
                        config.val_fraction
                    )
                } else {
                    format!(
                        "no evaluation windows held out of {}: its {n} windows are too few for val_fraction {} \
                         (give an evaluation set to evaluate)",
                        s.path.display(),
                        config.val_fraction
                    )
                };
                if config.val_fraction > 0.0 {
                    observer.on_event(&Event::Info(&line));
                }
            }
            if !val.is_empty() {
                eval_sets.push(("val".into(), val));
            }
        }
        if config.packing == PackMode::Neat {
            for s in &mut sources {
                let n = s.windows.len();
                s.windows = pack_neat(std::mem::take(&mut s.windows), config.seq_len);
                observer.on_event(&Event::Info(&format!(
                    "{}: {n} examples packed into {} rows of {} tokens (neat packing: no attention across examples)",
                    s.path.display(),
                    s.windows.len(),
                    config.seq_len
                )));
            }
        }
        Ok(Self {
            stream: ExampleStream::new(sources, config.seed),
            eval_sets,
        })
    }
}

/// At most `max` items, evenly spaced (all of them when `max` is `None` or not smaller).
fn spread<T>(items: Vec<T>, max: Option<usize>) -> Vec<T> {
    match max {
        Some(m) if m > 0 && m < items.len() => {
            let n = items.len();
            let keep: HashSet<usize> = (0..m).map(|i| i * n / m).collect();
            items
                .into_iter()
                .enumerate()
                .filter(|(i, _)| keep.contains(i))
                .map(|(_, x)| x)
                .collect()
        }
        _ => items,
    }
}

/// A set of trainable parameters stepped with one learning-rate factor and one weight decay.
#[derive(Debug, Clone)]
pub(super) struct Group {
    pub(super) label: String,
    pub(super) ids: HashSet<ParamId>,
    pub(super) lr_scale: f64,
    pub(super) decay: bool,
}

/// Parameter groups: decay only on >= 2-D tensors (and only with a weight decay); a learning-rate
/// factor from the first `lr_scale` entry whose selection matches.
pub(super) fn parameter_groups<B: AutodiffBackend>(
    config: &TrainConfig,
    model: &LlamaForCausalLM<B>,
    info: &ModelInfo,
) -> Vec<Group> {
    let ctx = SelectContext {
        map: &info.map,
        tied: info.hf.config.tie_word_embeddings,
    };
    let mut groups: Vec<Group> = Vec::new();
    for p in model
        .named_parameters()
        .iter()
        .filter(|p| info.summary.trainable_names.contains(&p.name))
    {
        let decay = p.shape.len() >= 2 && config.weight_decay > 0.0;
        let (label, lr_scale) = config
            .lr_scale
            .iter()
            .find(|s| s.selection.matches(&p.name, &ctx))
            .map(|s| (format!("{} x{} ", s.selection, s.factor), s.factor))
            .unwrap_or_else(|| (String::new(), 1.0));
        let key = format!("{label}{}", if decay { "decay" } else { "no decay" });
        match groups.iter_mut().find(|g| g.label == key) {
            Some(g) => {
                g.ids.insert(p.id);
            }
            None => groups.push(Group {
                label: key,
                ids: HashSet::from([p.id]),
                lr_scale,
                decay,
            }),
        }
    }
    groups
}

/// Model FLOPs per trained token of this selection (see [`crate::flops`]).
pub(super) fn flops_per_token<B: AutodiffBackend>(
    config: &TrainConfig,
    model: &LlamaForCausalLM<B>,
    info: &ModelInfo,
) -> f64 {
    let c = &info.hf.config;
    let named = model.named_parameters();
    let trainable: Vec<_> = named
        .iter()
        .filter(|p| info.summary.trainable_names.contains(&p.name))
        .collect();
    let lowest = trainable
        .iter()
        .filter_map(|p| layer_of(&p.name).map(|(i, _)| i))
        .min();
    let embeddings = trainable
        .iter()
        .any(|p| p.name.starts_with("model.embed_tokens."));
    let matmul: usize = trainable
        .iter()
        .filter(|p| {
            p.shape.len() == 2
                && (c.tie_word_embeddings || !p.name.starts_with("model.embed_tokens."))
        })
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    crate::flops::train_flops_per_token(c, config.seq_len, lowest, embeddings, matmul)
}

/// The device's peak FLOP/s for the MFU, and where the figure came from.
pub(super) fn peak_flops(config: &TrainConfig) -> Option<(f64, String)> {
    match config.peak_tflops {
        Some(t) => Some((t * 1e12, "the peak_tflops setting".to_string())),
        None if config.primary_device() == llama_pro_core::device::DeviceSpec::Cpu => {
            crate::flops::cpu_peak_flops()
        }
        None => None,
    }
}

/// burn's optimizer over the model with the fused AdamW update.
pub(super) type Optim<B> =
    burn::optim::adaptor::OptimizerAdaptor<FusedAdamW, LlamaForCausalLM<B>, B>;
/// burn's optimizer state: per-`ParamId` moments and step counts.
pub(super) type OptRecord<B> = <Optim<B> as Optimizer<LlamaForCausalLM<B>, B>>::Record;

/// AdamW for the parameters with weight decay and for those without.
pub(super) struct Optimizers<B: AutodiffBackend> {
    pub(super) decay: Optim<B>,
    pub(super) plain: Optim<B>,
}

impl<B: AutodiffBackend> Optimizers<B> {
    pub(super) fn new(config: &TrainConfig) -> Self {
        let adamw = |wd: f64| {
            FusedAdamW::new(
                config.adam_beta1 as f32,
                config.adam_beta2 as f32,
                config.adam_eps as f32,
                wd as f32,
            )
            .init::<B, LlamaForCausalLM<B>>()
        };
        Self {
            decay: adamw(config.weight_decay),
            plain: adamw(0.0),
        }
    }

    /// The optimizer of a group.
    pub(super) fn of(&mut self, group: &Group) -> &mut Optim<B> {
        if group.decay {
            &mut self.decay
        } else {
            &mut self.plain
        }
    }
}
