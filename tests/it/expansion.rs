//! Block expansion and freezing: the LLaMA Pro transform is the identity, matches the official
//! expansion script tensor for tensor, and trains only what it should.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, backend::Backend};
use llama_pro::core::expand::{ExpansionPlan, LayerMap, expand_checkpoint, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::model::causal_lm_loss_sum;
use llama_pro::core::save::SaveOptions;
use llama_pro::core::weights::Checkpoint;
use llama_pro::core::{DType, HfConfig, LlamaForCausalLM};
use sha2::{Digest, Sha256};

use crate::common::*;

type Ad = Autodiff<Cpu>;

fn plan(case: &str) -> ExpansionPlan {
    let p: Vec<&str> = case.split('-').collect();
    let n = |i: usize| p[i].parse::<usize>().unwrap();
    match p[0] {
        "interleaved" => ExpansionPlan::Interleaved {
            groups: n(1),
            copies: n(2),
        },
        "top" => ExpansionPlan::Top { k: n(1) },
        "bottom" => ExpansionPlan::Bottom { k: n(1) },
        _ => unreachable!(),
    }
}

#[test]
fn layer_maps_of_each_layout() {
    let m = |p: ExpansionPlan, l| p.layer_map(l).unwrap().compact();
    assert_eq!(
        m(
            ExpansionPlan::Interleaved {
                groups: 2,
                copies: 1
            },
            4
        ),
        "0 1 c1 2 3 c3"
    );
    assert_eq!(
        m(
            ExpansionPlan::Interleaved {
                groups: 4,
                copies: 1
            },
            4
        ),
        "0 c0 1 c1 2 c2 3 c3"
    );
    assert_eq!(
        m(
            ExpansionPlan::Interleaved {
                groups: 2,
                copies: 2
            },
            4
        ),
        "0 1 c0 c1 2 3 c2 c3"
    );
    assert_eq!(m(ExpansionPlan::Top { k: 2 }, 3), "0 1 2 c2 c2");
    assert_eq!(m(ExpansionPlan::Bottom { k: 1 }, 3), "c0 0 1 2");
    assert_eq!(
        m(ExpansionPlan::parse_positions("0@0,2@3").unwrap(), 3),
        "c0 0 1 c2 2"
    );
    // The paper: LLaMA-2-7B 32 blocks, N = 8 → 40, new blocks 4, 9, …, 39 (copies of 3, 7, …, 31).
    let map = ExpansionPlan::Interleaved {
        groups: 8,
        copies: 1,
    }
    .layer_map(32)
    .unwrap();
    assert_eq!(map.len(), 40);
    assert_eq!(map.new_layers(), vec![4, 9, 14, 19, 24, 29, 34, 39]);
    assert_eq!(map.layers[39].source, 31);
    // Composition: expanding an expanded model keeps earlier new blocks new, sources in the base.
    let first = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    }
    .layer_map(4)
    .unwrap();
    let second = ExpansionPlan::Top { k: 1 }.layer_map(6).unwrap();
    assert_eq!(first.then(&second).compact(), "0 1 c1 2 3 c3 c3");
}

#[test]
fn plan_errors_are_clear() {
    let e = |p: ExpansionPlan, l| p.layer_map(l).unwrap_err().to_string();
    let s = e(
        ExpansionPlan::Interleaved {
            groups: 5,
            copies: 1,
        },
        32,
    );
    assert!(
        s.contains("groups 5") && s.contains("N must divide 32: 1, 2, 4, 8, 16, 32"),
        "{s}"
    );
    let s = e(
        ExpansionPlan::Interleaved {
            groups: 4,
            copies: 9,
        },
        32,
    );
    assert!(
        s.contains("copies 9 is larger than the group size 8"),
        "{s}"
    );
    assert!(
        e(
            ExpansionPlan::Interleaved {
                groups: 0,
                copies: 1
            },
            4
        )
        .contains("zero new blocks")
    );
    assert!(e(ExpansionPlan::Top { k: 0 }, 4).contains("adds no block"));
    let s = e(ExpansionPlan::parse_positions("7@1").unwrap(), 4);
    assert!(s.contains("source block 7 does not exist"), "{s}");
    let s = e(ExpansionPlan::parse_positions("1@9").unwrap(), 4);
    assert!(s.contains("position 9 is out of range"), "{s}");
    assert!(e(ExpansionPlan::parse_positions("").unwrap(), 4).contains("zero new blocks"));
    assert!(
        ExpansionPlan::parse_positions("3-4")
            .unwrap_err()
            .to_string()
            .contains("SOURCE@POSITION")
    );
}

fn sha_of(ck: &Checkpoint, name: &str) -> String {
    let (bytes, _, _) = ck.raw(name).unwrap();
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Our streamed expansion equals the official script's, tensor for tensor.
#[test]
fn expansion_matches_the_official_script() {
    let want: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expansion_hashes.json")).unwrap(),
    )
    .unwrap();
    assert!(want.len() >= 7);
    for (key, hashes) in &want {
        let (model, case) = key.split_once('/').unwrap();
        let out = tmpdir(&format!("exp-{model}-{case}")).join("out");
        let report = expand_checkpoint(
            &model_dir(model),
            &out,
            &plan(case),
            &SaveOptions::default(),
        )
        .unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        let names: Vec<&str> = ck.names().collect();
        assert_eq!(
            names,
            hashes.keys().map(String::as_str).collect::<Vec<_>>(),
            "{key}: tensor names"
        );
        for (n, h) in hashes {
            assert_eq!(&sha_of(&ck, n), h, "{key}: {n}");
        }
        // The config says how many layers there are now, and which are new.
        let hf = HfConfig::from_path(&out).unwrap();
        assert_eq!(hf.config.num_hidden_layers, report.to_layers);
        let map = LayerMap::from_config(&hf.raw, report.to_layers, &hf.path).unwrap();
        assert_eq!(map, report.map);
        assert_eq!(
            hf.config.dtype,
            HfConfig::from_path(model_dir(model)).unwrap().config.dtype,
            "{key}: dtype kept"
        );
        println!(
            "{key:<40} {} tensors identical to the official expansion, layers {}",
            hashes.len(),
            map.compact()
        );
    }
}

fn ids<B: Backend>(device: &B::Device) -> Tensor<B, 2, Int> {
    Golden::open("llama-mha-f32").ids::<B>("input_ids", device)
}

fn logits_bytes<B: burn::tensor::backend::Backend>(
    m: &LlamaForCausalLM<B>,
    device: &B::Device,
) -> Vec<u8> {
    m.forward(ids::<B>(device)).into_data().as_bytes().to_vec()
}

/// Every layout, in memory and through a checkpoint, in f32 and bf16: bitwise the same logits.
#[test]
fn expanded_model_is_bitwise_the_identity() {
    let device = Default::default();
    let plans = [
        ExpansionPlan::Interleaved {
            groups: 2,
            copies: 1,
        },
        ExpansionPlan::Interleaved {
            groups: 4,
            copies: 1,
        },
        ExpansionPlan::Interleaved {
            groups: 2,
            copies: 2,
        },
        ExpansionPlan::Interleaved {
            groups: 1,
            copies: 4,
        },
        ExpansionPlan::Top { k: 2 },
        ExpansionPlan::Bottom { k: 2 },
        ExpansionPlan::parse_positions("3@0,0@3,2@5").unwrap(),
    ];
    for name in [
        "llama-mha-f32",
        "qwen2-bias-f32",
        "mistral-window-f32",
        "llama3-gqa-headdim-bf16",
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let (base, _) =
                LlamaForCausalLM::<Cpu>::from_pretrained(model_dir(name), &device, Some(dtype))
                    .unwrap();
            let want = logits_bytes(&base, &device);
            for p in &plans {
                let (exp, map) = expand_model(base.clone(), p, None).unwrap();
                assert_eq!(exp.model.layers.len(), map.len());
                assert!(
                    want == logits_bytes(&exp, &device),
                    "{name} {dtype} {p}: logits differ"
                );
                // New blocks: o_proj/down_proj (and biases) exactly zero; fresh parameter ids.
                let named = exp.named_parameters();
                let base_ids: Vec<_> = base.named_parameters().into_iter().map(|p| p.id).collect();
                for p in &named {
                    if let Some((i, rest)) = llama_pro::core::expand::layer_of(&p.name)
                        && map.layers[i].new
                    {
                        assert!(
                            !base_ids.contains(&p.id),
                            "{name}: {} shares a ParamId with the base",
                            p.name
                        );
                        if rest.starts_with("self_attn.o_proj.")
                            || rest.starts_with("mlp.down_proj.")
                        {
                            let (v, _) = to_vec(p.value.clone());
                            assert!(v.iter().all(|x| *x == 0.0), "{}", p.name);
                        }
                    }
                }
            }
        }
        // Through the streamed checkpoint writer as well.
        let out = tmpdir(&format!("ident-{name}")).join("m");
        expand_checkpoint(
            &model_dir(name),
            &out,
            &ExpansionPlan::Interleaved {
                groups: 2,
                copies: 1,
            },
            &SaveOptions::default(),
        )
        .unwrap();
        let (base, _) =
            LlamaForCausalLM::<Cpu>::from_pretrained(model_dir(name), &device, Some(DType::F32))
                .unwrap();
        let (exp, _) =
            LlamaForCausalLM::<Cpu>::from_pretrained(&out, &device, Some(DType::F32)).unwrap();
        assert!(
            logits_bytes(&base, &device) == logits_bytes(&exp, &device),
            "{name}: checkpoint expansion"
        );
    }
}

fn load_expanded<B: Backend>(dir: &Path, device: &B::Device) -> (LlamaForCausalLM<B>, LayerMap) {
    let (model, hf) =
        LlamaForCausalLM::<B>::from_pretrained(dir, device, Some(DType::F32)).unwrap();
    let map = LayerMap::from_config(&hf.raw, hf.config.num_hidden_layers, &hf.path).unwrap();
    (model, map)
}

fn mean_loss<B: burn::tensor::backend::Backend>(
    model: &LlamaForCausalLM<B>,
    device: &B::Device,
) -> Tensor<B, 1> {
    let ids = ids::<B>(device);
    let mask = Tensor::<B, 2>::ones(ids.dims(), device);
    let (s, c) = causal_lm_loss_sum(model.forward(ids.clone()), ids, mask);
    s / c
}

/// With only the new blocks trainable, the first backward pass gives non-zero gradients only to
/// their o_proj and down_proj, and those equal transformers' (≤ 1e-5).
#[test]
fn first_step_gradients_match_transformers() {
    let device = Default::default();
    let out = expanded_fixture("llama-mha-f32", "grads");
    let (model, map) = load_expanded::<Ad>(&out, &device);
    assert_eq!(map.new_layers(), vec![2, 5]);
    let (model, summary) =
        set_trainable(model, &Selection::parse("expanded").unwrap(), &map).unwrap();
    println!("{summary}");
    let golden = Golden::open("expanded-grads");
    let loss = mean_loss(&model, &device);
    let (l, _) = to_vec(loss.clone());
    let want = golden.f32("loss").0[0];
    assert!((l[0] - want).abs() < 1e-5, "loss {} vs {want}", l[0]);
    let grads = loss.backward();
    let mut checked = 0;
    let mut worst = 0f32;
    for (name, grad) in model.named_grads(&grads) {
        let new = llama_pro::core::expand::layer_of(&name).is_some_and(|(i, _)| map.layers[i].new);
        match grad {
            None => assert!(!new, "{name}: trainable but got no gradient"),
            Some(g) => {
                assert!(new, "{name}: frozen but got a gradient");
                let (g, _) = to_vec(g);
                let (want, _) = golden.f32(&format!("grad.{name}"));
                let d = max_abs_diff(&g, &want);
                worst = worst.max(d);
                assert!(
                    d <= 1e-5,
                    "{name}: gradient differs from transformers by {d}"
                );
                let zero_expected = !(name.contains("o_proj") || name.contains("down_proj"));
                let nonzero = g.iter().any(|x| *x != 0.0);
                assert_eq!(
                    nonzero,
                    !zero_expected,
                    "{name}: gradient should be {}",
                    if zero_expected {
                        "exactly 0"
                    } else {
                        "non-zero"
                    }
                );
                checked += 1;
            }
        }
    }
    println!("{checked} gradients of the new blocks match transformers, max |Δ| = {worst:.3e}");
    assert_eq!(checked, 2 * 9);
}

/// Frozen tensors are bitwise unchanged after several AdamW steps with weight decay; trainable
/// ones move; the optimizer sees only the trainable parameters.
#[test]
fn frozen_parameters_are_bitwise_unchanged_after_training() {
    let device = Default::default();
    let out = expanded_fixture("llama-gqa-tied-sharded-f32", "frozen");
    for spec in ["expanded", "expanded.mlp+norm", "interleaved[2]"] {
        let (model, map) = load_expanded::<Ad>(&out, &device);
        let (mut model, summary) =
            set_trainable(model, &Selection::parse(spec).unwrap(), &map).unwrap();
        let before: Vec<(String, Vec<u8>)> = model
            .named_parameters()
            .into_iter()
            .map(|p| (p.name, p.value.into_data().as_bytes().to_vec()))
            .collect();
        let mut optim = AdamWConfig::new()
            .with_weight_decay(0.1)
            .with_epsilon(1e-8)
            .with_beta_2(0.95)
            .init::<Ad, LlamaForCausalLM<Ad>>();
        for _ in 0..4 {
            let grads = mean_loss(&model, &device).backward();
            let grads = GradientsParams::from_grads(grads, &model);
            assert_eq!(
                grads.len(),
                summary.trainable_names.len(),
                "{spec}: gradients only for trainable params"
            );
            model = optim.step(1e-2, model, grads);
        }
        let after = model.named_parameters();
        for ((name, b), p) in before.iter().zip(after) {
            let same = *b == p.value.into_data().as_bytes().to_vec();
            let trainable = summary.trainable_names.contains(name);
            assert_eq!(
                same,
                !trainable,
                "{spec}: {name} {}",
                if trainable {
                    "did not move"
                } else {
                    "changed while frozen"
                }
            );
        }
        // Optimizer state exists for trainable parameters only.
        let record = optim.to_record();
        assert_eq!(
            record.len(),
            summary.trainable_names.len(),
            "{spec}: optimizer state entries"
        );
    }
}

#[test]
fn selections_express_llama_factory_knobs() {
    let device = Default::default();
    let out = expanded_fixture("llama-mha-f32", "sel");
    let names = |spec: &str| -> Vec<String> {
        let (model, hf) = LlamaForCausalLM::<Cpu>::from_pretrained(&out, &device, None).unwrap();
        let map = LayerMap::from_config(&hf.raw, 6, &hf.path).unwrap();
        Selection::parse(spec)
            .and_then(|sel| set_trainable(model, &sel, &map))
            .map(|(_, s)| s.trainable_names)
            .unwrap_or_else(|e| vec![format!("ERR {e}")])
    };
    let layer_set = |v: &[String]| -> Vec<usize> {
        let mut s: Vec<usize> = v
            .iter()
            .filter_map(|n| llama_pro::core::expand::layer_of(n).map(|x| x.0))
            .collect();
        s.dedup();
        s
    };
    assert_eq!(layer_set(&names("expanded")), vec![2, 5]);
    assert_eq!(names("expanded").len(), 18);
    let extra = names("expanded+embed_tokens+lm_head");
    assert!(
        extra.contains(&"model.embed_tokens.weight".to_string())
            && extra.contains(&"lm_head.weight".to_string())
            && extra.len() == 20
    );
    let mlp = names("expanded.mlp");
    assert_eq!(mlp.len(), 6);
    assert!(mlp.iter().all(|n| n.contains(".mlp.")));
    // LLaMA-Factory's interleaved freeze baseline on 6 layers with N = 2: stride 3 → layers 2, 5.
    assert_eq!(layer_set(&names("interleaved[2]")), vec![2, 5]);
    assert_eq!(layer_set(&names("interleaved[3]")), vec![1, 3, 5]);
    assert_eq!(layer_set(&names("layers[0,4].attn")), vec![0, 4]);
    assert_eq!(names("all-/norm/").len(), 6 * 9 + 2 - 6 * 2);
    assert_eq!(layer_set(&names("original")), vec![0, 1, 3, 4]);
    let err = |spec: &str| names(spec).pop().unwrap();
    assert!(err("layers[9]").contains("layer 9 does not exist"));
    assert!(err("interleaved[4]").contains("N must divide the 6 layers"));
    assert!(err("bogus").contains("unknown term \"bogus\""));
    assert!(err("expanded.ffn").contains("unknown block part"));
    assert!(err("/[/").contains("invalid regex"));
    assert!(err("/nothing-matches-this/").contains("selects no parameter"));
    // A model that was never expanded has no `expanded` blocks; a tied one has no lm_head.
    let (model, hf) = LlamaForCausalLM::<Cpu>::from_pretrained(
        model_dir("llama-gqa-tied-sharded-f32"),
        &device,
        None,
    )
    .unwrap();
    let map = LayerMap::from_config(&hf.raw, 4, &hf.path).unwrap();
    let e = set_trainable(model.clone(), &Selection::parse("expanded").unwrap(), &map)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no expanded blocks") && e.contains("llama-pro expand"),
        "{e}"
    );
    let e = set_trainable(model, &Selection::parse("lm_head").unwrap(), &map)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tied to embed_tokens"), "{e}");
}

/// Per-group learning rates: stepping each group with its own rate (the mechanism the trainer
/// uses) moves a group with rate 0 not at all and the others as usual.
#[test]
fn per_group_learning_rates() {
    let device = Default::default();
    let out = expanded_fixture("llama-mha-f32", "lr");
    let (model, map) = load_expanded::<Ad>(&out, &device);
    let (model, summary) = set_trainable(
        model,
        &Selection::parse("expanded+embed_tokens").unwrap(),
        &map,
    )
    .unwrap();
    let embed_before = model
        .model
        .embed_tokens
        .weight
        .val()
        .into_data()
        .as_bytes()
        .to_vec();
    let block_before = model.model.layers[2]
        .mlp
        .down_proj
        .weight
        .val()
        .into_data()
        .as_bytes()
        .to_vec();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.1)
        .init::<Ad, LlamaForCausalLM<Ad>>();
    let mut grads = mean_loss(&model, &device).backward();
    let embed_id = model.model.embed_tokens.weight.id;
    let block_ids: Vec<_> = model
        .named_parameters()
        .into_iter()
        .filter(|p| summary.trainable_names.contains(&p.name) && p.id != embed_id)
        .map(|p| p.id)
        .collect();
    assert_eq!(block_ids.len(), 18);
    let blocks = GradientsParams::from_params(&mut grads, &model, &block_ids);
    let embeds = GradientsParams::from_params(&mut grads, &model, &[embed_id]);
    assert_eq!((blocks.len(), embeds.len()), (18, 1));
    let model = optim.step(1e-2, model, blocks);
    let model = optim.step(0.0, model, embeds);
    assert_eq!(
        model
            .model
            .embed_tokens
            .weight
            .val()
            .into_data()
            .as_bytes()
            .to_vec(),
        embed_before
    );
    assert_ne!(
        model.model.layers[2]
            .mlp
            .down_proj
            .weight
            .val()
            .into_data()
            .as_bytes()
            .to_vec(),
        block_before
    );
    let _ = model.valid();
}
