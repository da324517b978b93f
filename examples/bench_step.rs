//! One training-step measurement on the CPU, as library code: the step `llama-pro bench` times on
//! any device (`llama-pro bench --preset S --mode pro`, which `benches/compare_torch.py` runs
//! against PyTorch and which adds FLOPs, MFU, memory and JSON). Prints one JSON line.
//!
//!     cargo run --release --example bench_step -- --case S --mode pro --steps 10 --warmup 3
//!
//! Cases (f32, 1,024 tokens per step): S = vocab 4096, hidden 256, FFN 688, 4 layers, 4 heads,
//! seq 128, batch 8; M = vocab 8192, hidden 512, FFN 1376, 8 layers, 8 heads, seq 256, batch 4.
//! Both expanded interleaved with groups of 4 blocks and one copy each (S: 4 → 5 layers,
//! M: 8 → 10, the paper's 4 → 5 ratio). Modes: `full` (every parameter of the expanded model
//! trains), `pro` (only the new blocks), `forward` (no gradient), `generate` (greedy decoding with
//! the KV cache, batch 1: 16-token prompt, 112 new tokens per step). The step is forward, mean
//! cross-entropy, backward and AdamW (lr 1e-4, β 0.9/0.95, ε 1e-8, wd 0.1), then a host sync.

use std::time::Instant;

use anyhow::{Result, bail};
use llama_pro::core::LlamaConfig;
use llama_pro::core::burn::backend::{Autodiff, Flex};
use llama_pro::core::burn::module::AutodiffModule;
use llama_pro::core::burn::optim::{GradientsParams, Optimizer};
use llama_pro::core::burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use llama_pro::core::expand::{ExpansionPlan, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::generate::{GenerationConfig, generate};
use llama_pro::core::model::LlamaForCausalLM;
use llama_pro::train::optim::FusedAdamW;

use llama_pro::core::burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;

fn config(case: &str) -> Result<(LlamaConfig, usize, usize)> {
    let mut c = LlamaConfig::tiny(4096);
    let (batch, seq) = match case {
        "S" => {
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
            ) = (4096, 256, 688, 4);
            (c.num_attention_heads, c.num_key_value_heads) = (4, 4);
            (8, 128)
        }
        "M" => {
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
            ) = (8192, 512, 1376, 8);
            (c.num_attention_heads, c.num_key_value_heads) = (8, 8);
            (4, 256)
        }
        other => bail!("--case {other}: expected S or M"),
    };
    c.head_dim = c.hidden_size / c.num_attention_heads;
    c.max_position_embeddings = 4096;
    Ok((c, batch, seq))
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    llama_pro::core::device::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: &str| -> String {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| d.to_string())
    };
    let (case, mode) = (get("--case", "S"), get("--mode", "pro"));
    let steps: usize = get("--steps", "10").parse()?;
    let warmup: usize = get("--warmup", "3").parse()?;
    // `--checkpointing 1`: burn's balanced activation checkpointing.
    if get("--checkpointing", "0") == "1" {
        bench::<Autodiff<Flex, BalancedCheckpointing>>(&case, &mode, steps, warmup, true)
    } else {
        bench::<Autodiff<Flex>>(&case, &mode, steps, warmup, false)
    }
}

fn bench<B: llama_pro::core::burn::tensor::backend::AutodiffBackend>(
    case: &str,
    mode: &str,
    steps: usize,
    warmup: usize,
    checkpointing: bool,
) -> Result<()> {
    let (cfg, batch, seq) = config(case)?;
    let device: B::Device = Default::default();
    let base = cfg.init::<B>(&device, 0);
    let groups = cfg.num_hidden_layers / 4;
    let (model, map) = expand_model(
        base,
        &ExpansionPlan::Interleaved { groups, copies: 1 },
        None,
    )?;
    let selection = match mode {
        "full" | "forward" | "generate" => "all",
        "pro" => "expanded",
        other => bail!("--mode {other}: expected full, pro, forward or generate"),
    };
    let (mut model, summary) = set_trainable(model, &Selection::parse(selection)?, &map)?;
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i as u64 * 2654435761) % cfg.vocab_size as u64) as i64)
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let mask = Tensor::<B, 2>::ones([batch, seq], &device);
    // The trainer's optimizer (AdamW, fused on the CPU).
    let mut optim = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1).init::<B, LlamaForCausalLM<B>>();
    let mut times = Vec::new();
    // Per-phase times (Flex is eager, so a phase's ops are done when its call returns; on GPU
    // backends the split is only indicative).
    let mut phases: [Vec<f64>; 3] = Default::default();
    let mut loss_first = f32::NAN;
    let mut loss_last = f32::NAN;
    // Generation: greedy decoding with the KV cache, batch 1, a 16-token prompt, GEN_TOKENS new
    // tokens per "step"; tokens/s counts the new tokens.
    const GEN_TOKENS: usize = 112;
    let tokens_per_step = if mode == "generate" {
        GEN_TOKENS
    } else {
        batch * seq
    };
    let gen_cfg = GenerationConfig {
        max_new_tokens: GEN_TOKENS,
        ..GenerationConfig::default()
    };
    let prompt: Vec<u32> = (0..16u32)
        .map(|i| (i * 2654435761u32) % cfg.vocab_size as u32)
        .collect();
    for i in 0..warmup + steps {
        let t = Instant::now();
        if mode == "generate" {
            let inner = model.valid();
            let out = generate(&inner, &prompt, &gen_cfg, &device, |_| {})?;
            if out.len() != GEN_TOKENS {
                bail!("generated {} tokens, expected {GEN_TOKENS}", out.len());
            }
            loss_last = f32::NAN;
        } else if mode == "forward" {
            let inner = model.valid();
            let (s, c) = inner.loss_sum(ids.clone().inner(), mask.clone().inner());
            loss_last = (s / c).into_scalar().elem::<f32>();
        } else {
            let (s, c) = model.loss_sum(ids.clone(), mask.clone());
            let loss = s / c;
            let t_fwd = t.elapsed().as_secs_f64();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let t_bwd = t.elapsed().as_secs_f64();
            model = optim.step(1e-4, model, grads);
            loss_last = loss.into_scalar().elem::<f32>();
            if i >= warmup {
                let t_all = t.elapsed().as_secs_f64();
                phases[0].push(t_fwd);
                phases[1].push(t_bwd - t_fwd);
                phases[2].push(t_all - t_bwd);
            }
        }
        if i == 0 {
            loss_first = loss_last;
        }
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens_per_s = tokens_per_step as f64 / median;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let phase_s = serde_json::json!({
        "forward": med(&mut phases[0]), "backward": med(&mut phases[1]), "optimizer": med(&mut phases[2]),
    });
    println!(
        "{}",
        serde_json::json!({
            "impl": "llama-pro", "case": case, "mode": mode, "layers": map.len(),
            "params": summary.total(), "trainable": if matches!(mode, "forward" | "generate") { 0 } else { summary.trainable() },
            "tokens_per_step": tokens_per_step, "median_step_s": median, "tokens_per_s": tokens_per_s,
            "peak_rss_mb": peak_rss_kb() as f64 / 1024.0, "loss_first": loss_first, "loss_last": loss_last,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "checkpointing": checkpointing, "phase_s": phase_s,
            "kernels": llama_pro::core::ops::has_kernels::<B>(),
        })
    );
    Ok(())
}
