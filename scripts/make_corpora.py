#!/usr/bin/env python3
"""Rebuild the embedded demo corpora in data/ from Debian packages (see data/DATA.md).

general: the King James Version of the Bible (public domain), from Debian's `bible-kjv-text`,
         extracted with the package's own `bible` program (`bible-kjv`); one chapter per document.
domain:  Python source code of the CPython 3.11 standard library (PSF License), from Debian's
         `libpython3.11-stdlib`; one module file per document.

Each is split into a training file and a held-out validation file by a fixed rule (every 40th
chapter, every 30th module), written as JSON lines {"text": ...}. Needs a Debian/Ubuntu machine
with apt (no root needed for `apt-get download`).

    python3 scripts/make_corpora.py            # writes data/{general,domain}-{train,valid}.jsonl
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data")
PACKAGES = ["bible-kjv-text", "bible-kjv", "libpython3.11-stdlib"]
# Python files: stop after this many bytes (sorted by path) to keep the repository small.
DOMAIN_BYTES = 2_700_000


def extract(tmp):
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    for deb in sorted(glob.glob(os.path.join(tmp, "*.deb"))):
        print("using", os.path.basename(deb))
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
    return os.path.join(tmp, "x")


def kjv_chapters(x):
    out = subprocess.run(
        [os.path.join(x, "usr/bin/bible"), "-p", os.path.join(x, "usr/lib"), "-l0", "-m", "8192",
         "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    chapters, cur = [], None
    for line in out.splitlines():
        s = line.strip()
        if not s:
            continue
        if line.startswith("  "):  # "  12 verse text"
            num, _, text = s.partition(" ")
            assert num.isdigit(), line
            cur[1].append(text.strip())
        else:  # "Genesis 1"
            cur = (s, [])
            chapters.append(cur)
    assert len(chapters) == 1189, len(chapters)
    return ["\n".join(verses) for _, verses in chapters]


def python_modules(x):
    base = os.path.join(x, "usr/lib/python3.11")
    files = []
    for p in sorted(glob.glob(os.path.join(base, "**/*.py"), recursive=True)):
        rel = os.path.relpath(p, base)
        if any(part in rel for part in ("test", "idlelib/", "lib2to3/", "pydoc_data/", "ensurepip/",
                                         "_sysconfigdata", "this.py", "site-packages/")):
            continue
        text = open(p, encoding="utf-8").read()
        if len(text) < 200:
            continue
        files.append(text)
    out, total = [], 0
    for t in files:
        if total >= DOMAIN_BYTES:
            break
        out.append(t)
        total += len(t.encode())
    return out


def write(name, docs, every):
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    valid = [d for i, d in enumerate(docs) if i % every == every - 1]
    for split, ds in (("train", train), ("valid", valid)):
        path = os.path.join(OUT, f"{name}-{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for d in ds:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        print(f"{path}: {len(ds)} documents, {os.path.getsize(path)} bytes")


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        x = extract(tmp)
        write("general", kjv_chapters(x), 40)
        write("domain", python_modules(x), 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
