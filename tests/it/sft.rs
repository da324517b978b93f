//! Instruction tuning: chat templates against transformers' `apply_chat_template`, conversation
//! formats, ids and labels against the reference of `scripts/make_chat_fixtures.py`
//! (LLaMA-Factory's semantics), one SFT step against torch, packed = unpacked, bad files.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use llama_pro::core::weights::Checkpoint;
use llama_pro::core::{ChatTemplate, LlamaForCausalLM, Message, Tokenizer};
use llama_pro::train::config::{DataSource, Method, PackMode, Stage, TrainConfig};
use llama_pro::train::dataset::{Example, pack_neat};
use llama_pro::train::eval::batch_examples;
use llama_pro::train::schedule::ScheduleKind;
use llama_pro::train::sft::{ChatFormat, Encoder, LabelMode, Record, read_records};
use serde_json::Value;

use crate::common::*;

fn chat_fixtures() -> PathBuf {
    fixtures().join("chat")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(chat_fixtures().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The golden conversions by (file, line).
fn conversation(g: &Value, file: &str, line: u64) -> Vec<Message> {
    let c = g["conversions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == file && c["line"] == line)
        .unwrap_or_else(|| panic!("no conversion of {file}:{line}"));
    messages(&c["messages"])
}

fn template_dir(name: &str) -> PathBuf {
    chat_fixtures().join("templates").join(name)
}

#[test]
fn conversation_formats_read_like_the_reference() {
    let g = golden();
    let mut n = 0;
    for file in [
        "openai.jsonl",
        "sharegpt.jsonl",
        "alpaca.jsonl",
        "prompt_completion.jsonl",
    ] {
        let path = chat_fixtures().join("conversations").join(file);
        for (line, r) in read_records(&path, ChatFormat::Auto).unwrap() {
            let Record::Chat(m) = r else {
                panic!("{file}:{line} is a conversation")
            };
            assert_eq!(m, conversation(&g, file, line as u64), "{file}:{line}");
            n += 1;
        }
    }
    assert_eq!(n, g["conversions"].as_array().unwrap().len());
    println!("{n} conversations read as the reference reads them");
}

#[test]
fn chat_templates_render_byte_identical_to_transformers() {
    let g = golden();
    let mut templates = std::collections::BTreeMap::new();
    let (mut same, mut errors) = (0, 0);
    for r in g["renders"].as_array().unwrap() {
        let name = r["template"].as_str().unwrap();
        let t = templates.entry(name.to_string()).or_insert_with(|| {
            ChatTemplate::from_dir(template_dir(name))
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: no template found"))
        });
        let mut m = conversation(&g, r["file"].as_str().unwrap(), r["line"].as_u64().unwrap());
        let gen_prompt = r["add_generation_prompt"].as_bool().unwrap();
        if gen_prompt {
            assert_eq!(m.pop().unwrap().role, "assistant");
        }
        let got = t.render(&m, gen_prompt);
        let what = format!("{name} {}:{} gen={gen_prompt}", r["file"], r["line"]);
        if r.get("error").is_some() {
            let e = got.expect_err(&what).to_string();
            let want = r["message"].as_str().unwrap_or_default();
            assert!(
                e.contains(want),
                "{what}: error {e:?}, transformers: {want:?}"
            );
            errors += 1;
        } else {
            assert_eq!(got.unwrap(), r["text"].as_str().unwrap(), "{what}");
            same += 1;
        }
    }
    assert!(templates.len() >= 6 && same > 100 && errors > 0);
    println!(
        "{same} renders byte-identical to transformers over {} templates; {errors} template errors raised as transformers raises them",
        templates.len()
    );
}

#[test]
fn builtin_templates_are_the_real_ones() {
    // The built-ins are copies of the real templates in the fixtures (Llama-3-Instruct and
    // Mistral-Instruct v0.2): same source, so the renders above cover them too.
    for (builtin, dir) in [("llama3", "llama3"), ("mistral", "mistral")] {
        let ours = ChatTemplate::builtin(builtin, None).unwrap();
        let theirs = ChatTemplate::from_dir(template_dir(dir)).unwrap().unwrap();
        assert_eq!(ours.source(), theirs.source(), "{builtin}");
    }
    let chatml = ChatTemplate::builtin("chatml", None).unwrap();
    let m = [Message::new("user", "hi"), Message::new("assistant", "yo")];
    assert_eq!(
        chatml.render(&m, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    );
    // What ends an answer: the eos_token and what the template writes after an answer.
    assert_eq!(chatml.turn_ends(), ["<|im_end|>"]);
    let on_llama = ChatTemplate::builtin("chatml", Some(&template_dir("mistral"))).unwrap();
    assert_eq!(on_llama.turn_ends(), ["</s>", "<|im_end|>"]);
    for (dir, end) in [
        ("llama3", "<|eot_id|>"),
        ("mistral", "</s>"),
        ("zephyr", "</s>"),
    ] {
        let t = ChatTemplate::from_dir(template_dir(dir)).unwrap().unwrap();
        assert!(
            t.turn_ends().contains(&end.to_string()),
            "{dir}: {:?}",
            t.turn_ends()
        );
    }
    // No template and no --template: the error says what to do.
    let e = ChatTemplate::load(&model_dir("llama-mha-f32"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--template") && e.contains("chatml"), "{e}");
    let e = ChatTemplate::load(&model_dir("llama-mha-f32"), Some("vicuna"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vicuna") && e.contains("llama3"), "{e}");
}

#[test]
fn ids_and_labels_match_the_reference() {
    let g = golden();
    let (mut same, mut errors) = (0, 0);
    let mut cache = std::collections::BTreeMap::new();
    for e in g["encodings"].as_array().unwrap() {
        let name = e["template"].as_str().unwrap();
        let (t, tok) = cache.entry(name.to_string()).or_insert_with(|| {
            let dir = template_dir(name);
            (
                ChatTemplate::from_dir(&dir).unwrap().unwrap(),
                Tokenizer::from_dir(&dir, None, &[]).unwrap(),
            )
        });
        let mode = match e["mode"].as_str().unwrap() {
            "assistant" => LabelMode::Assistant,
            "prompt" => LabelMode::All,
            "last" => LabelMode::Last,
            m => panic!("mode {m}"),
        };
        let enc = Encoder {
            template: t,
            tokenizer: tok,
            mode,
        };
        let m = conversation(&g, e["file"].as_str().unwrap(), e["line"].as_u64().unwrap());
        let what = format!("{name} {}:{} {mode:?}", e["file"], e["line"]);
        let got = enc.encode(&m);
        if e.get("error").is_some() {
            assert!(got.is_err(), "{what}: transformers' template raised");
            errors += 1;
            continue;
        }
        let got = got.unwrap();
        let ids: Vec<u32> = serde_json::from_value(e["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(e["labels"].clone()).unwrap();
        assert_eq!(got.input_ids, ids, "{what}: ids");
        assert_eq!(got.labels, labels, "{what}: labels");
        same += 1;
    }
    assert!(same > 200 && errors > 0);
    println!(
        "{same} encodings: ids and labels identical to the reference; {errors} template errors"
    );
}

/// The expanded `llama-mha-f32` with a tokenizer and chat template beside it (the fixture
/// tokenizers' special tokens fit its 320-token vocabulary).
fn chat_model(tag: &str, template: &str) -> PathBuf {
    let dir = expanded_fixture("llama-mha-f32", tag);
    for e in std::fs::read_dir(template_dir(template)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn sft_config(model: &Path, data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: vec![DataSource::new(data)],
        output: out.to_path_buf(),
        lr: 1e-3,
        lr_schedule: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        clip_grad_norm: 0.0,
        weight_decay: 0.1,
        packing: PackMode::None,
        seq_len: 64,
        val_fraction: 0.0,
        log_every: 0,
        token_cache: false,
        max_steps: Some(1),
        batch_size: 2,
        ..TrainConfig::sft()
    }
}

#[test]
fn one_sft_step_on_a_masked_batch_matches_torch() {
    let model = expanded_fixture("llama-mha-f32", "sft-step");
    let out = model.parent().unwrap().join("run");
    let cfg = sft_config(&model, &fixtures().join("train/sft.jsonl"), &out);
    assert_eq!((cfg.stage, cfg.method), (Stage::Sft, Method::Full));
    let r = train_cpu(&cfg, |_| true).unwrap();
    let golden = Golden::open("sft-step");
    let want = golden.f32("loss").0[0] as f64;
    println!("SFT loss: ours {:.7}, torch {want:.7}", r.losses[0]);
    assert!((r.losses[0] - want).abs() < 1e-6);
    let ck = Checkpoint::open(
        llama_pro::train::trainer::latest_checkpoint(&out.join("checkpoints"))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    // Every element within 1e-6 of torch, except where the first Adam update is ill-conditioned
    // (|grad| near eps: update = lr·g/(|g| + eps)) and torch's own float32 result is more than
    // 1e-6 from the float64 one: there, ours must be as close to the float64 result as torch's.
    let (mut n, mut worst, mut outliers) = (0, 0f32, 0);
    for name in ck.names() {
        let shape = ck.meta(name).unwrap().shape;
        let ours = ck.read_f32(name, &shape).unwrap();
        let (theirs, _) = golden.f32(&format!("param.{name}"));
        let (exact, _) = golden.f32(&format!("param64.{name}"));
        for ((o, t), e) in ours.iter().zip(&theirs).zip(&exact) {
            let d = (o - t).abs();
            if d <= 1e-6 {
                worst = worst.max(d);
                continue;
            }
            let (ours_off, torch_off) = ((o - e).abs(), (t - e).abs());
            assert!(
                torch_off > 1e-6 && ours_off <= 1.5 * torch_off + 1e-7,
                "{name}: {o} vs torch {t} (float64: {e})"
            );
            outliers += 1;
        }
        n += 1;
    }
    println!(
        "{n} parameters after one SFT step match torch, max |Δ| = {worst:.3e}; {outliers} ill-conditioned elements as close to float64 as torch's"
    );
    assert!(outliers <= 8);
    assert_eq!(n, 57, "every parameter trains in SFT");
}

/// Loss sum and every gradient of `examples` run as one batch on `B`.
fn loss_and_grads<B: burn::tensor::backend::AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    examples: &[Example],
    device: &B::Device,
) -> (f64, Vec<(String, Vec<f32>)>) {
    let b = batch_examples::<B>(examples, device);
    let logits = model.forward_packed(b.ids.clone(), b.packing.as_ref());
    let (sum, _) = llama_pro::core::model::causal_lm_loss_weighted(logits, b.ids, b.weights);
    let value = to_vec(sum.clone()).0[0] as f64;
    let grads = sum.backward();
    let named = model
        .named_grads(&grads)
        .into_iter()
        .map(|(n, g)| (n, g.map(|g| to_vec(g).0).unwrap_or_default()))
        .collect();
    (value, named)
}

/// `‖a − b‖₂ / ‖b‖₂` and `max|a − b| / max|b|`.
fn rel(a: &[f32], b: &[f64]) -> (f64, f64) {
    let (mut d2, mut n2, mut dmax, mut bmax) = (0f64, 0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = *x as f64 - y;
        d2 += d * d;
        n2 += y * y;
        dmax = dmax.max(d.abs());
        bmax = bmax.max(y.abs());
    }
    ((d2 / n2.max(1e-300)).sqrt(), dmax / bmax.max(1e-300))
}

/// Five documents with prompt masks packed into rows of 18 (boundaries mid-row) against the
/// documents one by one: the loss and every gradient, within `tol` (relative, L2).
fn packed_vs_one_by_one<B: burn::tensor::backend::AutodiffBackend>(device: &B::Device, tol: f64) {
    // GQA with a sliding window shorter than some documents, and biases.
    for name in ["mistral-window-f32", "qwen2-bias-f32"] {
        let (model, _) =
            LlamaForCausalLM::<B>::from_pretrained(model_dir(name), device, None).unwrap();
        let lens = [9usize, 5, 12, 3, 7];
        let docs: Vec<Example> = lens
            .iter()
            .enumerate()
            .map(|(d, &n)| Example {
                ids: (0..n)
                    .map(|i| ((d * 37 + i * 11) % 300 + 5) as u32)
                    .collect(),
                targets: Some((0..n).map(|i| i >= 2 + d % 3 || (d == 3)).collect()),
                docs: vec![],
            })
            .collect();
        let packed = pack_neat(docs.clone(), 18);
        assert!(packed.len() < docs.len() && packed.iter().any(|e| e.docs.len() >= 2));
        for kernels in [true, false] {
            let run = |ex: &[Example]| {
                if kernels {
                    loss_and_grads(&model, ex, device)
                } else {
                    llama_pro::core::ops::without_kernels(|| loss_and_grads(&model, ex, device))
                }
            };
            let (packed_loss, packed_grads) = run(&packed);
            // The documents one by one, their losses and gradients summed in f64.
            let mut loss = 0f64;
            let mut sum: Vec<Vec<f64>> = vec![];
            for d in &docs {
                let (l, g) = run(std::slice::from_ref(d));
                loss += l;
                if sum.is_empty() {
                    sum = g.iter().map(|(_, v)| vec![0f64; v.len()]).collect();
                }
                for (s, (_, v)) in sum.iter_mut().zip(g) {
                    s.iter_mut().zip(v).for_each(|(a, b)| *a += b as f64);
                }
            }
            let dl = (packed_loss - loss).abs() / loss.abs();
            let (mut worst, mut worst_max) = (0f64, 0f64);
            for ((n, p), s) in packed_grads.iter().zip(&sum) {
                assert_eq!(p.len(), s.len(), "{n}");
                let (r, rmax) = rel(p, s);
                worst = worst.max(r);
                worst_max = worst_max.max(rmax);
                assert!(
                    r <= tol,
                    "{name} kernels={kernels} {n}: packed vs one by one {r:.2e}"
                );
            }
            println!(
                "{name} kernels={kernels}: {} rows for {} documents; loss rel {dl:.1e}, worst gradient rel {worst:.1e} (L2), {worst_max:.1e} (max/max) over {} tensors",
                packed.len(),
                docs.len(),
                sum.len()
            );
            assert!(dl <= tol);
        }
    }
}

#[test]
fn packed_documents_equal_documents_one_by_one() {
    packed_vs_one_by_one::<Autodiff<Cpu>>(&Default::default(), 1e-6);
}

/// The same through the GPU path (block-wise attention and loss, CubeCL kernels) on wgpu.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_packed_documents_equal_documents_one_by_one() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    let dev = llama_pro::core::device::wgpu_device(None).expect("a wgpu adapter");
    packed_vs_one_by_one::<Autodiff<llama_pro::core::device::WgpuBackend>>(&dev, 1e-5);
}

#[test]
fn sft_trains_from_conversations_with_neat_packing() {
    let model = chat_model("sft-run", "qwen2");
    let out = model.parent().unwrap().join("run");
    let data = chat_fixtures().join("conversations/openai.jsonl");
    let cfg = TrainConfig {
        packing: PackMode::Neat,
        seq_len: 256,
        max_steps: Some(3),
        batch_size: 1,
        lr: 1e-3,
        ..sft_config(&model, &data, &out)
    };
    let (r, lines) = train_cpu_lines(&cfg);
    let r = r.unwrap();
    println!("{lines:#?}\nlosses {:?}", r.losses);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("chat template") && l.contains("tokenizer_config.json"))
    );
    assert!(lines.iter().any(|l| l.contains("packed into")));
    assert!(
        r.losses[2] < r.losses[0],
        "the answer loss goes down: {:?}",
        r.losses
    );
    // Trained through a built-in template: the export carries it.
    let plain = expanded_fixture("llama-mha-f32", "sft-builtin");
    std::fs::copy(
        template_dir("qwen2").join("tokenizer.json"),
        plain.join("tokenizer.json"),
    )
    .unwrap();
    let out = plain.parent().unwrap().join("run");
    let cfg = TrainConfig {
        template: Some("chatml".into()),
        max_steps: Some(1),
        ..sft_config(&plain, &data, &out)
    };
    train_cpu(&cfg, |_| true).unwrap();
    let t = ChatTemplate::from_dir(out.join("model")).unwrap().unwrap();
    assert_eq!(
        t.source(),
        ChatTemplate::builtin("chatml", None).unwrap().source()
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_conversation_files_name_file_line_and_key() {
    let dir = tmpdir("sft-bad");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "missing-output.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n",
            &["missing-output.jsonl:2", "\"output\"", "alpaca"],
        ),
        (
            "role.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", \"content\": \"b\"}]}\n",
            &["role.jsonl:1", "unknown role \"bot\""],
        ),
        (
            "sharegpt-role.jsonl",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"robot\", \"value\": \"b\"}]}\n",
            &["sharegpt-role.jsonl:1", "unknown role \"robot\""],
        ),
        (
            "nothing.jsonl",
            "{\"text\": \"plain\"}\n",
            &["nothing.jsonl:1", "\"messages\"", "found keys \"text\""],
        ),
        (
            "no-answer.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n",
            &["no-answer.jsonl:1", "no assistant message"],
        ),
        (
            "json.jsonl",
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n{not json\n",
            &["json.jsonl:2", "invalid JSON"],
        ),
        (
            "content.jsonl",
            "{\"messages\": [{\"role\": \"user\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
            &["content.jsonl:1", "\"content\""],
        ),
        (
            "labels.jsonl",
            "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2]}\n",
            &["labels.jsonl:1", "\"labels\" has 2 entries"],
        ),
    ];
    for (name, text, want) in cases {
        let p = write(&dir, name, text);
        let e = read_records(&p, ChatFormat::Auto).unwrap_err().to_string();
        for w in *want {
            assert!(e.contains(w), "{name}: {e:?} should contain {w:?}");
        }
        println!("{e}");
    }
    // A template that raises for this conversation (Mistral's rejects a system message) names
    // the line during training.
    let model = chat_model("sft-bad-template", "mistral");
    let data = write(
        &dir,
        "system.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    // A format given for a file in another one.
    let cfg = TrainConfig {
        format: ChatFormat::Alpaca,
        ..sft_config(&model, &data, &dir.join("run"))
    };
    let e = train_cpu(&cfg, |_| true).unwrap_err().to_string();
    assert!(
        e.contains("system.jsonl:1") && e.contains("missing key \"instruction\""),
        "{e}"
    );
    let cfg = sft_config(&model, &data, &dir.join("run"));
    let e = train_cpu(&cfg, |_| true).unwrap_err().to_string();
    println!("{e}");
    assert!(
        e.contains("system.jsonl:2") && e.contains("roles must alternate"),
        "{e}"
    );
    // Conversations for a model without a chat template.
    let plain = expanded_fixture("llama-mha-f32", "sft-no-template");
    std::fs::copy(
        template_dir("qwen2").join("tokenizer.json"),
        plain.join("tokenizer.json"),
    )
    .unwrap();
    let conv = chat_fixtures().join("conversations/alpaca.jsonl");
    let e = train_cpu(&sft_config(&plain, &conv, &dir.join("run2")), |_| true)
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(
        e.contains("alpaca.jsonl:1") && e.contains("--template"),
        "{e}"
    );
}

#[test]
fn sft_preview_marks_the_trained_tokens() {
    let g = golden();
    let dir = template_dir("llama3");
    let data = chat_fixtures().join("conversations/sharegpt.jsonl");
    let json = crate::cli::run_ok(&[
        "sft-preview",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--index",
        "1",
        "--mask-history",
        "--json",
    ]);
    let got: Value = serde_json::from_str(json.trim()).unwrap();
    let want = g["encodings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["template"] == "llama3"
                && e["file"] == "sharegpt.jsonl"
                && e["line"] == 2
                && e["mode"] == "last"
        })
        .unwrap();
    assert_eq!(got["input_ids"], want["input_ids"]);
    assert_eq!(got["labels"], want["labels"]);
    let text = crate::cli::run_ok(&[
        "sft-preview",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    println!("{text}");
    assert!(
        text.contains("[[") && text.contains("<|eot_id|>]]"),
        "{text}"
    );
    assert!(text.contains("trained") && text.contains("masked"));
}

#[test]
fn pipeline_recipe_expands_pretrains_instruction_tunes_and_resumes() {
    let dir = tmpdir("pipeline");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for src in [model_dir("llama-mha-f32"), template_dir("qwen2")] {
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), base.join(e.file_name())).unwrap();
        }
    }
    let recipe = dir.join("recipe.toml");
    let text = format!(
        r#"model = "{base}"
output = "{out}"

[expand]
groups = 2

[pretrain]
data = ["{pre}"]
max_steps = 2
batch_size = 2
seq_len = 32
val_fraction = 0.0
token_cache = false

[sft]
data = ["{chat}"]
max_steps = 2
batch_size = 2
seq_len = 256
lr = 1e-3
val_fraction = 0.0
"#,
        base = base.display(),
        out = dir.join("run").display(),
        pre = fixtures().join("train/seqs.jsonl").display(),
        chat = chat_fixtures().join("conversations/openai.jsonl").display(),
    );
    std::fs::write(&recipe, text).unwrap();
    let out = crate::cli::run_ok(&["pipeline", recipe.to_str().unwrap()]);
    let model = dir.join("run/sft/model");
    assert!(out.contains(&model.display().to_string()), "{out}");
    // Each stage ran with its defaults: pretraining trained the new blocks only, SFT everything.
    let pre: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run/pretrain/report.json")).unwrap(),
    )
    .unwrap();
    let sft: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/sft/report.json")).unwrap())
            .unwrap();
    println!(
        "pretrain trained {} of {}; sft {} of {}",
        pre["trainable_params"], pre["total_params"], sft["trainable_params"], sft["total_params"]
    );
    assert!(pre["trainable_params"].as_u64() < pre["total_params"].as_u64());
    assert_eq!(sft["trainable_params"], sft["total_params"]);
    let toml = std::fs::read_to_string(dir.join("run/sft/train.toml")).unwrap();
    assert!(
        toml.contains("stage = \"sft\"") && toml.contains("packing = \"neat\""),
        "{toml}"
    );
    // The exported model carries the chat template and loads.
    assert!(ChatTemplate::from_dir(&model).unwrap().is_some());
    Checkpoint::open(&model).unwrap();
    // Run again: every stage is done and skipped.
    let again = crate::cli::run_ok(&["pipeline", recipe.to_str().unwrap()]);
    assert!(again.contains("pipeline done"));
    // A bad recipe names the stage and key.
    std::fs::write(
        &recipe,
        "model = \"x\"\noutput = \"y\"\n[sft]\nlr = \"fast\"\n",
    )
    .unwrap();
    let e = crate::cli::run_err(&["pipeline", recipe.to_str().unwrap()]);
    assert!(e.contains("[sft]") && e.contains("lr"), "{e}");
}

#[test]
fn long_conversations_are_cut_at_seq_len_and_counted() {
    use llama_pro::train::sft::load_examples;
    let dir = template_dir("llama3");
    let (t, tok) = (
        ChatTemplate::from_dir(&dir).unwrap().unwrap(),
        Tokenizer::from_dir(&dir, None, &[]).unwrap(),
    );
    let enc = Encoder {
        template: &t,
        tokenizer: &tok,
        mode: LabelMode::Assistant,
    };
    let data = chat_fixtures().join("conversations/openai.jsonl");
    let lines = read_records(&data, ChatFormat::Auto).unwrap().len();
    let (all, stats) = load_examples(&data, ChatFormat::Auto, Some(&enc), "", 320, 4096).unwrap();
    assert_eq!((stats.kept, stats.truncated, stats.dropped), (lines, 0, 0));
    let longest = all.iter().map(|e| e.input_ids.len()).max().unwrap();
    // Cut below the longest: that one loses its end, keeps its start, labels cut alike.
    let (cut, stats) =
        load_examples(&data, ChatFormat::Auto, Some(&enc), "", 320, longest - 5).unwrap();
    println!("{stats:?}");
    assert!(stats.truncated >= 1 && stats.kept + stats.dropped == lines);
    for e in &cut {
        assert!(e.input_ids.len() <= longest - 5 && e.labels.len() == e.input_ids.len());
        let full = all
            .iter()
            .find(|a| a.input_ids.starts_with(&e.input_ids))
            .unwrap();
        assert_eq!(e.labels[..], full.labels[..e.labels.len()]);
    }
    // So short that no answer is left: every conversation dropped, and said.
    let e = load_examples(&data, ChatFormat::Auto, Some(&enc), "", 320, 8)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no example left") && e.contains("dropped"),
        "{e}"
    );
}
