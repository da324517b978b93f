//! Training-step benchmarks on the CPU backend (f32, 1,024 tokens per step).
//!
//! Configuration S of the performance issue: vocab 4096, hidden 256, FFN 688, 4 layers, 4 heads,
//! seq 128, batch 8, expanded interleaved to 8 layers (N = 4, P = 1). Cases:
//! - `fwd_bwd/full`: forward + backward with every parameter trainable;
//! - `fwd_bwd/pro`:  the same with only the new blocks trainable (LLaMA Pro): no weight gradients
//!   for frozen parameters and no backward work below the lowest new block;
//! - `step/full`, `step/pro`: the same plus an AdamW update.
//!
//!     cargo bench --bench train_step
//!
//! Throughput is reported in tokens (elements) per second.

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llama_pro::core::LlamaConfig;
use llama_pro::core::expand::{ExpansionPlan, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::model::{LlamaForCausalLM, causal_lm_loss_sum};

type B = Autodiff<Flex>;
const BATCH: usize = 8;
const SEQ: usize = 128;

fn config_s() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(4096);
    c.hidden_size = 256;
    c.intermediate_size = 688;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 4;
    c.head_dim = 64;
    c
}

fn models() -> (LlamaForCausalLM<B>, LlamaForCausalLM<B>) {
    let device = Default::default();
    let base = config_s().init::<B>(&device, 0);
    let (expanded, map) = expand_model(
        base,
        &ExpansionPlan::Interleaved {
            groups: 4,
            copies: 1,
        },
        None,
    )
    .unwrap();
    let (full, _) =
        set_trainable(expanded.clone(), &Selection::parse("all").unwrap(), &map).unwrap();
    let (pro, _) = set_trainable(expanded, &Selection::parse("expanded").unwrap(), &map).unwrap();
    (full, pro)
}

fn batch() -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let device = Default::default();
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| ((i * 2654435761) % 4096) as i64)
        .collect();
    (
        Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), &device),
        Tensor::ones([BATCH, SEQ], &device),
    )
}

fn loss(model: &LlamaForCausalLM<B>, ids: &Tensor<B, 2, Int>, mask: &Tensor<B, 2>) -> Tensor<B, 1> {
    let (s, c) = causal_lm_loss_sum(model.forward(ids.clone()), ids.clone(), mask.clone());
    s / c
}

fn bench(c: &mut Criterion) {
    let (full, pro) = models();
    let (ids, mask) = batch();
    let mut g = c.benchmark_group("fwd_bwd");
    g.sample_size(10)
        .throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, m) in [("full", &full), ("pro", &pro)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let grads = loss(m, &ids, &mask).backward();
                std::hint::black_box(grads);
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("step");
    g.sample_size(10)
        .throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, m) in [("full", full), ("pro", pro)] {
        let mut model = Some(m);
        let mut optim = AdamWConfig::new()
            .with_weight_decay(0.1)
            .with_epsilon(1e-8)
            .init::<B, LlamaForCausalLM<B>>();
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = model.take().unwrap();
                let grads = GradientsParams::from_grads(loss(&m, &ids, &mask).backward(), &m);
                let m = optim.step(1e-4, m, grads);
                // Sync so that lazy work is inside the measurement.
                let _ = m.model.norm.weight.val().into_data();
                model = Some(m);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
