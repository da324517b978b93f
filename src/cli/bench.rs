//! `llama-pro bench`: one training step (or a forward pass, or greedy decoding) of a synthetic,
//! randomly initialised model on any device, through the library's own code: the model, block
//! expansion, freezing, mixed precision and the trainer's fused AdamW. Prints tokens/s, step
//! times, model FLOPs, MFU and peak memory, and writes them as JSON.
//!
//! The step (`pro` and `full`) is what `examples/bench_step.rs` and `benches/compare_torch.py`
//! define: forward, mean cross-entropy over every position, backward, AdamW (lr 1e-4, β
//! 0.9/0.95, ε 1e-8, weight decay 0.1 on every trainable tensor), then the loss read back to the
//! host. The device is synchronised after the forward pass, after the backward pass and at the end
//! of the step, so the phase times are real and a step's time includes all its work.

use std::any::{Any, TypeId};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use llama_pro::core::burn;
use llama_pro::core::device::{DeviceSpec, OnAutodiffBackend, dispatch_autodiff_with};
use llama_pro::core::expand::{ExpansionPlan, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::generate::{GenerationConfig, generate};
use llama_pro::core::model::LlamaForCausalLM;
use llama_pro::core::weights::{Init, WeightSource};
use llama_pro::core::{DType, LlamaConfig, RopeScaling};
use llama_pro::train::optim::FusedAdamW;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Int, Tensor, TensorData};

/// `llama-pro bench`
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model shape: S and M (small CPU cases: vocab 4096/8192, hidden 256/512, 4→5 / 8→10
    /// blocks), 1b (Llama-3.2-1B expanded 16→20 blocks) or llama2-7b-pro (Llama-2-7B expanded
    /// 32→40 blocks, the paper's 8.3B). Every preset is expanded interleaved, one zero-initialised
    /// copy after each group of 4 blocks.
    #[arg(long, default_value = "S", ignore_case = true)]
    pub preset: Preset,
    /// What a step is: pro (train the new blocks only), full (train every parameter), forward
    /// (loss without gradients), generate (greedy decoding with the KV cache, batch 1).
    #[arg(long, default_value = "pro")]
    pub mode: Mode,
    /// Device: cpu, wgpu, wgpu:N, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype. bf16/f16 is the trainer's mixed precision: frozen weights and activations in
    /// the half type, trainable weights and AdamW state in f32.
    #[arg(long, default_value = "f32", value_parser = super::dtype_parser())]
    pub dtype: DType,
    /// Tokens per sequence (default: S 128, M 256, 1b 2048, llama2-7b-pro 4096).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Sequences per step (default: S 8, M 4; 1b: 8192 tokens per step; llama2-7b-pro 1).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps before them (kernel compilation, autotuning, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// burn's balanced activation checkpointing (recompute memory-bound ops in the backward).
    #[arg(long)]
    pub checkpointing: bool,
    /// Peak TFLOP/s of the device for the MFU (default: a table of known GPUs by name; on the
    /// CPU an estimate from /proc/cpuinfo).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// New tokens per step in `generate` mode (after a 16-token prompt).
    #[arg(long, default_value_t = 112)]
    pub gen_tokens: usize,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the results as JSON to this file (`-`: standard output, instead of the text).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// vocab 4096, hidden 256, FFN 688, 4 blocks, 4 heads (MHA), untied.
    #[value(name = "S")]
    S,
    /// vocab 8192, hidden 512, FFN 1376, 8 blocks, 8 heads (MHA), untied.
    #[value(name = "M")]
    M,
    /// Llama-3.2-1B: vocab 128256, hidden 2048, FFN 8192, 16 blocks, 32 heads / 8 KV heads,
    /// head_dim 64, tied embeddings, RoPE θ 500000 (llama3 scaling).
    #[value(name = "1b")]
    OneB,
    /// Llama-2-7B: vocab 32000, hidden 4096, FFN 11008, 32 blocks, 32 heads (MHA), untied.
    #[value(name = "llama2-7b-pro")]
    Llama2_7bPro,
}

impl Preset {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::S => "S",
            Self::M => "M",
            Self::OneB => "1b",
            Self::Llama2_7bPro => "llama2-7b-pro",
        }
    }

    /// The base (not yet expanded) configuration.
    pub fn config(self) -> LlamaConfig {
        let mut c = LlamaConfig::tiny(4096);
        c.rms_norm_eps = 1e-5;
        match self {
            Self::S => {
                (c.vocab_size, c.hidden_size, c.intermediate_size) = (4096, 256, 688);
                (
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                ) = (4, 4, 4);
                c.max_position_embeddings = 4096;
            }
            Self::M => {
                (c.vocab_size, c.hidden_size, c.intermediate_size) = (8192, 512, 1376);
                (
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                ) = (8, 8, 8);
                c.max_position_embeddings = 4096;
            }
            Self::OneB => {
                (c.vocab_size, c.hidden_size, c.intermediate_size) = (128256, 2048, 8192);
                (
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                ) = (16, 32, 8);
                c.tie_word_embeddings = true;
                c.rope_theta = 500000.0;
                c.rope_scaling = RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                };
                c.max_position_embeddings = 131072;
                c.bos_token_id = Some(128000);
                c.eos_token_ids = vec![128001];
            }
            Self::Llama2_7bPro => {
                (c.vocab_size, c.hidden_size, c.intermediate_size) = (32000, 4096, 11008);
                (
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                ) = (32, 32, 32);
                c.max_position_embeddings = 4096;
            }
        }
        c.head_dim = c.hidden_size / c.num_attention_heads;
        c
    }

    /// Default (sequence length, batch size) when the flags do not give them.
    fn default_shape(self, seq: Option<usize>) -> (usize, usize) {
        match self {
            Self::S => (seq.unwrap_or(128), 8),
            Self::M => (seq.unwrap_or(256), 4),
            Self::OneB => {
                let s = seq.unwrap_or(2048);
                (s, (8192 / s).max(1))
            }
            Self::Llama2_7bPro => (seq.unwrap_or(4096), 1),
        }
    }

    /// Small enough to initialise on the host with the library's seeded initialisation (the
    /// same weights on every backend); the large presets draw their weights on the device.
    fn host_init(self) -> bool {
        matches!(self, Self::S | Self::M)
    }
}

/// What one step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Train only the new blocks (LLaMA Pro).
    Pro,
    /// Train every parameter of the expanded model.
    Full,
    /// The loss without gradients.
    Forward,
    /// Greedy decoding with the KV cache, batch 1.
    Generate,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Pro => "pro",
            Self::Full => "full",
            Self::Forward => "forward",
            Self::Generate => "generate",
        }
    }
    fn trains(self) -> bool {
        matches!(self, Self::Pro | Self::Full)
    }
}

/// Tokens in the `generate` mode's prompt.
const PROMPT_TOKENS: usize = 16;

pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (seq, batch) = a.preset.default_shape(a.seq);
    let batch = a.batch.unwrap_or(batch);
    if seq < 2 || batch == 0 {
        bail!("--seq must be at least 2 and --batch at least 1");
    }
    // Sampled before the model exists: what the device held before this run touched it.
    let smi = match a.device {
        DeviceSpec::Cuda(i) | DeviceSpec::Wgpu(Some(i)) => SmiPoller::start(i),
        DeviceSpec::Wgpu(None) => SmiPoller::start(0),
        DeviceSpec::Cpu => None,
    };
    let task = BenchTask {
        args: a,
        seq,
        batch,
    };
    let mut report = dispatch_autodiff_with(a.device, a.checkpointing, task)??;
    if let Some(p) = smi {
        let (baseline, peak) = p.stop();
        report["memory"]["nvidia_smi"] = serde_json::json!({
            "measure": "memory.used of the whole GPU by nvidia-smi, sampled every 100 ms (includes the CUDA context and every process on it)",
            "before_bytes": baseline,
            "peak_bytes": peak,
        });
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        if path.as_os_str() == "-" {
            println!("{text}");
            return Ok(());
        }
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    print_summary(&report);
    Ok(())
}

struct BenchTask<'a> {
    args: &'a BenchArgs,
    seq: usize,
    batch: usize,
}

impl OnAutodiffBackend for BenchTask<'_> {
    type Output = anyhow::Result<serde_json::Value>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        bench::<B>(self.args, self.seq, self.batch, device)
    }
}

/// Random initialisation on the device (normal(0, 0.02) weights, unit norms, zero biases, as
/// HF's `_init_weights`), from the backend's own generator: a 7B model's weights are drawn where
/// they live instead of on the host.
struct DeviceInit<B: Backend> {
    device: B::Device,
}

impl<B: Backend> WeightSource<B> for DeviceInit<B> {
    fn tensor<const D: usize>(
        &mut self,
        _name: &str,
        shape: [usize; D],
        init: Init,
    ) -> llama_pro::core::Result<Tensor<B, D>> {
        Ok(match init {
            Init::Normal(std) => {
                Tensor::random(shape, Distribution::Normal(0.0, std), &self.device)
            }
            Init::Ones => Tensor::ones(shape, &self.device),
            Init::Zeros => Tensor::zeros(shape, &self.device),
        })
    }
}

/// The trainer's mixed precision ([`LlamaForCausalLM::mixed_precision`]) with the cast done on
/// the device: frozen parameters stored in the half type, trainable ones kept in f32, activations
/// computed in the half type. (The library rounds on the host for bitwise agreement with torch;
/// for a benchmark of a random model the device's cast is the same work at load time, minus
/// moving 30 GB through the host.)
/// With `all`, every parameter is cast (inference).
struct CastFrozen {
    dtype: burn::tensor::DType,
    all: bool,
}

impl<B: Backend> ModuleMapper<B> for CastFrozen {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if param.is_require_grad() && !self.all {
            return param;
        }
        let dtype = self.dtype;
        param.map(|t| t.cast(dtype))
    }
}

fn cast_params<B: Backend>(
    model: LlamaForCausalLM<B>,
    dtype: DType,
    all: bool,
) -> LlamaForCausalLM<B> {
    if dtype == DType::F32 {
        return model;
    }
    let mut m = model.map(&mut CastFrozen {
        dtype: dtype.burn(),
        all,
    });
    m.compute_dtype = Some(dtype);
    m
}

fn sync<B: Backend>(device: &B::Device) -> anyhow::Result<()> {
    B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))
}

/// Step statistics in seconds.
fn stats(v: &[f64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    serde_json::json!({
        "mean": mean, "min": s[0], "median": s[s.len() / 2], "max": s[s.len() - 1], "all": v,
    })
}

fn bench<B: AutodiffBackend>(
    a: &BenchArgs,
    seq: usize,
    batch: usize,
    device: B::Device,
) -> anyhow::Result<serde_json::Value> {
    let t_setup = Instant::now();
    let base_cfg = a.preset.config();
    let mut mem = MemoryProbe::new::<B::InnerBackend>(&device);
    let base = if a.preset.host_init() {
        base_cfg.init::<B>(&device, a.seed)
    } else {
        B::seed(&device, a.seed);
        base_cfg.load(&mut DeviceInit::<B> {
            device: device.clone(),
        })?
    };
    let groups = base_cfg.num_hidden_layers / 4;
    let plan = ExpansionPlan::Interleaved { groups, copies: 1 };
    let (model, map) = expand_model(base, &plan, None)?;
    let cfg = model.config.clone();
    let mode = a.mode;
    let selection = match mode {
        Mode::Pro => "expanded",
        _ => "all",
    };
    let (model, summary) = set_trainable(model, &Selection::parse(selection)?, &map)?;
    let trainable_names: Vec<String> = if mode.trains() {
        summary.trainable_names.clone()
    } else {
        Vec::new()
    };
    let params = summary.total();
    let trainable = if mode.trains() {
        summary.trainable()
    } else {
        0
    };
    let tokens_per_step = match mode {
        Mode::Generate => a.gen_tokens,
        _ => batch * seq,
    };
    let flops = match mode {
        Mode::Generate => FlopCount::generate(&cfg, PROMPT_TOKENS, a.gen_tokens),
        Mode::Forward => FlopCount::forward(&cfg, seq, batch),
        _ => FlopCount::train(&cfg, seq, batch, &trainable_names),
    };

    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i as u64 * 2654435761) % cfg.vocab_size as u64) as i64)
        .collect();
    let mut step_s = Vec::new();
    let mut phases: [Vec<f64>; 3] = Default::default();
    let (mut loss_first, mut loss_last) = (f64::NAN, f64::NAN);
    let setup_s;
    if mode.trains() {
        let mut model = cast_params(model, a.dtype, false);
        sync::<B>(&device)?;
        mem.sample("after set-up");
        setup_s = t_setup.elapsed().as_secs_f64();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
        let mask = Tensor::<B, 2>::ones([batch, seq], &device);
        let mut optim = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1).init::<B, LlamaForCausalLM<B>>();
        for i in 0..a.warmup + a.steps {
            let t = Instant::now();
            let (s, c) = model.loss_sum(ids.clone(), mask.clone());
            let loss = s / c;
            sync::<B>(&device)?;
            let t_fwd = t.elapsed().as_secs_f64();
            mem.sample("after forward");
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            sync::<B>(&device)?;
            let t_bwd = t.elapsed().as_secs_f64();
            mem.sample("after backward");
            model = optim.step(1e-4, model, grads);
            let l = loss.into_scalar().elem::<f64>();
            sync::<B>(&device)?;
            let t_all = t.elapsed().as_secs_f64();
            mem.sample("after optimizer");
            if !l.is_finite() {
                bail!("step {}: the loss is {l}", i + 1);
            }
            if i == 0 {
                loss_first = l;
            }
            loss_last = l;
            if i >= a.warmup {
                step_s.push(t_all);
                phases[0].push(t_fwd);
                phases[1].push(t_bwd - t_fwd);
                phases[2].push(t_all - t_bwd);
            }
        }
    } else {
        // Nothing trains: every parameter is stored in the compute dtype.
        let inner = cast_params(model.valid(), a.dtype, true);
        sync::<B::InnerBackend>(&device)?;
        mem.sample("after set-up");
        setup_s = t_setup.elapsed().as_secs_f64();
        let ids = Tensor::<B::InnerBackend, 2, Int>::from_data(
            TensorData::new(ids, [batch, seq]),
            &device,
        );
        let mask = Tensor::<B::InnerBackend, 2>::ones([batch, seq], &device);
        let prompt: Vec<u32> = (0..PROMPT_TOKENS as u32)
            .map(|i| i.wrapping_mul(2654435761) % cfg.vocab_size as u32)
            .collect();
        let gen_cfg = GenerationConfig {
            max_new_tokens: a.gen_tokens,
            ..GenerationConfig::default()
        };
        for i in 0..a.warmup + a.steps {
            let t = Instant::now();
            if mode == Mode::Generate {
                let out = generate(&inner, &prompt, &gen_cfg, &device, |_| {})?;
                if out.len() != a.gen_tokens {
                    bail!("generated {} tokens, expected {}", out.len(), a.gen_tokens);
                }
            } else {
                let (s, c) = inner.loss_sum(ids.clone(), mask.clone());
                let l = (s / c).into_scalar().elem::<f64>();
                if i == 0 {
                    loss_first = l;
                }
                loss_last = l;
            }
            sync::<B::InnerBackend>(&device)?;
            mem.sample("after step");
            if i >= a.warmup {
                step_s.push(t.elapsed().as_secs_f64());
            }
        }
    }

    let mean = step_s.iter().sum::<f64>() / step_s.len() as f64;
    let min = step_s.iter().copied().fold(f64::INFINITY, f64::min);
    let tokens_per_s = tokens_per_step as f64 / mean;
    let device_name = device_name(a.device);
    let peak = peak_flops(a, &device_name);
    let achieved = flops.per_step / mean;
    let mfu = peak.as_ref().map(|(p, _)| achieved / p);
    let mfu_causal = peak.as_ref().map(|(p, _)| flops.per_step_causal / mean / p);
    let new_layers = map.new_layers();
    let phase = |v: &[f64]| {
        if v.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let memory_plan = memory_plan(&cfg, a, seq, batch, &map)?;
    let mut report = serde_json::json!({
        "impl": "llama-pro",
        "version": env!("CARGO_PKG_VERSION"),
        "git_commit": git_commit(),
        "command": std::env::args().collect::<Vec<_>>(),
        "preset": a.preset.name(),
        "mode": mode.name(),
        "dtype": a.dtype.to_string(),
        "device": a.device.to_string(),
        "device_name": device_name.0,
        "device_name_source": device_name.1,
        "backend": B::name(&device),
        "kernels": llama_pro::core::ops::has_kernels::<B>(),
        "cpu_model": cpu_model(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "config": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "base_layers": base_cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
        },
        "layer_map": map.compact(),
        "new_layers": new_layers,
        "init": if a.preset.host_init() { "host (seeded ChaCha8, as LlamaConfig::init)" } else { "device (the backend's normal generator)" },
    });
    let more = serde_json::json!({
        "params": params,
        "trainable": trainable,
        "seq": seq,
        "batch": batch,
        "tokens_per_step": tokens_per_step,
        "steps": a.steps,
        "warmup": a.warmup,
        "checkpointing": a.checkpointing,
        "setup_s": setup_s,
        "step_s": stats(&step_s),
        "phase_s": {"forward": phase(&phases[0]), "backward": phase(&phases[1]), "optimizer": phase(&phases[2])},
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_best": tokens_per_step as f64 / min,
        "flops_per_token": flops.per_step / tokens_per_step as f64,
        "flops_per_step": flops.per_step,
        "flops_per_step_causal": flops.per_step_causal,
        "flops_formula": flops.formula,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak.as_ref().map(|(p, _)| p / 1e12),
        "peak_source": peak.as_ref().map(|(_, s)| s.clone()),
        "mfu": mfu,
        "mfu_causal": mfu_causal,
        "memory": mem.report(),
        "memory_plan": memory_plan,
        "loss_first": loss_first,
        "loss_last": loss_last,
    });
    if let (Some(r), serde_json::Value::Object(m)) = (report.as_object_mut(), more) {
        r.extend(m);
    }
    Ok(report)
}

/// Model FLOPs of one step.
struct FlopCount {
    /// PaLM's convention (the trainer's, [`llama_pro::train::flops`]): attention scores over the
    /// full window.
    per_step: f64,
    /// The same with attention counted over the causal half only.
    per_step_causal: f64,
    formula: &'static str,
}

impl FlopCount {
    /// A training step (pro or full), with `trainable` the names of the trainable parameters.
    ///
    /// Per token, with N_layer the matmul parameters of one block, N_head = vocab × hidden, q =
    /// heads × head_dim, s = seq, L = blocks, and 2 FLOPs per multiply-add:
    /// - forward: 2 · (L · N_layer + N_head) + L · 4 · q · s (QKᵀ and AV over the full window,
    ///   PaLM's convention; the causal count is half of it: L · 2 · q · s);
    /// - backward, activation gradients: 2 · (L' · N_layer + N_head) + 2 · L' · 4 · q · s, where
    ///   L' counts the blocks from the top down to the lowest one with a trainable parameter
    ///   (nothing is differentiated below it; all L when the embeddings train);
    /// - backward, weight gradients: 2 · (trainable matmul parameters) (norm weights and
    ///   embedding rows are not matmuls; a tied embedding trains as the head).
    ///
    /// With everything trainable this is PaLM's 6N + 12 · L · q · s. This is the trainer's count
    /// ([`llama_pro::train::flops::train_flops_per_token`], the MFU `train` prints), called here.
    fn train(cfg: &LlamaConfig, seq: usize, batch: usize, trainable: &[String]) -> Self {
        let lowest = trainable
            .iter()
            .filter_map(|n| llama_pro::core::expand::layer_of(n).map(|(i, _)| i))
            .min();
        let embeddings = trainable
            .iter()
            .any(|n| n.starts_with("model.embed_tokens."));
        let matmul: usize = cfg
            .tensor_shapes()
            .iter()
            .filter(|(n, s)| {
                s.len() == 2
                    && trainable.contains(n)
                    && (cfg.tie_word_embeddings || !n.starts_with("model.embed_tokens."))
            })
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let per_token =
            llama_pro::train::flops::train_flops_per_token(cfg, seq, lowest, embeddings, matmul);
        let l = cfg.num_hidden_layers;
        let through = if embeddings {
            l
        } else {
            lowest.map_or(0, |m| l - m)
        };
        let q = (cfg.num_attention_heads * cfg.head_dim) as f64;
        let attn_full = (l + 2 * through) as f64 * 4.0 * q * seq as f64;
        let tokens = (seq * batch) as f64;
        Self {
            per_step: per_token * tokens,
            per_step_causal: (per_token - attn_full / 2.0) * tokens,
            formula: "per token: forward 2(L*N_layer + N_head) + 4*L*q*s; backward 2(L'*N_layer + N_head) + 8*L'*q*s \
                      for activations (L' = blocks from the top to the lowest trainable one) + 2*N_trainable_matmul \
                      for weights; attention over the full window (PaLM), *_causal counts half of it",
        }
    }

    /// Forward pass and loss: 2 · (L · N_layer + N_head) + L · 4 · q · s per token.
    fn forward(cfg: &LlamaConfig, seq: usize, batch: usize) -> Self {
        let (matmul, attn) = forward_terms(cfg);
        let tokens = (seq * batch) as f64;
        let s = seq as f64;
        Self {
            per_step: (matmul + attn * s) * tokens,
            per_step_causal: (matmul + attn * s / 2.0) * tokens,
            formula: "per token: 2(L*N_layer + N_head) + 4*L*q*s (full window; *_causal: half)",
        }
    }

    /// Greedy decoding: each new token is one position of the forward pass over the context so
    /// far (prompt + tokens before it): 2 · (L · N_layer + N_head) + L · 4 · q · context.
    fn generate(cfg: &LlamaConfig, prompt: usize, new: usize) -> Self {
        let (matmul, attn) = forward_terms(cfg);
        // The first token comes from the prompt's forward pass (prompt positions).
        let prompt_pass = prompt as f64 * matmul + attn * (prompt * prompt) as f64;
        let steps: f64 = (1..new).map(|k| matmul + attn * (prompt + k) as f64).sum();
        let prompt_causal = prompt as f64 * matmul + attn * (prompt * (prompt + 1)) as f64 / 2.0;
        Self {
            per_step: prompt_pass + steps,
            per_step_causal: prompt_causal + steps,
            formula: "prompt forward + per new token 2(L*N_layer + N_head) + 4*L*q*context",
        }
    }
}

/// (2 · matmul parameters, 4 · L · q): forward FLOPs per token are `a + b · s`.
fn forward_terms(cfg: &LlamaConfig) -> (f64, f64) {
    let (d, f, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_hidden_layers as f64,
    );
    let hd = cfg.head_dim as f64;
    let (h, kv) = (
        cfg.num_attention_heads as f64,
        cfg.num_key_value_heads as f64,
    );
    let layer = d * h * hd + 2.0 * d * kv * hd + h * hd * d + 3.0 * d * f;
    let head = cfg.vocab_size as f64 * d;
    (2.0 * (l * layer + head), 4.0 * l * h * hd)
}

/// Dense peak TFLOP/s of known GPUs: (name pattern, bf16/f16 tensor-core peak, f32 peak without
/// tensor cores). Vendor data sheets, dense (no sparsity). Patterns are matched in order against
/// the device name (`nvidia-smi --query-gpu=name`), so the more specific come first.
const GPU_PEAKS: &[(&str, f64, f64)] = &[
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H800 PCIe", 756.0, 51.0),
    ("H800", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("RTX 6000 Ada", 364.0, 91.1),
    ("RTX A6000", 155.0, 38.7),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
];

/// The device's peak FLOP/s for `dtype` and where the figure came from.
pub fn gpu_peak(name: &str, dtype: DType) -> Option<(f64, String)> {
    let (pat, half, f32_) = GPU_PEAKS.iter().find(|(p, _, _)| name.contains(p))?;
    let no_bf16 = matches!(*pat, "V100" | "T4");
    let t = match dtype {
        DType::F32 => *f32_,
        DType::BF16 if no_bf16 => return None,
        _ => *half,
    };
    let kind = match dtype {
        DType::F32 => "f32 without tensor cores",
        DType::BF16 => "dense bf16 tensor cores",
        DType::F16 => "dense f16 tensor cores",
    };
    Some((t * 1e12, format!("{t} TFLOP/s, {kind} ({pat} data sheet)")))
}

fn peak_flops(a: &BenchArgs, device_name: &(String, String)) -> Option<(f64, String)> {
    if let Some(t) = a.peak_tflops {
        return Some((t * 1e12, "--peak-tflops".into()));
    }
    match a.device {
        DeviceSpec::Cpu => llama_pro::train::flops::cpu_peak_flops().map(|(p, s)| {
            let s = if a.dtype == DType::F32 {
                s
            } else {
                format!(
                    "{s}; the f32 peak (no native {} matmul on the CPU)",
                    a.dtype
                )
            };
            (p, s)
        }),
        _ => gpu_peak(&device_name.0, a.dtype),
    }
}

/// The device's name and how it was found.
fn device_name(spec: DeviceSpec) -> (String, String) {
    match spec {
        DeviceSpec::Cpu => (
            cpu_model().unwrap_or_else(|| "cpu".into()),
            "/proc/cpuinfo".into(),
        ),
        DeviceSpec::Cuda(i) => match smi_name(i) {
            Some(n) => (n, format!("nvidia-smi -i {i}")),
            None => (
                format!("cuda:{i}"),
                "unknown (nvidia-smi not found)".into(),
            ),
        },
        DeviceSpec::Wgpu(i) => match smi_name(i.unwrap_or(0)) {
            Some(n) => (
                n,
                format!(
                    "assumed: nvidia-smi GPU {} (the wgpu adapter's own name is not exposed)",
                    i.unwrap_or(0)
                ),
            ),
            None => (
                spec.to_string(),
                "unknown: the wgpu adapter's name is not exposed and no nvidia-smi; give --peak-tflops".into(),
            ),
        },
    }
}

fn smi_name(i: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            "-i",
            &i.to_string(),
        ])
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

/// The commit this binary was built from (`LLAMA_PRO_GIT_COMMIT` at build time, as
/// `scripts/device-check.sh build` sets it), else the working directory's `git rev-parse HEAD`.
pub fn git_commit() -> Option<String> {
    if let Some(c) = option_env!("LLAMA_PRO_GIT_COMMIT") {
        return Some(c.to_string());
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let c = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !c.is_empty()).then(|| format!("{c} (working directory)"))
}

fn vm_hwm_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Device memory as the backend's allocator sees it: cubecl's `memory_usage()` (bytes in use by
/// live tensors, bytes reserved from the driver) for the backends whose tensors are cubecl
/// tensors; nothing for the others (the CPU reports the process's peak RSS instead).
type UsageFn<D> = fn(&D) -> Option<(u64, u64)>;

struct MemoryProbe<D> {
    read: Option<UsageFn<D>>,
    device: D,
    /// (label, bytes in use, bytes reserved), the largest in-use sample per label.
    samples: Vec<(&'static str, u64, u64)>,
}

impl<D: Clone> MemoryProbe<D> {
    fn new<B: Backend<Device = D>>(device: &D) -> Self {
        Self {
            read: cube_usage_fn::<B>(),
            device: device.clone(),
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, label: &'static str) {
        let Some(read) = self.read else { return };
        let Some((used, reserved)) = read(&self.device) else {
            return;
        };
        match self.samples.iter_mut().find(|s| s.0 == label) {
            Some(s) => {
                s.1 = s.1.max(used);
                s.2 = s.2.max(reserved);
            }
            None => self.samples.push((label, used, reserved)),
        }
    }

    fn report(&self) -> serde_json::Value {
        let rss = vm_hwm_bytes();
        if self.samples.is_empty() {
            return serde_json::json!({
                "measure": "peak resident set size of the process (VmHWM)",
                "peak_bytes": rss,
                "process_peak_rss_bytes": rss,
            });
        }
        let peak_used = self.samples.iter().map(|s| s.1).max();
        let peak_reserved = self.samples.iter().map(|s| s.2).max();
        let samples: serde_json::Map<String, serde_json::Value> = self
            .samples
            .iter()
            .map(|(l, u, r)| {
                (
                    l.to_string(),
                    serde_json::json!({"in_use_bytes": u, "reserved_bytes": r}),
                )
            })
            .collect();
        serde_json::json!({
            "measure": "cubecl memory_usage(): bytes held by live tensors (in use) and reserved from the driver, \
                        sampled after set-up and after the forward, backward and optimizer phases of every step; \
                        peak_bytes is the largest reserved sample (an in-use peak inside a phase can be higher than \
                        any in-use sample)",
            "peak_bytes": peak_reserved,
            "peak_in_use_bytes": peak_used,
            "peak_reserved_bytes": peak_reserved,
            "samples": samples,
            "process_peak_rss_bytes": rss,
        })
    }
}

/// How to read cubecl's memory usage on backend `B`, if its float tensors are cubecl tensors of
/// a backend named here (the unfused wgpu backend; the CUDA backend when it is unfused).
fn cube_usage_fn<B: Backend>() -> Option<UsageFn<B::Device>> {
    #[cfg(feature = "wgpu")]
    {
        type W = llama_pro::core::device::WgpuBackend;
        if TypeId::of::<B>() == TypeId::of::<W>() {
            return Some(|d| {
                cube_usage::<B, <W as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive>(
                    d,
                    |t| {
                        t.client
                            .memory_usage()
                            .ok()
                            .map(|u| (u.bytes_in_use, u.bytes_reserved))
                    },
                )
            });
        }
    }
    #[cfg(feature = "cuda")]
    {
        type C = llama_pro::core::device::CudaBackend;
        if TypeId::of::<B>() == TypeId::of::<C>() {
            return Some(|d| {
                cube_usage::<B, <C as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive>(
                    d,
                    |t| {
                        t.client
                            .memory_usage()
                            .ok()
                            .map(|u| (u.bytes_in_use, u.bytes_reserved))
                    },
                )
            });
        }
    }
    let _ = TypeId::of::<B>();
    None
}

/// A one-element tensor of `B` as the concrete primitive `P`, read by `f`.
#[allow(dead_code)]
fn cube_usage<B: Backend, P: 'static>(
    device: &B::Device,
    f: impl Fn(&P) -> Option<(u64, u64)>,
) -> Option<(u64, u64)> {
    let t = Tensor::<B, 1>::zeros([1], device).into_primitive().tensor();
    let any: Box<dyn Any> = Box::new(t);
    let p = any.downcast::<P>().ok()?;
    f(&p)
}

/// Polls `nvidia-smi` for the GPU's used memory every 100 ms in a child process, keeping the
/// largest value.
struct SmiPoller {
    child: std::process::Child,
    reader: std::thread::JoinHandle<Option<u64>>,
    baseline: Option<u64>,
}

impl SmiPoller {
    fn start(index: usize) -> Option<Self> {
        let query = |extra: &[&str]| {
            let mut c = std::process::Command::new("nvidia-smi");
            c.args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                &index.to_string(),
            ])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
            c
        };
        let once = query(&[]).output().ok()?;
        if !once.status.success() {
            return None;
        }
        let mib = |s: &str| s.trim().parse::<u64>().ok().map(|m| m * 1024 * 1024);
        let baseline = mib(String::from_utf8_lossy(&once.stdout).lines().next()?);
        let mut child = query(&["-lms", "100"]).spawn().ok()?;
        let stdout = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| mib(&l))
                .max()
        });
        Some(Self {
            child,
            reader,
            baseline,
        })
    }

    /// (memory used before the run, peak while it ran), in bytes.
    fn stop(mut self) -> (Option<u64>, Option<u64>) {
        // One more sample period so that the end of the last step is seen.
        std::thread::sleep(std::time::Duration::from_millis(150));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let peak = self.reader.join().ok().flatten();
        (self.baseline, peak)
    }
}

/// The memory planner's prediction for this training run
/// ([`MemoryPlan::for_training`](llama_pro::train::memory::MemoryPlan::for_training), what
/// `train --dry-run` prints), to hold against the measured peak.
fn memory_plan(
    cfg: &LlamaConfig,
    a: &BenchArgs,
    seq: usize,
    batch: usize,
    map: &llama_pro::core::expand::LayerMap,
) -> anyhow::Result<serde_json::Value> {
    use llama_pro::train::memory::{AttentionKind, MemoryPlan, PlanInputs};
    if !a.mode.trains() {
        return Ok(
            serde_json::json!({"available": false, "note": "the planner predicts training runs"}),
        );
    }
    let selection = Selection::parse(if a.mode == Mode::Pro {
        "expanded"
    } else {
        "all"
    })?;
    let mut inputs = PlanInputs::new(selection, map.clone());
    inputs.dtype = a.dtype;
    inputs.seq_len = seq;
    inputs.batch_size = batch;
    inputs.grad_accum = 1;
    inputs.checkpointing = a.checkpointing;
    inputs.attention = AttentionKind::default_for(a.device, a.dtype);
    inputs.device = a.device;
    inputs.label = a.mode.name().to_string();
    let plan = MemoryPlan::for_training(cfg, &inputs);
    Ok(serde_json::json!({
        "available": true,
        "total_bytes": plan.total_bytes(),
        "plan": plan.to_json(),
    }))
}

fn gb(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
}

fn print_summary(r: &serde_json::Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let shape = if r["mode"] == "generate" {
        format!(
            "{} new tokens per step after a {PROMPT_TOKENS}-token prompt",
            r["tokens_per_step"]
        )
    } else {
        format!("{} x {} tokens per step", r["batch"], r["seq"])
    };
    println!(
        "bench {} {} {} on {} ({}): {} of {} parameters trainable, {shape}",
        r["preset"].as_str().unwrap_or(""),
        r["mode"].as_str().unwrap_or(""),
        r["dtype"].as_str().unwrap_or(""),
        r["device"].as_str().unwrap_or(""),
        r["device_name"].as_str().unwrap_or(""),
        r["trainable"],
        r["params"],
    );
    let st = &r["step_s"];
    println!(
        "  {:.0} tokens/s   step {:.4} s mean, {:.4} s min ({} steps after {} warm-up; set-up {:.1} s)",
        f("tokens_per_s"),
        st["mean"].as_f64().unwrap_or(f64::NAN),
        st["min"].as_f64().unwrap_or(f64::NAN),
        r["steps"],
        r["warmup"],
        f("setup_s"),
    );
    if let Some(fw) = r["phase_s"]["forward"].as_f64() {
        println!(
            "  phases: forward {:.4} s, backward {:.4} s, optimizer {:.4} s",
            fw,
            r["phase_s"]["backward"].as_f64().unwrap_or(f64::NAN),
            r["phase_s"]["optimizer"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "  model FLOPs {:.3e} per step ({:.3e} counting causal attention), {:.2} TFLOP/s achieved",
        f("flops_per_step"),
        f("flops_per_step_causal"),
        f("achieved_tflops")
    );
    match r["mfu"].as_f64() {
        Some(m) => println!(
            "  MFU {:.1}% ({:.1}% causal) of {:.2} TFLOP/s ({})",
            100.0 * m,
            100.0 * r["mfu_causal"].as_f64().unwrap_or(f64::NAN),
            f("peak_tflops"),
            r["peak_source"].as_str().unwrap_or("")
        ),
        None => println!(
            "  MFU: the device's peak is unknown ({}); give --peak-tflops",
            r["device_name"].as_str().unwrap_or("")
        ),
    }
    let m = &r["memory"];
    println!(
        "  peak memory {} ({})",
        gb(m["peak_bytes"].as_u64()),
        m["measure"].as_str().unwrap_or("")
    );
    if let Some(s) = m.get("nvidia_smi") {
        println!(
            "  nvidia-smi: {} used at peak, {} before the run",
            gb(s["peak_bytes"].as_u64()),
            gb(s["before_bytes"].as_u64())
        );
    }
    if let Some(t) = r["memory_plan"]["total_bytes"].as_u64() {
        println!(
            "  memory plan (train --dry-run's prediction): {}",
            gb(Some(t))
        );
    }
    println!(
        "  loss {:.4} (first step) {:.4} (last)",
        f("loss_first"),
        f("loss_last")
    );
}
