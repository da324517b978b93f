#!/usr/bin/env python3
"""Golden fixtures for llama-pro's built-in multiple-choice log-likelihood evaluation
(`llama-pro eval --task FILE.jsonl`), produced by lm-evaluation-harness's own request-building
code and transformers' forward pass on the tiny fixture models.

Regenerate (from the repository root; nothing is downloaded, HF libraries run offline):

    benches/.venv/bin/python scripts/make_task_fixtures.py

or, in a fresh virtual environment:

    python3 -m venv .venv
    .venv/bin/pip install -r scripts/requirements.txt -r scripts/requirements-serve.txt
    .venv/bin/python scripts/make_task_fixtures.py

Pinned versions (scripts/requirements.txt, scripts/requirements-serve.txt): torch 2.15.0,
transformers 5.23.0, tokenizers 0.23.3, numpy 2.4.6, lm_eval[api] 0.4.13. The versions that
actually ran are written into each golden file ("versions").

Reads tests/fixtures/tasks/mc_tiny.jsonl (hand-written, see tests/fixtures/tasks/README.md) and
the fixture models tests/fixtures/models/{llama-mha-f32,llama-gqa-tied-sharded-f32} (random tiny
HF Llama models written by scripts/make_fixtures.py, byte-level BPE tokenizer.json). Writes
tests/fixtures/tasks/golden-<model>.json:

  model, task ("mc_tiny"), task_file, versions {torch, transformers, tokenizers, lm_eval}
  lm_eval      the lm-eval settings the requests were built with: model "local-completions",
               tokenizer_backend "huggingface", max_length (lm-eval's effective value: its
               default 2048 minus 1 = 2047), prefix_token_id (BOS if the tokenizer has one, else
               EOS), target_delimiter " ", add_special_tokens false
  requests     one per (item, choice), item-major, choices in order:
                 item, choice     0-based indices into the task file
                 tokens           the token ids lm-eval sends (context + continuation, left-
                                  truncated to max_length; no BOS is added, except that an empty
                                  context becomes [prefix_token_id])
                 context_len      lm-eval's ctxlen: tokens[context_len:] are the continuation
                 ll               sum over t in [context_len, len(tokens)) of
                                  log_softmax(logits[t-1])[tokens[t]], the float32 log-softmax
                                  values widened to float64 and summed in order in float64
                 is_greedy        lm-eval's is_greedy (every continuation token is an argmax)
  items        one per task line: lls (= the requests' ll, in choice order), gold, acc, acc_norm
  acc, acc_norm, acc_stderr, acc_norm_stderr, n
               as lm-eval's multiple_choice process_results + mean / mean_stderr aggregation:
               acc = mean(argmax(lls) == gold); acc_norm uses argmax(lls[i] / len(choices[i]))
               with len in characters (code points) of the choice without the delimiter; ties go
               to the lowest index (np.argmax); *_stderr = sample stddev / sqrt(n).

How the numbers are made, and how they are checked (every check is an assert; the script fails
rather than write a golden file that disagrees with lm-eval):

  1. lm-eval itself builds the requests: `lm_eval.simple_evaluate` runs the task (the same task
     YAML that scripts/serve_clients.py writes for its `lm-eval` subcommand) on a
     `LocalCompletionsAPI(base_url="http://unused", tokenizer=<model dir>,
     tokenizer_backend="huggingface")` whose `model_call` is replaced by an in-process server:
     it takes the exact payload lm-eval would POST (`_create_payload`: token-id prompts, echo,
     logprobs=1, max_tokens=1) and answers it from the transformers model in the OpenAI
     completions shape. Everything else (ConfigurableTask.construct_requests,
     TemplateLM.loglikelihood / _encode_pair / tok_encode / prefix_token_id,
     TemplateAPI.batch_loglikelihood_requests truncation, LocalCompletionsAPI.parse_logprobs,
     process_results, mean / mean_stderr) is lm-eval's own code. No network is contacted.
  2. An independent replica of those rules (`replica_request`) re-derives every request's tokens
     and context_len from the tokenizer; they must equal what lm-eval sent. The replica's
     left-truncation is also checked against lm-eval's batch_loglikelihood_requests with a small
     max_length (every request truncated, some down into the continuation).
  3. The golden ll / acc / acc_norm / stderr are computed directly from the forward pass and the
     formulas above, and must equal what lm-eval reported bit for bit.

The transformers model runs in float32, eager attention, one sequence at a time, on the CPU with
one thread (deterministic).
"""

from __future__ import annotations

import os

# Before any HF library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TASK_FILE = FIX / "tasks" / "mc_tiny.jsonl"
TASK = "mc_tiny"
MODELS = ["llama-mha-f32", "llama-gqa-tied-sharded-f32"]
TARGET_DELIMITER = " "
SMALL_MAX_LENGTH = 9  # lm-eval argument for the truncation check; effective 8

sys.path.insert(0, str(ROOT / "scripts"))
from serve_clients import task_name_for, write_task_yaml  # noqa: E402  (stdlib-only imports)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# transformers side


class Scorer:
    """Forward passes of one HF model, one sequence at a time, float32."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.max_positions = self.model.config.max_position_embeddings
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def log_softmax(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] float32 log_softmax of the logits (row t predicts tokens[t+1])."""
        key = tuple(tokens)
        if key not in self._cache:
            assert 0 < len(tokens) <= self.max_positions, (len(tokens), self.max_positions)
            logits = self.model(input_ids=torch.tensor([tokens], dtype=torch.long)).logits[0]
            assert logits.dtype == torch.float32
            self._cache[key] = torch.log_softmax(logits, dim=-1)
        return self._cache[key]

    def loglikelihood(self, tokens: list[int], ctxlen: int) -> tuple[float, bool]:
        """Golden ll: float32 log-softmax values widened to float64, summed in order."""
        lp = self.log_softmax(tokens)
        ll = 0.0
        greedy = True
        for t in range(ctxlen, len(tokens)):
            row = lp[t - 1]
            v = float(row[tokens[t]])  # exact float32 -> float64
            ll += v
            greedy = greedy and v == float(row.max())
        return ll, greedy

    def echo_choice(self, index: int, tokens: list[int]) -> dict:
        """One OpenAI completions `choices[]` entry for echo=True, logprobs=1, max_tokens=1:
        one logprob per prompt token (the first is null) plus the generated token."""
        lp = self.log_softmax(tokens)
        token_logprobs: list[float | None] = [None]
        top_logprobs: list[dict | None] = [None]
        for t in range(1, len(tokens)):
            row = lp[t - 1]
            token_logprobs.append(float(row[tokens[t]]))
            top_logprobs.append({str(int(row.argmax())): float(row.max())})
        last = lp[len(tokens) - 1]
        token_logprobs.append(float(last.max()))
        top_logprobs.append({str(int(last.argmax())): float(last.max())})
        return {
            "index": index,
            "text": "",
            "logprobs": {"token_logprobs": token_logprobs, "top_logprobs": top_logprobs},
            "finish_reason": "length",
        }


# --------------------------------------------------------------------------------------------
# lm-eval side


def make_lm(model_dir: Path, scorer: Scorer | None, **kwargs):
    """lm-eval's `local-completions` model, answered in-process instead of over HTTP."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class InProcessCompletions(LocalCompletionsAPI):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.scorer = scorer
            self.sent: dict[tuple[str, str], tuple[list[int], int]] = {}
            self.payloads: list[dict] = []

        def batch_loglikelihood_requests(self, chunks):
            inputs, ctxlens, cache_keys = super().batch_loglikelihood_requests(chunks)
            for key, inp, ctxlen in zip(cache_keys, inputs, ctxlens, strict=True):
                self.sent[tuple(key)] = (list(inp), ctxlen)
            return inputs, ctxlens, cache_keys

        def model_call(self, messages, *, generate=True, gen_kwargs=None, **kw):
            assert not generate, "only log-likelihood requests are expected"
            payload = self._create_payload(
                self.create_message(messages),
                generate=generate,
                gen_kwargs=gen_kwargs,
                seed=self._seed,
                eos=self.eos_string,
                **kw,
            )
            assert payload["echo"] is True and payload["max_tokens"] == 1, payload
            assert payload["logprobs"] == 1 and payload["temperature"] == 0, payload
            prompts = payload["prompt"]
            assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts)
            self.payloads.append(payload)
            return {"choices": [self.scorer.echo_choice(i, p) for i, p in enumerate(prompts)]}

        async def amodel_call(self, *args, **kw):
            raise AssertionError("async path not expected (num_concurrent=1)")

    return InProcessCompletions(
        base_url="http://unused",  # never contacted: model_call is replaced
        tokenizer=str(model_dir),
        tokenizer_backend="huggingface",
        num_concurrent=1,
        batch_size=1,
        max_retries=1,
        **kwargs,
    )


def run_lm_eval(lm, task_name: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="llama_pro_task_fixtures_") as tmp:
        tmpdir = Path(tmp)
        write_task_yaml(tmpdir, task_name, TASK_FILE)
        logging.getLogger("lm_eval.models.api_models").setLevel(logging.WARNING)
        tm = TaskManager(include_path=str(tmpdir), include_defaults=False)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task_name],
            task_manager=tm,
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=100000,  # default; `mean` uses the closed-form mean_stderr anyway
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    assert res is not None
    return res


# --------------------------------------------------------------------------------------------
# independent replica of lm-eval 0.4.13's request building


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, return_attention_mask=False).input_ids


def replica_request(tok, prefix_token_id: int, context: str, continuation: str, max_length: int):
    """(tokens, ctxlen, context_enc, continuation_enc) as TemplateLM.loglikelihood,
    TemplateLM._encode_pair and TemplateAPI.batch_loglikelihood_requests build them."""
    if context == "":
        cont = encode(tok, continuation)
        if prefix_token_id != cont[0]:
            ctx_enc, cont_enc = [prefix_token_id], cont
        else:
            ctx_enc, cont_enc = cont[:1], cont[1:]
    else:
        n_spaces = len(context) - len(context.rstrip())  # any trailing whitespace, not just " "
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = encode(tok, context + continuation)
        ctx_enc = encode(tok, context)
        cont_enc = whole[len(ctx_enc):]
    tokens, ctxlen = truncate(ctx_enc, cont_enc, max_length)
    return tokens, ctxlen, ctx_enc, cont_enc


def truncate(ctx_enc: list[int], cont_enc: list[int], max_length: int) -> tuple[list[int], int]:
    tokens = (ctx_enc + cont_enc)[-max_length:]
    ctxlen = len(ctx_enc) - max(0, len(ctx_enc) + len(cont_enc) - max_length)
    return tokens, ctxlen


def prefix_report(tok, context: str, continuation: str) -> dict:
    """Is encode(context) a prefix of encode(context + continuation)? Both for the raw context
    and for lm-eval's split (trailing whitespace moved into the continuation)."""
    out = {}
    raw_ctx = encode(tok, context)
    out["raw"] = encode(tok, context + continuation)[: len(raw_ctx)] == raw_ctx
    n = len(context) - len(context.rstrip())
    c, k = (context[:-n], context[-n:] + continuation) if n else (context, continuation)
    moved_ctx = encode(tok, c)
    out["moved"] = encode(tok, c + k)[: len(moved_ctx)] == moved_ctx
    return out


# --------------------------------------------------------------------------------------------
# metrics, as lm-eval's process_results + mean / mean_stderr


def item_scores(lls: list[float], choices: list[str], gold: int) -> tuple[float, float]:
    completion_len = np.array([float(len(c)) for c in choices])
    pred = np.argmax(lls)
    pred_norm = np.argmax(np.array(lls) / completion_len)
    return (1.0 if pred == gold else 0.0), (1.0 if pred_norm == gold else 0.0)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def mean_stderr(xs: list[float]) -> float:
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


# --------------------------------------------------------------------------------------------


def dump(obj: dict) -> str:
    """Pretty but compact: one line per request / item."""
    lines = ["{"]
    keys = list(obj)
    for i, k in enumerate(keys):
        v = obj[k]
        comma = "," if i + 1 < len(keys) else ""
        if k in ("requests", "items"):
            rows = [" " * 2 + json.dumps(r, ensure_ascii=False) for r in v]
            lines.append(f" {json.dumps(k)}: [\n" + ",\n".join(rows) + f"\n ]{comma}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import lm_eval
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "lm_eval": lm_eval.__version__,
    }


def make_golden(model_name: str, docs: list[dict]) -> dict:
    model_dir = FIX / "models" / model_name
    scorer = Scorer(model_dir)
    lm = make_lm(model_dir, scorer)
    tok = lm.tokenizer
    max_length = lm.max_length
    prefix_token_id = lm.prefix_token_id
    assert max_length == 2047, max_length
    assert prefix_token_id is not None
    log(
        f"{model_name}: max_length {max_length}, prefix_token_id {prefix_token_id} "
        f"(bos {tok.bos_token!r}={tok.bos_token_id}, eos {tok.eos_token!r}={tok.eos_token_id})"
    )

    # 1. lm-eval end to end
    task_name = task_name_for(TASK_FILE)
    res = run_lm_eval(lm, task_name)
    metrics = res["results"][task_name]
    samples = sorted(res["samples"][task_name], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))

    # 2. + 3. independent replica and direct computation, compared with lm-eval's
    small = make_lm(model_dir, None, max_length=SMALL_MAX_LENGTH)
    # its "Left truncating context" warnings are expected for every request
    logging.getLogger("lm_eval.models.api_models").setLevel(logging.ERROR)
    requests, items, accs, norms = [], [], [], []
    non_prefix = []
    for i, (doc, sample) in enumerate(zip(docs, samples, strict=True)):
        choices = doc["choices"]
        assert sample["doc"]["context"] == doc["context"]
        lls = []
        for j, choice in enumerate(choices):
            continuation = TARGET_DELIMITER + choice
            assert tuple(sample["arguments"][j]) == (doc["context"], continuation), sample["arguments"][j]
            tokens, ctxlen, ctx_enc, cont_enc = replica_request(
                tok, prefix_token_id, doc["context"], continuation, max_length
            )
            sent_tokens, sent_ctxlen = lm.sent[(doc["context"], continuation)]
            assert (sent_tokens, sent_ctxlen) == (tokens, ctxlen), (i, j, sent_tokens, tokens)
            assert 0 < ctxlen < len(tokens) <= scorer.max_positions

            # truncation rule vs lm-eval's, with a max_length that cuts every request
            got = small.batch_loglikelihood_requests([[((doc["context"], continuation), ctx_enc, cont_enc)]])
            assert (got[0][0], got[1][0]) == truncate(ctx_enc, cont_enc, SMALL_MAX_LENGTH - 1), (i, j)

            pr = prefix_report(tok, doc["context"], continuation) if doc["context"] else None
            if pr is not None and not (pr["raw"] and pr["moved"]):
                non_prefix.append({"item": i, "choice": j, **pr})

            ll, greedy = scorer.loglikelihood(tokens, ctxlen)
            assert math.isfinite(ll) and ll < 0, (i, j, ll)
            h_ll, h_greedy = sample["resps"][j][0]
            assert (h_ll, h_greedy) == (ll, greedy), (i, j, h_ll, ll, h_greedy, greedy)
            lls.append(ll)
            requests.append(
                {"item": i, "choice": j, "tokens": tokens, "context_len": ctxlen, "ll": ll, "is_greedy": greedy}
            )
        acc, acc_norm = item_scores(lls, choices, doc["gold"])
        assert (sample["acc"], sample["acc_norm"]) == (acc, acc_norm), (i, sample["acc"], sample["acc_norm"])
        accs.append(acc)
        norms.append(acc_norm)
        items.append({"lls": lls, "gold": doc["gold"], "acc": acc, "acc_norm": acc_norm})

    # every request went through lm-eval exactly once, one sequence per call
    assert len(lm.sent) == len(requests), (len(lm.sent), len(requests))
    assert len(lm.payloads) == len(requests) and all(len(p["prompt"]) == 1 for p in lm.payloads)

    golden = {
        "model": model_name,
        "task": TASK,
        "task_file": str(TASK_FILE.relative_to(ROOT)),
        "versions": versions(),
        "lm_eval": {
            "model": "local-completions",
            "tokenizer_backend": "huggingface",
            "max_length": max_length,
            "prefix_token_id": prefix_token_id,
            "target_delimiter": TARGET_DELIMITER,
            "add_special_tokens": False,
        },
        "requests": requests,
        "items": items,
        "acc": mean(accs),
        "acc_norm": mean(norms),
        "acc_stderr": mean_stderr(accs),
        "acc_norm_stderr": mean_stderr(norms),
        "n": len(items),
    }
    for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert metrics[f"{k},none"] == golden[k], (k, metrics[f"{k},none"], golden[k])
    assert res["n-samples"][task_name]["effective"] == len(docs)

    log(
        f"{model_name}: {len(requests)} requests, acc {golden['acc']:.4f} ± {golden['acc_stderr']:.4f}, "
        f"acc_norm {golden['acc_norm']:.4f} ± {golden['acc_norm_stderr']:.4f}; "
        f"encode(context) not a prefix of encode(context + continuation): {non_prefix or 'none'}"
    )
    return golden


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    docs = [json.loads(line) for line in TASK_FILE.read_text().splitlines() if line.strip()]
    for m in MODELS:
        golden = make_golden(m, docs)
        out = FIX / "tasks" / f"golden-{m}.json"
        out.write_text(dump(golden))
        json.loads(out.read_text())  # round-trips
        log(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
