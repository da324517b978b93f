//! Generation: the cached loop equals repeated full forwards; sampling is seeded.

use burn::tensor::{Int, Tensor, TensorData};
use llama_pro::core::generate::{GenerationConfig, Sampler, argmax, generate};
use llama_pro::core::{DType, LlamaForCausalLM};

use crate::common::*;

#[test]
fn greedy_generation_matches_full_forward_argmax() {
    let device = Default::default();
    let (model, _) = LlamaForCausalLM::<Cpu>::from_pretrained(
        model_dir("llama-gqa-tied-sharded-f32"),
        &device,
        Some(DType::F32),
    )
    .unwrap();
    let prompt = vec![1u32, 17, 42, 99];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let got = generate(&model, &prompt, &cfg, &device, |_| {}).unwrap();
    assert_eq!(got.len(), 12);
    // Reference: no cache, recompute the whole sequence each step.
    let mut seq: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for &tok in &got {
        let n = seq.len();
        let logits = model.forward(Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(seq.clone(), [1, n]),
            &device,
        ));
        let (last, _) = to_vec(logits.narrow(1, n - 1, 1));
        assert_eq!(argmax(&last), tok);
        seq.push(tok as i64);
    }
}

#[test]
fn generation_without_kv_cache_is_the_same() {
    let device = Default::default();
    let (model, _) = LlamaForCausalLM::<Cpu>::from_pretrained(
        model_dir("qwen2-bias-f32"),
        &device,
        Some(DType::F32),
    )
    .unwrap();
    let prompt = [1u32, 9, 33];
    for temperature in [0.0, 1.0] {
        let cfg = GenerationConfig {
            max_new_tokens: 10,
            temperature,
            seed: 5,
            ..Default::default()
        };
        let cached = generate(&model, &prompt, &cfg, &device, |_| {}).unwrap();
        let plain = generate(
            &model,
            &prompt,
            &GenerationConfig {
                use_kv_cache: false,
                ..cfg
            },
            &device,
            |_| {},
        )
        .unwrap();
        assert_eq!(cached, plain, "temperature {temperature}");
    }
}

#[test]
fn generation_stops_at_eos_and_sampling_is_seeded() {
    let device = Default::default();
    let (model, _) = LlamaForCausalLM::<Cpu>::from_pretrained(
        model_dir("llama-mha-f32"),
        &device,
        Some(DType::F32),
    )
    .unwrap();
    let prompt = [1u32, 5, 6];
    let greedy = generate(
        &model,
        &prompt,
        &GenerationConfig {
            max_new_tokens: 5,
            ..Default::default()
        },
        &device,
        |_| {},
    )
    .unwrap();
    // Declaring the first greedy token an EOS stops right after it.
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        eos_token_ids: vec![greedy[0]],
        ..Default::default()
    };
    assert_eq!(
        generate(&model, &prompt, &cfg, &device, |_| {}).unwrap(),
        vec![greedy[0]]
    );

    let sample = |seed| {
        let cfg = GenerationConfig {
            max_new_tokens: 20,
            temperature: 1.5,
            top_p: Some(0.95),
            seed,
            ..Default::default()
        };
        generate(&model, &prompt, &cfg, &device, |_| {}).unwrap()
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
    // top-k = 1 is greedy whatever the temperature.
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        temperature: 2.0,
        top_k: Some(1),
        seed: 3,
        ..Default::default()
    };
    assert_eq!(
        generate(&model, &prompt, &cfg, &device, |_| {}).unwrap(),
        greedy
    );
}

#[test]
fn sampler_respects_top_p_and_rejects_bad_options() {
    // Probabilities 0.5, 0.3, 0.2 (logits = ln p): top-p 0.6 keeps the first two only.
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let mut s = Sampler::new(GenerationConfig {
        temperature: 1.0,
        top_p: Some(0.6),
        seed: 1,
        ..Default::default()
    })
    .unwrap();
    let mut counts = [0usize; 3];
    for _ in 0..4000 {
        counts[s.sample(&logits) as usize] += 1;
    }
    assert_eq!(counts[2], 0, "{counts:?}");
    let frac = counts[0] as f64 / 4000.0;
    assert!((frac - 0.625).abs() < 0.03, "{counts:?}");
    assert!(
        Sampler::new(GenerationConfig {
            top_p: Some(1.5),
            ..Default::default()
        })
        .is_err()
    );
    assert!(
        Sampler::new(GenerationConfig {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err()
    );
}
