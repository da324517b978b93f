#!/usr/bin/env python3
"""Rebuild the embedded demo corpora in data/ from Debian packages (see data/DATA.md).

general: the King James Version of the Bible (public domain), from Debian's `bible-kjv-text`,
         extracted with the package's own `bible` program (`bible-kjv`); one chapter per document.
domain:  Python source code of the CPython 3.11 standard library (PSF License), from Debian's
         `libpython3.11-stdlib`; one module file per document.
english: a second held-out general set (no training split): chapters of Jane Austen's six novels
         (public domain), from Debian's `r-cran-janeaustenr` (MIT), read out of the R package's
         lazy-load database by a small R-serialization reader below (no R needed).

Each is split into a training file and a held-out validation file by a fixed rule (every 40th
chapter, every 30th module), written as JSON lines {"text": ...}. Needs a Debian/Ubuntu machine
with apt (no root needed for `apt-get download`).

    python3 scripts/make_corpora.py            # writes data/{general,domain}-{train,valid}.jsonl
                                               # and data/english-valid.jsonl
    python3 scripts/make_corpora.py --english  # only data/english-valid.jsonl
"""
import glob
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data")
PACKAGES = ["bible-kjv-text", "bible-kjv", "libpython3.11-stdlib"]
ENGLISH_PACKAGES = ["r-cran-janeaustenr"]
# english-valid.jsonl: every ENGLISH_EVERY-th chapter of the six novels (in the package's order).
ENGLISH_EVERY = 20
# Python files: stop after this many bytes (sorted by path) to keep the repository small.
DOMAIN_BYTES = 2_700_000


def extract(tmp, packages=PACKAGES):
    subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=True,
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


class RUnserializer:
    """Just enough of R's XDR serialization format (version 2 and 3) to read the character
    vectors of an R package's lazy-load data base (`data/Rdata.rdx` + `Rdata.rdb`)."""

    def __init__(self, b):
        assert b[:2] == b"X\n", "not XDR serialization"
        self.b, self.p, self.refs = b, 2, []
        version = self.int()
        self.int(), self.int()  # writer's and minimal R versions
        if version == 3:
            n = self.int()  # native encoding name
            self.p += n

    def int(self):
        (v,) = struct.unpack(">i", self.b[self.p:self.p + 4])
        self.p += 4
        return v

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, markers
            return None
        if t == 255:  # reference
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # symbol
            v = ("sym", self.item())
            self.refs.append(v)
            return v
        if t in (2, 239):  # pairlist: [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr or [])
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            v = self.b[self.p:self.p + n].decode("utf-8")
            self.p += n
            return v
        if t in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            n = self.int()
            if t in (10, 13):
                v = list(struct.unpack(f">{n}i", self.b[self.p:self.p + 4 * n]))
                self.p += 4 * n
            elif t == 14:
                v = list(struct.unpack(f">{n}d", self.b[self.p:self.p + 8 * n]))
                self.p += 8 * n
            else:
                v = [self.item() for _ in range(n)]
            if has_attr:
                names = [x for tag, x in self.item() if tag == ("sym", "names")]
                if names and t == 19:
                    return dict(zip(names[0], v))
            return v
        raise ValueError(f"R serialization type {t} not supported")


def r_lazyload(prefix):
    """{name: value} of an R lazy-load data base (zlib-compressed entries)."""
    index = RUnserializer(gzip.decompress(open(prefix + ".rdx", "rb").read())).item()
    assert index["compressed"] in ([1], [True], True, 1), index["compressed"]
    db = open(prefix + ".rdb", "rb").read()
    out = {}
    for name, (off, n) in index["variables"].items():
        out[name] = RUnserializer(zlib.decompress(db[off + 4:off + n])).item()
    return out


def austen_chapters(x):
    """Chapters of the six novels, in the package's order (Emma, Mansfield Park, Northanger
    Abbey, Persuasion, Pride and Prejudice, Sense and Sensibility): paragraphs unwrapped (one
    per line), `_emphasis_` marks removed; title pages, volume headings, "THE END" and the
    editor's note after Northanger Abbey left out."""
    books = r_lazyload(os.path.join(x, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    assert len(books) == 6, sorted(books)
    chapters = []
    for _, lines in sorted(books.items()):
        cur = None
        for line in lines + [""]:
            s = line.strip()
            if re.match(r"^(THE END|FINIS|Finis|A NOTE ON THE TEXT)$", s):
                break
            if re.match(r"^(CHAPTER|Chapter) [IVXLC0-9]+\.?$", s):
                cur = [[]]
                chapters.append(cur)
            elif re.match(r"^VOLUME [IVX]+$", s) or cur is None:
                continue
            elif s:
                cur[-1].append(s)
            elif cur[-1]:
                cur.append([])
    out = []
    for ch in chapters:
        paras = [" ".join(p) for p in ch if p]
        text = "\n".join(re.sub(r"\s+", " ", p).replace("_", "") for p in paras)
        out.append(text)
    assert len(out) > 250, len(out)
    return out


def write_english(chapters):
    path = os.path.join(OUT, "english-valid.jsonl")
    docs = [c for i, c in enumerate(chapters) if i % ENGLISH_EVERY == ENGLISH_EVERY - 1]
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    print(f"{path}: {len(docs)} documents, {os.path.getsize(path)} bytes")


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
    english_only = "--english" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        x = extract(tmp, ENGLISH_PACKAGES + ([] if english_only else PACKAGES))
        if not english_only:
            write("general", kjv_chapters(x), 40)
            write("domain", python_modules(x), 30)
        write_english(austen_chapters(x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
