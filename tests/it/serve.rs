//! Serving: token log-probabilities against transformers, batched decoding against one
//! sequence at a time, multiple-choice scoring, and `llama-pro serve` over real HTTP (the
//! OpenAI endpoints, errors, concurrency, disconnects, shutdown).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use llama_pro::core::generate::{GenerationConfig, generate};
use llama_pro::core::score::{BatchDecoder, score};
use llama_pro::core::{DType, LlamaForCausalLM, Tokenizer};
use serde_json::{Value, json};

use crate::common::*;

type B = Flex;

fn load(name: &str) -> LlamaForCausalLM<B> {
    LlamaForCausalLM::<B>::from_pretrained(model_dir(name), &Default::default(), Some(DType::F32))
        .unwrap()
        .0
}

/// log_softmax in f64 of one row of transformers' logits.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// `score`: every token's log-probability (and the best alternative) equals transformers'
/// log-softmax, for sequences of different lengths in one right-padded batch.
#[test]
fn token_logprobs_match_transformers() {
    for name in [
        "llama-mha-f32",
        "llama-gqa-tied-sharded-f32",
        "mistral-window-f32",
    ] {
        let golden = Golden::open(name);
        let model = load(name);
        let (ids, shape) = golden.i64("input_ids");
        let (logits, _) = golden.f32("logits");
        let (rows, seq) = (shape[0], shape[1]);
        let vocab = model.config.vocab_size;
        // Row 0 whole, row 1 cut short: padding must not change row 1's values.
        let lens = [seq, seq - 5];
        let seqs: Vec<Vec<u32>> = (0..rows.min(2))
            .map(|r| {
                ids[r * seq..r * seq + lens[r]]
                    .iter()
                    .map(|&t| t as u32)
                    .collect()
            })
            .collect();
        let scored = score(&model, &seqs, 3, &Default::default()).unwrap();
        let mut worst = 0f64;
        for (r, s) in scored.iter().enumerate() {
            assert_eq!(s.token_logprobs.len(), lens[r] - 1);
            for t in 1..lens[r] {
                let row = &logits[(r * seq + t - 1) * vocab..(r * seq + t) * vocab];
                let want = log_softmax(row);
                let got = s.token_logprobs[t - 1] as f64;
                worst = worst.max((got - want[seqs[r][t] as usize]).abs());
                // The best alternative is transformers' argmax, with its value.
                let (best, lp) = s.top[t - 1][0];
                let arg = (0..vocab)
                    .max_by(|&a, &b| want[a].total_cmp(&want[b]).then(b.cmp(&a)))
                    .unwrap();
                assert_eq!(best as usize, arg, "{name} row {r} position {t}: argmax");
                assert!((lp as f64 - want[arg]).abs() < 1e-4);
                assert!(
                    s.top[t - 1].windows(2).all(|w| w[0].1 >= w[1].1),
                    "top sorted"
                );
            }
            // The next-token logits of the last position.
            let last = lens[r] - 1;
            let want = &logits[(r * seq + last) * vocab..(r * seq + last + 1) * vocab];
            let d = max_abs_diff(&s.next_logits, want);
            assert!(d < 1e-4, "{name} row {r}: next logits differ by {d}");
        }
        println!("{name:<28} token log-probabilities vs transformers max|Δ| = {worst:.3e}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

/// Batched decoding: rows of different lengths that join at different times (before and
/// after the batch's position, so that the batch moves forward for a longer prompt) and leave
/// early compute, at every step, the logits of their whole sequence run alone.
#[test]
fn batched_decoding_matches_one_sequence_at_a_time() {
    for name in [
        "llama-mha-f32",
        "llama-gqa-tied-sharded-f32",
        "mistral-window-f32",
    ] {
        let model = load(name);
        let device = Default::default();
        let vocab = model.config.vocab_size as u32;
        let seq = |seed: u32, n: usize| -> Vec<u32> {
            (0..n as u32)
                .map(|i| (seed * 31 + i * 7 + 3) % vocab)
                .collect()
        };
        // (prompt, joins before step, leaves after step)
        let plan = [
            (seq(1, 6), 0, 9),
            (seq(2, 3), 0, 4),
            (seq(3, 12), 2, 12),
            (seq(4, 5), 5, 12),
        ];
        let mut decoder = BatchDecoder::new(&model, &device);
        let mut live: Vec<(usize, Vec<u32>)> = Vec::new(); // (plan index, tokens so far)
        let mut worst = 0f32;
        let alone = |tokens: &[u32]| -> Vec<f32> {
            let n = tokens.len();
            let ids = Tensor::<B, 2, Int>::from_data(
                TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]),
                &device,
            );
            to_vec(model.forward(ids).narrow(1, n - 1, 1)).0
        };
        let mut next: Vec<u32> = Vec::new();
        for step in 0..12 {
            let joining: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].1 == step).collect();
            // Step the rows already in the batch, then add the new ones.
            if !live.is_empty() {
                let logits = decoder.step(&next).unwrap();
                for ((_, toks), l) in live.iter().zip(&logits) {
                    worst = worst.max(max_abs_diff(l, &alone(toks)));
                }
                next = logits
                    .iter()
                    .map(|l| llama_pro::core::generate::argmax(l))
                    .collect();
                for ((_, toks), &t) in live.iter_mut().zip(&next) {
                    toks.push(t);
                }
            }
            if !joining.is_empty() {
                let prompts: Vec<Vec<u32>> = joining.iter().map(|&i| plan[i].0.clone()).collect();
                assert!(prompts.iter().all(|p| decoder.can_join(p.len())));
                let logits = decoder.join(&prompts).unwrap();
                for (&i, l) in joining.iter().zip(&logits) {
                    worst = worst.max(max_abs_diff(l, &alone(&plan[i].0)));
                    let t = llama_pro::core::generate::argmax(l);
                    let mut toks = plan[i].0.clone();
                    toks.push(t);
                    live.push((i, toks));
                    next.push(t);
                }
            }
            // Rows leave.
            let keep: Vec<usize> = (0..live.len())
                .filter(|&k| plan[live[k].0].2 > step)
                .collect();
            decoder.keep(&keep);
            live = keep.iter().map(|&k| live[k].clone()).collect();
            next = keep.iter().map(|&k| next[k]).collect();
            assert_eq!(decoder.rows(), live.len());
        }
        println!("{name:<28} batched decoding vs alone max|Δ| = {worst:.3e}");
        assert!(
            worst < 1e-4,
            "{name}: batched logits differ from one-at-a-time by {worst}"
        );
    }
}

/// Multiple-choice scoring: lm-eval's requests and log-likelihoods, against the fixture made
/// with transformers and lm-eval's own request code (`scripts/make_task_fixtures.py`).
#[test]
fn multiple_choice_matches_transformers_and_lm_eval() {
    use llama_pro::train::tasks::{McOptions, McTask, evaluate_task, requests};
    let task = McTask::load(&fixtures().join("tasks/mc_tiny.jsonl")).unwrap();
    for name in ["llama-mha-f32", "llama-gqa-tied-sharded-f32"] {
        let path = fixtures().join(format!("tasks/golden-{name}.json"));
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let model = load(name);
        let dir = model_dir(name);
        let hf = llama_pro::core::HfConfig::from_path(&dir).unwrap();
        let tok =
            Tokenizer::from_dir(&dir, hf.config.bos_token_id, &hf.config.eos_token_ids).unwrap();
        let opts = McOptions::default();
        // The requests: tokens and context lengths exactly as lm-eval builds them.
        let reqs: Vec<_> = task
            .items
            .iter()
            .flat_map(|item| requests(&tok, item, &opts).unwrap())
            .collect();
        let want = golden["requests"].as_array().unwrap();
        assert_eq!(reqs.len(), want.len(), "{name}: request count");
        for (k, (r, w)) in reqs.iter().zip(want).enumerate() {
            let tokens: Vec<u32> = serde_json::from_value(w["tokens"].clone()).unwrap();
            assert_eq!(r.tokens, tokens, "{name}: request {k} tokens");
            assert_eq!(
                r.context_len as u64,
                w["context_len"].as_u64().unwrap(),
                "{name}: request {k} context"
            );
        }
        let r = evaluate_task(
            &model,
            &tok,
            &task,
            &McOptions {
                batch_size: 3,
                ..opts
            },
            &Default::default(),
            |_, _| {},
        )
        .unwrap();
        let mut worst = 0f64;
        for (got, w) in r.items.iter().zip(golden["items"].as_array().unwrap()) {
            for (a, b) in got.lls.iter().zip(w["lls"].as_array().unwrap()) {
                worst = worst.max((a - b.as_f64().unwrap()).abs());
            }
        }
        println!("{name:<28} choice log-likelihoods vs transformers max|Δ| = {worst:.3e}");
        assert!(worst < 1e-4, "{name}: {worst}");
        for key in ["acc", "acc_norm", "acc_stderr", "acc_norm_stderr"] {
            let (a, b) = (
                serde_json::to_value(&r).unwrap()[key].as_f64().unwrap(),
                golden[key].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-12, "{name} {key}: {a} vs {b}");
        }
    }
    // Bad task files name the line.
    let dir = tmpdir("mc-bad");
    for (text, expect) in [
        (
            "{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": 2}\n",
            ":1: \"gold\" is 2",
        ),
        (
            "{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": 0}\n{\"choices\": [\"x\"]}\n",
            ":2: no \"context\"",
        ),
        ("not json\n", ":1: not a JSON object"),
    ] {
        let p = dir.join("bad.jsonl");
        std::fs::write(&p, text).unwrap();
        let e = McTask::load(&p).unwrap_err().to_string();
        assert!(e.contains(expect), "{e:?} should contain {expect:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// llama-pro serve over HTTP.

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(model: &str, extra: &[&str]) -> Self {
        Self::start_env(model, extra, &[])
    }

    fn start_env(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llama-pro"))
            .args(["serve", "--model", model, "--port", "0"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, port }
    }

    /// One request; (status, body). SSE bodies are returned as sent (chunked encoding undone).
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        (status, body)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, Some(&body.to_string()));
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The `data:` payloads of a server-sent-event body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// The OpenAI endpoints: what lm-eval's `local-completions` sends (token-id prompts, echo,
/// logprobs, one new token) gets the scores `score` computes; greedy completions are what
/// `generate` gives; chat streams; bad requests get 4xx with OpenAI's error body.
#[test]
fn serve_openai_endpoints() {
    let name = "llama-mha-f32";
    let dir = model_dir(name);
    let server = Server::start(
        dir.to_str().unwrap(),
        &["--chat-template", "chatml", "--served-model-name", "tiny"],
    );
    let (status, body) = server.request("GET", "/health", None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.request("GET", "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 128);

    // lm-eval's log-likelihood request: two token-id prompts, echo, logprobs 1, max_tokens 1.
    let model = load(name);
    let prompts: Vec<Vec<u32>> = vec![(5..25).collect(), (40..49).collect()];
    let (status, out) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": true,
                "temperature": 0, "seed": 1234}),
    );
    assert_eq!(status, 200, "{out}");
    let scored = score(&model, &prompts, 1, &Default::default()).unwrap();
    for (i, (p, s)) in prompts.iter().zip(&scored).enumerate() {
        let c = &out["choices"][i];
        assert_eq!(c["index"], i);
        let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
        let tops = c["logprobs"]["top_logprobs"].as_array().unwrap();
        // The prompt (first token: null) and the one generated token.
        assert_eq!(lps.len(), p.len() + 1);
        assert!(lps[0].is_null() && tops[0].is_null());
        for t in 1..p.len() {
            // The values `score` computes (the server may have scored the two prompts in
            // separate passes: rounding of another batch shape, ~1 ulp).
            let same = |a: f64, b: f32| (a - b as f64).abs() <= 1e-5;
            assert!(
                same(lps[t].as_f64().unwrap(), s.token_logprobs[t - 1]),
                "prompt {i} token {t}: {} vs {}",
                lps[t],
                s.token_logprobs[t - 1]
            );
            let best = tops[t]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!(same(best, s.top[t - 1][0].1));
        }
        let greedy = llama_pro::core::generate::argmax(&s.next_logits);
        assert_eq!(
            c["logprobs"]["tokens"].as_array().unwrap().len(),
            p.len() + 1
        );
        assert_eq!(out["usage"]["completion_tokens"], 2);
        let _ = greedy;
    }

    // Greedy completion of a text prompt: what `generate` gives (BOS added as the tokenizer does).
    let hf = llama_pro::core::HfConfig::from_path(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir, hf.config.bos_token_id, &hf.config.eos_token_ids).unwrap();
    let text = "the sea and the sky";
    let ids = tok.encode(text, true).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        eos_token_ids: tok.eos_token_ids.clone(),
        ..Default::default()
    };
    let want = generate(&model, &ids, &cfg, &Default::default(), |_| {}).unwrap();
    let kept: Vec<u32> = want
        .iter()
        .copied()
        .filter(|t| !tok.eos_token_ids.contains(t))
        .collect();
    let (status, out) = server.post(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], tok.decode(&kept).unwrap());
    assert_eq!(out["usage"]["prompt_tokens"], ids.len());
    assert_eq!(out["usage"]["completion_tokens"], want.len());
    // A stop string cuts the text.
    let full = out["choices"][0]["text"].as_str().unwrap().to_string();
    if let Some(cut) = full
        .char_indices()
        .nth(4)
        .map(|(i, _)| i)
        .filter(|&i| i > 0)
    {
        let stop = &full[cut..(cut + 2).min(full.len())];
        let (_, out) = server.post(
            "/v1/completions",
            &json!({"prompt": text, "max_tokens": 12, "temperature": 0, "stop": [stop]}),
        );
        let got = out["choices"][0]["text"].as_str().unwrap();
        assert_eq!(got, &full[..full.find(stop).unwrap()]);
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
    }

    // Sampling with a seed is repeatable.
    let req = json!({"prompt": text, "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7});
    assert_eq!(
        server.post("/v1/completions", &req).1["choices"][0]["text"],
        server.post("/v1/completions", &req).1["choices"][0]["text"]
    );

    // Chat, streamed: role first, content deltas, a finish reason, [DONE]; the same text as
    // without streaming.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
                      "max_tokens": 10, "temperature": 0});
    let (status, plain) = server.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{plain}");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, body) =
        server.request("POST", "/v1/chat/completions", Some(&streamed.to_string()));
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(
        finish,
        [plain["choices"][0]["finish_reason"].as_str().unwrap()]
    );
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        plain["usage"]["completion_tokens"]
    );

    // Errors: status, OpenAI's body, the culprit named.
    let err = |status: u16, body: &str, expect: &str, code: Option<&str>| {
        let (s, text) = server.request("POST", "/v1/completions", Some(body));
        assert_eq!(s, status, "{body} -> {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(expect),
            "{body}: {msg:?} should contain {expect:?}"
        );
        assert!(v["error"]["type"].is_string());
        if let Some(code) = code {
            assert_eq!(v["error"]["code"], code);
        }
    };
    err(400, "{\"prompt\": \"a\", ", "not valid JSON", None);
    err(400, "[1, 2]", "must be a JSON object", None);
    err(400, "{\"max_tokens\": 3}", "`prompt` is required", None);
    err(
        404,
        "{\"model\": \"gpt-4\", \"prompt\": \"a\"}",
        "`gpt-4` does not exist",
        Some("model_not_found"),
    );
    err(
        400,
        "{\"prompt\": \"a\", \"max_tokens\": -1}",
        "max_tokens: expected an integer",
        None,
    );
    err(
        400,
        "{\"prompt\": \"a\", \"temperature\": \"hot\"}",
        "temperature: expected a number",
        None,
    );
    err(
        400,
        "{\"prompt\": {\"a\": 1}}",
        "prompt: expected a string",
        None,
    );
    err(
        400,
        "{\"prompt\": [1, 99999]}",
        "token id 99999 is out of range",
        None,
    );
    err(
        400,
        "{\"prompt\": \"a\", \"max_tokens\": 500}",
        "maximum context length is 128 tokens",
        Some("context_length_exceeded"),
    );
    let long: Vec<u32> = (0..200).map(|i| i % 300).collect();
    err(
        400,
        &json!({"prompt": long, "max_tokens": 0}).to_string(),
        "200 in prompt[0]",
        Some("context_length_exceeded"),
    );
    let (s, text) = server.request(
        "POST",
        "/v1/chat/completions",
        Some("{\"messages\": [{\"content\": \"hi\"}]}"),
    );
    assert_eq!(s, 400, "{text}");
    assert!(text.contains("messages[0]"), "{text}");
    let (s, text) = server.request("GET", "/v1/nothing", None);
    assert_eq!(s, 404, "{text}");
    assert!(text.contains("\"error\""));
    let (s, text) = server.request("GET", "/v1/completions", None);
    assert_eq!(s, 405, "{text}");
    assert!(text.contains("\"error\""));
}

/// Concurrent requests are batched and answered as one at a time; a client that disconnects
/// cancels its generation; SIGTERM lets the request under way finish, then the server exits.
#[test]
fn serve_concurrency_disconnect_and_shutdown() {
    let dir = model_dir("llama-gqa-tied-sharded-f32");
    // 10 ms per decoding step: generations last long enough to be cancelled or interrupted.
    let server = Server::start_env(
        dir.to_str().unwrap(),
        &["--max-batch", "8"],
        &[("LLAMA_PRO_SERVE_STEP_MS", "10")],
    );
    let body = |i: usize| json!({"prompt": (1..4 + 3 * i as u32).collect::<Vec<u32>>(), "max_tokens": 16, "temperature": 0, "logprobs": 2});
    // One at a time first.
    let alone: Vec<Value> = (0..12)
        .map(|i| server.post("/v1/completions", &body(i)).1)
        .collect();
    // Then all at once (8 per batch, joining at different positions).
    let port = server.port;
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let b = body(i);
                s.spawn(move || {
                    let srv = Server {
                        child: Command::new("true").spawn().unwrap(),
                        port,
                    };
                    let out = srv.post("/v1/completions", &b);
                    assert_eq!(out.0, 200, "{}", out.1);
                    out.1
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The same tokens, up to a near-tie: batched rows are computed with other kernels (gemm vs
    // the few-row decoding kernel), so greedy choices between two tokens within rounding may
    // differ; from there on the sequences may differ.
    let mut diverged = 0;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        let toks = |v: &Value| {
            v["choices"][0]["logprobs"]["tokens"]
                .as_array()
                .unwrap()
                .clone()
        };
        let (ta, tt) = (toks(a), toks(t));
        match ta.iter().zip(&tt).position(|(x, y)| x != y) {
            None => {
                assert_eq!(
                    a["choices"][0]["text"], t["choices"][0]["text"],
                    "request {i}"
                );
                assert_eq!(a["usage"], t["usage"], "request {i}");
            }
            Some(j) => {
                let top = &a["choices"][0]["logprobs"]["top_logprobs"][j];
                let v: Vec<f64> = top
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert!(
                    v.len() == 2 && (v[0] - v[1]).abs() < 1e-4,
                    "request {i}: batched differs from alone at token {j} without a near-tie: {top}"
                );
                diverged += 1;
            }
        }
    }
    assert!(diverged <= 2, "{diverged} of 12 requests diverged");

    // Disconnect: a long streamed generation (100 steps, >= 1 s), dropped after its first
    // chunk, leaves the batch as cancelled.
    let health =
        || -> Value { serde_json::from_str(&server.request("GET", "/health", None).1).unwrap() };
    assert_eq!(health()["cancelled"], 0);
    let t0 = Instant::now();
    {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let b = json!({"prompt": [1, 2, 3], "max_tokens": 100, "temperature": 0, "stream": true})
            .to_string();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        let _ = s.read(&mut first).unwrap();
    }
    loop {
        let h = health();
        if h["active"] == 0 && h["cancelled"] == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the disconnected request still runs: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "disconnected stream cancelled after {:.2} s (100 steps would take >= 1 s)",
        t0.elapsed().as_secs_f64()
    );

    // SIGTERM during a request: it completes, then the server exits 0.
    let mut server = server;
    let handle = std::thread::spawn(move || {
        let srv = Server {
            child: Command::new("true").spawn().unwrap(),
            port,
        };
        srv.post(
            "/v1/completions",
            &json!({"prompt": [1, 2, 3], "max_tokens": 100, "temperature": 0, "stop": []}),
        )
    });
    // Under way (>= 1 s of steps) when the signal comes.
    let t0 = Instant::now();
    while server
        .request("GET", "/health", None)
        .1
        .contains("\"active\":0")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the request never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe { libc_kill(server.child.id() as i32, 15) };
    let (status, out) = handle.join().unwrap();
    assert_eq!(status, 200, "{out}");
    // Completed in full: stopped by its length or the model's EOS, not cut.
    let reason = out["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "length" || reason == "stop", "{out}");
    if reason == "length" {
        assert_eq!(out["usage"]["completion_tokens"], 100);
    }
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status after SIGTERM: {code:?}");
    let mut err = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("stopping"), "{err}");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// `train --eval-task`: the tasks scored before training (the base model: transformers'
/// numbers) and after, in the report and its table; a bad task file fails before training.
#[test]
fn train_reports_tasks_before_and_after() {
    use llama_pro::train::config::{DataSource, TrainConfig};
    let out = tmpdir("train-tasks");
    let cfg = TrainConfig {
        model: model_dir("llama-mha-f32"),
        data: vec![DataSource::new(fixtures().join("train/seqs.jsonl"))],
        output: out.join("run"),
        trainable: Some("layers[3]".parse().unwrap()),
        lr: 1e-2,
        max_steps: Some(3),
        seq_len: 64,
        val_fraction: 0.0,
        log_every: 0,
        token_cache: false,
        eval_tasks: vec![fixtures().join("tasks/mc_tiny.jsonl")],
        ..Default::default()
    };
    let (report, lines) = train_cpu_lines(&cfg);
    let report = report.unwrap();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tasks/golden-llama-mha-f32.json")).unwrap(),
    )
    .unwrap();
    let before = &report.tasks_before["mc_tiny"];
    assert_eq!(before.n, 8);
    assert_eq!(before.acc, golden["acc"].as_f64().unwrap());
    assert_eq!(before.acc_norm, golden["acc_norm"].as_f64().unwrap());
    let after = &report.tasks_after["mc_tiny"];
    assert_eq!(after.n, 8);
    // Training moved the choices' log-likelihoods.
    assert_ne!(before.items, after.items);
    let table = llama_pro::train::trainer::forgetting_table(&report);
    assert!(table.contains("mc_tiny acc_norm"), "{table}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tasks before training: mc_tiny acc")),
        "{lines:?}"
    );

    // A malformed task file: refused before any step, naming the file and line.
    let bad = out.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"context\": \"x\", \"choices\": [\"a\"], \"gold\": 0}\n",
    )
    .unwrap();
    let cfg = TrainConfig {
        eval_tasks: vec![bad],
        output: out.join("run2"),
        ..cfg
    };
    let e = train_cpu_lines(&cfg).0.unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:1: 1 choice(s)"), "{e}");
    assert!(!out.join("run2").join("checkpoints").exists());
}
