#!/usr/bin/env python3
"""Client-side checks for `llama-pro serve` (OpenAI-compatible HTTP server).

Subcommands (each prints one JSON object on stdout; progress/logs go to stderr):

  lm-eval  Run lm-evaluation-harness (`local-completions`) against the server on a
           multiple-choice JSONL task ({"context", "choices", "gold"} per line) and report
           acc / acc_norm, plus per-item log-likelihoods. Must match `llama-pro eval` on the
           same file.
  chat     Use the `openai` client: streamed chat completion (SSE), non-streamed chat
           completion, and a completions call with echo + logprobs; checks their shapes.
  load     Fire N concurrent POST /v1/completions requests; report latency percentiles and
           throughput; fail if any request errors.

Setup (Python deps pinned in scripts/requirements-serve.txt):

  python3 -m venv benches/.venv
  benches/.venv/bin/pip install -r scripts/requirements.txt -r scripts/requirements-serve.txt

Run (server in the background, loopback only; nothing else is contacted, HF libraries are put
in offline mode):

  llama-pro serve --model models/smollm2-135m-instruct --host 127.0.0.1 --port 8000 &
  until curl -sf http://127.0.0.1:8000/health >/dev/null; do sleep 0.5; done
  benches/.venv/bin/python scripts/serve_clients.py lm-eval --url http://127.0.0.1:8000 \
      --model-dir models/smollm2-135m-instruct --task tests/fixtures/tasks/mc_general.jsonl \
      --out runs/lm_eval_mc_general.json
  llama-pro eval --model models/smollm2-135m-instruct --task tests/fixtures/tasks/mc_general.jsonl
  benches/.venv/bin/python scripts/serve_clients.py chat --url http://127.0.0.1:8000
  benches/.venv/bin/python scripts/serve_clients.py load --url http://127.0.0.1:8000 \
      --concurrency 64 --requests 64 --max-tokens 32
  kill %1

What lm-eval's `local-completions` sends for each log-likelihood request (lm_eval 0.4.13):
  POST <base_url> {"model": ID, "prompt": [[tok, ...], ...], "temperature": 0, "max_tokens": 1,
                   "logprobs": 1, "seed": 1234, "echo": true}
The prompt is a list of token-id lists (context + continuation, tokenized here with the HF
tokenizer, no BOS added), one list per request (batch_size of them). It reads, per choice
sorted by "index", choices[i].logprobs.token_logprobs[ctxlen:-1] (summed) and
top_logprobs[ctxlen:-1] (dicts; only used for is_greedy). The trailing [-1] drops the one
generated token, so the server must return len(prompt) + 1 entries (echoed prompt + the
generated token), even when the generated token is EOS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# --------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def server_root(url: str) -> str:
    """Normalise --url: accept http://h:p, http://h:p/, http://h:p/v1 or .../v1/completions."""
    url = url.rstrip("/")
    for suffix in ("/v1/completions", "/v1/chat/completions", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
            break
    if not re.match(r"^https?://", url):
        raise SystemExit(f"--url must start with http:// or https:// (got {url!r})")
    return url


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 60.0):
    """Return (status, parsed JSON or raw text). Never raises for HTTP error statuses."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return status, raw.decode("utf-8", "replace")


def served_model_id(root: str) -> str:
    status, body = http_json("GET", root + "/v1/models", timeout=30)
    if status != 200 or not isinstance(body, dict) or not body.get("data"):
        raise SystemExit(f"GET {root}/v1/models failed: HTTP {status}: {body!r}")
    return body["data"][0]["id"]


def emit(obj: dict, out: str | None = None) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        # keep stdout short when the full result (with items) went to a file
        obj = {k: v for k, v in obj.items() if k != "items"}
        text = json.dumps(obj, indent=2, ensure_ascii=False)
    print(text, flush=True)


def set_offline_env() -> None:
    # Must happen before datasets / transformers / huggingface_hub are imported.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------------
# lm-eval


def task_name_for(path: Path) -> str:
    # prefixed so it cannot collide with one of lm-eval's built-in task names
    return "llama_pro_" + re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_")


def write_task_yaml(task_dir: Path, task_name: str, data_file: Path) -> Path:
    # JSON is valid YAML, so no yaml writer is needed. Fields are referenced by name
    # (doc_to_text: context, ...) rather than as Jinja "{{context}}": lm-eval then returns
    # doc[field] as-is (str / list / int) instead of rendering a template and literal_eval-ing
    # it; the prompts and choices are identical either way.
    cfg = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data_file)},
            "cache_dir": str(task_dir / "hf_datasets_cache"),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    path = task_dir / f"{task_name}.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def harness_scores(lls: list[float], choices: list[str], gold: int) -> tuple[float, float]:
    """acc / acc_norm of one item, exactly as lm_eval/api/task.py process_results does."""
    import numpy as np

    completion_len = np.array([float(len(c)) for c in choices])  # characters, no delimiter
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(np.array(lls) / completion_len))
    return float(pred == gold), float(pred_norm == gold)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    set_offline_env()
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = server_root(args.url)
    task_file = Path(args.task).resolve()
    model_dir = Path(args.model_dir).resolve()
    if not task_file.is_file():
        raise SystemExit(f"task file not found: {task_file}")
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise SystemExit(f"no tokenizer in {model_dir}")
    docs = [json.loads(line) for line in task_file.read_text().splitlines() if line.strip()]

    model_id = args.model_id or served_model_id(root)
    task_name = task_name_for(task_file)
    model_args = {
        "base_url": root + "/v1/completions",
        "model": model_id,
        "tokenizer": str(model_dir),
        "tokenizer_backend": "huggingface",  # explicit: "auto" would probe /tokenizer_info
        "tokenized_requests": not args.string_prompts,
        "num_concurrent": args.num_concurrent,
        "batch_size": args.batch_size,
        "max_retries": args.max_retries,
        "max_length": args.max_length,
        "timeout": args.timeout,
    }
    log(f"lm-eval {lm_eval.__version__}: task {task_name} ({len(docs)} items), model_args {model_args}")

    with tempfile.TemporaryDirectory(prefix="llama_pro_lm_eval_") as tmp:
        tmpdir = Path(tmp)
        write_task_yaml(tmpdir, task_name, task_file)
        try:
            tm = TaskManager(include_path=str(tmpdir), include_defaults=False)
        except TypeError:  # older lm-eval without include_defaults
            tm = TaskManager(include_path=str(tmpdir))
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=[task_name],
            task_manager=tm,
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        wall = time.perf_counter() - t0
    if res is None:
        raise SystemExit("lm_eval.simple_evaluate returned None")

    metrics = res["results"][task_name]
    acc, acc_norm = metrics["acc,none"], metrics["acc_norm,none"]

    # Per-item log-likelihoods. Each multiple_choice doc has one loglikelihood request per
    # choice; sample["resps"][i] == [(ll, is_greedy)] (one repeat) for choice i.
    items = []
    for s in sorted(res.get("samples", {}).get(task_name, []), key=lambda s: s["doc_id"]):
        lls = [float(r[0][0]) for r in s["resps"]]
        greedy = [bool(r[0][1]) for r in s["resps"]]
        items.append(
            {
                "doc_id": s["doc_id"],
                "gold": s["doc"]["gold"],
                "lls": lls,
                "is_greedy": greedy,
                "acc": s.get("acc"),
                "acc_norm": s.get("acc_norm"),
            }
        )

    # Cross-check the harness math from the raw lls (same formula as process_results).
    problems = []
    if len(items) != len(docs):
        problems.append(f"{len(items)} logged samples for {len(docs)} items")
    re_acc, re_norm = [], []
    for it in items:
        doc = docs[it["doc_id"]]
        if len(it["lls"]) != len(doc["choices"]):
            problems.append(f"doc {it['doc_id']}: {len(it['lls'])} lls for {len(doc['choices'])} choices")
            continue
        if not all(math.isfinite(x) for x in it["lls"]):
            problems.append(f"doc {it['doc_id']}: non-finite ll {it['lls']}")
        a, an = harness_scores(it["lls"], doc["choices"], doc["gold"])
        re_acc.append(a)
        re_norm.append(an)
    if items and re_acc and (
        abs(statistics.fmean(re_acc) - acc) > 1e-12 or abs(statistics.fmean(re_norm) - acc_norm) > 1e-12
    ):
        problems.append(
            f"recomputed acc/acc_norm {statistics.fmean(re_acc)}/{statistics.fmean(re_norm)} != reported {acc}/{acc_norm}"
        )

    out = {
        "task": task_name,
        "task_file": str(task_file),
        "model": model_id,
        "acc": acc,
        "acc_norm": acc_norm,
        "n": len(items) if items else len(docs),
        "lm_eval_version": lm_eval.__version__,
        "model_args": model_args,
        "wall_s": round(wall, 3),
        "problems": problems,
        "items": items,
    }
    emit(out, args.out)
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------
# chat (openai client)


def cmd_chat(args: argparse.Namespace) -> int:
    import openai

    root = server_root(args.url)
    client = openai.OpenAI(base_url=root + "/v1", api_key="none", timeout=args.timeout, max_retries=0)
    models = [m.id for m in client.models.list().data]
    if not models:
        raise SystemExit("GET /v1/models returned no model")
    model = args.model_id or models[0]
    messages = [{"role": "user", "content": args.message}]
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        if not cond:
            failures.append(what)

    # 1. streamed chat completion (SSE)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    chunks, text_parts, roles, finish = [], [], [], None
    for chunk in stream:
        chunks.append(chunk)
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                text_parts.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    check(len(chunks) > 1, f"stream: expected >1 chunk, got {len(chunks)}")
    check(content_chunks > 1, f"stream: expected >1 chunk with content, got {content_chunks}")
    check(bool(chunks) and bool(chunks[0].choices) and chunks[0].choices[0].delta.role == "assistant",
          "stream: first chunk must carry delta.role == 'assistant'")
    last_with_choice = next((c for c in reversed(chunks) if c.choices), None)
    check(last_with_choice is not None and last_with_choice.choices[0].finish_reason in ("stop", "length"),
          "stream: last chunk must carry finish_reason")
    check(all(c.model == model for c in chunks), "stream: chunk.model differs from the served model id")
    check(len({c.id for c in chunks}) == 1, "stream: chunk ids differ")
    streamed_text = "".join(text_parts)

    # 2. non-streamed chat completion: temperature 0 => same text as the stream
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
    msg = resp.choices[0].message
    check(msg.role == "assistant", "chat: message.role must be 'assistant'")
    check(resp.choices[0].finish_reason in ("stop", "length"), "chat: finish_reason missing")
    check(msg.content == streamed_text, "chat: non-streamed text differs from streamed text at temperature 0")
    check(resp.usage is not None and 0 < resp.usage.completion_tokens <= args.max_tokens,
          "chat: usage.completion_tokens missing or out of range")

    # 3. completions with echo + logprobs (the shape lm-eval relies on)
    prompt = "The capital of France is"
    comp = client.completions.create(
        model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2, seed=1234
    )
    c0 = comp.choices[0]
    lp = c0.logprobs
    n_prompt, n_comp = comp.usage.prompt_tokens, comp.usage.completion_tokens
    check(c0.text.startswith(prompt), "completions: echo=True text must start with the prompt")
    check(lp is not None and lp.token_logprobs is not None, "completions: logprobs missing")
    if lp is not None and lp.token_logprobs is not None:
        check(len(lp.token_logprobs) == n_prompt + n_comp,
              f"completions: {len(lp.token_logprobs)} token_logprobs != prompt {n_prompt} + completion {n_comp}")
        check(len(lp.tokens or []) == len(lp.token_logprobs), "completions: len(tokens) != len(token_logprobs)")
        check(len(lp.top_logprobs or []) == len(lp.token_logprobs), "completions: len(top_logprobs) != len(token_logprobs)")
        check(lp.token_logprobs[0] is None, "completions: token_logprobs[0] must be null (no context for token 0)")
        check(all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:]), "completions: token_logprobs must be <= 0")
        for i, top in enumerate((lp.top_logprobs or [])[1:], start=1):
            if not top or lp.token_logprobs[i] > max(top.values()) + 1e-6:
                check(False, f"completions: top_logprobs[{i}] empty or below the token's own logprob")
                break

    # 4. completions with a batch of token-id prompts (what lm-eval sends)
    ids_batch = [[504, 3575, 282, 4649, 314], [504, 3575]]
    comp2 = client.completions.create(
        model=model, prompt=ids_batch, max_tokens=1, temperature=0, echo=True, logprobs=1, seed=1234
    )
    idx = sorted(ch.index for ch in comp2.choices)
    check(idx == [0, 1], f"completions batch: choice indices {idx} != [0, 1]")
    for ch in comp2.choices:
        n = len(ids_batch[ch.index]) + 1
        got = len(ch.logprobs.token_logprobs) if ch.logprobs and ch.logprobs.token_logprobs else 0
        check(got == n, f"completions batch: choice {ch.index} has {got} token_logprobs, expected {n} (prompt + 1)")

    out = {
        "model": model,
        "stream": {"chunks": len(chunks), "content_chunks": content_chunks, "roles": roles,
                   "finish_reason": finish, "text": streamed_text},
        "chat": {"text": msg.content, "finish_reason": resp.choices[0].finish_reason,
                 "usage": resp.usage.model_dump() if resp.usage else None},
        "completions": {"text": c0.text, "prompt_tokens": n_prompt, "completion_tokens": n_comp,
                        "tokens": lp.tokens if lp else None,
                        "token_logprobs": lp.token_logprobs if lp else None,
                        "top_logprobs_sample": (lp.top_logprobs or [None, None])[1] if lp else None},
        "failures": failures,
    }
    emit(out)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# load

TOPICS = [
    "the sea", "a red bicycle", "mountains in winter", "a cup of coffee", "the moon", "a small dog",
    "rain on a window", "a busy market", "an old library", "learning to swim", "a thunderstorm",
    "baking bread", "a train journey", "the first day of school", "a garden in spring", "the desert",
]


def make_prompt(i: int) -> str:
    styles = ["Write one sentence about {}.", "Describe {} in a few words:", "Here is a short story about {}:",
              "Q: What do you know about {}?\nA:"]
    return styles[i % len(styles)].format(TOPICS[(i // len(styles) + i) % len(TOPICS)])


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not sorted_vals:
        return float("nan")
    k = max(1, math.ceil(q / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def cmd_load(args: argparse.Namespace) -> int:
    root = server_root(args.url)
    model = args.model_id or served_model_id(root)
    url = root + "/v1/completions"
    n, conc = args.requests, max(1, min(args.concurrency, args.requests))
    results: list[dict | None] = [None] * n
    next_i = [0]
    lock = threading.Lock()
    start = threading.Barrier(conc)

    def one(i: int) -> dict:
        body = {"model": model, "prompt": make_prompt(i), "max_tokens": args.max_tokens,
                "temperature": args.temperature, "seed": i}
        t0 = time.perf_counter()
        try:
            status, resp = http_json("POST", url, body, timeout=args.timeout)
        except Exception as e:  # connection refused/reset, timeout
            return {"ok": False, "latency": time.perf_counter() - t0, "error": repr(e), "tokens": 0}
        dt = time.perf_counter() - t0
        err = None
        if status != 200:
            err = f"HTTP {status}: {str(resp)[:200]}"
        elif not isinstance(resp, dict) or "error" in resp:
            err = f"error body: {str(resp)[:200]}"
        elif not resp.get("choices") or not isinstance(resp["choices"][0].get("text"), str):
            err = f"no choices[0].text: {str(resp)[:200]}"
        tokens = 0
        if err is None:
            tokens = int((resp.get("usage") or {}).get("completion_tokens", 0))
            if not 0 < tokens <= args.max_tokens:
                err = f"usage.completion_tokens={tokens} outside (0, {args.max_tokens}]"
        return {"ok": err is None, "latency": dt, "error": err, "tokens": tokens}

    def worker() -> None:
        start.wait()
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= n:
                return
            results[i] = one(i)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.timeout * n + 60)
    wall = time.perf_counter() - t0

    done = [r for r in results if r is not None]
    errors = [r for r in done if not r["ok"]] + [{"error": "no answer (thread hung)"}] * (n - len(done))
    lat = sorted(r["latency"] for r in done if r["ok"])
    tokens = sum(r["tokens"] for r in done if r["ok"])
    out = {
        "requests": n,
        "concurrency": conc,
        "max_tokens": args.max_tokens,
        "errors": len(errors),
        "p50_s": round(percentile(lat, 50), 4) if lat else None,
        "p99_s": round(percentile(lat, 99), 4) if lat else None,
        "max_s": round(lat[-1], 4) if lat else None,
        "wall_s": round(wall, 4),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "error_samples": sorted({str(e["error"]) for e in errors})[:5],
    }
    emit(out)
    return 1 if errors else 0


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
        sp.add_argument("--model-id", help="model id to send (default: first id from GET /v1/models)")
        sp.add_argument("--timeout", type=int, default=300, help="per-request timeout, seconds")

    sp = sub.add_parser("lm-eval", help="lm-evaluation-harness local-completions on a JSONL MC task")
    common(sp)
    sp.add_argument("--model-dir", required=True, help="HF model dir (its tokenizer is used by lm-eval)")
    sp.add_argument("--task", required=True, help="JSONL with {context, choices, gold} per line")
    sp.add_argument("--out", help="write the full result JSON (with per-item lls) here")
    sp.add_argument("--num-concurrent", type=int, default=1)
    sp.add_argument("--batch-size", type=int, default=1, help="prompts per HTTP request")
    sp.add_argument("--max-retries", type=int, default=1)
    sp.add_argument("--max-length", type=int, default=2048,
                    help="lm-eval left-truncates context+continuation to max_length-1 tokens")
    sp.add_argument("--string-prompts", action="store_true",
                    help="tokenized_requests=False: send decoded strings instead of token ids "
                         "(ctxlen still comes from the client tokenizer, so the server must re-tokenize identically)")
    sp.set_defaults(fn=cmd_lm_eval)

    sp = sub.add_parser("chat", help="openai-client checks: streamed chat, chat, completions echo+logprobs")
    common(sp)
    sp.add_argument("--message", default="Name three colors of the rainbow.")
    sp.add_argument("--max-tokens", type=int, default=32)
    sp.set_defaults(fn=cmd_chat)

    sp = sub.add_parser("load", help="N concurrent /v1/completions requests; latency and throughput")
    common(sp)
    sp.add_argument("--concurrency", type=int, default=64)
    sp.add_argument("--requests", type=int, default=64)
    sp.add_argument("--max-tokens", type=int, default=32)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.set_defaults(fn=cmd_load)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
