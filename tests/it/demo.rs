//! LoRA, pretraining from a random init, tokenizer training, plots and the embedded demo.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use llama_pro::core::linear::LinearConfig;
use llama_pro::core::weights::Checkpoint;
use llama_pro::core::{DType, LlamaForCausalLM, Tokenizer};
use llama_pro::train::config::{DataSource, EvalSet, Method, TrainConfig};
use llama_pro::train::demo::{DemoConfig, DemoMethod, answer_of, run_demo};
use llama_pro::train::eval::evaluate;
use llama_pro::train::trainer::TrainReport;

use crate::common::*;

fn run(cfg: &TrainConfig) -> Result<TrainReport, llama_pro::train::TrainError> {
    train_cpu(cfg, |_| true)
}

fn seqs() -> PathBuf {
    fixtures().join("train/seqs.jsonl")
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
}

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// LoRA's forward against a float64 host computation of `x Wᵀ + b + (α/r)(x Aᵀ) Bᵀ`; a fresh
/// adapter (B = 0) changes nothing bitwise; merging folds it into W.
#[test]
fn lora_linear_matches_reference_and_merges() {
    let dev = Default::default();
    let (d_in, d_out, r, alpha) = (12, 10, 4, 8.0);
    let plain = LinearConfig::new(d_in, d_out, true).init::<Cpu>(&dev);
    let x = Tensor::<Cpu, 2>::from_data(TensorData::new(pseudo(3 * d_in, 1), [3, d_in]), &dev);
    let y0 = to_vec(plain.forward(x.clone())).0;
    let fresh = plain.clone().with_lora(r, alpha, 7);
    assert_eq!(
        to_vec(fresh.forward(x.clone())).0,
        y0,
        "a fresh adapter changes the output"
    );

    let mut l = fresh;
    l.lora_b = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(pseudo(d_out * r, 2), [d_out, r]),
        &dev,
    )));
    let got = to_vec(l.forward(x.clone())).0;
    let w = to_vec(l.weight.val()).0;
    let b = to_vec(l.bias.as_ref().unwrap().val()).0;
    let a = to_vec(l.lora_a.as_ref().unwrap().val()).0;
    let bb = to_vec(l.lora_b.as_ref().unwrap().val()).0;
    let xs = to_vec(x.clone()).0;
    let s = alpha / r as f64;
    let mut want = vec![0f32; 3 * d_out];
    for i in 0..3 {
        let low: Vec<f64> = (0..r)
            .map(|k| {
                (0..d_in)
                    .map(|j| xs[i * d_in + j] as f64 * a[k * d_in + j] as f64)
                    .sum()
            })
            .collect();
        for o in 0..d_out {
            let base: f64 = (0..d_in)
                .map(|j| xs[i * d_in + j] as f64 * w[o * d_in + j] as f64)
                .sum::<f64>()
                + b[o] as f64;
            let up: f64 = (0..r).map(|k| low[k] * bb[o * r + k] as f64).sum();
            want[i * d_out + o] = (base + s * up) as f32;
        }
    }
    let d = max_abs_diff(&got, &want);
    println!("LoRA forward vs f64 reference: {d:.2e}");
    assert!(d < 1e-5, "{d}");
    assert!(
        max_abs_diff(&got, &y0) > 1e-2,
        "the trained adapter had no effect"
    );
    let merged = l.merge_lora();
    assert!(merged.lora_a.is_none() && merged.lora_b.is_none());
    let dm = max_abs_diff(&to_vec(merged.forward(x)).0, &want);
    println!("merged LoRA vs reference: {dm:.2e}");
    assert!(dm < 1e-5, "{dm}");
}

/// `--method lora`: only adapters train (the base weights stay), the export is a plain LLaMA with
/// the adapters merged that evaluates like the trained model, and loss.png is drawn.
#[test]
fn lora_training_trains_adapters_and_exports_merged() {
    let model = model_dir("llama-mha-f32");
    let out = tmpdir("lora-run");
    let cfg = TrainConfig {
        model: model.clone(),
        data: vec![DataSource::new(seqs())],
        eval: vec![EvalSet {
            name: "train".into(),
            path: seqs(),
        }],
        output: out.clone(),
        method: Method::Lora,
        lora_rank: 4,
        lora_alpha: 8.0,
        max_steps: Some(12),
        eval_every: 4,
        batch_size: 2,
        seq_len: 64,
        packing: llama_pro::train::config::PackMode::None,
        lr: 1e-2,
        log_every: 0,
        token_cache: false,
        ..Default::default()
    };
    // The loss plot is an observer (the command line attaches it).
    let mut plot =
        llama_pro::train::trainer::LossPlot::new(&out.join("metrics.jsonl"), &out.join("loss.png"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let r = llama_pro::train::trainer::train::<burn::backend::Autodiff<Cpu>>(
        cfg.clone(),
        &Default::default(),
        &mut plot,
        &stop,
    )
    .unwrap();
    assert!(plot.warnings.is_empty(), "{:?}", plot.warnings);
    let (before, after) = (r.eval_before["train"].loss, r.eval_after["train"].loss);
    println!(
        "lora: train-set loss {before:.4} -> {after:.4}, {} trainable",
        r.trainable_params
    );
    assert!(after < before - 0.3, "{before} -> {after}");
    // rank 4 on 7 projections of 4 layers (hidden 64, ffn 128): 4 * 4*(in+out) summed.
    let per_layer = 4 * ((64 + 64) * 4 + (64 + 128) * 2 + (128 + 64));
    assert_eq!(r.trainable_params, 4 * per_layer);
    assert_eq!(r.evals.len(), 4, "before, steps 4 and 8, after");
    assert!(is_png(&out.join("loss.png")));

    let (base, exported) = (
        Checkpoint::open(&model).unwrap(),
        Checkpoint::open(out.join("model")).unwrap(),
    );
    let mut names: Vec<&str> = exported.names().collect();
    let mut base_names: Vec<&str> = base.names().collect();
    names.sort();
    base_names.sort();
    assert_eq!(names, base_names, "the export is a plain LLaMA");
    for n in base.names() {
        let is_proj = n.contains("_proj.");
        let changed = base.raw(n).unwrap().0 != exported.raw(n).unwrap().0;
        assert_eq!(changed, is_proj, "{n}");
    }
    let dev = Default::default();
    let (m, _) =
        LlamaForCausalLM::<Cpu>::from_pretrained(out.join("model"), &dev, Some(DType::F32))
            .unwrap();
    let tok = Tokenizer::from_dir(&model, Some(1), &[2]).unwrap();
    let data = llama_pro::train::data::read_sequences(&seqs(), Some(&tok), 320, 64).unwrap();
    let e = evaluate(&m, &data, 2, &dev, |_| {}).unwrap();
    println!(
        "merged export: loss {:.6} vs in-training {after:.6}",
        e.loss
    );
    assert!((e.loss - after).abs() < 1e-4, "{} vs {after}", e.loss);
}

/// Pretraining from a config alone (`random_init`) is reproducible from the seed; without the
/// flag the missing weights are a clear error.
#[test]
fn random_init_pretraining() {
    let dir = tmpdir("random-init").join("m");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("llama-mha-f32").join(f), dir.join(f)).unwrap();
    }
    let cfg = |out: &str| TrainConfig {
        model: dir.clone(),
        data: vec![DataSource::new(seqs())],
        output: dir.with_file_name(out),
        method: Method::Full,
        random_init: true,
        max_steps: Some(4),
        batch_size: 2,
        seq_len: 64,
        packing: llama_pro::train::config::PackMode::None,
        lr: 3e-3,
        log_every: 0,
        token_cache: false,
        seed: 5,
        ..Default::default()
    };
    let (a, b) = (run(&cfg("a")).unwrap(), run(&cfg("b")).unwrap());
    println!("random init: losses {:?}", a.losses);
    assert_eq!(a.losses, b.losses);
    // A random init at std 0.02 starts near log(vocab) = log(320) = 5.77.
    assert!((a.losses[0] - 320f64.ln()).abs() < 0.2, "{}", a.losses[0]);
    assert!(a.losses[3] < a.losses[0]);
    assert!(Checkpoint::open(dir.with_file_name("a").join("model")).is_ok());
    let err = run(&TrainConfig {
        random_init: false,
        ..cfg("c")
    })
    .unwrap_err()
    .to_string();
    println!("{err}");
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("safetensors"),
        "{err}"
    );
}

/// A BPE trained by `train_tokenizer` round-trips text, adds BOS, and loads as a model tokenizer.
#[test]
fn tokenizer_training_round_trips() {
    use llama_pro::train::tokenizer_train::{TokenizerTrainConfig, train_tokenizer};
    let dir = tmpdir("tok-train");
    let data = dir.join("docs.jsonl");
    let docs = [
        "In the beginning was the word, and the word was with code.",
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * i)\n",
        "Unicode: naïve café — ünïcödé ✓",
    ];
    let text: String = docs
        .iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect();
    std::fs::write(&data, text).unwrap();
    let out = dir.join("tok");
    train_tokenizer(
        &[data],
        &TokenizerTrainConfig {
            vocab_size: 300,
            min_frequency: 1,
        },
        &out,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&out, Some(0), &[]).unwrap();
    assert_eq!(
        tok.eos_token_ids,
        vec![1],
        "</s> from tokenizer_config.json"
    );
    assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 258);
    for d in docs {
        let ids = tok.encode(d, true).unwrap();
        assert_eq!(ids[0], 0, "BOS first");
        assert!(ids.len() < d.len(), "merges learned");
        assert_eq!(tok.decode(&ids).unwrap(), d);
    }
    let bad = train_tokenizer(
        &[dir.join("missing.txt")],
        &TokenizerTrainConfig::default(),
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("missing.txt"), "{bad}");
}

/// The shipped demo tokenizer gives the ids transformers gives (golden made by
/// scripts/make_fixtures.py with AutoTokenizer on data/base).
#[test]
fn shipped_tokenizer_matches_transformers() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/base");
    let tok = Tokenizer::from_dir(&base, Some(0), &[1]).unwrap();
    let n = assert_tokenizer_cases(&tok, &fixtures().join("golden/demo-tokenizer.json"));
    assert!(n >= 4);
}

/// The demo on the shipped model and data, shrunk to seconds: the expansion is the identity,
/// every method trains, the table, plot and report are written; the SFT stage fine-tunes LLaMA
/// Pro's model and the base on the same conversations, lowers LLaMA Pro's held-out answer loss
/// and answers held-out prompts.
#[test]
fn demo_runs_on_the_shipped_data() {
    let out = tmpdir("demo");
    let cfg = DemoConfig {
        output: out.clone(),
        methods: vec![DemoMethod::Pro, DemoMethod::Lora, DemoMethod::Suffix],
        steps: 2,
        batch_size: 2,
        seq_len: 32,
        evals_during: 1,
        eval_sequences: 2,
        sft_steps: 4,
        sft_eval_conversations: Some(12),
        sft_answer_tokens: 8,
        ..DemoConfig::default()
    };
    assert!(
        cfg.sft && DemoConfig::quick().sft,
        "the SFT stage is on by default"
    );
    assert_eq!(cfg.total_steps(), 3 * 2 + 2 * 4);
    let r = run_demo(&cfg, &mut llama_pro::train::trainer::silent()).unwrap();
    print!("{}", llama_pro::train::demo::demo_table(&r));
    assert!(r.passed, "{:?}", r.verdict);
    assert_eq!(r.runs.len(), 3);
    assert_eq!(r.runs[0].identity_max_abs_diff, Some(0.0));
    assert_eq!(r.runs[2].identity_max_abs_diff, Some(0.0));
    assert_eq!(r.runs[1].identity_max_abs_diff, None);
    assert_eq!(r.runs[0].layers, 6);
    for run in &r.runs {
        assert_eq!(run.train_losses.len(), 2);
        assert_eq!(run.evals.len(), 3, "{}", run.method);
        assert!(run.after["domain"] < run.before["domain"], "{}", run.method);
    }
    // Same base, same eval windows: every method starts from the same losses.
    assert_eq!(r.runs[0].before, r.runs[1].before);
    assert!(is_png(&out.join("forgetting.png")));

    // The SFT stage: LLaMA Pro's trained model and the base, the same budget, before/after.
    let sft = r.sft.as_ref().expect("the SFT stage ran");
    let names: Vec<&str> = sft.runs.iter().map(|s| s.model.as_str()).collect();
    assert_eq!(names, ["llama-pro", "base"]);
    let (pro, base) = (&sft.runs[0], &sft.runs[1]);
    assert_eq!(pro.layers, 6);
    assert_eq!(base.layers, 4);
    assert_eq!(
        pro.trainable_params, r.runs[0].total_params,
        "SFT trains every parameter"
    );
    assert_eq!(pro.tokens, base.tokens, "the same SFT token budget");
    assert!(pro.tokens > 0);
    for s in &sft.runs {
        assert_eq!(s.train_losses.len(), 4, "{}", s.model);
        assert_eq!(s.evals.len(), 2, "{}: before and after", s.model);
        assert!(s.answer_loss_before.is_finite() && s.answer_loss_after.is_finite());
        assert!(
            s.model_dir
                .as_ref()
                .is_some_and(|d| d.join("config.json").exists())
        );
    }
    assert!(
        pro.answer_loss_after < pro.answer_loss_before,
        "SFT did not lower LLaMA Pro's held-out answer loss: {} -> {}",
        pro.answer_loss_before,
        pro.answer_loss_after
    );
    // LLaMA Pro's SFT starts from its post-pretrained model, not from the base.
    assert_ne!(pro.answer_loss_before, base.answer_loss_before);
    // Greedy answers to the first three held-out prompts.
    let valid = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/instruct-valid.jsonl"),
    )
    .unwrap();
    let first: serde_json::Value = serde_json::from_str(valid.lines().next().unwrap()).unwrap();
    assert_eq!(pro.answers.len(), 3);
    assert_eq!(
        pro.answers[0].prompt,
        first["messages"][0]["content"].as_str().unwrap()
    );
    assert_eq!(
        pro.answers[0].reference,
        first["messages"][1]["content"].as_str().unwrap()
    );
    assert!(
        pro.answers.iter().any(|a| !a.answer.is_empty()),
        "{:?}",
        pro.answers
    );
    for a in &pro.answers {
        assert_eq!(a.answer, answer_of(&a.generated));
    }
    // An answer is the first line of what was generated, up to the end-of-turn marker.
    assert_eq!(
        answer_of(" and the LORD spake.<|im_end|>\n<|im_start|>user"),
        "and the LORD spake."
    );
    assert_eq!(answer_of("def f(x):\n    return x"), "def f(x):");
    assert_eq!(answer_of("<|im_end|>"), "");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo.json")).unwrap()).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 3);
    assert_eq!(json["sft"]["runs"].as_array().unwrap().len(), 2);
    assert!(json["sft"]["runs"][0]["answers"][0]["answer"].is_string());
    // A rerun into the same output replaces the earlier runs (the demo owns its directory).
    let again = run_demo(
        &DemoConfig {
            methods: vec![DemoMethod::Pro],
            steps: 1,
            sft: false,
            ..cfg
        },
        &mut llama_pro::train::trainer::silent(),
    )
    .unwrap();
    assert_eq!(again.runs[0].train_losses.len(), 1);
    assert!(again.sft.is_none(), "the SFT stage switched off");
    let _: PathBuf = out;
}

/// `demo --model DIR`: the same comparison on another HuggingFace model directory (its own
/// tokenizer), with the paper's expansion ratio by default and an extra held-out general set
/// reported beside the shipped one; clear errors for a directory the demo cannot start from.
#[test]
fn demo_runs_on_a_model_directory() {
    use llama_pro::train::demo::paper_groups;
    assert_eq!(
        [32, 30, 4, 24, 12, 1].map(paper_groups),
        [8, 6, 1, 6, 3, 1],
        "one new block per four base blocks"
    );
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let out = tmpdir("demo-model");
    let cfg = DemoConfig {
        model: Some(model_dir("llama-mha-f32")),
        general_eval: vec![EvalSet {
            name: "english".into(),
            path: data.join("english-valid.jsonl"),
        }],
        output: out.clone(),
        methods: vec![DemoMethod::Pro, DemoMethod::Full],
        groups: 0,
        steps: 2,
        batch_size: 2,
        seq_len: 32,
        evals_during: 0,
        eval_sequences: 2,
        max_general_change_pct: f64::INFINITY,
        sft: false,
        ..DemoConfig::default()
    };
    let r = run_demo(&cfg, &mut llama_pro::train::trainer::silent()).unwrap();
    let table = llama_pro::train::demo::demo_table(&r);
    print!("{table}");
    assert!(r.passed, "{:?}", r.verdict);
    assert_eq!(
        r.runs[0].layers, 5,
        "4 layers, paper's ratio: 1 group, 4 -> 5"
    );
    assert_eq!(r.runs[0].identity_max_abs_diff, Some(0.0));
    assert_eq!(r.runs[1].layers, 4);
    for run in &r.runs {
        for set in ["general", "domain", "english"] {
            assert!(
                run.before[set].is_finite() && run.after[set].is_finite(),
                "{set}"
            );
        }
        assert_eq!(run.evals.len(), 2, "before and after");
    }
    assert_eq!(
        r.runs[0].before, r.runs[1].before,
        "the same base, the same windows"
    );
    // The fixture's own tokenizer (320 tokens), not the toy's 4096: losses near log(320).
    assert!(r.runs[1].before["domain"] < 8.0);
    assert!(table.contains("english"), "{table}");
    assert!(
        r.verdict
            .iter()
            .any(|v| v.contains("general loss on english")),
        "{:?}",
        r.verdict
    );
    assert!(is_png(&out.join("forgetting.png")));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo.json")).unwrap()).unwrap();
    assert!(json["runs"][0]["after"]["english"].is_number());

    // Directories the demo cannot start from.
    let err = |model: PathBuf| {
        run_demo(
            &DemoConfig {
                model: Some(model),
                ..cfg.clone()
            },
            &mut llama_pro::train::trainer::silent(),
        )
        .unwrap_err()
        .to_string()
    };
    let e = err(out.join("no-such-model"));
    assert!(
        e.contains("no-such-model") && e.contains("no such directory"),
        "{e}"
    );
    let bare = out.join("no-tokenizer");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir("llama-mha-f32").join(f), bare.join(f)).unwrap();
    }
    let e = err(bare.clone());
    assert!(e.contains("no tokenizer.json"), "{e}");
    std::fs::remove_file(bare.join("model.safetensors")).unwrap();
    let e = err(bare);
    assert!(e.contains("safetensors"), "{e}");
    // 3 groups do not divide 4 layers.
    let e = run_demo(
        &DemoConfig {
            groups: 3,
            ..cfg.clone()
        },
        &mut llama_pro::train::trainer::silent(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("must divide"), "{e}");
}
