#!/usr/bin/env python3
"""Derive the demo's small instruction set from the shipped corpora (see data/DATA.md).

Reads data/{general,domain}-{train,valid}.jsonl (the KJV Bible, one chapter per line; Python
standard-library modules, one per line) and writes OpenAI `messages` conversations:

    data/instruct-train.jsonl   from the *-train corpora
    data/instruct-valid.jsonl   from the *-valid corpora (held out: no answer of it is a train answer)

Three tasks, mixed:
    doc    "Write the docstring of this function:\\ndef f(a, b):"  ->  the first sentence of its
           docstring (Python source, parsed with `ast`)
    def    "Write the def line of the function whose docstring is:\\n<first sentence>"  ->  "def f(a, b):"
    verse  "Continue this verse: <first half>"  ->  the second half (KJV)

Every conversation is short: at most MAX_TOKENS tokens of data/base's 4096-token BPE once rendered
with the chatml template (counted here by a small byte-level BPE that reads data/base/tokenizer.json),
so it fits the demo's 128-token rows whole. Deterministic (fixed seed, sorted inputs), standard
library only, no network.

    python3 scripts/make_instruct.py
"""
import ast
import inspect
import json
import os
import random
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
SEED = 0
# Rendered conversation (chatml markers included) at most this many tokens.
MAX_TOKENS = 120
# Examples per split and task.
COUNTS = {
    "train": {"doc": 800, "def": 400, "verse": 800},
    "valid": {"doc": 40, "def": 20, "verse": 40},
}


class Bpe:
    """Byte-level BPE of a HuggingFace tokenizer.json (GPT-2 pre-tokenizer), for counting tokens."""

    # The GPT-2 split with Python's `re`: letters are [^\W\d_], digits \d.
    SPLIT = re.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

    def __init__(self, path):
        model = json.load(open(path, encoding="utf-8"))["model"]
        self.vocab = model["vocab"]
        self.ranks = {tuple(m if isinstance(m, list) else m.split(" ")): i
                      for i, m in enumerate(model["merges"])}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_char = {b: chr(c) for b, c in zip(bs, cs)}
        self.cache = {}

    def word(self, w):
        if w in self.cache:
            return self.cache[w]
        parts = [self.byte_char[b] for b in w.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        self.cache[w] = len(parts)
        return len(parts)

    def count(self, text):
        return sum(self.word(w) for w in self.SPLIT.findall(text))


def chatml(user, assistant):
    return (f"<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant}<|im_end|>\n")


def read(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def first_sentence(doc, limit=150):
    """The docstring's first paragraph as one line, cut after its first sentence when long."""
    para = " ".join(doc.split("\n\n")[0].split())
    if len(para) > limit:
        m = re.search(r"^(.{20,}?[.!?])\s", para)
        para = m.group(1) if m else ""
    return para if 8 <= len(para) <= limit else None


def parse(src):
    """The module's syntax tree; a module cut short by the corpus's size limit loses lines at the
    end until it parses."""
    lines = src.split("\n")
    for cut in range(len(lines), max(len(lines) - 400, 0), -1):
        try:
            return ast.parse("\n".join(lines[:cut]))
        except SyntaxError:
            continue
    return None


def functions(modules):
    """(def line, docstring sentence) of every documented function and method."""
    out = []
    for src in modules:
        tree = parse(src)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            sentence = first_sentence(inspect.cleandoc(doc))
            if sentence is None:
                continue
            kw = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            sig = f"{kw} {node.name}({ast.unparse(node.args)}):"
            if len(sig) > 90:
                continue
            out.append((sig, sentence))
    return out


def verses(chapters):
    """(first half, second half) of verses of 40-200 characters, cut at the punctuation mark
    nearest the middle (else at the space nearest it)."""
    out = []
    for ch in chapters:
        for v in ch.split("\n"):
            v = v.strip()
            if not 40 <= len(v) <= 200:
                continue
            mid = len(v) // 2
            cuts = [m.end() for m in re.finditer(r"[,;:] ", v) if 0.3 * len(v) < m.end() < 0.7 * len(v)]
            if not cuts:
                cuts = [m.end() for m in re.finditer(" ", v)]
            cut = min(cuts, key=lambda c: abs(c - mid))
            head, tail = v[:cut].rstrip(), v[cut:].strip()
            if len(head) >= 15 and len(tail) >= 10:
                out.append((head, tail))
    return out


def tasks(modules, chapters):
    fns = functions(modules)
    return {
        "doc": [(f"Write the docstring of this function:\n{sig}", doc) for sig, doc in fns],
        "def": [(f"Write the def line of the function whose docstring is:\n{doc}", sig) for sig, doc in fns],
        "verse": [(f"Continue this verse: {h}", t) for h, t in verses(chapters)],
    }


def pick(pool, n, rng, bpe, seen):
    """Up to n distinct examples of `pool` that fit MAX_TOKENS and whose answers are not in `seen`."""
    pool = sorted(set(pool))
    rng.shuffle(pool)
    out, answers = [], set()
    for q, a in pool:
        if len(out) == n:
            break
        if a in seen or a in answers or bpe.count(chatml(q, a)) > MAX_TOKENS:
            continue
        answers.add(a)
        out.append((q, a))
    return out


def write(name, examples):
    path = os.path.join(DATA, name)
    with open(path, "w", encoding="utf-8") as f:
        for q, a in examples:
            msg = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(msg, ensure_ascii=False) + "\n")
    print(f"{path}: {len(examples)} conversations, {os.path.getsize(path)} bytes")


def main():
    bpe = Bpe(os.path.join(DATA, "base", "tokenizer.json"))
    rng = random.Random(SEED)
    seen = set()
    for split in ["train", "valid"]:
        pools = tasks(read(f"domain-{split}.jsonl"), read(f"general-{split}.jsonl"))
        chosen = []
        for task, n in COUNTS[split].items():
            got = pick(pools[task], n, rng, bpe, seen)
            print(f"{split} {task}: {len(got)} of {len(pools[task])} candidates")
            chosen += got
        # Held-out answers must be unseen: the train answers are excluded from the valid split.
        seen |= {a for _, a in chosen}
        rng.shuffle(chosen)
        tokens = [bpe.count(chatml(q, a)) for q, a in chosen]
        print(f"{split}: tokens per conversation {min(tokens)}..{max(tokens)}, "
              f"mean {sum(tokens) / len(tokens):.1f}")
        write(f"instruct-{split}.jsonl", chosen)


if __name__ == "__main__":
    main()
