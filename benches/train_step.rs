//! Criterion benchmarks on the CPU backend (f32): the training step, forward-only and
//! generation, for the two configurations of the performance issue.
//!
//! - S: vocab 4096, hidden 256, FFN 688, 4 layers, 4 heads, seq 128, batch 8;
//! - M: vocab 8192, hidden 512, FFN 1376, 8 layers, 8 heads, seq 256, batch 4;
//!
//! each expanded interleaved with one copy per 4 blocks (S: 5 layers, M: 10), 1,024 tokens per
//! step. Cases per configuration:
//! - `step/full`: forward, cross-entropy, backward, AdamW with every parameter trainable;
//! - `step/pro`: the same with only the new blocks trainable (LLaMA Pro);
//! - `forward`: logits and loss without gradients;
//! - `generate`: greedy decoding with the KV cache, batch 1, 16-token prompt, 32 new tokens.
//!
//! ```text
//! cargo bench --bench train_step              # all
//! cargo bench --bench train_step -- S/        # one configuration
//! ```
//!
//! Throughput is in tokens (elements) per second. `benches/compare_torch.py` runs the same
//! steps in PyTorch in the same session and prints the ratio.

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llama_pro::core::LlamaConfig;
use llama_pro::core::expand::{ExpansionPlan, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::generate::{GenerationConfig, generate};
use llama_pro::core::model::LlamaForCausalLM;
use llama_pro::train::optim::FusedAdamW;

type B = Autodiff<Flex>;

struct Case {
    name: &'static str,
    config: LlamaConfig,
    batch: usize,
    seq: usize,
}

fn cases() -> [Case; 2] {
    let make = |vocab, hidden, ffn, layers, heads| {
        let mut c = LlamaConfig::tiny(vocab);
        c.hidden_size = hidden;
        c.intermediate_size = ffn;
        c.num_hidden_layers = layers;
        c.num_attention_heads = heads;
        c.num_key_value_heads = heads;
        c.head_dim = hidden / heads;
        c.max_position_embeddings = 4096;
        c
    };
    [
        Case {
            name: "S",
            config: make(4096, 256, 688, 4, 4),
            batch: 8,
            seq: 128,
        },
        Case {
            name: "M",
            config: make(8192, 512, 1376, 8, 8),
            batch: 4,
            seq: 256,
        },
    ]
}

fn model(case: &Case, selection: &str) -> LlamaForCausalLM<B> {
    let device = Default::default();
    let base = case.config.init::<B>(&device, 0);
    let groups = case.config.num_hidden_layers / 4;
    let plan = ExpansionPlan::Interleaved { groups, copies: 1 };
    let (expanded, map) = expand_model(base, &plan, None).unwrap();
    set_trainable(expanded, &Selection::parse(selection).unwrap(), &map)
        .unwrap()
        .0
}

fn batch(case: &Case) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let device = Default::default();
    let (b, s, v) = (case.batch, case.seq, case.config.vocab_size as u64);
    let ids: Vec<i64> = (0..b * s)
        .map(|i| ((i as u64 * 2654435761) % v) as i64)
        .collect();
    (
        Tensor::from_data(TensorData::new(ids, [b, s]), &device),
        Tensor::ones([b, s], &device),
    )
}

fn bench(c: &mut Criterion) {
    llama_pro::core::device::tune_allocator();
    for case in cases() {
        let tokens = (case.batch * case.seq) as u64;
        let (ids, mask) = batch(&case);
        let mut g = c.benchmark_group(format!("{}/step", case.name));
        g.sample_size(10).throughput(Throughput::Elements(tokens));
        for (name, selection) in [("full", "all"), ("pro", "expanded")] {
            let mut m = Some(model(&case, selection));
            let mut optim = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1).init::<B, LlamaForCausalLM<B>>();
            g.bench_function(name, |bch| {
                bch.iter(|| {
                    let cur = m.take().unwrap();
                    let (s, n) = cur.loss_sum(ids.clone(), mask.clone());
                    let grads = GradientsParams::from_grads((s / n).backward(), &cur);
                    m = Some(optim.step(1e-4, cur, grads));
                })
            });
        }
        g.finish();

        let inner = model(&case, "all").valid();
        let (ids_i, mask_i) = (ids.clone().inner(), mask.clone().inner());
        let mut g = c.benchmark_group(format!("{}/forward", case.name));
        g.sample_size(10).throughput(Throughput::Elements(tokens));
        g.bench_function("loss", |bch| {
            bch.iter(|| {
                let (s, n) = inner.loss_sum(ids_i.clone(), mask_i.clone());
                std::hint::black_box((s / n).into_scalar())
            })
        });
        g.finish();

        let new_tokens = 32;
        let cfg = GenerationConfig {
            max_new_tokens: new_tokens,
            ..GenerationConfig::default()
        };
        let prompt: Vec<u32> = (0..16u32).collect();
        let mut g = c.benchmark_group(format!("{}/generate", case.name));
        g.sample_size(10)
            .throughput(Throughput::Elements(new_tokens as u64));
        g.bench_function("kv_cache", |bch| {
            bch.iter(|| generate(&inner, &prompt, &cfg, &Default::default(), |_| {}).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
