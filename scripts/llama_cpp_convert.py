#!/usr/bin/env python3
"""Run llama.cpp's own `convert_hf_to_gguf.py`, optionally with a fallback BPE pre-tokenizer name.

    benches/.venv/bin/python scripts/llama_cpp_convert.py [--pre-fallback gpt-2] MODEL_DIR \
        --outtype f32|f16|bf16|q8_0 --outfile OUT.gguf

Everything after our own option is passed to convert_hf_to_gguf.py unchanged.

The llama.cpp tree is the one vendored in the llama-cpp-python sdist (see
scripts/requirements-gguf.txt), extracted to $LLAMA_CPP_DIR, default
~/.cache/llama-pro/llama.cpp-src/vendor/llama.cpp:

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d /tmp/sdist
    mkdir -p ~/.cache/llama-pro/llama.cpp-src
    tar xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C ~/.cache/llama-pro/llama.cpp-src --strip-components=1

Its converter uses its own copy of gguf-py (`<llama.cpp>/gguf-py`, inserted in sys.path by the
script itself unless NO_LOCAL_GGUF is set).

--pre-fallback NAME: convert identifies a byte-level BPE pre-tokenizer by hashing the ids the
tokenizer gives to a fixed text (`chkhsh` over `chktxt`, TextModel.get_vocab_base_pre in
conversion/base.py) and refuses an unknown hash (NotImplementedError). The repository's test
tokenizers are tiny byte-level BPEs trained for the fixtures, so their hash is unknown; with this
option an unknown hash writes `tokenizer.ggml.pre = NAME` instead of failing (a known hash is used
as is). Nothing else of the converter is changed.
"""

import os
import sys
from pathlib import Path


def llama_cpp_dir() -> Path:
    default = Path.home() / ".cache" / "llama-pro" / "llama.cpp-src" / "vendor" / "llama.cpp"
    d = Path(os.environ.get("LLAMA_CPP_DIR", default))
    if not (d / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"llama.cpp's convert_hf_to_gguf.py not found under {d} (set LLAMA_CPP_DIR)")
    return d


def main() -> None:
    argv = sys.argv[1:]
    fallback = None
    if len(argv) >= 2 and argv[0] == "--pre-fallback":
        fallback = argv[1]
        argv = argv[2:]
    d = llama_cpp_dir()
    sys.path.insert(0, str(d))
    sys.argv = [str(d / "convert_hf_to_gguf.py")] + argv
    import runpy

    if fallback is not None:
        # Import the package the converter uses and wrap the hash lookup before the script runs.
        if "NO_LOCAL_GGUF" not in os.environ:
            sys.path.insert(1, str(d / "gguf-py"))
        import conversion.base as base

        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                print(f"llama_cpp_convert: unknown pre-tokenizer hash, writing tokenizer.ggml.pre = {fallback!r}",
                      file=sys.stderr)
                return fallback

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    runpy.run_path(str(d / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
