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

/// `chat` and `generate --chat` on the shipped demo model through the built-in chatml template:
/// the answers are exactly greedy generation from the rendered conversation (encoded without
/// special tokens, stopped at the template's end of turn), the history is kept, `/reset` and
/// `/exit` work, the oldest turns are dropped when the context is full, and the template flags
/// fail clearly where they do not apply.
#[test]
fn chat_cli_answers_through_the_chat_template() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use llama_pro::core::{ChatTemplate, Message, Tokenizer};

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/base");
    let base = dir.to_str().unwrap();
    let device = Default::default();
    let (model, hf) =
        LlamaForCausalLM::<Cpu>::from_pretrained(&dir, &device, Some(DType::F32)).unwrap();
    let tok = Tokenizer::from_dir(&dir, hf.config.bos_token_id, &hf.config.eos_token_ids).unwrap();
    let template = ChatTemplate::builtin("chatml", Some(&dir)).unwrap();
    let mut stop = tok.eos_token_ids.clone();
    stop.extend(
        template
            .special_tokens()
            .get("eos_token")
            .and_then(|t| tok.inner().token_to_id(t)),
    );
    // The reference answer: render, encode without special tokens, greedy, drop the stop token.
    let answer = |messages: &[Message], max_new_tokens: usize| -> String {
        let text = template.render(messages, true).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
        let ids = tok.encode(&text, false).unwrap();
        assert_ne!(
            ids.first().copied(),
            tok.bos_token_id,
            "no BOS added: {ids:?}"
        );
        let cfg = GenerationConfig {
            max_new_tokens,
            eos_token_ids: stop.clone(),
            ..Default::default()
        };
        let out = generate(&model, &ids, &cfg, &device, |_| {}).unwrap();
        let kept: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        tok.decode(&kept).unwrap()
    };
    let chat = |args: &[&str], input: &str| -> (String, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llama-pro"))
            .args(["chat", "--model", base, "--template", "chatml"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "chat {args:?} failed:\n{stderr}");
        (String::from_utf8(out.stdout).unwrap(), stderr)
    };
    let user = |text: &str| Message::new("user", text);
    let stats_lines = |stderr: &str| stderr.lines().filter(|l| l.contains("new tokens")).count();

    // (a) generate --chat: the answer only, as the library computes it.
    let prompt = "Tell me about the sea.";
    let out = crate::cli::run_ok(&[
        "generate",
        "--model",
        base,
        "--chat",
        "--template",
        "chatml",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
    ]);
    assert!(!out.is_empty());
    assert!(!out.contains(prompt), "the prompt is not echoed: {out:?}");
    assert_eq!(out, format!("{}\n", answer(&[user(prompt)], 8)));

    // (b) chat: two answers around /reset, /exit ends (the last line is never answered).
    let (out, err) = chat(
        &["--max-new-tokens", "8"],
        "hello\n/reset\nhi again\n/exit\nnever answered\n",
    );
    assert_eq!(stats_lines(&err), 2, "{err}");
    assert!(err.contains("template built-in chatml"), "{err}");
    let first = answer(&[user("hello")], 8);
    assert_eq!(
        out,
        format!("{first}\n{}\n", answer(&[user("hi again")], 8))
    );

    // The history (with the system prompt) is kept between turns; EOF ends the chat.
    let system = Message::new("system", "Be brief.");
    let (out, err) = chat(
        &["--max-new-tokens", "8", "--system", "Be brief."],
        "hello\n\nhi again\n",
    );
    assert_eq!(stats_lines(&err), 2, "{err}");
    let first = answer(&[system.clone(), user("hello")], 8);
    let second = answer(
        &[
            system.clone(),
            user("hello"),
            Message::new("assistant", first.as_str()),
            user("hi again"),
        ],
        8,
    );
    assert_eq!(out, format!("{first}\n{second}\n"));

    // A full context (1024 positions) drops the oldest turn, keeping the system prompt.
    let (out, err) = chat(
        &["--max-new-tokens", "900", "--system", "Be brief."],
        "hello\nhi again\n",
    );
    assert!(err.contains("dropped the 1 oldest turn"), "{err}");
    let first = answer(&[system.clone(), user("hello")], 900);
    let second = answer(&[system, user("hi again")], 900);
    assert_eq!(out, format!("{first}\n{second}\n"));

    // (c) a model without a chat template needs --template.
    let err = crate::cli::run_err(&["chat", "--model", base]);
    assert!(
        err.contains("no chat template") && err.contains("--template"),
        "{err}"
    );

    // (d) the chat flags of generate need --chat.
    for flag in ["--template", "--system"] {
        let err =
            crate::cli::run_err(&["generate", "--model", base, "--prompt", "x", flag, "chatml"]);
        assert!(
            err.contains(&format!("{flag} only applies with --chat")),
            "{err}"
        );
    }
}
