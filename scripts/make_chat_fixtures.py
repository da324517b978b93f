#!/usr/bin/env python3
"""Golden fixtures for llama-pro's instruction tuning (SFT): chat templates, conversation formats,
rendered prompts, supervised token labels, and one full-model SFT optimizer step, all produced by
transformers / jinja2 / torch themselves.

Regenerate (from the repository root):

    benches/.venv/bin/python scripts/make_chat_fixtures.py

or, in a fresh virtual environment:

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_chat_fixtures.py

It reads tests/fixtures/tokenizer/tokenizer.json, tests/fixtures/train/seqs.jsonl and
tests/fixtures/models/llama-mha-f32 (all written by scripts/make_fixtures.py, whose functions it
imports) and writes:

  tests/fixtures/chat/templates/<name>/
        tokenizer.json         the fixture byte-level BPE tokenizer (vocab 300) plus, as special added
                               tokens (ids 300.., so they stay below the models' vocab of 320), the
                               markers the template emits (SPECS below), so every marker is one token.
        tokenizer_config.json  bos_token / eos_token (/ pad_token / unk_token) of the real model
                               family, and the model's real chat template, stored in one of the three
                               layouts a loader has to read:
          "string": `chat_template` is a string in tokenizer_config.json (qwen2, mistral, llama2, zephyr)
          "jinja":  no `chat_template` key; the template is the file chat_template.jinja beside it
                    (transformers 5 save_pretrained layout) (smollm2)
          "list":   `chat_template` is a list of named templates
                    [{"name": "default", ...}, {"name": "tool_use", ...}] (llama3). transformers uses
                    "default" unless tools are passed; every render here uses "default".
        chat_template.jinja    (smollm2 only) the template, byte for byte.
     Templates (verbatim; see TEMPLATE_SOURCES for where each was copied from, every one
     cross-checked against a second independent copy and pinned by its SHA-256 below):
        qwen2    Qwen/Qwen2.5-*-Instruct            (ChatML, default Qwen system prompt, tools branch)
        smollm2  HuggingFaceTB/SmolLM2-*-Instruct   (ChatML, default SmolLM system prompt)
        llama3   meta-llama/Meta-Llama-3-8B-Instruct ("default"); "tool_use" is
                 meta-llama/Llama-3.1-8B-Instruct's template (never rendered here)
        mistral  mistralai/Mistral-7B-Instruct-v0.2 (original template: [INST] ... [/INST], raises on a
                 system message and on non-alternating roles)
        llama2   meta-llama/Llama-2-7b-chat-hf      (<<SYS>> folded into the first user turn)
        zephyr   HuggingFaceH4/zephyr-7b-beta       (<|system|> / <|user|> / <|assistant|> ... </s>)

  tests/fixtures/chat/conversations/
        openai.jsonl             {"messages": [{"role", "content"}, ...]}
        sharegpt.jsonl           {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
        alpaca.jsonl             {"instruction", "input", "output", "system"?, "history"?: [[user, assistant], ...]}
        prompt_completion.jsonl  {"prompt", "completion"}
     Conversion to messages (LLaMA-Factory's semantics), see `to_messages`:
        sharegpt: human -> user, gpt -> assistant, system -> system
        alpaca: [system, if present and non-empty] + (user, assistant) per history pair
                + user = instruction + "\\n" + input (just instruction when input is empty)
                + assistant = output
        prompt_completion: user = prompt, assistant = completion

  tests/fixtures/chat/golden.json
        versions      transformers / tokenizers / jinja2 versions that produced it
        conversions   {"file", "line" (1-based), "messages"} for every line of every file
        renders       {"template", "file", "line", "add_generation_prompt", "text"} for every template x
                      line: `apply_chat_template(messages, tokenize=False, add_generation_prompt=False)`
                      and `add_generation_prompt=True` on the messages without the final assistant
                      message. Where the template raises (raise_exception), "error": true and
                      "message" replace "text".
        encodings     {"template", "file", "line", "mode", "input_ids", "labels"} for every template x
                      line x mode, built from apply_chat_template text (see `encode`):
                      R(m, gen) = apply_chat_template(m, tokenize=False, add_generation_prompt=gen).
                      Walking the assistant messages in order with prev = 0 characters consumed, for
                      the assistant at index i: p = R(msgs[:i], True), a = R(msgs[:i+1], False);
                      prompt segment p[prev:], answer segment a[len(p):], prev = len(a). After the last
                      assistant the rest of R(msgs, False) is a masked tail segment. Every segment is
                      tokenized on its own with tokenizer(segment, add_special_tokens=False) and the ids
                      are concatenated (their text concatenation equals R(msgs, False)).
                      Labels: "assistant": -100 on prompt/tail segments, the ids on answer segments;
                      "prompt": labels = input_ids; "last": only the last answer segment is trained.
                      Where the template raises: "error": "template error" (+ "message"); where
                      a.startswith(p) or p.startswith(consumed text) fails: "error": "not prefix-stable".

  tests/fixtures/train/sft.jsonl
        the two rows of train/seqs.jsonl (16 and 11 tokens) as {"input_ids", "labels"}, labels = ids
        except -100 at positions [0, 5) and [9, 11) of row 0 and [0, 4) of row 1 (half-open ranges:
        a prompt, then a second turn's prompt).
  tests/fixtures/golden/sft-step.safetensors
        one torch.optim.AdamW step (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on >= 2-D
        tensors, 0 on the others) on make_fixtures.expanded_model() (llama-mha-f32 expanded to 6
        blocks) with EVERY parameter trainable (embeddings, all blocks, final norm, lm_head), batch =
        both rows right-padded (pad id 0, attention_mask 0 and labels -100 there):
        `loss` [1] = model(input_ids, attention_mask, labels).loss before the step, `loss_after` [1]
        on the same batch after it, `param.<name>` every parameter after the step, `param64.<name>`
        the same step run in float64 (rounded to float32) (the exact reference where the
        first Adam update is ill-conditioned), and the padded `input_ids`, `labels` and
        `attention_mask` [2, 16] (i64) used.

Output is deterministic (no randomness; torch.use_deterministic_algorithms(True)).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import jinja2
import tokenizers
import torch
import transformers
from jinja2.exceptions import TemplateError
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import expanded_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
CHAT = FIX / "chat"
VOCAB = 320
MADE_BY = "benches/.venv/bin/python scripts/make_chat_fixtures.py"


def _j(body):
    """The template as tokenizer_config.json spells it (the body of a JSON string), decoded."""
    return json.loads('"' + body + '"')


# --------------------------------------------------------------------------------------------- #
# The templates, verbatim. Each literal below is the JSON string body exactly as in the model's
# tokenizer_config.json; the SHA-256 is of the decoded template (UTF-8).
# --------------------------------------------------------------------------------------------- #

QWEN25 = _j(r"""{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n""")
QWEN25_SHA256 = "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"

SMOLLM2 = _j(r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}""")
SMOLLM2_SHA256 = "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"

LLAMA3 = _j(r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}""")
LLAMA3_SHA256 = "ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122"

LLAMA31 = _j(r"""{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n            {%- for arg_name, arg_val in tool_call.arguments | items %}\n                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n            {{- \")\" }}\n        {%- else  %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n""")
LLAMA31_SHA256 = "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"

MISTRAL = _j(r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}""")
MISTRAL_SHA256 = "26a59556925c987317ce5291811ba3b7f32ec4c647c400c6cc7e3a9993007ba7"

LLAMA2 = _j(r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}""")
LLAMA2_SHA256 = "e8d5b5a546d3f19df16a5320c614fab05bdc4edd50e850f1afd947b503ea41cf"

ZEPHYR = _j(r"""{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}""")
ZEPHYR_SHA256 = "66291cf0045c2425a3a667cf3cbb7af2b11f09e025c02f97245323ab79119362"

# Where each template was copied from (the snapshot commit read), and the independent copy it was
# checked against (decoded strings compared equal).
TEMPLATE_SOURCES = {
    "qwen2": {
        "model": "Qwen/Qwen2.5-3B-Instruct (the same template ships with every Qwen2.5-*-Instruct)",
        "copied_from": "openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py "
                       "@da1db864d2bc1a265e9a036f5b57ef13f0e86c2c, key 'Qwen/Qwen2.5-3B-Instruct'",
        "checked_against": "huggingface/huggingface.js packages/jinja/test/e2e.test.js "
                           "@fe42e68017ffc76d09922ea8f9b38a6964345710, key 'Qwen/Qwen2.5-7B-Instruct'",
    },
    "smollm2": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "copied_from": "biom8er/phymes .cache/hf/models--HuggingFaceTB--SmolLM2-135M-Instruct/tokenizer_config.json "
                       "@50abd805c9c200fc7773c69aa9ac47d512695a3d (a vendored copy of the model's own file)",
        "checked_against": "biom8er/phymes phymes-agents/src/candle_assets/candle_which.rs (test asserting the "
                           "downloaded tokenizer_config.json's chat_template equals this string); SHA-256 also "
                           "quoted independently in a public IFEval report",
    },
    "llama3": {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct (current revision, with `if add_generation_prompt`)",
        "copied_from": "openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py "
                       "@da1db864d2bc1a265e9a036f5b57ef13f0e86c2c, key 'meta-llama/Meta-Llama-3-8B-Instruct'",
        "checked_against": "EricLBuehler/mistral.rs chat_templates/llama3.json "
                           "@9e922623f24b32d41f3892b74f0eed18707f4e6c",
    },
    "llama3/tool_use": {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "copied_from": "openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py "
                       "@da1db864d2bc1a265e9a036f5b57ef13f0e86c2c, key 'meta-llama/Llama-3.1-8B-Instruct'",
        "checked_against": "huggingface/huggingface.js packages/jinja/test/e2e.test.js "
                           "@fe42e68017ffc76d09922ea8f9b38a6964345710, key 'meta-llama/Llama-3.1-8B-Instruct'",
    },
    "mistral": {
        "model": "mistralai/Mistral-7B-Instruct-v0.2 (its original template, also Mixtral-8x7B-Instruct-v0.1's; "
                 "Mistral later replaced both with a system-message-tolerant one)",
        "copied_from": "ggml-org/llama.cpp tests/test-chat-template.cpp @03f94f19a2c4c9d039fa1a84838fe3e2110cc28d, "
                       "case 'mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)'",
        "checked_against": "openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py, key "
                           "'TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ'; huggingface/huggingface.js "
                           "packages/jinja/test/e2e.test.js, key 'mistralai/Mixtral-8x7B-Instruct-v0.1'",
    },
    "llama2": {
        "model": "meta-llama/Llama-2-7b-chat-hf",
        "copied_from": "openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py "
                       "@da1db864d2bc1a265e9a036f5b57ef13f0e86c2c, key 'meta-llama/Llama-2-7b-chat-hf'",
        "checked_against": "EricLBuehler/mistral.rs chat_templates/llama2.json "
                           "@9e922623f24b32d41f3892b74f0eed18707f4e6c",
    },
    "zephyr": {
        "model": "HuggingFaceH4/zephyr-7b-beta",
        "copied_from": "huggingface/huggingface.js packages/jinja/test/e2e.test.js "
                       "@fe42e68017ffc76d09922ea8f9b38a6964345710, key "
                       "'HuggingFaceH4/zephyr-7b-beta (add_generation_prompt=false)'",
        "checked_against": "huggingface/alignment-handbook recipes/zephyr-7b-beta/sft/config_full.yaml "
                           "@925acdfe4b2b4e38c3dabd1851bc418f0b656351 (the recipe that trained zephyr-7b-beta); "
                           "openvinotoolkit/openvino.genai tokenizer_configs.py key "
                           "'TinyLlama/TinyLlama-1.1B-Chat-v1.0' (same template)",
    },
}

# Per template directory: layout, the real family's bos/eos (/pad/unk), and the markers the template
# emits that must be single special tokens. <unk>, <s>, </s> are already special tokens (ids 0, 1, 2)
# of the fixture tokenizer.
SPECS = {
    "qwen2": dict(layout="string", template=QWEN25,
                  special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "smollm2": dict(layout="jinja", template=SMOLLM2,
                    special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                            "unk_token": "<|endoftext|>"}),
    "llama3": dict(layout="list", template=LLAMA3, tool_use=LLAMA31,
                   special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": dict(layout="string", template=MISTRAL, special=["[INST]", "[/INST]"],
                    config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "llama2": dict(layout="string", template=LLAMA2, special=["[INST]", "[/INST]"],
                   config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "zephyr": dict(layout="string", template=ZEPHYR, special=["<|user|>", "<|assistant|>", "<|system|>"],
                   config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}),
}
SHA256 = {"qwen2": QWEN25_SHA256, "smollm2": SMOLLM2_SHA256, "llama3": LLAMA3_SHA256,
          "llama3/tool_use": LLAMA31_SHA256, "mistral": MISTRAL_SHA256, "llama2": LLAMA2_SHA256,
          "zephyr": ZEPHYR_SHA256}


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_template_dir(name, spec):
    out = CHAT / "templates" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = Tokenizer.from_file(str(FIX / "tokenizer" / "tokenizer.json"))
    base = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    for t in spec["special"]:
        assert tok.token_to_id(t) is not None and tok.token_to_id(t) < VOCAB, t
    assert tok.get_vocab_size(with_added_tokens=True) == base + len(spec["special"]) <= VOCAB
    tok.save(str(out / "tokenizer.json"))

    config = {"tokenizer_class": "PreTrainedTokenizerFast", **spec["config"], "model_max_length": 512}
    if spec["layout"] == "string":
        config["chat_template"] = spec["template"]
    elif spec["layout"] == "list":
        config["chat_template"] = [{"name": "default", "template": spec["template"]},
                                   {"name": "tool_use", "template": spec["tool_use"]}]
    elif spec["layout"] == "jinja":
        (out / "chat_template.jinja").write_bytes(spec["template"].encode("utf-8"))
    else:
        raise ValueError(spec["layout"])
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")

    # transformers must see exactly this template (and the "default" entry for the list layout).
    hf = AutoTokenizer.from_pretrained(out)
    if spec["layout"] == "list":
        assert hf.chat_template == {"default": spec["template"], "tool_use": spec["tool_use"]}, name
    else:
        assert hf.chat_template == spec["template"], name
    assert hf.get_chat_template() == spec["template"], name
    assert hf.eos_token == spec["config"]["eos_token"] and hf.bos_token == spec["config"]["bos_token"], name
    for t in spec["special"]:
        assert len(hf(t, add_special_tokens=False)["input_ids"]) == 1, (name, t)
    return hf


# --------------------------------------------------------------------------------------------- #
# Conversations
# --------------------------------------------------------------------------------------------- #

CONVERSATIONS = {
    "openai.jsonl": [
        {"messages": [{"role": "system", "content": "You are a terse math tutor."},
                      {"role": "user", "content": "What is 2 + 3?"},
                      {"role": "assistant", "content": "5."}]},
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hey"},
                      {"role": "user", "content": "Color?"},
                      {"role": "assistant", "content": "Blue"},
                      {"role": "user", "content": "Fruit?"},
                      {"role": "assistant", "content": "A pear."}]},
        {"messages": [{"role": "user", "content": "Grüße aus Köln! 数学?"},
                      {"role": "assistant", "content": "数学 = math 🙂"}]},
        {"messages": [{"role": "system", "content": "Answer in code."},
                      {"role": "user", "content": "Add a and b."},
                      {"role": "assistant", "content": "  def add(a, b):\n    return a + b\n"},
                      {"role": "user", "content": "Now call it."},
                      {"role": "assistant", "content": "print(add(1, 2))"}]},
    ],
    "sharegpt.jsonl": [
        {"conversations": [{"from": "system", "value": "Be kind."},
                           {"from": "human", "value": "How are you?"},
                           {"from": "gpt", "value": "Fine, thanks!"}]},
        {"conversations": [{"from": "human", "value": "def add(a, b):"},
                           {"from": "gpt", "value": "    return a + b"},
                           {"from": "human", "value": "for i in range(3):"},
                           {"from": "gpt", "value": "    print(i)"}]},
        {"conversations": [{"from": "human", "value": "The quick brown fox?"},
                           {"from": "gpt", "value": "Jumps over the lazy dog."}]},
    ],
    "alpaca.jsonl": [
        {"instruction": "Translate to German.", "input": "Greetings from Cologne!", "output": "Grüße aus Köln!"},
        {"instruction": "Give a prime.", "input": "", "output": "7", "system": "Reply with digits only."},
        {"instruction": "Go on.", "input": "x, y,", "output": "z",
         "history": [["Hi", "Hi!"], ["1, 2,", "3"]]},
        {"instruction": "Name a fruit.", "input": "", "output": "Pear.", "system": ""},
    ],
    "prompt_completion.jsonl": [
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": "Say hello.", "completion": "Hello!"},
        {"prompt": "for i = 3, print(i * i) gives", "completion": "9"},
    ],
}


def to_messages(file, row):
    """LLaMA-Factory's conversion of each dataset format to OpenAI-style messages."""
    if file == "openai.jsonl":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if file == "sharegpt.jsonl":
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        return [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
    if file == "alpaca.jsonl":
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": row["system"]})
        for user, assistant in row.get("history") or []:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        user = "\n".join([row["instruction"], row["input"]]) if row.get("input") else row["instruction"]
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        return msgs
    if file == "prompt_completion.jsonl":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    raise ValueError(file)


# --------------------------------------------------------------------------------------------- #
# Renders and supervised encodings
# --------------------------------------------------------------------------------------------- #

class NotPrefixStable(Exception):
    pass


def render(tok, msgs, gen):
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def segments(tok, msgs):
    """[(kind, text)] with kind in prompt / answer / tail; see the module docstring."""
    segs, prev = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        p = render(tok, msgs[:i], True)
        a = render(tok, msgs[: i + 1], False)
        consumed = "".join(t for _, t in segs)  # == the first `prev` characters
        if not a.startswith(p) or not p.startswith(consumed):
            raise NotPrefixStable()
        segs.append(("prompt", p[prev:]))
        segs.append(("answer", a[len(p):]))
        prev = len(a)
    full = render(tok, msgs, False)
    if not full.startswith("".join(t for _, t in segs)):
        raise NotPrefixStable()
    segs.append(("tail", full[prev:]))
    assert "".join(t for _, t in segs) == full
    return segs


def encode(tok, segs, mode):
    last = max(i for i, (k, _) in enumerate(segs) if k == "answer")
    ids, labels = [], []
    for i, (kind, text) in enumerate(segs):
        seg = tok(text, add_special_tokens=False)["input_ids"] if text else []
        ids += seg
        if mode == "prompt" or (kind == "answer" and (mode == "assistant" or i == last)):
            labels += seg
        else:
            labels += [-100] * len(seg)
    return ids, labels


def chat_golden(toks):
    conv_dir = CHAT / "conversations"
    conv_dir.mkdir(parents=True, exist_ok=True)
    conversions, cases = [], []
    for file, rows in CONVERSATIONS.items():
        (conv_dir / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                     encoding="utf-8")
        # Read back what was written, as the Rust side will.
        for n, line in enumerate((conv_dir / file).read_text(encoding="utf-8").splitlines(), 1):
            msgs = to_messages(file, json.loads(line))
            assert msgs[-1]["role"] == "assistant"
            conversions.append({"file": file, "line": n, "messages": msgs})
            cases.append((file, n, msgs))

    renders, encodings = [], []
    for name, tok in toks.items():
        for file, n, msgs in cases:
            for gen, m in ((False, msgs), (True, msgs[:-1])):
                key = {"template": name, "file": file, "line": n, "add_generation_prompt": gen}
                try:
                    renders.append({**key, "text": render(tok, m, gen)})
                except TemplateError as e:
                    renders.append({**key, "error": True, "message": str(e)})
            for mode in ("assistant", "prompt", "last"):
                key = {"template": name, "file": file, "line": n, "mode": mode}
                try:
                    ids, labels = encode(tok, segments(tok, msgs), mode)
                    encodings.append({**key, "input_ids": ids, "labels": labels})
                except TemplateError as e:
                    encodings.append({**key, "error": "template error", "message": str(e)})
                except NotPrefixStable:
                    encodings.append({**key, "error": "not prefix-stable"})

    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "jinja2": jinja2.__version__}
    # One entry per line keeps the file small and diffs readable; it is still plain JSON.
    parts = ['{"made_by": ' + json.dumps(MADE_BY) + ',\n "versions": ' + json.dumps(versions)]
    for key, items in (("conversions", conversions), ("renders", renders), ("encodings", encodings)):
        body = ",\n  ".join(json.dumps(x, ensure_ascii=False) for x in items)
        parts.append(f' "{key}": [\n  {body}\n ]')
    (CHAT / "golden.json").write_text(",\n".join(parts) + "}\n", encoding="utf-8")
    return conversions, renders, encodings


# --------------------------------------------------------------------------------------------- #
# One SFT step of the whole expanded model
# --------------------------------------------------------------------------------------------- #

MASKED = {0: [(0, 5), (9, 11)], 1: [(0, 4)]}  # half-open [start, end) ranges of prompt tokens


def sft_step():
    rows = [json.loads(l)["input_ids"] for l in (FIX / "train" / "seqs.jsonl").read_text().splitlines()]
    assert [len(r) for r in rows] == [16, 11]
    sft_rows = []
    for i, r in enumerate(rows):
        labels = list(r)
        for a, b in MASKED[i]:
            labels[a:b] = [-100] * (b - a)
        sft_rows.append({"input_ids": r, "labels": labels})
    (FIX / "train" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))

    n = max(len(r) for r in rows)
    x = torch.zeros(len(rows), n, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(sft_rows):
        k = len(r["input_ids"])
        x[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1

    def step(dtype):
        model = expanded_model().to(dtype)
        model.requires_grad_(True)
        params = list(model.named_parameters())
        assert len({id(p) for _, p in params}) == len(params), "tied parameters would be listed once"
        decay = [p for _, p in params if p.dim() >= 2]
        plain = [p for _, p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None for _, p in params)
        grads = {name: p.grad.detach().clone() for name, p in params}
        opt.step()
        with torch.no_grad():
            after = model(input_ids=x, attention_mask=mask, labels=labels).loss
        return loss, after, params, grads

    loss, after, params, grads = step(torch.float32)
    # The same step in float64: the exact reference for the few elements whose first Adam
    # update is ill-conditioned (|grad| near eps: update = lr * g / (|g| + eps)), where torch's own
    # float32 result is off too.
    _, _, params64, _ = step(torch.float64)
    out = {"loss": loss.detach().reshape(1), "loss_after": after.reshape(1),
           "input_ids": x, "labels": labels, "attention_mask": mask}
    out.update({f"param.{name}": p.detach().clone() for name, p in params})
    # Rounded to float32 (1e-8 absolute here, far below the 1e-6 the test resolves).
    out.update({f"param64.{name}": p.detach().float().clone() for name, p in params64})
    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden" / "sft-step.safetensors"))
    return loss.item(), after.item(), len(params)


def main():
    torch.use_deterministic_algorithms(True)
    for name, spec in SPECS.items():
        assert sha256(spec["template"]) == SHA256[name], name
        if "tool_use" in spec:
            assert sha256(spec["tool_use"]) == SHA256[name + "/tool_use"], name
    assert set(TEMPLATE_SOURCES) == set(SHA256)
    if (CHAT / "templates").exists():
        shutil.rmtree(CHAT / "templates")
    toks = {name: write_template_dir(name, spec) for name, spec in SPECS.items()}
    conversions, renders, encodings = chat_golden(toks)
    loss, after, nparams = sft_step()
    print(f"chat fixtures: {len(toks)} templates, {len(conversions)} conversations, "
          f"{len(renders)} renders ({sum('error' in r for r in renders)} errors), "
          f"{len(encodings)} encodings ({sum('error' in e for e in encodings)} errors, "
          f"{sum(e.get('error') == 'not prefix-stable' for e in encodings)} not prefix-stable)")
    print(f"sft step: {nparams} parameters, loss {loss:.6f} -> {after:.6f}")


if __name__ == "__main__":
    sys.exit(main())
