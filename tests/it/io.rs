//! HuggingFace checkpoint I/O: bitwise round trips, sharding, atomic writes and clear errors.

use std::path::Path;

use llama_pro::core::config::DType;
use llama_pro::core::save::{OwnedTensor, SaveOptions, save_pretrained, write_weights};
use llama_pro::core::weights::Checkpoint;
use llama_pro::core::{CoreError, HfConfig, LlamaForCausalLM};

use crate::common::*;

fn load(dir: &Path, dtype: DType) -> Result<LlamaForCausalLM<Cpu>, CoreError> {
    LlamaForCausalLM::<Cpu>::from_pretrained(dir, &Default::default(), Some(dtype)).map(|(m, _)| m)
}

fn err_of(dir: &Path) -> String {
    match load(dir, DType::F32) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Every tensor of `a` and `b`: same names, same dtype, same shape, same bytes.
fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (ca, cb) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let na: Vec<&str> = ca.names().collect();
    let nb: Vec<&str> = cb.names().collect();
    assert_eq!(
        na,
        nb,
        "tensor names differ between {} and {}",
        a.display(),
        b.display()
    );
    for n in na {
        let (ba, da, sa) = ca.raw(n).unwrap();
        let (bb, db, sb) = cb.raw(n).unwrap();
        assert_eq!((da, sa), (db, sb), "{n}: dtype/shape");
        assert!(ba == bb, "{n}: bytes differ");
    }
}

/// Rewrite `dir/model.safetensors` through `edit` (name → tensor).
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>)) {
    let ck = Checkpoint::open(dir).unwrap();
    let mut ts: Vec<(String, OwnedTensor)> = ck
        .names()
        .map(|n| {
            let (b, _, s) = ck.raw(n).unwrap();
            let dtype = ck.meta(n).unwrap().dtype;
            (
                n.to_string(),
                OwnedTensor {
                    dtype,
                    shape: s.to_vec(),
                    bytes: b.to_vec(),
                },
            )
        })
        .collect();
    drop(ck);
    edit(&mut ts);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    write_weights(dir, ts, usize::MAX).unwrap();
}

#[test]
fn save_load_round_trip_is_bitwise() {
    for name in MODELS {
        let src = model_dir(name);
        let hf = HfConfig::from_path(&src).unwrap();
        for compute in [DType::F32, hf.config.dtype] {
            let model = load(&src, compute).unwrap();
            let out = tmpdir(&format!("rt-{name}-{compute}"));
            let out = out.join("export");
            save_pretrained(&model, &hf, Some(&src), &out, &SaveOptions::default()).unwrap();
            assert_same_checkpoint(&src, &out);
            // Load the export again: identical parameters.
            let again = load(&out, compute).unwrap();
            for (p, q) in model
                .named_parameters()
                .into_iter()
                .zip(again.named_parameters())
            {
                assert_eq!(p.name, q.name);
                assert!(
                    p.value.into_data().as_bytes() == q.value.into_data().as_bytes(),
                    "{name}: {}",
                    p.name
                );
            }
            // config.json keeps every original key and value.
            let a: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                    .unwrap();
            let b: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            for (k, v) in a.as_object().unwrap() {
                assert_eq!(b.get(k), Some(v), "{name}: config key {k}");
            }
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
            ] {
                assert!(out.join(f).exists(), "{name}: {f} not copied");
            }
            let tied = hf.config.tie_word_embeddings;
            assert_eq!(
                Checkpoint::open(&out)
                    .unwrap()
                    .meta("lm_head.weight")
                    .is_some(),
                !tied,
                "{name}: lm_head written iff untied"
            );
        }
    }
}

#[test]
fn named_parameters_are_the_hf_tensor_names() {
    for name in MODELS {
        let ck = Checkpoint::open(model_dir(name)).unwrap();
        let model = load(&model_dir(name), DType::F32).unwrap();
        let mut ours: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|p| p.name)
            .collect();
        ours.sort();
        let theirs: Vec<String> = ck.names().map(str::to_string).collect();
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn sharded_save_writes_an_index_and_reloads() {
    let src = model_dir("llama-mha-f32");
    let hf = HfConfig::from_path(&src).unwrap();
    let model = load(&src, DType::F32).unwrap();
    let out = tmpdir("shard").join("m");
    let opts = SaveOptions {
        max_shard_bytes: 100_000,
        ..Default::default()
    };
    save_pretrained(&model, &hf, Some(&src), &out, &opts).unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(!out.join("model.safetensors").exists());
    let shards = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert!(shards > 1, "expected several shards, got {shards}");
    assert_same_checkpoint(&src, &out);
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total = idx["metadata"]["total_size"].as_u64().unwrap();
    assert_eq!(total as usize, hf.config.num_params() * 4);
}

#[test]
fn save_converts_dtype_when_asked() {
    let src = model_dir("llama-mha-f32");
    let hf = HfConfig::from_path(&src).unwrap();
    let model = load(&src, DType::F32).unwrap();
    let out = tmpdir("bf16").join("m");
    save_pretrained(
        &model,
        &hf,
        Some(&src),
        &out,
        &SaveOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        },
    )
    .unwrap();
    let back = HfConfig::from_path(&out).unwrap();
    assert_eq!(back.config.dtype, DType::BF16);
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.names().all(|n| ck.meta(n).unwrap().dtype == DType::BF16));
    // Values are the f32 ones rounded to nearest bf16.
    let orig = Checkpoint::open(&src).unwrap();
    let a = orig.read_f32("model.norm.weight", &[64]).unwrap();
    let b = ck.read_f32("model.norm.weight", &[64]).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
    }
}

#[test]
fn save_refuses_a_non_empty_directory_and_leaves_no_temp() {
    let src = model_dir("llama-mha-f32");
    let hf = HfConfig::from_path(&src).unwrap();
    let model = load(&src, DType::F32).unwrap();
    let parent = tmpdir("atomic");
    let out = parent.join("m");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let e = save_pretrained(&model, &hf, Some(&src), &out, &SaveOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exists and is not empty") && e.contains("overwrit"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    // With overwrite the directory is replaced as a whole; no temporary directory is left.
    save_pretrained(
        &model,
        &hf,
        Some(&src),
        &out,
        &SaveOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!out.join("keep.txt").exists());
    let names: Vec<String> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["m".to_string()]);
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_model("llama-mha-f32", "missing");
    rewrite(&dir, |ts| {
        ts.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let e = err_of(&dir);
    assert!(
        e.contains("missing tensor \"model.layers.1.mlp.up_proj.weight\"")
            && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = copy_model("llama-mha-f32", "unexpected");
    rewrite(&dir, |ts| {
        ts.push((
            "model.layers.7.self_attn.q_proj.weight".into(),
            OwnedTensor {
                dtype: DType::F32,
                shape: vec![2],
                bytes: vec![0; 8],
            },
        ))
    });
    let e = err_of(&dir);
    assert!(
        e.contains("unexpected tensor")
            && e.contains("model.layers.7.self_attn.q_proj.weight")
            && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = copy_model("llama-mha-f32", "shape");
    rewrite(&dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        t.1.shape = vec![32, 128];
    });
    let e = err_of(&dir);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("[32, 128]")
            && e.contains("[64, 64]"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_named() {
    let dir = copy_model("llama-mha-f32", "trunc");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_of(&dir);
    assert!(
        e.contains(&f.display().to_string()) && e.contains("not a valid safetensors file"),
        "{e}"
    );
    std::fs::write(&f, b"this is not a safetensors file at all").unwrap();
    let e = err_of(&dir);
    assert!(
        e.contains(&f.display().to_string()) && e.contains("not a valid safetensors file"),
        "{e}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_model("llama-gqa-tied-sharded-f32", "shard-missing");
    std::fs::remove_file(dir.join("model-00003-of-00005.safetensors")).unwrap();
    let e = err_of(&dir);
    assert!(e.contains("model-00003-of-00005.safetensors"), "{e}");
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn config_errors_are_clear() {
    let dir = copy_model("llama-gqa-tied-sharded-f32", "cfg");
    edit_config(&dir, |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    });
    let e = err_of(&dir);
    assert!(
        e.contains("config.json") && e.contains("unsupported architecture \"GPT2LMHeadModel\""),
        "{e}"
    );

    let dir = copy_model("llama-gqa-tied-sharded-f32", "cfg-rope");
    edit_config(&dir, |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
        );
    });
    let e = err_of(&dir);
    assert!(e.contains("unsupported RoPE type \"yarn\""), "{e}");

    let dir = copy_model("llama-gqa-tied-sharded-f32", "cfg-key");
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    let e = err_of(&dir);
    assert!(
        e.contains("config.json") && e.contains("missing required key `hidden_size`"),
        "{e}"
    );

    let dir = copy_model("llama-gqa-tied-sharded-f32", "cfg-act");
    edit_config(&dir, |c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    assert!(err_of(&dir).contains("hidden_act"));

    let dir = copy_model("llama-gqa-tied-sharded-f32", "cfg-heads");
    edit_config(&dir, |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    assert!(err_of(&dir).contains("must be a multiple of `num_key_value_heads` (3)"));

    let dir = copy_model("llama-gqa-tied-sharded-f32", "cfg-json");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = err_of(&dir);
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn both_config_layouts_are_read() {
    // llama-mha-f32 was rewritten in the transformers-4 layout, the others are transformers-5.
    let v4 = HfConfig::from_path(model_dir("llama-mha-f32")).unwrap();
    assert!(v4.raw.contains_key("torch_dtype") && v4.raw.contains_key("rope_theta"));
    let v5 = HfConfig::from_path(model_dir("llama3-gqa-headdim-bf16")).unwrap();
    assert!(v5.raw.contains_key("rope_parameters") && v5.raw.contains_key("dtype"));
    assert_eq!(v5.config.dtype, DType::BF16);
    assert_eq!(v5.config.rope_theta, 500000.0);
    assert_eq!(v5.config.head_dim, 32);
    assert!(matches!(
        v5.config.rope_scaling,
        llama_pro::core::RopeScaling::Llama3 { .. }
    ));
    let q = HfConfig::from_path(model_dir("qwen2-bias-f32")).unwrap();
    assert!(q.config.qkv_bias && !q.config.o_bias);
    let m = HfConfig::from_path(model_dir("mistral-window-f32")).unwrap();
    assert_eq!(m.config.sliding_window, Some(6));
}

#[test]
fn device_strings() {
    use llama_pro::core::device::DeviceSpec;
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
    assert_eq!(
        "wgpu".parse::<DeviceSpec>().unwrap(),
        DeviceSpec::Wgpu(None)
    );
    let e = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
    assert!(
        e.contains("device \"tpu\"") && e.contains("expected cpu"),
        "{e}"
    );
    let e = "cuda:x".parse::<DeviceSpec>().unwrap_err().to_string();
    assert!(e.contains("must be a number"), "{e}");
}

/// f16 checkpoints: every weight is the f32 one rounded to f16, in f32 and f16 compute.
#[test]
fn f16_checkpoints_load() {
    let src = model_dir("llama-mha-f32");
    let hf = HfConfig::from_path(&src).unwrap();
    let model = load(&src, DType::F32).unwrap();
    let out = tmpdir("f16").join("m");
    save_pretrained(
        &model,
        &hf,
        Some(&src),
        &out,
        &SaveOptions {
            dtype: Some(DType::F16),
            ..Default::default()
        },
    )
    .unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.names().all(|n| ck.meta(n).unwrap().dtype == DType::F16));
    let orig = Checkpoint::open(&src).unwrap();
    let a = orig
        .read_f32("model.layers.2.mlp.up_proj.weight", &[128, 64])
        .unwrap();
    let b = ck
        .read_f32("model.layers.2.mlp.up_proj.weight", &[128, 64])
        .unwrap();
    assert!(
        a.iter()
            .zip(&b)
            .all(|(x, y)| half::f16::from_f32(*x).to_f32() == *y)
    );
    let golden = Golden::open("llama-mha-f32");
    let device = Default::default();
    for compute in [DType::F32, DType::F16] {
        let m = load(&out, compute).unwrap();
        assert_eq!(m.dtype(), compute);
        let logits = m.forward(golden.ids::<Cpu>("input_ids", &device));
        assert_close(
            &format!("f16 checkpoint, {compute} compute"),
            logits,
            &golden,
            "logits",
            2e-2,
        );
    }
}

/// Each module's `Config::init(device)` builds a module that runs with the documented shapes.
#[test]
fn module_configs_init_and_forward() {
    use burn::tensor::{Distribution, Tensor};
    use llama_pro::core::attention::AttentionConfig;
    use llama_pro::core::block::DecoderLayerConfig;
    use llama_pro::core::mlp::MlpConfig;
    use llama_pro::core::{LlamaConfig, rope::RotaryEmbedding};
    let device = Default::default();
    let c = LlamaConfig::tiny(100);
    let x = Tensor::<Cpu, 3>::random([2, 5, 64], Distribution::Normal(0.0, 1.0), &device);
    let (cos, sin) = RotaryEmbedding::new(&c).tables::<Cpu>(0, 5, DType::F32, &device);
    let attn = AttentionConfig::from_model(&c).init::<Cpu>(&device);
    assert_eq!(
        attn.forward(x.clone(), cos.clone(), sin.clone(), None)
            .dims(),
        [2, 5, 64]
    );
    let mlp = MlpConfig {
        hidden_size: 64,
        intermediate_size: 176,
        bias: false,
    }
    .init::<Cpu>(&device);
    assert_eq!(mlp.forward(x.clone()).dims(), [2, 5, 64]);
    let block = DecoderLayerConfig::from_model(&c).init::<Cpu>(&device);
    assert_eq!(block.forward(x, cos, sin, None).dims(), [2, 5, 64]);
    let model = c.init::<Cpu>(&device, 7);
    assert_eq!(model.num_parameters(), c.num_params());
    // Seeded: the same seed gives the same weights.
    let again = c.init::<Cpu>(&device, 7);
    let (a, b) = (model.named_parameters(), again.named_parameters());
    assert!(
        a.iter()
            .zip(&b)
            .all(|(p, q)| p.value.clone().into_data().as_bytes()
                == q.value.clone().into_data().as_bytes())
    );
}

/// `LlamaConfig::tensor_shapes` (what `expand` checks a checkpoint against without building a
/// model) lists exactly the parameters a built model has, in order, for every fixture and for
/// every bias/tie combination.
#[test]
fn tensor_shapes_match_the_built_model() {
    let mut configs: Vec<llama_pro::core::LlamaConfig> = MODELS
        .iter()
        .map(|m| {
            llama_pro::core::HfConfig::from_path(model_dir(m))
                .unwrap()
                .config
        })
        .collect();
    let mut c = llama_pro::core::LlamaConfig::tiny(50);
    c.qkv_bias = true;
    c.o_bias = true;
    c.mlp_bias = true;
    c.tie_word_embeddings = true;
    configs.push(c);
    for c in configs {
        let model = c.init::<Cpu>(&Default::default(), 0);
        let built: Vec<(String, Vec<usize>)> = model
            .named_parameters()
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        assert_eq!(c.tensor_shapes(), built);
    }
    // And every fixture checkpoint passes the header check.
    for m in MODELS {
        let dir = model_dir(m);
        let hf = llama_pro::core::HfConfig::from_path(&dir).unwrap();
        Checkpoint::open(&dir)
            .unwrap()
            .check_layout(&hf.config)
            .unwrap();
    }
}
