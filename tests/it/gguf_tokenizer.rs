//! Tokenizers between GGUF and HuggingFace files (issue 16), against what llama.cpp and
//! transformers themselves produce (`tests/fixtures/gguf`, made by
//! `scripts/make_gguf_fixtures.py`).

use std::path::{Path, PathBuf};

use llama_pro::core::CoreError;
use llama_pro::core::gguf::tokenizer::{
    HfTokenizerFiles, gguf_tokenizer_metadata, tokenizer_from_gguf,
};
use llama_pro::core::gguf::{ArrayValue, GgufFile, Value, write_gguf};
use llama_pro::core::tokenizer::Tokenizer;
use serde_json::Value as Json;

use crate::common::*;

fn gguf_fixture(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

/// The GGUFs llama.cpp's converter wrote for fixture models: (file, model directory).
const CONVERTED: &[(&str, &str)] = &[
    ("llama-mha-f32-f16.gguf", "llama-mha-f32"),
    ("llama-mha-f32-q8_0.gguf", "llama-mha-f32"),
    ("mistral-window-f32-q8_0.gguf", "mistral-window-f32"),
    ("qwen2-bias-f32-q8_0.gguf", "qwen2-bias-f32"),
];

/// Texts for the round trips: prose, code, scripts, emoji, whitespace runs, special tokens.
const TEXTS: &[&str] = &[
    "Hello world",
    " Hello world",
    "  Hello  world  ",
    "hello\nworld\n\n\nfoo",
    "\t\ttabs\tand spaces   \n",
    "LLaMA Pro expands a pretrained model with identity blocks.",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "Ünïcödé façade naïve — “quotes” …",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Привет, мир! Ελληνικά.",
    "emoji 🦙🚀😶\u{200d}🌫\u{fe0f} ✅ 🇫🇷",
    "numbers 1 12 123 1234 3.14159 ½",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hello [/INST] world</s>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "   ",
    " ",
    "",
    "\n",
];

/// Write the rebuilt files to a fresh directory and load them as the CLI does.
fn load_files(files: &HfTokenizerFiles, tag: &str) -> (PathBuf, Tokenizer) {
    let dir = tmpdir(tag);
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&files.tokenizer_json).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&files.tokenizer_config).unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir, files.bos_token_id, &[]).unwrap();
    (dir, tok)
}

fn import(path: &Path, tag: &str) -> (HfTokenizerFiles, PathBuf, Tokenizer) {
    let file = GgufFile::open(path).unwrap();
    let files = tokenizer_from_gguf(&file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (dir, tok) = load_files(&files, tag);
    (files, dir, tok)
}

/// The `tokenizer.*` metadata of a GGUF file, in file order.
fn tokenizer_metadata(file: &GgufFile) -> Vec<(String, Value)> {
    file.metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect()
}

/// A metadata-only GGUF (what `convert_hf_to_gguf.py --vocab-only` writes, minus `general.*`).
fn write_vocab_gguf(meta: &[(String, Value)], path: &Path) -> GgufFile {
    let mut all = vec![(
        "general.architecture".to_string(),
        Value::String("llama".into()),
    )];
    all.extend(meta.iter().cloned());
    write_gguf(path, &all, Vec::new(), &mut |_, _| {}).unwrap();
    GgufFile::open(path).unwrap()
}

fn assert_same_metadata(got: &[(String, Value)], want: &[(String, Value)], label: &str) {
    let keys = |m: &[(String, Value)]| m.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(got), keys(want), "{label}: keys (in order)");
    for ((k, a), (_, b)) in got.iter().zip(want) {
        assert_eq!(a.type_code(), b.type_code(), "{label}: type of {k}");
        if a != b {
            let detail = match (a, b) {
                (Value::Array(ArrayValue::String(x)), Value::Array(ArrayValue::String(y))) => {
                    let i = x.iter().zip(y).position(|(p, q)| p != q);
                    format!(
                        "lengths {} / {}, first difference at {i:?}",
                        x.len(),
                        y.len()
                    )
                }
                _ => format!("{} / {}", a.summary(), b.summary()),
            };
            panic!("{label}: {k} differs: {detail}");
        }
    }
}

/// llama.cpp's tokenizer test file: texts separated by `\n__ggml_vocab_test__\n`
/// (`tests/test-tokenizer-0.cpp`), and one line of ids per text.
fn vocab_cases(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let raw = std::fs::read_to_string(format!("{}.inp", gguf.display())).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].find(sep) {
            Some(n) => {
                texts.push(raw[pos..pos + n].to_string());
                pos += n + sep.len();
            }
            None => {
                texts.push(raw[pos..].to_string());
                break;
            }
        }
    }
    let out = std::fs::read_to_string(format!("{}.out", gguf.display())).unwrap();
    let ids: Vec<Vec<u32>> = out
        .split('\n')
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert!(ids.len() >= texts.len());
    texts.into_iter().zip(ids).collect()
}

/// transformers' and llama.cpp's ids for the texts of `tokenizer-cases.json`.
fn recorded_cases(file: &str) -> Vec<Json> {
    let path = gguf_fixture("tokenizer-cases.json");
    let all: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    all[file]["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{file} in {}", path.display()))
        .clone()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Import: the rebuilt tokenizer gives transformers' ids (`AutoTokenizer(gguf_file=…)`) on the
/// recorded texts, and llama.cpp's where the two agree.
#[test]
fn imported_tokenizers_match_transformers_and_llama_cpp() {
    for file in ["llama-mha-f32-f16.gguf", "vocab-llama-spm.gguf"] {
        let (_, _, tok) = import(&gguf_fixture(file), &format!("gguf-tok-import-{file}"));
        let cases = recorded_cases(file);
        assert!(!cases.is_empty());
        let mut agree = 0;
        for c in &cases {
            let text = c["text"].as_str().unwrap();
            let got = tok.encode(text, true).unwrap();
            assert_eq!(
                got,
                ids(&c["transformers"]),
                "{file}: {text:?} (with special tokens)"
            );
            if c["agree"].as_bool().unwrap() {
                assert_eq!(
                    got,
                    ids(&c["llama_cpp_special"]),
                    "{file}: {text:?} vs llama.cpp"
                );
                agree += 1;
            }
        }
        println!(
            "{file}: {} texts as transformers, {agree} of them as llama.cpp too",
            cases.len()
        );
    }
}

/// Import of llama.cpp's own SentencePiece test vocabulary against its `.inp`/`.out` cases: the
/// same ids except the 15 texts that start with a space, where transformers (which we follow)
/// adds no `▁` in front and llama.cpp does: for those, our ids of the text with one more space
/// are llama.cpp's.
#[test]
fn imported_spm_vocab_matches_llama_cpp_test_cases() {
    let path = gguf_fixture("vocab-llama-spm.gguf");
    let (files, _, tok) = import(&path, "gguf-tok-spm-cases");
    assert_eq!(files.bos_token_id, Some(1));
    assert_eq!(files.eos_token_id, Some(2));
    let cases = vocab_cases(&path);
    assert_eq!(cases.len(), 46);
    let mut same = 0;
    for (i, (text, want)) in cases.iter().enumerate() {
        let got = tok.encode(text, false).unwrap();
        if text.starts_with(' ') {
            assert_eq!(
                tok.encode(&format!(" {text}"), false).unwrap(),
                *want,
                "case {i}: {text:?}"
            );
        } else {
            assert_eq!(got, *want, "case {i}: {text:?}");
            same += 1;
        }
    }
    assert_eq!(same, 31);
    // Byte fallback, BOS, the unknown token as a special token.
    assert_eq!(tok.encode("\n", false).unwrap(), vec![29871, 13]);
    assert_eq!(tok.encode("hi", true).unwrap()[0], 1);
    assert_eq!(tok.inner().token_to_id("<0x0A>"), Some(13));
    let config = &files.tokenizer_config;
    assert_eq!(config["bos_token"], "<s>");
    assert_eq!(config["unk_token"], "<unk>");
    assert_eq!(config["add_bos_token"], true);
}

/// Export: the `tokenizer.*` metadata is what llama.cpp's converter wrote for the same directory,
/// key for key, in order (its tokenizers are tiny byte-level BPEs unknown to convert's hash
/// table: the fixtures were converted with `tokenizer.ggml.pre = "gpt-2"`, which is what we infer).
#[test]
fn exported_metadata_matches_llama_cpp_converter() {
    for (file, model) in CONVERTED {
        let want = tokenizer_metadata(&GgufFile::open(gguf_fixture(file)).unwrap());
        let got = gguf_tokenizer_metadata(&model_dir(model)).unwrap();
        assert_same_metadata(&got, &want, file);
        println!(
            "{file}: {} tokenizer keys as convert_hf_to_gguf.py",
            got.len()
        );
    }
}

/// HF → GGUF → HF: the re-imported tokenizer gives the original `tokenizer.json`'s ids.
///
/// Except BOS for the `llama3` and `smollm2` chat fixtures, whose `tokenizer.json` adds `<s>`
/// while their `tokenizer_config.json` names another BOS (`<|begin_of_text|>`, `<|im_start|>`):
/// convert (and we) write that one as `tokenizer.ggml.bos_token_id` with `add_bos_token`, so
/// llama.cpp adds it, and so does the tokenizer imported back.
#[test]
fn hf_gguf_hf_round_trip_keeps_ids() {
    let mut dirs: Vec<PathBuf> = MODELS.iter().map(|m| model_dir(m)).collect();
    for t in ["llama2", "llama3", "mistral", "qwen2", "smollm2", "zephyr"] {
        dirs.push(fixtures().join("chat").join("templates").join(t));
    }
    for (n, dir) in dirs.iter().enumerate() {
        let meta = gguf_tokenizer_metadata(dir).unwrap();
        let gguf = write_vocab_gguf(&meta, &tmpdir(&format!("gguf-tok-rt1-{n}")).join("v.gguf"));
        let (files, _, back) = import(gguf.path(), &format!("gguf-tok-rt1-{n}-hf"));
        let orig = Tokenizer::from_dir(dir, None, &[]).unwrap();
        let bos_differs = orig.encode("", true).unwrap().first().copied() != files.bos_token_id;
        assert_eq!(
            bos_differs,
            dir.ends_with("llama3") || dir.ends_with("smollm2"),
            "{}",
            dir.display()
        );
        for text in TEXTS {
            for special in [true, false] {
                let (got, want) = (
                    back.encode(text, special).unwrap(),
                    orig.encode(text, special).unwrap(),
                );
                if special && bos_differs {
                    assert_eq!(
                        (Some(got[0]), &got[1..]),
                        (files.bos_token_id, &want[1..]),
                        "{}: {text:?}",
                        dir.display()
                    );
                    continue;
                }
                assert_eq!(
                    got,
                    want,
                    "{}: {text:?} (special tokens: {special})",
                    dir.display()
                );
            }
        }
        let config: Json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        // A list of named templates (the `llama3` fixture) gives its `default` one; the `smollm2`
        // fixture has it in chat_template.jinja.
        let template = match config.get("chat_template") {
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str()),
            other => other.and_then(Json::as_str),
        }
        .map(str::to_string)
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        assert_eq!(template, files.chat_template, "{}", dir.display());
    }
}

/// GGUF → HF → GGUF: a byte-level file comes back with the same metadata; the SentencePiece one
/// with the same tokens and, as convert's `LlamaHfVocab` writes them, CONTROL for the unknown
/// token and no scores of its own, ours ranked by merge so that importing it again tokenizes
/// as the first import did.
#[test]
fn gguf_hf_gguf_round_trip() {
    let path = gguf_fixture("llama-mha-f32-f16.gguf");
    let original = tokenizer_metadata(&GgufFile::open(&path).unwrap());
    let (_, dir, _) = import(&path, "gguf-tok-rt2-bpe");
    // As the model import writes it: the vocabulary size of the embeddings (20 fillers past the
    // tokenizer's 300 tokens).
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 320}"#,
    )
    .unwrap();
    assert_same_metadata(
        &gguf_tokenizer_metadata(&dir).unwrap(),
        &original,
        "byte-level round trip",
    );

    let path = gguf_fixture("vocab-llama-spm.gguf");
    let file = GgufFile::open(&path).unwrap();
    let (_, dir, first) = import(&path, "gguf-tok-rt2-spm");
    let meta = gguf_tokenizer_metadata(&dir).unwrap();
    let get =
        |m: &[(String, Value)], k: &str| m.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(
        get(&meta, "tokenizer.ggml.model"),
        Some(Value::String("llama".into()))
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.tokens").as_ref(),
        file.get("tokenizer.ggml.tokens")
    );
    let (
        Some(Value::Array(ArrayValue::I32(types))),
        Some(Value::Array(ArrayValue::I32(orig_types))),
    ) = (
        get(&meta, "tokenizer.ggml.token_type"),
        file.get("tokenizer.ggml.token_type").cloned(),
    )
    else {
        panic!("token types")
    };
    let changed: Vec<usize> = (0..types.len())
        .filter(|&i| types[i] != orig_types[i])
        .collect();
    assert_eq!(changed, vec![0], "only <unk>: UNKNOWN → CONTROL");
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        assert_eq!(get(&meta, key).as_ref(), file.get(key), "{key}");
    }
    let gguf = write_vocab_gguf(&meta, &tmpdir("gguf-tok-rt2-spm-2").join("v.gguf"));
    let (_, _, second) = import(gguf.path(), "gguf-tok-rt2-spm-3");
    let mut texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    texts.extend(vocab_cases(&path).into_iter().map(|(t, _)| t));
    for text in &texts {
        assert_eq!(
            second.encode(text, true).unwrap(),
            first.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
}

/// Unsupported tokenizers and broken metadata fail with the key, the value and what is expected.
#[test]
fn unsupported_gguf_tokenizers_are_clear_errors() {
    let dir = tmpdir("gguf-tok-errors");
    let tokens = |n: usize| {
        Value::Array(ArrayValue::String(
            (0..n).map(|i| format!("t{i}")).collect(),
        ))
    };
    type Case = (Vec<(String, Value)>, &'static [&'static str]);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("tokenizer.ggml.model".into(), Value::String("bert".into())),
                ("tokenizer.ggml.tokens".into(), tokens(4)),
            ],
            &["tokenizer.ggml.model", "\"bert\"", "\"llama\"", "\"gpt2\""],
        ),
        (vec![], &["tokenizer.ggml.model", "no tokenizer"]),
        (
            vec![
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens".into(), tokens(4)),
                (
                    "tokenizer.ggml.token_type".into(),
                    Value::Array(ArrayValue::I32(vec![1, 1])),
                ),
            ],
            &["tokenizer.ggml.token_type", "2 entries", "4 tokens"],
        ),
        (
            vec![
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens".into(), tokens(4)),
                (
                    "tokenizer.ggml.merges".into(),
                    Value::Array(ArrayValue::String(vec!["t0t1".into()])),
                ),
            ],
            &["tokenizer.ggml.merges[0]", "two tokens"],
        ),
    ];
    for (i, (meta, words)) in cases.into_iter().enumerate() {
        let file = write_vocab_gguf(&meta, &dir.join(format!("{i}.gguf")));
        let err = tokenizer_from_gguf(&file).expect_err("must fail");
        assert!(matches!(err, CoreError::Gguf { .. }), "{err:?}");
        let msg = err.to_string();
        for w in words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
    }
}
