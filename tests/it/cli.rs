//! The `llama-pro` binary, end to end.

use std::process::Command;

use crate::common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llama-pro"))
}

pub fn run_ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "llama-pro {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn run_err(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        !out.status.success(),
        "llama-pro {args:?} should have failed"
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn help_on_every_subcommand() {
    for sub in [
        "inspect",
        "eval",
        "generate",
        "convert",
        "import-gguf",
        "export-gguf",
        "expand",
        "train",
        "demo",
        "train-tokenizer",
        "bench",
        "selftest",
    ] {
        let h = run_ok(&[sub, "--help"]);
        assert!(h.contains("Usage: llama-pro"), "{sub}: {h}");
    }
    let h = run_ok(&["eval", "--help"]);
    assert!(h.contains("--device") && h.contains("--max-seq-len") && h.contains("--json"));
}

#[test]
fn inspect_reports_the_model() {
    let dir = model_dir("llama-gqa-tied-sharded-f32");
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", dir.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    assert_eq!(v["num_hidden_layers"], 4);
    assert_eq!(v["num_key_value_heads"], 2);
    assert_eq!(v["tie_word_embeddings"], true);
    assert_eq!(v["parameters"], v["stored_parameters"]);
    let text = run_ok(&["inspect", model_dir("qwen2-bias-f32").to_str().unwrap()]);
    assert!(
        text.contains("Qwen2ForCausalLM") && text.contains("GQA"),
        "{text}"
    );
}

/// `eval` on the golden batch (row 1 truncated to 11 tokens) gives transformers' loss.
#[test]
fn eval_matches_transformers_loss() {
    let name = "llama-mha-f32";
    let golden = Golden::open(name);
    let (ids, _) = golden.i64("input_ids");
    let rows = [&ids[..16], &ids[16..27]];
    let dir = tmpdir("eval");
    let data = dir.join("tokens.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .map(|r| serde_json::json!({ "input_ids": r }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = run_ok(&[
        "eval",
        "--model",
        model_dir(name).to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let want = golden.f32("pad_loss").0[0] as f64;
    let got = v["loss"].as_f64().unwrap();
    println!("eval CLI loss {got:.7} transformers {want:.7}");
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert_eq!(v["tokens"], 15 + 10);
    assert!((v["perplexity"].as_f64().unwrap() - got.exp()).abs() < 1e-9);
    // --batch-size 1 and --max-seq-len truncation.
    let out = run_ok(&[
        "eval",
        "--model",
        model_dir(name).to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        "--batch-size",
        "1",
        "--max-seq-len",
        "5",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tokens"], 8);
}

#[test]
fn eval_reads_text_and_reports_bad_data() {
    let model = model_dir("llama-mha-f32");
    let m = model.to_str().unwrap();
    let dir = tmpdir("evaldata");
    let txt = dir.join("a.txt");
    std::fs::write(&txt, "LLaMA Pro expands a model.\n\ndef add(a, b):\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(
        run_ok(&[
            "eval",
            "--model",
            m,
            "--data",
            txt.to_str().unwrap(),
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(v["sequences"], 2);
    assert!(v["loss"].as_f64().unwrap() > 0.0);

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    let e = run_err(&["eval", "--model", m, "--data", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.jsonl:2") && e.contains("invalid JSON"),
        "{e}"
    );

    std::fs::write(&bad, "{\"input_ids\": [1, 2, 999]}\n").unwrap();
    let e = run_err(&["eval", "--model", m, "--data", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.jsonl:1") && e.contains("token id 999") && e.contains("vocab_size is 320"),
        "{e}"
    );

    std::fs::write(&bad, "{\"content\": \"x\"}\n").unwrap();
    let e = run_err(&["eval", "--model", m, "--data", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.jsonl:1") && e.contains("\"text\" or \"input_ids\""),
        "{e}"
    );

    std::fs::write(&bad, "\n\n").unwrap();
    let e = run_err(&["eval", "--model", m, "--data", bad.to_str().unwrap()]);
    assert!(e.contains("bad.jsonl") && e.contains("empty"), "{e}");

    let bin_file = dir.join("latin1.txt");
    std::fs::write(&bin_file, b"fine\ncaf\xe9\n").unwrap();
    let e = run_err(&["eval", "--model", m, "--data", bin_file.to_str().unwrap()]);
    assert!(e.contains("latin1.txt:2") && e.contains("UTF-8"), "{e}");

    let e = run_err(&[
        "eval",
        "--model",
        m,
        "--data",
        dir.join("nope.txt").to_str().unwrap(),
    ]);
    assert!(e.contains("nope.txt") && e.contains("no such file"), "{e}");

    let e = run_err(&[
        "eval",
        "--model",
        m,
        "--data",
        txt.to_str().unwrap(),
        "--device",
        "tpu",
    ]);
    assert!(
        e.contains("--device") && e.contains("\"tpu\": expected cpu"),
        "{e}"
    );
    #[cfg(not(feature = "cuda"))]
    {
        let e = run_err(&[
            "eval",
            "--model",
            m,
            "--data",
            txt.to_str().unwrap(),
            "--device",
            "cuda",
        ]);
        assert!(e.contains("without the `cuda` feature"), "{e}");
    }
}

#[test]
fn generate_prints_a_continuation() {
    let out = bin()
        .args([
            "generate",
            "--model",
            model_dir("llama-mha-f32").to_str().unwrap(),
            "--prompt",
            "def add",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("def add"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("8 new tokens"), "{err}");
}

/// bf16 → f32 → bf16 through the CLI is bitwise.
#[test]
fn convert_round_trips_dtype() {
    let src = model_dir("llama3-gqa-headdim-bf16");
    let dir = tmpdir("convert");
    let f32_dir = dir.join("f32");
    let back = dir.join("bf16");
    run_ok(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--output",
        f32_dir.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    run_ok(&[
        "convert",
        "--model",
        f32_dir.to_str().unwrap(),
        "--output",
        back.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--max-shard-size",
        "100KB",
    ]);
    assert!(back.join("model.safetensors.index.json").exists());
    let (a, b) = (
        llama_pro::core::weights::Checkpoint::open(&src).unwrap(),
        llama_pro::core::weights::Checkpoint::open(&back).unwrap(),
    );
    for n in a.names() {
        assert!(a.raw(n).unwrap().0 == b.raw(n).unwrap().0, "{n}");
    }
    let e = run_err(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--output",
        back.to_str().unwrap(),
    ]);
    assert!(e.contains("exists and is not empty"), "{e}");
}

/// Loss of `model` on `data` through the CLI's `eval --json`.
pub fn cli_eval_loss(model: &std::path::Path, data: &std::path::Path) -> f64 {
    let out = run_ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// `train` from the command line with LoRA and bf16 mixed precision prints tokens/s and the model
/// FLOPs (with the MFU where the CPU's peak can be estimated); the demo and the tokenizer
/// trainer name what is missing.
#[test]
fn train_cli_lora_mixed_precision_and_clear_errors() {
    let out = tmpdir("cli-lora");
    let data = fixtures().join("train/seqs.jsonl");
    let model = model_dir("llama-mha-f32");
    let lora = |extra: &[&str]| -> Vec<String> {
        [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--method",
            "lora",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let args = lora(&[
        "--lora-rank",
        "2",
        "--dtype",
        "bf16",
        "--max-steps",
        "3",
        "--seq-len",
        "32",
        "--no-packing",
        "--no-token-cache",
    ]);
    let text = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        text.contains("3 steps") && text.contains("tokens/s"),
        "{text}"
    );
    assert!(
        text.contains("model FLOPs:") && text.contains("M/token"),
        "{text}"
    );
    assert!(out.join("model/model.safetensors").exists());
    let e = run_err(&["demo", "--quick", "--data-dir", "/nonexistent-llama-pro"]);
    assert!(e.contains("/nonexistent-llama-pro/base"), "{e}");
    let e = run_err(&[
        "train-tokenizer",
        "--output",
        out.to_str().unwrap(),
        "/nonexistent.txt",
    ]);
    assert!(e.contains("/nonexistent.txt"), "{e}");
    let args = lora(&["--lora-targets", "q_proj,wq"]);
    let e = run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("\"wq\"") && e.contains("q_proj"), "{e}");
    // Library errors that name a setting are shown with its flag; values are parsed by the flag.
    let args = lora(&["--warmup-ratio", "1.5"]);
    let e = run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("--warmup-ratio: must be in [0, 1), got 1.5"),
        "{e}"
    );
    let args = lora(&["--dtype", "int8"]);
    let e = run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("--dtype") && e.contains("int8") && e.contains("bf16"),
        "{e}"
    );
    let args = lora(&["--data", "x.txt:-1"]);
    let e = run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("--data") && e.contains("weight must be"), "{e}");
    let args = lora(&["--eval", "general"]);
    let e = run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("--eval") && e.contains("NAME=FILE"), "{e}");
    let e = run_err(&[
        "expand",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out.join("x").to_str().unwrap(),
        "--groups",
        "3",
    ]);
    assert!(e.contains("--groups 3: 4 layers cannot be split"), "{e}");
}

/// `bench` on the CPU: one timed step of the S preset (LLaMA Pro: only the new block trains)
/// writes a JSON report whose model FLOPs are the formula computed here from the shapes, with
/// consistent throughput, MFU and memory figures.
#[test]
fn bench_cli_reports_flops_throughput_and_memory() {
    let dir = tmpdir("cli-bench");
    let json = dir.join("bench.json");
    run_ok(&[
        "bench",
        "--preset",
        "S",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {}", v[k]));
    assert_eq!(v["preset"], "S");
    assert_eq!(v["mode"], "pro");
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["device"], "cpu");
    // S: vocab 4096, hidden 256, FFN 688, 4 heads of 64 (MHA), untied, 4 blocks expanded to 5
    // with the copy of block 3 at position 4; 8 sequences of 128 tokens.
    let (vocab, d, ffn, layers, seq, batch) = (4096.0, 256.0, 688.0, 5.0, 128.0, 8.0);
    assert_eq!(v["config"]["num_hidden_layers"], 5);
    assert_eq!(v["new_layers"], serde_json::json!([4]));
    let block = 4.0 * d * d + 3.0 * d * ffn; // q, k, v, o; gate, up, down
    let head = vocab * d;
    assert_eq!(f("params"), 2.0 * head + layers * (block + 2.0 * d) + d);
    assert_eq!(f("trainable"), block + 2.0 * d);
    assert_eq!(f("tokens_per_step"), seq * batch);
    // Per token: the forward pass (matmuls + QKᵀ and AV over the full window), the backward pass
    // through the top block only (the lowest trainable one) and the head, and the new block's
    // weight gradients.
    let attn = 4.0 * d * seq;
    let forward = 2.0 * (layers * block + head) + layers * attn;
    let backward_act = 2.0 * (block + head) + 2.0 * attn;
    let backward_w = 2.0 * block;
    let per_step = (forward + backward_act + backward_w) * seq * batch;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(
        close(f("flops_per_step"), per_step),
        "{} vs {per_step}",
        f("flops_per_step")
    );
    // Causal attention: half of every attention term (5 blocks forward, 1 backward at twice the
    // forward's work).
    let causal = per_step - (layers + 2.0) * attn / 2.0 * seq * batch;
    assert!(close(f("flops_per_step_causal"), causal));
    // Throughput and MFU agree with the step time.
    let steps = v["step_s"]["all"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    let step = v["step_s"]["mean"].as_f64().unwrap();
    assert!(step > 0.0 && step < 60.0, "{step}");
    assert!(close(f("tokens_per_s"), seq * batch / step));
    assert!(close(f("achieved_tflops"), per_step / step / 1e12));
    if let Some(peak) = v["peak_tflops"].as_f64() {
        assert!(close(f("mfu"), per_step / step / (peak * 1e12)));
        assert!(f("mfu") > 0.0 && f("mfu") < 2.0, "{}", f("mfu"));
    }
    // A random model predicts about uniformly: the loss is near ln(vocab).
    assert!(
        (f("loss_first") - vocab.ln()).abs() < 0.5,
        "{}",
        f("loss_first")
    );
    // Peak memory: at least the f32 weights (24 MB), far less than a GB.
    let peak = v["memory"]["peak_bytes"].as_f64().unwrap();
    assert!(peak > 24e6 && peak < 2e9, "{peak}");
    assert!(v["memory"]["measure"].as_str().unwrap().contains("VmHWM"));
    assert!(v["command"].as_array().unwrap().len() > 3);
    // The memory planner's prediction for the same run is in the report.
    if v["memory_plan"]["available"] == true {
        assert!(v["memory_plan"]["total_bytes"].as_f64().unwrap() > 24e6);
    }
    let e = run_err(&["bench", "--preset", "XL"]);
    assert!(e.contains("XL") && e.contains("llama2-7b-pro"), "{e}");
}

/// `selftest` passes on the CPU with the fixtures built into the binary, and fails (exit 1,
/// naming the check) when a golden value is wrong.
#[test]
fn selftest_cli_passes_on_cpu_and_catches_a_wrong_golden() {
    let dir = tmpdir("cli-selftest");
    let json = dir.join("selftest.json");
    let out = run_ok(&[
        "selftest",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["failed"], 0, "{out}");
    let checks = v["checks"].as_array().unwrap();
    for name in [
        "logits",
        "block-outputs",
        "loss",
        "kv-cache",
        "kv-vs-full",
        "expansion-identity",
        "train-step-loss",
        "train-step-params",
        "train-step-after",
    ] {
        assert!(
            checks
                .iter()
                .any(|c| c["name"] == name && c["status"] == "pass"),
            "{name} missing:\n{out}"
        );
    }
    // f32, bf16 and f16 all run on the CPU.
    for dtype in ["f32", "bf16", "f16"] {
        assert!(checks.iter().any(|c| c["dtype"] == dtype), "{dtype}");
    }
    for c in checks {
        let (d, t) = (c["max_abs_diff"].as_f64(), c["tolerance"].as_f64());
        assert!(d.unwrap() <= t.unwrap(), "{c}");
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS")).count(),
        checks.len()
    );

    // The same fixtures from a directory, with one logit of llama-mha-f32 off by 1e-3.
    let fx = dir.join("fixtures");
    for f in [
        "models/llama-mha-f32/config.json",
        "models/llama-mha-f32/model.safetensors",
        "models/llama3-gqa-headdim-bf16/config.json",
        "models/llama3-gqa-headdim-bf16/model.safetensors",
        "golden/llama-mha-f32.safetensors",
        "golden/llama3-gqa-headdim-bf16.safetensors",
        "golden/train-adamw-1.safetensors",
        "train/seqs.jsonl",
    ] {
        std::fs::create_dir_all(fx.join(f).parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join(f), fx.join(f)).unwrap();
    }
    let golden = fx.join("golden/llama-mha-f32.safetensors");
    let mut bytes = std::fs::read(&golden).unwrap();
    let at = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits").unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    let x = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) + 1e-3;
    bytes[at..at + 4].copy_from_slice(&x.to_le_bytes());
    std::fs::write(&golden, bytes).unwrap();
    let o = bin()
        .args([
            "selftest",
            "--device",
            "cpu",
            "--half",
            "none",
            "--fixtures",
            fx.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(
        failed[0].contains("logits") && failed[0].contains("llama-mha-f32"),
        "{text}"
    );
    assert!(text.contains("1 failed"), "{text}");
}
