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
        "expand",
        "train",
        "demo",
        "train-tokenizer",
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
