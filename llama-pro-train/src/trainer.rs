//! The training loop: continued pretraining of the selected parameters (by default the expanded
//! blocks) with AdamW, warmup + decay, global-norm clipping and gradient accumulation; periodic
//! evaluation, checkpoints with exact resume, and a final HuggingFace export.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};

use crate::optim::FusedAdamW;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use llama_pro_core::burn;
use llama_pro_core::expand::LayerMap;
use llama_pro_core::freeze::{SelectContext, Selection, TrainableSummary, set_trainable};
use llama_pro_core::model::{LlamaForCausalLM, causal_lm_loss_sum};
use llama_pro_core::save::{
    OwnedTensor, SaveOptions, begin_atomic_dir, commit_atomic_dir, save_pretrained, write_json,
    write_weights,
};
use llama_pro_core::weights::Checkpoint;
use llama_pro_core::{DType, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::dataset::{DataCursor, ExampleStream, Source, load_source, split_validation};
use crate::error::{Result, TrainError};
use crate::eval::{EvalResult, evaluate, pad_batch};
use crate::schedule::Schedule;

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

type Optim<B> = burn::optim::adaptor::OptimizerAdaptor<FusedAdamW, LlamaForCausalLM<B>, B>;
/// burn's optimizer state: per-`ParamId` moments and step counts.
type OptRecord<B> = <Optim<B> as Optimizer<LlamaForCausalLM<B>, B>>::Record;

/// A set of trainable parameters stepped with one learning-rate factor and one weight decay.
#[derive(Debug, Clone)]
struct Group {
    label: String,
    ids: HashSet<ParamId>,
    lr_scale: f64,
    decay: bool,
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Mean loss of the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Gradient norm per parameter group (before clipping).
    pub group_grad_norms: BTreeMap<String, f64>,
    /// Tokens in the step's loss.
    pub tokens: usize,
    /// Training tokens per second over this step.
    pub tokens_per_sec: f64,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps done (in total, resumed runs included).
    pub steps: usize,
    /// Loss of every optimizer step of this process, in order.
    pub losses: Vec<f64>,
    /// Evaluation before training, per set.
    pub eval_before: BTreeMap<String, EvalResult>,
    /// Evaluation after training, per set (empty if interrupted).
    pub eval_after: BTreeMap<String, EvalResult>,
    /// Every evaluation of this process, in order: before training (step 0, unless resumed),
    /// every `eval_every` steps, and after training.
    pub evals: Vec<EvalPoint>,
    /// The exported HuggingFace directory (None if interrupted).
    pub model_dir: Option<PathBuf>,
    /// True when stopped by the user before the last step.
    pub interrupted: bool,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// Mean training tokens per second.
    pub tokens_per_sec: f64,
    /// Model FLOPs per trained token (see [`crate::flops::train_flops_per_token`]).
    pub flops_per_token: f64,
    /// Model FLOPs utilisation against `peak_flops`, when the peak is known.
    pub mfu: Option<f64>,
    /// Peak FLOP/s used for the MFU, and where it came from.
    pub peak_flops: Option<(f64, String)>,
}

/// The evaluation losses at one step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    /// Optimizer steps done when evaluated.
    pub step: usize,
    /// Loss per evaluation set.
    pub loss: BTreeMap<String, f64>,
}

impl EvalPoint {
    fn new(step: usize, r: &BTreeMap<String, EvalResult>) -> Self {
        Self {
            step,
            loss: r.iter().map(|(k, v)| (k.clone(), v.loss)).collect(),
        }
    }
}

/// State saved next to the weights in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    step: usize,
    cursor: DataCursor,
    eval_before: BTreeMap<String, EvalResult>,
    config: TrainConfig,
    trainable_names: Vec<String>,
}

/// How a caller watches and stops a run.
pub struct RunControl<'a> {
    /// Polled before every step (Ctrl-C sets it): when true, a checkpoint is written and the run
    /// returns with `interrupted = true`.
    pub stop: &'a AtomicBool,
    /// Called after every optimizer step; returning `false` stops the run the same way.
    pub on_step: Box<dyn FnMut(&StepMetrics) -> bool + 'a>,
    /// No progress bar or log lines (library use, tests).
    pub quiet: bool,
}

/// Run training as configured.
pub fn train<B: llama_pro_core::LlamaAutodiffBackend>(
    cfg: &TrainConfig,
    device: &B::Device,
    mut control: RunControl<'_>,
) -> Result<TrainReport> {
    let quiet = control.quiet;
    let stop = control.stop;
    cfg.validate()?;
    llama_pro_core::device::tune_allocator();
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let model_dir = crate::data::existing(&cfg.model)?;
    let (model, hf) = if cfg.random_init {
        let hf = llama_pro_core::HfConfig::from_path(&model_dir)?;
        let mut c = hf.config.clone();
        c.dtype = DType::F32;
        say(format!(
            "random initialisation of {} ({} parameters, seed {})",
            hf.path.display(),
            c.num_params(),
            cfg.seed
        ));
        (c.init::<B>(device, cfg.seed), hf)
    } else {
        LlamaForCausalLM::<B>::from_pretrained(&model_dir, device, Some(DType::F32))?
    };
    let model = if cfg.method == crate::config::Method::Lora {
        let lc = llama_pro_core::linear::LoraConfig {
            rank: cfg.lora_rank,
            alpha: cfg.lora_alpha,
            targets: cfg.lora_targets.clone(),
        };
        model.with_lora(&lc, cfg.seed)?
    } else {
        model
    };
    let c = hf.config.clone();
    let map = LayerMap::from_config(&hf.raw, c.num_hidden_layers, &hf.path)?;
    let spec = match &cfg.trainable {
        Some(s) => s.clone(),
        None => cfg.method.default_selection(c.num_hidden_layers)?,
    };
    let selection = Selection::parse(&spec)?;
    let (mut model, summary) = set_trainable(model, &selection, &map)?;
    say(format!("trainable parameters ({spec}):\n{summary}"));
    let compute = DType::parse(&cfg.dtype).ok_or_else(|| {
        TrainError::Invalid(format!(
            "--dtype {:?}: expected f32, bf16 or f16",
            cfg.dtype
        ))
    })?;
    if compute != DType::F32 {
        check_dtype_support::<B>(device, compute, &cfg.dtype)?;
        model = model.mixed_precision(compute);
        say(format!(
            "mixed precision: frozen weights and activations in {}, trainable weights and AdamW state in f32",
            cfg.dtype
        ));
    }
    if cfg.activation_checkpointing
        && compute == DType::F32
        && cfg.device == "cpu"
        && llama_pro_core::kernels::kernels_enabled()
    {
        say("note: --activation-checkpointing saves no memory on the CPU in f32: the fused CPU kernels \
             already keep only what their backward needs (it applies to the GPU backends and to bf16/f16)"
            .to_string());
    }

    // Data.
    let tok = if model_dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(
            &model_dir,
            c.bos_token_id,
            &c.eos_token_ids,
        )?)
    } else {
        None
    };
    let eos = tok
        .as_ref()
        .and_then(|t| t.eos_token_ids.first().copied())
        .or(c.eos_token_ids.first().copied());
    let tokenizer_file = model_dir.join("tokenizer.json");
    let cache = cfg.token_cache.then(crate::data::default_cache_dir);
    // Training data and evaluation sets are read alike: token cache, packing or one per line.
    let load = |spec: &str| {
        load_source(
            spec,
            tok.as_ref(),
            tokenizer_file.exists().then_some(tokenizer_file.as_path()),
            c.vocab_size,
            cfg.seq_len,
            cfg.packing,
            eos,
            cache.as_deref(),
        )
    };
    let mut sources: Vec<Source> = cfg.data.iter().map(|d| load(d)).collect::<Result<_>>()?;
    let mut eval_sets: Vec<(String, Vec<Vec<u32>>)> = Vec::new();
    for e in &cfg.eval {
        let (name, file) = e
            .split_once('=')
            .ok_or_else(|| TrainError::Invalid(format!("--eval {e:?}: expected NAME=FILE")))?;
        // The data-spec weight syntax does not apply: ":1" keeps a ':' in the path.
        let windows = load(&format!("{file}:1"))?.windows;
        eval_sets.push((name.to_string(), spread(windows, cfg.eval_max_sequences)));
    }
    if eval_sets.is_empty() {
        let val = split_validation(&mut sources, cfg.val_fraction, cfg.seed);
        if !val.is_empty() {
            eval_sets.push(("val".into(), val));
        }
    }
    let mut stream = ExampleStream::new(sources, cfg.seed);
    let per_step = cfg.batch_size * cfg.grad_accum;
    let total_steps = cfg.max_steps.unwrap_or_else(|| {
        ((cfg.epochs * stream.len() as f64) / per_step as f64)
            .ceil()
            .max(1.0) as usize
    });
    let schedule = Schedule {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: (cfg.warmup_ratio * total_steps as f64).round() as usize,
        total_steps,
        kind: cfg.lr_schedule,
    };
    say(format!(
        "data: {} training examples of up to {} tokens from {} file(s){}; {} optimizer steps of {} sequences ({} x {} accumulated)",
        stream.len(),
        cfg.seq_len,
        stream.sources().len(),
        if cfg.packing { ", packed" } else { "" },
        total_steps,
        per_step,
        cfg.batch_size,
        cfg.grad_accum
    ));

    // Parameter groups: decay only on >= 2-D tensors; per-group learning-rate factors.
    let scales: Vec<(Selection, f64)> = cfg
        .lr_scale
        .iter()
        .map(|s| {
            let (sel, f) = s.rsplit_once('=').ok_or_else(|| {
                TrainError::Invalid(format!("--lr-scale {s:?}: expected SELECTION=FACTOR"))
            })?;
            let f: f64 = f.parse().map_err(|_| {
                TrainError::Invalid(format!("--lr-scale {s:?}: {f:?} is not a number"))
            })?;
            Ok((Selection::parse(sel)?, f))
        })
        .collect::<Result<_>>()?;
    let ctx = SelectContext {
        map: &map,
        tied: c.tie_word_embeddings,
    };
    let named = model.named_parameters();
    let mut groups: Vec<Group> = Vec::new();
    for p in named
        .iter()
        .filter(|p| summary.trainable_names.contains(&p.name))
    {
        let decay = p.shape.len() >= 2 && cfg.weight_decay > 0.0;
        let (label, lr_scale) = scales
            .iter()
            .find(|(s, _)| s.matches(&p.name, &ctx))
            .map(|(s, f)| (format!("{s} x{f} "), *f))
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
    // Model FLOPs per token and the device peak, for the MFU.
    let flops_per_token = {
        use llama_pro_core::expand::layer_of;
        let trainable: Vec<_> = named
            .iter()
            .filter(|p| summary.trainable_names.contains(&p.name))
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
        crate::flops::train_flops_per_token(&c, cfg.seq_len, lowest, embeddings, matmul)
    };
    let peak_flops = match cfg.peak_tflops {
        Some(t) => Some((t * 1e12, "--peak-tflops".to_string())),
        None if cfg.device == "cpu" => crate::flops::cpu_peak_flops(),
        None => None,
    };
    let mfu_of = |tps: f64| peak_flops.as_ref().map(|(p, _)| tps * flops_per_token / p);
    let adamw = |wd: f64| {
        let (b1, b2, eps) = (
            cfg.adam_beta1 as f32,
            cfg.adam_beta2 as f32,
            cfg.adam_eps as f32,
        );
        FusedAdamW::new(b1, b2, eps, wd as f32).init::<B, LlamaForCausalLM<B>>()
    };
    let mut opt_decay = adamw(cfg.weight_decay);
    let mut opt_plain = adamw(0.0);

    let ckpt_root = cfg.output.join("checkpoints");
    std::fs::create_dir_all(&cfg.output).map_err(|source| TrainError::Io {
        path: cfg.output.clone(),
        source,
    })?;

    // Resume.
    let mut start_step = 0;
    let mut eval_before = BTreeMap::new();
    if let Some(r) = &cfg.resume {
        let dir = if r == "latest" {
            latest_checkpoint(&ckpt_root)?.ok_or_else(|| {
                TrainError::Invalid(format!(
                    "--resume latest: no checkpoint in {}",
                    ckpt_root.display()
                ))
            })?
        } else {
            PathBuf::from(r)
        };
        let state: RunState = read_json(&dir.join("state.json"))?;
        if state.trainable_names != summary.trainable_names {
            return Err(TrainError::Invalid(format!(
                "{}: the checkpoint trained other parameters than this run's selection ({spec})",
                dir.display()
            )));
        }
        model = load_trainable(model, &Checkpoint::open(&dir)?, device)?;
        let by_stable: HashMap<ParamId, ParamId> =
            named.iter().map(|p| (stable_id(&p.name), p.id)).collect();
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        for (file, opt) in [
            ("optimizer-decay", &mut opt_decay),
            ("optimizer-plain", &mut opt_plain),
        ] {
            let rec: OptRecord<B> = recorder.load(dir.join(file), device).map_err(|e| {
                TrainError::Invalid(format!(
                    "{}: cannot read optimizer state: {e}",
                    dir.join(file).display()
                ))
            })?;
            let rec = rec
                .into_iter()
                .filter_map(|(k, v)| by_stable.get(&k).map(|id| (*id, v)))
                .collect();
            *opt = opt.clone().load_record(rec);
        }
        stream.restore(state.cursor)?;
        start_step = state.step;
        eval_before = state.eval_before;
        say(format!(
            "resumed from {} at step {start_step}",
            dir.display()
        ));
    }

    let eval_all = |m: &LlamaForCausalLM<B>| -> Result<BTreeMap<String, EvalResult>> {
        let inner = m.valid();
        let mut out = BTreeMap::new();
        for (name, seqs) in &eval_sets {
            out.insert(
                name.clone(),
                evaluate(&inner, seqs, cfg.batch_size, device, |_| {})?,
            );
        }
        Ok(out)
    };
    if cfg.resume.is_none() {
        eval_before = eval_all(&model)?;
        for (k, v) in &eval_before {
            say(format!(
                "eval before  {k}: loss {:.4}  ppl {:.2}",
                v.loss, v.perplexity
            ));
        }
    }

    let metrics_path = cfg.output.join("metrics.jsonl");
    // A fresh run starts a new log; a resumed one keeps the lines up to its checkpoint (an
    // interrupted process may have logged steps after it, which are about to be redone).
    let kept = if cfg.resume.is_some() {
        std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s as usize <= start_step)
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    } else {
        String::new()
    };
    std::fs::write(&metrics_path, kept).map_err(|source| TrainError::Io {
        path: metrics_path.clone(),
        source,
    })?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|source| TrainError::Io {
            path: metrics_path.clone(),
            source,
        })?;
    let log_eval = |metrics: &mut std::fs::File, step: usize, r: &BTreeMap<String, EvalResult>| {
        for (k, v) in r {
            let _ = writeln!(
                metrics,
                "{}",
                serde_json::json!({"step": step, "eval": k, "loss": v.loss, "perplexity": v.perplexity})
            );
        }
    };
    let mut evals = Vec::new();
    if cfg.resume.is_none() {
        log_eval(&mut metrics, 0, &eval_before);
        evals.push(EvalPoint::new(0, &eval_before));
    }
    let plot_path = cfg.output.join("loss.png");
    let plot = |quiet: bool| {
        if let Err(e) = plot_run(&metrics_path, &plot_path) {
            if !quiet {
                eprintln!("warning: {e}");
            }
        }
    };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total_steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start_step as u64);

    let save = |model: &LlamaForCausalLM<B>,
                step: usize,
                cursor: &DataCursor,
                od: &OptRecord<B>,
                op: &OptRecord<B>,
                eb: &BTreeMap<String, EvalResult>| {
        save_checkpoint::<B>(&ckpt_root, model, &summary, step, cursor, od, op, eb, cfg)
    };

    let mut losses = Vec::new();
    let run_start = Instant::now();
    let mut run_tokens = 0usize;
    let mut interrupted = false;
    for step in start_step..total_steps {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            save(
                &model,
                step,
                stream.cursor(),
                &opt_decay.to_record(),
                &opt_plain.to_record(),
                &eval_before,
            )?;
            bar.abandon_with_message(format!("interrupted: checkpoint written at step {step}"));
            break;
        }
        let t0 = Instant::now();
        let lr = schedule.lr(step);
        let mut acc = GradientsAccumulator::<LlamaForCausalLM<B>>::new();
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for _ in 0..cfg.grad_accum {
            let batch = stream.next_batch(cfg.batch_size);
            let (ids, mask) = pad_batch::<B>(&batch, device);
            // Predicted tokens are known on the host (L - 1 per sequence): one device sync per
            // micro-batch, for the loss value that the non-finite check needs.
            let count: usize = batch.iter().map(|s| s.len().saturating_sub(1)).sum();
            let (s, n) = causal_lm_loss_sum(model.forward(ids.clone()), ids, mask);
            let loss = s / n;
            let value: f64 = loss.clone().into_scalar().elem_f64();
            if !value.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "step {}: the loss is {value} (not finite); stopping without writing. The last good checkpoint in {} is intact",
                    step + 1,
                    ckpt_root.display()
                )));
            }
            loss_sum += value;
            tokens += count;
            // The mean over micro-batches: each micro-batch's mean loss divided by their number.
            let grads = (loss / cfg.grad_accum as f64).backward();
            acc.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let mut grads = acc.grads();
        let (norm, group_norms) = grad_norms::<B>(&model, &grads, &groups);
        if !norm.is_finite() {
            return Err(TrainError::Invalid(format!(
                "step {}: the gradient norm is {norm} (not finite); stopping without writing. The last good checkpoint in {} is intact",
                step + 1,
                ckpt_root.display()
            )));
        }
        if cfg.clip_grad_norm > 0.0 {
            // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1.
            let coef = cfg.clip_grad_norm / (norm + 1e-6);
            if coef < 1.0 {
                grads = scale_grads::<B>(&model, grads, coef);
            }
        }
        for g in &groups {
            let part = take_grads::<B>(&model, &mut grads, &g.ids);
            model = if g.decay {
                opt_decay.step(lr * g.lr_scale, model, part)
            } else {
                opt_plain.step(lr * g.lr_scale, model, part)
            };
        }
        let loss = loss_sum / cfg.grad_accum as f64;
        losses.push(loss);
        run_tokens += tokens;
        let secs = t0.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm: norm,
            group_grad_norms: groups
                .iter()
                .map(|g| g.label.clone())
                .zip(group_norms.iter().copied())
                .collect(),
            tokens,
            tokens_per_sec: tokens as f64 / secs.max(1e-9),
        };
        let line = serde_json::to_string(&m).unwrap_or_default();
        let _ = writeln!(metrics, "{line}");
        bar.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {:.0} tok/s",
            m.tokens_per_sec
        ));
        bar.inc(1);
        if cfg.log_every > 0 && (step + 1) % cfg.log_every == 0 {
            let gn: Vec<String> = m
                .group_grad_norms
                .iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect();
            let mfu = mfu_of(m.tokens_per_sec)
                .map(|u| format!("  MFU {:.1}%", 100.0 * u))
                .unwrap_or_default();
            bar.suspend(|| {
                say(format!(
                    "step {:>6}  loss {loss:.4}  lr {lr:.3e}  grad-norm {norm:.3} [{}]  {:.0} tok/s{mfu}",
                    step + 1,
                    gn.join(", "),
                    m.tokens_per_sec
                ))
            });
        }
        if cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0 && step + 1 < total_steps {
            let r = eval_all(&model)?;
            log_eval(&mut metrics, step + 1, &r);
            evals.push(EvalPoint::new(step + 1, &r));
            plot(quiet);
            for (k, v) in &r {
                bar.suspend(|| {
                    say(format!(
                        "eval step {}  {k}: loss {:.4}  ppl {:.2}",
                        step + 1,
                        v.loss,
                        v.perplexity
                    ))
                });
            }
        }
        if cfg.save_every > 0 && (step + 1) % cfg.save_every == 0 && step + 1 < total_steps {
            save(
                &model,
                step + 1,
                stream.cursor(),
                &opt_decay.to_record(),
                &opt_plain.to_record(),
                &eval_before,
            )?;
        }
        if !(control.on_step)(&m) && step + 1 < total_steps {
            stop.store(true, Ordering::SeqCst);
        }
    }
    let tokens_per_sec = run_tokens as f64 / run_start.elapsed().as_secs_f64().max(1e-9);
    let mut report = TrainReport {
        steps: if interrupted {
            start_step + losses.len()
        } else {
            total_steps
        },
        losses,
        eval_before: eval_before.clone(),
        eval_after: BTreeMap::new(),
        evals,
        model_dir: None,
        interrupted,
        trainable_params: summary.trainable(),
        total_params: summary.total(),
        tokens_per_sec,
        flops_per_token,
        mfu: mfu_of(tokens_per_sec),
        peak_flops: peak_flops.clone(),
    };
    if interrupted {
        plot(quiet);
        return Ok(report);
    }
    bar.finish_and_clear();
    save(
        &model,
        total_steps,
        stream.cursor(),
        &opt_decay.to_record(),
        &opt_plain.to_record(),
        &eval_before,
    )?;
    report.eval_after = eval_all(&model)?;
    log_eval(&mut metrics, total_steps, &report.eval_after);
    report
        .evals
        .push(EvalPoint::new(total_steps, &report.eval_after));
    plot(quiet);
    let out = cfg.output.join("model");
    save_pretrained(
        &model.valid().merge_lora(),
        &hf,
        Some(&model_dir),
        &out,
        &SaveOptions {
            overwrite: true,
            // Mixed precision exports in the compute dtype (as the base usually is).
            dtype: (compute != DType::F32).then_some(compute),
            ..Default::default()
        },
    )?;
    report.model_dir = Some(out.clone());
    write_json(
        &cfg.output.join("report.json"),
        &serde_json::to_value(&report).unwrap_or_default(),
    )?;
    write_run_readme(&out, cfg, &spec, &report)?;
    if !quiet {
        eprintln!("\n{}", forgetting_table(&report));
        eprintln!("model written to {}", out.display());
    }
    Ok(report)
}

/// Draw `metrics.jsonl` (training loss per step, evaluation loss per set) into a PNG.
pub fn plot_run(metrics: &Path, png: &Path) -> Result<()> {
    use crate::plot::{Panel, Series, write_png};
    let text = std::fs::read_to_string(metrics).map_err(|source| TrainError::Io {
        path: metrics.to_path_buf(),
        source,
    })?;
    let mut train = Vec::new();
    let mut evals: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let (Some(step), Some(loss)) = (
            v.get("step").and_then(|s| s.as_f64()),
            v.get("loss").and_then(|s| s.as_f64()),
        ) else {
            continue;
        };
        match v.get("eval").and_then(|e| e.as_str()) {
            Some(name) => evals
                .entry(name.to_string())
                .or_default()
                .push((step, loss)),
            None => train.push((step, loss)),
        }
    }
    let mut panels = vec![Panel {
        title: "training loss".into(),
        x_label: "optimizer step".into(),
        y_label: "loss".into(),
        series: vec![Series {
            label: "train".into(),
            points: train,
        }],
    }];
    if !evals.is_empty() {
        panels.push(Panel {
            title: "evaluation loss".into(),
            x_label: "optimizer step".into(),
            y_label: "loss".into(),
            series: evals
                .into_iter()
                .map(|(label, points)| Series { label, points })
                .collect(),
        });
    }
    write_png(png, &panels, (640, 420))
}

/// Fail with a clear error if the backend cannot compute in `dtype` (burn panics on an
/// unsupported dtype deep inside a kernel): a small matmul, cast and reduction, forward only.
fn check_dtype_support<B: AutodiffBackend>(
    device: &B::Device,
    dtype: DType,
    flag: &str,
) -> Result<()> {
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
        s.into_scalar().elem_f64()
    }));
    match probe {
        Ok(v) if v.is_finite() => Ok(()),
        _ => Err(TrainError::Invalid(format!(
            "--dtype {flag}: this backend ({}) cannot compute in {}; use --dtype f32{}",
            std::any::type_name::<B::InnerBackend>(),
            dtype.hf_name(),
            if dtype == DType::F16 {
                " or bf16"
            } else {
                " or f16"
            }
        ))),
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

/// The before/after table of every evaluation set.
pub fn forgetting_table(r: &TrainReport) -> String {
    let mut s = format!(
        "{:<12} {:>12} {:>12} {:>9}\n",
        "eval set", "loss before", "loss after", "change"
    );
    for (k, b) in &r.eval_before {
        if let Some(a) = r.eval_after.get(k) {
            s += &format!(
                "{k:<12} {:>12.4} {:>12.4} {:>+8.2}%\n",
                b.loss,
                a.loss,
                100.0 * (a.loss - b.loss) / b.loss
            );
        }
    }
    s
}

fn write_run_readme(dir: &Path, cfg: &TrainConfig, spec: &str, r: &TrainReport) -> Result<()> {
    let text = format!(
        "# Trained with llama-pro\n\nBase model: `{}`\n\nTrainable selection: `{spec}` ({} of {} parameters)\n\n\
         Data: {}\n\nSteps: {} (batch {} x {} accumulation, seq {}), lr {} ({:?}, warmup {}), weight decay {}, clip {}\n\n\
         ```\n{}```\n",
        cfg.model.display(),
        r.trainable_params,
        r.total_params,
        cfg.data.join(", "),
        r.steps,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seq_len,
        cfg.lr,
        cfg.lr_schedule,
        cfg.warmup_ratio,
        cfg.weight_decay,
        cfg.clip_grad_norm,
        forgetting_table(r)
    );
    let p = dir.join("README.md");
    std::fs::write(&p, text).map_err(|source| TrainError::Io { path: p, source })
}

trait ElemF64 {
    fn elem_f64(self) -> f64;
}
impl<E: burn::tensor::ElementConversion> ElemF64 for E {
    fn elem_f64(self) -> f64 {
        self.elem::<f64>()
    }
}

/// Squared norms of every parameter gradient → (global norm, norm per group).
fn grad_norms<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: &GradientsParams,
    groups: &[Group],
) -> (f64, Vec<f64>) {
    struct V<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        out: Vec<(ParamId, Tensor<B::InnerBackend, 1>)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.out.push((param.id, g.square().sum()));
            }
        }
    }
    let mut v = V::<B> {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut v);
    if v.out.is_empty() {
        return (0.0, vec![0.0; groups.len()]);
    }
    let ids: Vec<ParamId> = v.out.iter().map(|(id, _)| *id).collect();
    // One host transfer for all of them.
    let sq: Vec<f64> = Tensor::cat(v.out.into_iter().map(|(_, t)| t).collect(), 0)
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .unwrap_or_default();
    let total = sq.iter().sum::<f64>().sqrt();
    let per_group = groups
        .iter()
        .map(|g| {
            ids.iter()
                .zip(&sq)
                .filter(|(id, _)| g.ids.contains(id))
                .map(|(_, s)| s)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    (total, per_group)
}

/// Multiply every gradient by `coef`.
fn scale_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: GradientsParams,
    coef: f64,
) -> GradientsParams {
    struct V<B: AutodiffBackend> {
        grads: GradientsParams,
        coef: f64,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads
                    .register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.coef));
            }
        }
    }
    let mut v = V::<B> {
        grads,
        coef,
        _b: std::marker::PhantomData,
    };
    model.visit(&mut v);
    v.grads
}

/// Move the gradients of `ids` out of `grads`.
fn take_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    grads: &mut GradientsParams,
    ids: &HashSet<ParamId>,
) -> GradientsParams {
    struct V<'a, B: AutodiffBackend> {
        from: &'a mut GradientsParams,
        to: GradientsParams,
        ids: &'a HashSet<ParamId>,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.ids.contains(&param.id) {
                if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
                    self.to.register::<B::InnerBackend, D>(param.id, g);
                }
            }
        }
    }
    let mut v = V::<B> {
        from: grads,
        to: GradientsParams::new(),
        ids,
        _b: std::marker::PhantomData,
    };
    model.visit(&mut v);
    v.to
}

/// Replace the parameters named in `ckpt` (keeping ids and trainability).
fn load_trainable<B: AutodiffBackend>(
    model: LlamaForCausalLM<B>,
    ckpt: &Checkpoint,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>> {
    struct M<'a, B: AutodiffBackend> {
        path: Vec<String>,
        ckpt: &'a Checkpoint,
        device: B::Device,
        err: Option<TrainError>,
        loaded: usize,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for M<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let name = self.path.join(".");
            if self.ckpt.meta(&name).is_none() {
                return param;
            }
            let shape: Vec<usize> = param.shape().dims::<D>().to_vec();
            match self.ckpt.read_f32(&name, &shape) {
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
        path: Vec::new(),
        ckpt,
        device: device.clone(),
        err: None,
        loaded: 0,
    };
    let model = model.map(&mut m);
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

#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: llama_pro_core::LlamaAutodiffBackend>(
    root: &Path,
    model: &LlamaForCausalLM<B>,
    summary: &TrainableSummary,
    step: usize,
    cursor: &DataCursor,
    opt_decay: &OptRecord<B>,
    opt_plain: &OptRecord<B>,
    eval_before: &BTreeMap<String, EvalResult>,
    cfg: &TrainConfig,
) -> Result<()> {
    std::fs::create_dir_all(root).map_err(|source| TrainError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let out = root.join(format!("step-{step}"));
    let tmp = begin_atomic_dir(&out, true)?;
    let named = model.named_parameters();
    let to_stable: HashMap<ParamId, ParamId> =
        named.iter().map(|p| (p.id, stable_id(&p.name))).collect();
    let tensors: Vec<(String, OwnedTensor)> = named
        .into_iter()
        .filter(|p| summary.trainable_names.contains(&p.name))
        .map(|p| {
            let data = p.value.into_data().convert::<f32>();
            (
                p.name,
                OwnedTensor {
                    dtype: DType::F32,
                    shape: p.shape,
                    bytes: data.as_bytes().to_vec(),
                },
            )
        })
        .collect();
    write_weights(&tmp, tensors, usize::MAX)?;
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    for (file, rec) in [
        ("optimizer-decay", opt_decay),
        ("optimizer-plain", opt_plain),
    ] {
        let remapped: OptRecord<B> = rec
            .iter()
            .filter_map(|(k, v)| to_stable.get(k).map(|s| (*s, v.clone())))
            .collect();
        recorder.record(remapped, tmp.join(file)).map_err(|e| {
            TrainError::Invalid(format!("writing optimizer state to {}: {e}", tmp.display()))
        })?;
    }
    let state = RunState {
        step,
        cursor: cursor.clone(),
        eval_before: eval_before.clone(),
        config: cfg.clone(),
        trainable_names: summary.trainable_names.clone(),
    };
    write_json(
        &tmp.join("state.json"),
        &serde_json::to_value(&state).unwrap_or_default(),
    )?;
    commit_atomic_dir(&tmp, &out)?;
    // Keep the newest `keep` checkpoints.
    let mut all = list_checkpoints(root)?;
    all.sort();
    while all.len() > cfg.keep {
        let (_, p) = all.remove(0);
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

fn list_checkpoints(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(v);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if e.path().join("state.json").exists() {
                v.push((n, e.path()));
            }
        }
    }
    Ok(v)
}

/// The checkpoint with the highest step under `root`.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(root)?.into_iter().max().map(|(_, p)| p))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: path.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })
}
