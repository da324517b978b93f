//! GGUF: dequantisation against gguf-py, import of llama.cpp's converter output, export compared
//! with it, round trips and errors. Fixtures: `scripts/make_gguf_fixtures.py`
//! (`tests/fixtures/gguf/`, sources in its SOURCES.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama_pro::core::gguf::convert::{
    ExportOptions, ImportOptions, export_gguf, gguf_name, import_gguf,
};
use llama_pro::core::gguf::{
    ArrayValue, GgmlType, GgufFile, PendingTensor, Value, quant, write_gguf,
};
use llama_pro::core::weights::Checkpoint;
use llama_pro::core::{DType, HfConfig};

use crate::common::*;

fn gguf_fixture(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

fn golden_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            (
                n,
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn dequantisation_is_bitwise_gguf_py() {
    let file = GgufFile::open(gguf_fixture("quants.gguf")).unwrap();
    let golden = golden_tensors(&gguf_fixture("quants-golden.safetensors"));
    let mut seen = vec![];
    for t in &file.tensors {
        let ours = file.dequantize(t).unwrap();
        let want = &golden[&t.name];
        assert_eq!(ours.len(), want.len(), "{}", t.name);
        let bad = ours
            .iter()
            .zip(want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            bad,
            0,
            "{} ({}): {bad} elements differ from gguf-py",
            t.name,
            t.ggml_type.name()
        );
        seen.push(t.ggml_type.name());
    }
    for must in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    ] {
        assert!(seen.contains(&must), "{must} not in the fixture: {seen:?}");
    }
    println!("bitwise equal to gguf-py: {seen:?}");
}

/// Every tensor of two HF directories, as f32.
fn tensors_of(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let hf = HfConfig::from_path(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    hf.config
        .tensor_shapes()
        .into_iter()
        .map(|(n, s)| {
            let v = ckpt.read_f32(&n, &s).unwrap();
            (n, (s, v))
        })
        .collect()
}

fn import(file: &Path, tag: &str, dtype: Option<DType>) -> PathBuf {
    let out = tmpdir(tag).join("m");
    import_gguf(
        file,
        &out,
        &ImportOptions {
            dtype,
            overwrite: false,
        },
        &|_, _| {},
    )
    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    out
}

const CONVERTED: &[&str] = &["llama-mha-f32", "qwen2-bias-f32", "mistral-window-f32"];

/// The conversions of `model` by llama.cpp's converter that the fixtures hold (f32, f16, q8_0).
fn conversions(model: &str) -> Vec<&'static str> {
    let found: Vec<&str> = ["f32", "f16", "bf16", "q8_0"]
        .into_iter()
        .filter(|ty| gguf_fixture(&format!("{model}-{ty}.gguf")).exists())
        .collect();
    assert!(
        !found.is_empty(),
        "no llama.cpp conversion of {model} in tests/fixtures/gguf"
    );
    found
}

#[test]
fn import_of_llama_cpp_conversions_gives_back_the_model() {
    for model in CONVERTED {
        let original = tensors_of(&model_dir(model));
        let orig_cfg = HfConfig::from_path(model_dir(model)).unwrap().config;
        for ty in conversions(model) {
            let file = gguf_fixture(&format!("{model}-{ty}.gguf"));
            let out = import(
                &file,
                &format!("gguf-import-{model}-{ty}"),
                Some(DType::F32),
            );
            let cfg = HfConfig::from_path(&out).unwrap().config;
            assert_eq!(cfg.hidden_size, orig_cfg.hidden_size);
            assert_eq!(cfg.num_hidden_layers, orig_cfg.num_hidden_layers);
            assert_eq!(cfg.num_attention_heads, orig_cfg.num_attention_heads);
            assert_eq!(cfg.num_key_value_heads, orig_cfg.num_key_value_heads);
            assert_eq!(cfg.head_dim, orig_cfg.head_dim);
            assert_eq!(cfg.intermediate_size, orig_cfg.intermediate_size);
            assert_eq!(cfg.qkv_bias, orig_cfg.qkv_bias);
            assert_eq!(cfg.tie_word_embeddings, orig_cfg.tie_word_embeddings);
            assert_eq!(cfg.rope_theta, orig_cfg.rope_theta);
            assert_eq!(
                cfg.rms_norm_eps, orig_cfg.rms_norm_eps,
                "{model}: ε read back as written"
            );
            let got = tensors_of(&out);
            // convert pads the vocabulary to config.vocab_size; our fixtures have no padding rows.
            assert_eq!(got.len(), original.len(), "{model} {ty}");
            let mut worst = 0f32;
            for (name, (shape, want)) in &original {
                let (s, v) = &got[name];
                assert_eq!(s, shape, "{model} {ty} {name}");
                match ty {
                    "f32" => assert!(
                        v.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{model} f32 {name}: not bitwise (row permutation?)"
                    ),
                    "f16" if shape.len() > 1 => {
                        for (a, b) in v.iter().zip(want) {
                            assert_eq!(*a, half::f16::from_f32(*b).to_f32(), "{model} f16 {name}");
                        }
                    }
                    "bf16" if shape.len() > 1 => {
                        for (a, b) in v.iter().zip(want) {
                            assert_eq!(
                                *a,
                                half::bf16::from_f32(*b).to_f32(),
                                "{model} bf16 {name}"
                            );
                        }
                    }
                    "q8_0" if shape.len() > 1 => {
                        // Per block of 32: |error| ≤ d/2 (+ d's own f16 rounding).
                        for (i, (vb, wb)) in v.chunks(32).zip(want.chunks(32)).enumerate() {
                            let d = wb.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                            for (a, b) in vb.iter().zip(wb) {
                                let e = (a - b).abs();
                                worst = worst.max(e / d.max(1e-30));
                                assert!(
                                    e <= d * 0.5 + d * 0.07 + 1e-7,
                                    "{model} q8_0 {name} block {i}: {a} vs {b}"
                                );
                            }
                        }
                    }
                    // 1-D tensors stay F32 in every conversion.
                    _ => assert!(
                        v.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{model} {ty} {name} (1-D, F32)"
                    ),
                }
            }
            if ty == "q8_0" {
                println!("{model} q8_0: worst error {worst:.3} quantisation steps");
            }
        }
    }
}

fn value_str(v: &Value) -> String {
    match v {
        Value::Array(ArrayValue::String(s)) => format!("{s:?}"),
        Value::Array(ArrayValue::I32(s)) => format!("{s:?}"),
        Value::Array(ArrayValue::F32(s)) => format!("{s:?}"),
        v => format!("{v:?}"),
    }
}

#[test]
fn export_writes_what_llama_cpp_convert_writes() {
    for model in CONVERTED {
        for ty in conversions(model) {
            let theirs = GgufFile::open(gguf_fixture(&format!("{model}-{ty}.gguf"))).unwrap();
            let path = tmpdir(&format!("gguf-export-{model}-{ty}")).join("m.gguf");
            export_gguf(
                &model_dir(model),
                &path,
                &ExportOptions {
                    ggml_type: GgmlType::from_name(ty).unwrap(),
                    name: None,
                    overwrite: false,
                },
                &mut |_, _| {},
            )
            .unwrap();
            let ours = GgufFile::open(&path).unwrap();
            // Metadata: same keys in the same order and the same values, except the names
            // convert derives from the directory name (general.name, basename, size_label...).
            let keep = |k: &str| {
                !matches!(
                    k,
                    "general.name" | "general.basename" | "general.finetune" | "general.size_label"
                )
            };
            let a: Vec<(&String, String)> = ours
                .metadata
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k, value_str(v)))
                .collect();
            let b: Vec<(&String, String)> = theirs
                .metadata
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k, value_str(v)))
                .collect();
            let ka: Vec<_> = a.iter().map(|x| x.0).collect();
            let kb: Vec<_> = b.iter().map(|x| x.0).collect();
            assert_eq!(ka, kb, "{model} {ty}: metadata keys");
            for ((k, va), (_, vb)) in a.iter().zip(&b) {
                assert_eq!(va, vb, "{model} {ty}: {k}");
            }
            // Tensors: same names, dims, types and bytes (order may differ: convert follows
            // the safetensors key order).
            assert_eq!(ours.tensors.len(), theirs.tensors.len(), "{model} {ty}");
            for t in &theirs.tensors {
                let o = ours
                    .tensor(&t.name)
                    .unwrap_or_else(|| panic!("{model} {ty}: we do not write {}", t.name));
                assert_eq!(o.dims, t.dims, "{model} {ty} {}", t.name);
                assert_eq!(o.ggml_type, t.ggml_type, "{model} {ty} {}", t.name);
                assert!(
                    ours.tensor_bytes(o) == theirs.tensor_bytes(t),
                    "{model} {ty} {}: bytes differ",
                    t.name
                );
            }
        }
    }
}

#[test]
fn export_then_import_round_trips() {
    for model in MODELS {
        let path = tmpdir(&format!("gguf-rt-{model}")).join("m.gguf");
        export_gguf(
            &model_dir(model),
            &path,
            &ExportOptions {
                ggml_type: GgmlType::F32,
                name: Some("rt".into()),
                overwrite: false,
            },
            &mut |_, _| {},
        )
        .unwrap();
        let back = import(&path, &format!("gguf-rt-back-{model}"), Some(DType::F32));
        let (a, b) = (tensors_of(&model_dir(model)), tensors_of(&back));
        assert_eq!(a.len(), b.len(), "{model}");
        for (n, (s, v)) in &a {
            assert_eq!(&b[n].0, s, "{model} {n}");
            assert!(
                b[n].1
                    .iter()
                    .zip(v)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{model} {n}"
            );
        }
        let (ca, cb) = (
            HfConfig::from_path(model_dir(model)).unwrap().config,
            HfConfig::from_path(&back).unwrap().config,
        );
        assert_eq!(ca.rope_scaling, cb.rope_scaling, "{model}: rope scaling");
        assert_eq!(
            ca.max_position_embeddings, cb.max_position_embeddings,
            "{model}"
        );
    }
}

/// A GGUF file written with our writer: llama metadata and the given tensors.
fn small_gguf(path: &Path, arch: &str, tensors: Vec<(&str, Vec<u64>, GgmlType)>) {
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        (format!("{arch}.block_count"), Value::U32(1)),
        (format!("{arch}.embedding_length"), Value::U32(32)),
        (format!("{arch}.feed_forward_length"), Value::U32(64)),
        (format!("{arch}.attention.head_count"), Value::U32(2)),
    ];
    let pending = tensors
        .into_iter()
        .map(|(n, dims, ty)| {
            let numel: u64 = dims.iter().product();
            PendingTensor {
                name: n.to_string(),
                dims,
                ggml_type: ty,
                data: Box::new(move || Ok(vec![0u8; ty.row_bytes(numel as usize)])),
            }
        })
        .collect();
    write_gguf(path, &meta, pending, &mut |_, _| {}).unwrap();
}

fn import_err(path: &Path) -> String {
    let out = path.with_extension("out");
    let e = import_gguf(path, &out, &ImportOptions::default(), &|_, _| {})
        .err()
        .expect("import should fail")
        .to_string();
    assert!(!out.exists(), "a failed import leaves no output");
    e
}

#[test]
fn bad_gguf_files_are_named() {
    let dir = tmpdir("gguf-bad");
    // Not GGUF at all.
    let p = dir.join("x.gguf");
    std::fs::write(&p, b"PK\x03\x04 a zip").unwrap();
    let e = import_err(&p);
    assert!(e.contains("x.gguf") && e.contains("not a GGUF file"), "{e}");
    // Another architecture.
    let p = dir.join("neox.gguf");
    small_gguf(
        &p,
        "gptneox",
        vec![("token_embd.weight", vec![32, 8], GgmlType::F32)],
    );
    let e = import_err(&p);
    assert!(e.contains("\"gptneox\"") && e.contains("llama"), "{e}");
    // A quantisation type we do not dequantise.
    let p = dir.join("iq2.gguf");
    small_gguf(
        &p,
        "llama",
        vec![
            ("token_embd.weight", vec![256, 8], GgmlType::F32),
            ("blk.0.attn_q.weight", vec![256, 32], GgmlType::IQ2_XXS),
        ],
    );
    let e = import_err(&p);
    assert!(
        e.contains("blk.0.attn_q.weight (IQ2_XXS)") && e.contains("Q4_K"),
        "{e}"
    );
    // Truncated: the data of the last tensor is cut.
    let p = dir.join("cut.gguf");
    small_gguf(
        &p,
        "llama",
        vec![("token_embd.weight", vec![32, 8], GgmlType::F32)],
    );
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = import_err(&p);
    assert!(
        e.contains("token_embd.weight") && e.contains("truncated"),
        "{e}"
    );
    // Header cut in the metadata.
    std::fs::write(&p, &bytes[..40]).unwrap();
    let e = import_err(&p);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // A missing block tensor is named by its GGUF name.
    let p = dir.join("missing.gguf");
    small_gguf(
        &p,
        "llama",
        vec![("token_embd.weight", vec![32, 8], GgmlType::F32)],
    );
    let e = import_err(&p);
    assert!(
        e.contains("missing tensor") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
}

#[test]
fn export_refuses_to_overwrite_and_leaves_no_temp() {
    let dir = tmpdir("gguf-exists");
    let path = dir.join("m.gguf");
    std::fs::write(&path, b"keep").unwrap();
    let e = export_gguf(
        &model_dir("llama-mha-f32"),
        &path,
        &ExportOptions {
            ggml_type: GgmlType::F16,
            name: None,
            overwrite: false,
        },
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("m.gguf") && e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    // A model with a NaN stops the export; the old file stays, no temporary is left.
    let bad = copy_model("llama-mha-f32", "gguf-nan");
    let ckpt_file = bad.join("model.safetensors");
    let bytes = std::fs::read(&ckpt_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, llama_pro::core::save::OwnedTensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let mut data = t.data().to_vec();
            if n == "model.layers.1.mlp.up_proj.weight" {
                data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            (
                n,
                llama_pro::core::save::OwnedTensor {
                    dtype: DType::F32,
                    shape: t.shape().to_vec(),
                    bytes: data,
                },
            )
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    drop(st);
    llama_pro::core::save::write_safetensors(&ckpt_file, &tensors).unwrap();
    let e = export_gguf(
        &bad,
        &path,
        &ExportOptions {
            ggml_type: GgmlType::F16,
            name: None,
            overwrite: true,
        },
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn q8_0_matches_the_reference_rounding() {
    // Half-way cases round away from zero, as gguf-py's np_roundf: 127 · x / max = ±k.5.
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 0.5;
    x[2] = -0.5;
    x[3] = 1.5;
    x[4] = -2.5;
    let q = quant::quantize(GgmlType::Q8_0, &x);
    let qs: Vec<i8> = q[2..].iter().map(|&b| b as i8).collect();
    assert_eq!(&qs[..5], &[127, 1, -1, 2, -3]);
    assert_eq!(
        gguf_name("model.layers.0.self_attn.o_proj.weight").unwrap(),
        "blk.0.attn_output.weight"
    );
}

#[test]
fn metadata_of_every_value_type_reads_as_gguf_py_wrote_it() {
    let file = GgufFile::open(gguf_fixture("quants.gguf")).unwrap();
    let want: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(gguf_fixture("quants-kv.json")).unwrap())
            .unwrap();
    let names = [
        "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING",
        "ARRAY", "UINT64", "INT64", "FLOAT64",
    ];
    let scalar_json = |v: &Value| -> serde_json::Value {
        match v {
            Value::Bool(b) => (*b).into(),
            Value::String(s) => s.clone().into(),
            Value::F32(x) => (*x as f64).into(),
            Value::F64(x) => (*x).into(),
            Value::I8(x) => (*x).into(),
            Value::I16(x) => (*x).into(),
            Value::I32(x) => (*x).into(),
            Value::I64(x) => (*x).into(),
            v => v.as_u64().unwrap().into(),
        }
    };
    for (k, w) in &want {
        let v = file.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(names[v.type_code() as usize], w["type"], "{k}: type");
        let got: serde_json::Value = match v {
            Value::Array(ArrayValue::String(s)) => s.clone().into(),
            Value::Array(ArrayValue::I32(s)) => s.clone().into(),
            Value::Array(ArrayValue::U32(s)) => s.clone().into(),
            Value::Array(ArrayValue::F32(s)) => {
                s.iter().map(|&x| x as f64).collect::<Vec<_>>().into()
            }
            Value::Array(ArrayValue::Other(_, s)) => {
                s.iter().map(scalar_json).collect::<Vec<_>>().into()
            }
            v => scalar_json(v),
        };
        assert_eq!(got, w["value"], "{k}");
    }
    assert!(want.len() >= 20);
}

#[test]
fn cli_import_inspect_export() {
    use crate::cli::{run_err, run_ok};
    let file = gguf_fixture("llama-mha-f32-q8_0.gguf");
    let f = file.to_str().unwrap();
    let dir = tmpdir("gguf-cli");
    let out = dir.join("m");
    let o = out.to_str().unwrap();
    let text = run_ok(&["inspect", f]);
    assert!(
        text.contains("LlamaForCausalLM") && text.contains("Q8_0"),
        "{text}"
    );
    assert!(text.contains("tokenizer.ggml.model = \"gpt2\""), "{text}");
    let v: serde_json::Value = serde_json::from_str(&run_ok(&["inspect", f, "--json"])).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["config"]["num_hidden_layers"], 4);
    let text = run_ok(&["import-gguf", f, "--output", o, "--quiet"]);
    assert!(text.contains("Q8_0") && text.contains("f32"), "{text}");
    // The imported model runs: eval and generation through its rebuilt tokenizer.
    run_ok(&[
        "generate",
        "--model",
        o,
        "--prompt",
        "def f",
        "--max-new-tokens",
        "4",
    ]);
    let e = run_err(&["import-gguf", f, "--output", o, "--quiet"]);
    assert!(e.contains("exists"), "{e}");
    let g = dir.join("m.gguf");
    let text = run_ok(&[
        "export-gguf",
        "--model",
        o,
        "--output",
        g.to_str().unwrap(),
        "--dtype",
        "q8_0",
        "--quiet",
    ]);
    assert!(text.contains("Q8_0") && text.contains("F32"), "{text}");
    // A model directory that is not one.
    let e = run_err(&[
        "export-gguf",
        "--model",
        dir.to_str().unwrap(),
        "--output",
        "x.gguf",
    ]);
    assert!(e.contains("config.json"), "{e}");
    let e = run_err(&[
        "export-gguf",
        "--model",
        o,
        "--output",
        "x.gguf",
        "--dtype",
        "q4_k",
    ]);
    assert!(e.contains("q4_k") && e.contains("q8_0"), "{e}");
    let e = run_err(&["import-gguf", "no-such.gguf", "--output", o]);
    assert!(e.contains("no-such.gguf"), "{e}");
}
