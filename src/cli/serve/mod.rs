//! `llama-pro serve`: an OpenAI-compatible HTTP server (axum on tokio) for lm-evaluation-harness
//! (`--model local-completions`) and chat clients.
//!
//! Endpoints: `POST /v1/completions` (text or token-id prompts, `echo` + `logprobs` for
//! log-likelihoods, `stream`), `POST /v1/chat/completions` (the model's chat template,
//! `stream`), `GET /v1/models`, `GET /health`. The model runs on one engine thread that batches
//! every request ([`engine`]); the HTTP side only parses, tokenizes and formats. Errors have
//! OpenAI's body and a 4xx status; a client that disconnects cancels its generation; SIGINT or
//! SIGTERM stops accepting connections and finishes the requests under way (a second one exits
//! at once).

mod api;
mod engine;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use llama_pro::core::burn::tensor::backend::Backend;
use llama_pro::core::device::{OnBackend, dispatch};
use llama_pro::core::{ChatTemplate, Message, Tokenizer};
use llama_pro::train::data::existing;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use self::api::{ApiError, Fields, Prompt};
use self::engine::{Event, Job, Limits, Stats};
use super::ComputeArgs;
use super::chat::{load_model, stop_token_ids};

/// `llama-pro serve`
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory (needs tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model's id in the API (`model` of requests, `/v1/models`); default: the model
    /// directory's name.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Chat template for /v1/chat/completions: a built-in one (chatml, llama3, mistral) or a
    /// .jinja file; default: the model's own.
    #[arg(long, value_name = "NAME|FILE")]
    pub chat_template: Option<String>,
    /// Sequences decoded together at most (more: higher throughput, slower steps).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Prompt tokens prefilled or scored in one forward pass at most (a longer prompt runs
    /// alone).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Context length: prompt plus new tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub compute: ComputeArgs,
}

/// Run `llama-pro serve` until SIGINT or SIGTERM.
pub fn run(a: &ServeArgs) -> anyhow::Result<()> {
    let dir = existing(&a.model)?;
    if a.max_batch == 0 || a.max_batch_tokens == 0 {
        anyhow::bail!("--max-batch and --max-batch-tokens must be at least 1");
    }
    // The template first: a bad --chat-template fails before the weights are read.
    let template = match &a.chat_template {
        Some(choice) => Some(ChatTemplate::load(&dir, Some(choice))?),
        None => ChatTemplate::from_dir(&dir)?,
    };
    dispatch(
        a.compute.device,
        ServeTask {
            args: a,
            dir,
            template,
        },
    )?
}

struct ServeTask<'a> {
    args: &'a ServeArgs,
    dir: PathBuf,
    template: Option<ChatTemplate>,
}

/// What the HTTP handlers share.
struct App {
    id: String,
    created: u64,
    context: usize,
    vocab: usize,
    tok: Tokenizer,
    template: Option<ChatTemplate>,
    jobs: std::sync::mpsc::Sender<Job>,
    stats: Arc<Stats>,
    counter: AtomicU64,
}

type Shared = Arc<App>;

impl OnBackend for ServeTask<'_> {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.args;
        let (model, tok) = load_model::<B>(&self.dir, &a.compute, &device, "serve")?;
        let positions = model.config.max_position_embeddings;
        let context = a.max_model_len.unwrap_or(positions);
        if context == 0 || context > positions {
            anyhow::bail!(
                "--max-model-len {context}: expected 1 to the model's max_position_embeddings ({positions})"
            );
        }
        let id = a.served_model_name.clone().unwrap_or_else(|| {
            let canonical = std::fs::canonicalize(&self.dir).unwrap_or(self.dir.clone());
            canonical
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let (jobs, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(Stats::default());
        let app = Arc::new(App {
            id: id.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            context,
            vocab: model.config.vocab_size,
            tok: tok.clone(),
            template: self.template,
            jobs,
            stats: stats.clone(),
            counter: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let addr = format!("{}:{}", a.host, a.port);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(&addr))
            .with_context(|| format!("--host/--port: cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        println!(
            "llama-pro serve: {id} on http://{local}/v1 ({}, {}, context {context}, batches of up to {} sequences); Ctrl-C stops",
            a.compute.device, a.compute.dtype, a.max_batch
        );
        let server = rt.spawn(async move {
            axum::serve(listener, router(app))
                .with_graceful_shutdown(shutdown_signal())
                .await
        });
        // The model runs here until the server is gone (its handlers hold the job sender).
        engine::run(
            &model,
            &tok,
            &device,
            rx,
            Limits {
                max_batch: a.max_batch,
                max_batch_tokens: a.max_batch_tokens,
                context,
            },
            stats,
        );
        rt.block_on(server)
            .context("the HTTP server task")?
            .context("the HTTP server")?;
        eprintln!("llama-pro serve: stopped");
        Ok(())
    }
}

/// The routes.
fn router(app: Shared) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError::invalid(None, "no such endpoint: the API has POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /health")
                .status(StatusCode::NOT_FOUND)
                .code("not_found")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::invalid(None, "method not allowed on this endpoint (completions take POST, models and health GET)")
                .status(StatusCode::METHOD_NOT_ALLOWED)
        })
        .with_state(app)
}

/// SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_signal().await;
    eprintln!(
        "llama-pro serve: stopping: no new connections; finishing the requests under way (again to quit now)"
    );
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("llama-pro serve: stopped at once");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn health(State(app): State<Shared>) -> Response {
    axum::Json(json!({
        "status": "ok", "model": app.id,
        "waiting": app.stats.waiting.load(Ordering::Relaxed),
        "active": app.stats.active.load(Ordering::Relaxed),
        "finished": app.stats.done.load(Ordering::Relaxed),
        "cancelled": app.stats.cancelled.load(Ordering::Relaxed),
    }))
    .into_response()
}

fn model_card(app: &App) -> Value {
    json!({"id": app.id, "object": "model", "created": app.created, "owned_by": "llama-pro",
           "max_model_len": app.context})
}

async fn models(State(app): State<Shared>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_card(&app)]})).into_response()
}

async fn model(State(app): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    if id == app.id {
        axum::Json(model_card(&app)).into_response()
    } else {
        unknown_model(&app, &id).into_response()
    }
}

fn unknown_model(app: &App, id: &str) -> ApiError {
    ApiError::invalid(
        Some("model".into()),
        format!(
            "The model `{id}` does not exist: this server serves `{}`.",
            app.id
        ),
    )
    .status(StatusCode::NOT_FOUND)
    .code("model_not_found")
}

/// Settings shared by both endpoints.
struct Sampling {
    max_tokens: usize,
    temperature: f32,
    top_p: Option<f32>,
    seed: Option<u64>,
    n: usize,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

impl Sampling {
    fn read(
        f: &Fields,
        default_max_tokens: Option<usize>,
        max_key: &str,
    ) -> Result<Self, ApiError> {
        let max_tokens = match f.uint(max_key, 0, u32::MAX as u64)? {
            Some(n) => n as usize,
            None => default_max_tokens.unwrap_or(16),
        };
        Ok(Self {
            max_tokens,
            // OpenAI's default temperature is 1.
            temperature: f.number("temperature", 0.0, 100.0)?.unwrap_or(1.0) as f32,
            top_p: f
                .number("top_p", 0.0, 1.0)?
                .map(|p| p as f32)
                .filter(|&p| p < 1.0)
                .map(|p| p.max(f32::MIN_POSITIVE)),
            seed: f
                .get("seed")
                .map(|v| {
                    v.as_i64().map(|s| s as u64).ok_or_else(|| {
                        ApiError::invalid(
                            Some("seed".into()),
                            format!("seed: expected an integer, got {v}"),
                        )
                    })
                })
                .transpose()?,
            n: f.uint("n", 1, 16)?.unwrap_or(1) as usize,
            stop: f.stop()?,
            stream: f.bool("stream")?.unwrap_or(false),
            include_usage: f.include_usage(),
        })
    }
}

impl App {
    fn check_model(&self, f: &Fields) -> Result<(), ApiError> {
        match f.string("model")? {
            Some(m) if m != self.id => Err(unknown_model(self, m)),
            _ => Ok(()),
        }
    }

    fn check_length(&self, prompt: usize, max_tokens: usize, which: &str) -> Result<(), ApiError> {
        if prompt == 0 {
            return Err(ApiError::invalid(
                Some("prompt".into()),
                format!("{which} is empty: give at least one token"),
            ));
        }
        if prompt + max_tokens > self.context {
            return Err(ApiError::invalid(
                Some(which.split('[').next().unwrap_or(which).to_string()),
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in {which}, {} for the completion). Please reduce the prompt or max_tokens.",
                    self.context,
                    prompt + max_tokens,
                    prompt,
                    max_tokens
                ),
            )
            .code("context_length_exceeded"));
        }
        Ok(())
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Queue one job; its events come on the receiver.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        prompt: Vec<u32>,
        s: &Sampling,
        seed: u64,
        stop_ids: Vec<u32>,
        stop: Vec<String>,
        logprobs: Option<usize>,
        prompt_logprobs: bool,
    ) -> Result<UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = unbounded_channel();
        let job = Job {
            prompt,
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            seed,
            stop_ids,
            stop,
            logprobs,
            prompt_logprobs,
            tx,
        };
        self.jobs.send(job).map_err(|_| {
            ApiError::server("the server is shutting down").status(StatusCode::SERVICE_UNAVAILABLE)
        })?;
        Ok(rx)
    }

    /// A token's text as the API shows it (special tokens included).
    fn token_text(&self, id: u32) -> String {
        self.tok.inner().decode(&[id], false).unwrap_or_default()
    }

    /// `{token text: logprob}` of alternatives; tokens whose texts coincide keep their
    /// vocabulary pieces as keys, so that no alternative is lost.
    fn top_map(&self, top: &[(u32, f32)]) -> Value {
        let mut m = Map::new();
        for &(id, lp) in top {
            let mut key = self.token_text(id);
            if m.contains_key(&key) {
                key = self
                    .tok
                    .inner()
                    .id_to_token(id)
                    .unwrap_or_else(|| format!("<{id}>"));
            }
            if m.contains_key(&key) {
                key = format!("{key}<{id}>");
            }
            m.insert(key, json!(lp as f64));
        }
        Value::Object(m)
    }
}

fn seed_for(s: &Sampling, i: usize) -> u64 {
    match s.seed {
        Some(seed) => seed.wrapping_add(i as u64),
        None => rand::random(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `(token, log-probability)` alternatives at one position, best first.
type Top = Vec<(u32, f32)>;

/// Everything a finished job produced.
#[derive(Default)]
struct Collected {
    prompt_logprobs: Option<(Vec<f32>, Vec<Top>)>,
    ids: Vec<u32>,
    logprobs: Vec<Option<(f32, Top)>>,
    text: String,
    finish_reason: &'static str,
    completion_tokens: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut c = Collected::default();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Prompt { logprobs, top } => c.prompt_logprobs = Some((logprobs, top)),
            Event::Token { id, text, logprob } => {
                c.ids.push(id);
                c.logprobs.push(logprob);
                c.text.push_str(&text);
            }
            Event::Done {
                finish_reason,
                completion_tokens,
                text,
            } => {
                c.text.push_str(&text);
                c.finish_reason = finish_reason;
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
            Event::Failed(m) => return Err(ApiError::server(format!("the model failed: {m}"))),
        }
    }
    Err(ApiError::server(
        "the engine stopped before the answer was complete",
    ))
}

fn error_response(e: ApiError) -> Response {
    e.into_response()
}

async fn completions(State(app): State<Shared>, body: Bytes) -> Response {
    match completions_inner(app, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn completions_inner(app: Shared, body: Bytes) -> Result<Response, ApiError> {
    let f = Fields::parse(&body)?;
    app.check_model(&f)?;
    let prompts = api::prompts(f.required("prompt")?)?;
    let s = Sampling::read(&f, None, "max_tokens")?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = f.uint("logprobs", 0, 20)?.map(|k| k as usize);
    // Token ids and texts of each prompt.
    let mut encoded: Vec<(Vec<u32>, String)> = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let which = format!("prompt[{i}]");
        let (ids, text) = match p {
            Prompt::Text(t) => {
                let ids = app
                    .tok
                    .encode(&t, true)
                    .map_err(|e| ApiError::invalid(Some("prompt".into()), e.to_string()))?;
                (ids, t)
            }
            Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= app.vocab) {
                    return Err(ApiError::invalid(
                        Some("prompt".into()),
                        format!(
                            "{which}: token id {bad} is out of range (the vocabulary has {} tokens)",
                            app.vocab
                        ),
                    ));
                }
                let text = if echo {
                    app.tok.inner().decode(&ids, false).unwrap_or_default()
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        app.check_length(ids.len(), s.max_tokens, &which)?;
        encoded.push((ids, text));
    }
    let mut receivers = Vec::new();
    for (p, (ids, _)) in encoded.iter().enumerate() {
        for i in 0..s.n {
            receivers.push(app.submit(
                ids.clone(),
                &s,
                seed_for(&s, p * s.n + i),
                app.tok.eos_token_ids.clone(),
                s.stop.clone(),
                logprobs,
                echo && logprobs.is_some(),
            )?);
        }
    }
    let id = app.next_id("cmpl");
    let prompt_tokens: usize = encoded.iter().map(|(ids, _)| ids.len()).sum();
    if s.stream {
        let prefixes: Vec<Option<(Vec<u32>, String)>> = encoded
            .iter()
            .flat_map(|e| std::iter::repeat_n(echo.then(|| e.clone()), s.n))
            .collect();
        return Ok(stream_response(
            app.clone(),
            receivers,
            move |app, index, ev| {
                completion_chunk(
                    app,
                    &id,
                    index,
                    ev,
                    logprobs,
                    prefixes.get(index).cloned().flatten(),
                )
            },
            s.include_usage,
            prompt_tokens,
            "text_completion",
        ));
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (index, rx) in receivers.into_iter().enumerate() {
        let c = collect(rx).await?;
        completion_tokens += c.completion_tokens;
        let (prompt_ids, prompt_text) = &encoded[index / s.n];
        let text = if echo {
            format!("{prompt_text}{}", c.text)
        } else {
            c.text.clone()
        };
        let lp =
            logprobs.map(|_| completion_logprobs(&app, echo.then_some(prompt_ids.as_slice()), &c));
        choices.push(
            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}),
        );
    }
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": now(), "model": app.id,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response())
}

/// OpenAI's completions `logprobs`: the prompt's tokens first with `echo` (the first one has
/// no log-probability), then the generated ones.
fn completion_logprobs(app: &App, prompt: Option<&[u32]>, c: &Collected) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut offsets = Vec::new();
    let mut at = 0usize;
    let mut push = |text: String, lp: Value, top: Value| {
        offsets.push(at);
        at += text.len();
        tokens.push(text);
        token_logprobs.push(lp);
        top_logprobs.push(top);
    };
    if let Some(ids) = prompt {
        let (lps, tops) = c.prompt_logprobs.clone().unwrap_or_default();
        for (t, &id) in ids.iter().enumerate() {
            if t == 0 {
                push(app.token_text(id), Value::Null, Value::Null);
            } else {
                push(
                    app.token_text(id),
                    lps.get(t - 1).map_or(Value::Null, |&v| json!(v as f64)),
                    tops.get(t - 1).map_or(Value::Null, |top| app.top_map(top)),
                );
            }
        }
    }
    for (&id, lp) in c.ids.iter().zip(&c.logprobs) {
        let (v, top) = match lp {
            Some((v, top)) => (json!(*v as f64), app.top_map(top)),
            None => (Value::Null, Value::Null),
        };
        push(app.token_text(id), v, top);
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
           "text_offset": offsets})
}

/// One streamed completions chunk for `ev` of choice `index` (None: nothing to send).
fn completion_chunk(
    app: &App,
    id: &str,
    index: usize,
    ev: &Event,
    logprobs: Option<usize>,
    echo: Option<(Vec<u32>, String)>,
) -> Option<Value> {
    let choice = |text: String, lp: Value, finish: Value| {
        json!({"id": id, "object": "text_completion", "created": now(), "model": app.id,
               "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})
    };
    match ev {
        Event::Prompt { logprobs: lps, top } => {
            let (ids, text) = echo?;
            let c = Collected {
                prompt_logprobs: Some((lps.clone(), top.clone())),
                ..Default::default()
            };
            Some(choice(
                text,
                completion_logprobs(app, Some(&ids), &c),
                Value::Null,
            ))
        }
        Event::Token {
            id: tok,
            text,
            logprob,
        } => {
            let lp = match (logprobs, logprob) {
                (Some(_), Some((v, top))) => {
                    json!({"tokens": [app.token_text(*tok)], "token_logprobs": [*v as f64],
                    "top_logprobs": [app.top_map(top)], "text_offset": [0]})
                }
                _ => Value::Null,
            };
            (!text.is_empty() || logprobs.is_some()).then(|| choice(text.clone(), lp, Value::Null))
        }
        Event::Done {
            finish_reason,
            text,
            ..
        } => Some(choice(text.clone(), Value::Null, json!(finish_reason))),
        Event::Failed(_) => None,
    }
}

/// A server-sent-event response over the events of `receivers`: each event through `chunk`,
/// the usage at the end if asked, then `[DONE]`. When the client goes, the forwarding task's
/// sends fail, it drops the receivers, and the engine cancels their rows.
fn stream_response(
    app: Shared,
    receivers: Vec<UnboundedReceiver<Event>>,
    chunk: impl Fn(&App, usize, &Event) -> Option<Value> + Send + 'static,
    include_usage: bool,
    prompt_tokens: usize,
    object: &'static str,
) -> Response {
    let (out, out_rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let merged =
            futures_util::stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
                Box::pin(futures_util::stream::unfold(rx, move |mut rx| async move {
                    rx.recv().await.map(|e| ((i, e), rx))
                }))
            }));
        futures_util::pin_mut!(merged);
        use futures_util::StreamExt;
        let mut completion_tokens = 0;
        let mut id = String::new();
        while let Some((i, ev)) = merged.next().await {
            if let Event::Failed(m) = &ev {
                let e = ApiError::server(format!("the model failed: {m}"));
                let _ = out.send(e.body().to_string()).await;
                return;
            }
            if let Event::Done {
                completion_tokens: n,
                ..
            } = &ev
            {
                completion_tokens += n;
            }
            if let Some(v) = chunk(&app, i, &ev) {
                if id.is_empty() {
                    id = v["id"].as_str().unwrap_or_default().to_string();
                }
                if out.send(v.to_string()).await.is_err() {
                    return;
                }
            }
        }
        if include_usage {
            let v = json!({"id": id, "object": object, "created": now(), "model": app.id, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}});
            let _ = out.send(v.to_string()).await;
        }
        let _ = out.send("[DONE]".to_string()).await;
    });
    let events = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, Infallible>(SseEvent::default().data(data)), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn chat_completions(State(app): State<Shared>, body: Bytes) -> Response {
    match chat_inner(app, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn chat_inner(app: Shared, body: Bytes) -> Result<Response, ApiError> {
    let f = Fields::parse(&body)?;
    app.check_model(&f)?;
    let messages = api::messages(f.required("messages")?)?;
    let Some(template) = app.template.as_ref() else {
        return Err(ApiError::invalid(
            Some("messages".into()),
            "this model has no chat template: restart the server with --chat-template NAME|FILE, or use /v1/completions",
        ));
    };
    let msgs: Vec<Message> = messages
        .iter()
        .map(|(r, c)| Message::new(r.as_str(), c.as_str()))
        .collect();
    let text = template.render(&msgs, true).map_err(|e| {
        ApiError::invalid(
            Some("messages".into()),
            format!("the chat template failed on these messages: {e}"),
        )
    })?;
    let prompt = app
        .tok
        .encode(&text, false)
        .map_err(|e| ApiError::server(e.to_string()))?;
    let key = if f.get("max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let s = Sampling::read(&f, Some(app.context.saturating_sub(prompt.len())), key)?;
    app.check_length(prompt.len(), s.max_tokens, "messages")?;
    let want_logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.uint("top_logprobs", 0, 20)?.map(|k| k as usize);
    let logprobs = want_logprobs.then(|| top.unwrap_or(0));
    let mut stops = s.stop.clone();
    for t in template.turn_ends() {
        if !stops.contains(&t) {
            stops.push(t);
        }
    }
    let stop_ids = stop_token_ids(&app.tok, template);
    let mut receivers = Vec::new();
    for i in 0..s.n {
        receivers.push(app.submit(
            prompt.clone(),
            &s,
            seed_for(&s, i),
            stop_ids.clone(),
            stops.clone(),
            logprobs,
            false,
        )?);
    }
    let id = app.next_id("chatcmpl");
    let prompt_tokens = prompt.len() * s.n;
    if s.stream {
        let started = std::sync::Mutex::new(vec![false; s.n]);
        return Ok(stream_response(
            app.clone(),
            receivers,
            move |app, index, ev| {
                let chunk = |delta: Value, lp: Value, finish: Value| {
                    json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": app.id,
                       "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})
                };
                let first = {
                    let mut s = started.lock().unwrap_or_else(|e| e.into_inner());
                    !std::mem::replace(&mut s[index], true)
                };
                let role = |mut d: Value| {
                    if first {
                        d["role"] = json!("assistant");
                    }
                    d
                };
                match ev {
                    Event::Token {
                        id: t,
                        text,
                        logprob,
                    } => {
                        let lp = match (logprobs, logprob) {
                            (Some(_), Some(l)) => json!({"content": [chat_logprob(app, *t, l)]}),
                            _ => Value::Null,
                        };
                        (first || !text.is_empty() || logprobs.is_some())
                            .then(|| chunk(role(json!({"content": text})), lp, Value::Null))
                    }
                    Event::Done {
                        finish_reason,
                        text,
                        ..
                    } => {
                        let delta = if text.is_empty() {
                            role(json!({}))
                        } else {
                            role(json!({"content": text}))
                        };
                        Some(chunk(delta, Value::Null, json!(finish_reason)))
                    }
                    Event::Prompt { .. } | Event::Failed(_) => None,
                }
            },
            s.include_usage,
            prompt_tokens,
            "chat.completion.chunk",
        ));
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (index, rx) in receivers.into_iter().enumerate() {
        let c = collect(rx).await?;
        completion_tokens += c.completion_tokens;
        let lp = logprobs.map(|_| {
            let content: Vec<Value> = c
                .ids
                .iter()
                .zip(&c.logprobs)
                .filter_map(|(&t, l)| l.as_ref().map(|l| chat_logprob(&app, t, l)))
                .collect();
            json!({"content": content})
        });
        choices.push(
            json!({"index": index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason}),
        );
    }
    Ok(axum::Json(json!({
        "id": id, "object": "chat.completion", "created": now(), "model": app.id,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response())
}

/// A token of chat `logprobs.content`.
fn chat_logprob(app: &App, id: u32, (lp, top): &(f32, Vec<(u32, f32)>)) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = app.token_text(id);
        json!({"token": t, "logprob": lp as f64, "bytes": t.as_bytes()})
    };
    let mut v = entry(id, *lp);
    v["top_logprobs"] = top
        .iter()
        .map(|&(i, l)| entry(i, l))
        .collect::<Vec<_>>()
        .into();
    v
}
