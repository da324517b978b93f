//! Memory planning (`llama_pro::train::memory`): line items against the parameters of real
//! models, how the activation estimate scales, the CPU's measured peak against the plan (each
//! measurement in a child process of this test binary, so that no other test's memory counts),
//! and the command line (`train --dry-run`, `inspect --memory`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::tensor::{Int, Tensor, TensorData};
use llama_pro::core::expand::{ExpansionPlan, LayerMap, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::linear::LoraConfig;
use llama_pro::core::model::causal_lm_loss_sum;
use llama_pro::core::{DType, LlamaConfig};
use llama_pro::train::memory::{
    AttentionKind, MemoryPlan, PlanInputs, human, measure_training_peak,
};

use crate::cli::{run_err, run_ok};
use crate::common::*;

type Ad = Autodiff<Cpu>;

/// The benchmark shapes (`examples/bench_step.rs`): S = vocab 4096, hidden 256, FFN 688, 4 → 5
/// layers, 4 heads, 8 x 128 tokens; M = vocab 8192, hidden 512, FFN 1376, 8 → 10 layers,
/// 8 heads, 4 x 256 tokens. Expanded interleaved, one copy per group of 4 blocks.
fn case(name: &str) -> (LlamaConfig, LayerMap, usize, usize) {
    let mut c = LlamaConfig::tiny(256);
    let (base, batch, seq) = match name {
        "S" => {
            (c.vocab_size, c.hidden_size, c.intermediate_size) = (4096, 256, 688);
            (c.num_attention_heads, c.num_key_value_heads) = (4, 4);
            (4, 8, 128)
        }
        "M" => {
            (c.vocab_size, c.hidden_size, c.intermediate_size) = (8192, 512, 1376);
            (c.num_attention_heads, c.num_key_value_heads) = (8, 8);
            (8, 4, 256)
        }
        "T" => (4, 1, 16),
        other => panic!("case {other}"),
    };
    c.head_dim = c.hidden_size / c.num_attention_heads;
    c.max_position_embeddings = 4096;
    let map = ExpansionPlan::Interleaved {
        groups: base / 4,
        copies: 1,
    }
    .layer_map(base)
    .unwrap();
    c.num_hidden_layers = map.len();
    (c, map, batch, seq)
}

/// Plan inputs from `key=value;…`: case (S|M), sel (a selection), dtype, ck (0|1), att
/// (kernel|composed), accum, batch, seq; lora=RANK adds adapters on every linear layer.
fn spec_inputs(spec: &str) -> (LlamaConfig, PlanInputs) {
    let get = |k: &str| {
        spec.split(';')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    let (c, map, batch, seq) = case(&get("case").unwrap_or("S".into()));
    let sel = Selection::parse(&get("sel").unwrap_or("expanded".into())).unwrap();
    let mut i = PlanInputs::new(sel, map);
    i.dtype = get("dtype").map_or(DType::F32, |d| d.parse().unwrap());
    i.checkpointing = get("ck").is_some_and(|v| v == "1");
    i.attention = get("att").map_or(AttentionKind::Kernel, |a| a.parse().unwrap());
    i.grad_accum = get("accum").map_or(1, |v| v.parse().unwrap());
    i.batch_size = get("batch").map_or(batch, |v| v.parse().unwrap());
    i.seq_len = get("seq").map_or(seq, |v| v.parse().unwrap());
    if let Some(r) = get("lora") {
        i.lora = Some(LoraConfig {
            rank: r.parse().unwrap(),
            ..LoraConfig::default()
        });
    }
    (c, i)
}

/// Counts the bytes the process has allocated (live, and the peak since [`reset_peak`]): the
/// live-memory peak of a step, without what the allocator keeps or fragments (which resident
/// memory includes). Installed for the whole test binary; an atomic add per allocation.
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Start a new live-memory peak; returns the bytes live now.
fn reset_peak() -> u64 {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// Run in a child process by [`measure`]: one measurement, printed as
/// `MEASURED <rss peak> <live peak> <rss before> <rss per phase: forward backward optimizer>`.
#[test]
#[ignore = "a measurement run in a child process by the memory tests"]
fn measure_child() {
    let Ok(spec) = std::env::var("LLAMA_PRO_MEMORY_CASE") else {
        return;
    };
    let (c, i) = spec_inputs(&spec);
    let steps = 3;
    let live_before = reset_peak();
    let m = if i.checkpointing {
        measure_training_peak::<Autodiff<Cpu, BalancedCheckpointing>>(
            &c,
            &i,
            steps,
            &Default::default(),
        )
    } else {
        measure_training_peak::<Ad>(&c, &i, steps, &Default::default())
    }
    .unwrap();
    let live = PEAK.load(Ordering::Relaxed) - live_before;
    println!(
        "MEASURED {} {live} {} {} {} {}",
        m.delta, m.rss_before, m.phases[0], m.phases[1], m.phases[2]
    );
}

/// A measurement of one training run in a child process.
struct Measured {
    /// Peak resident memory above the process's before the model was built.
    rss: u64,
    /// Peak of the bytes allocated (and not freed) above those before the model was built.
    live: u64,
    /// Peak resident memory in the forward, backward and optimizer phases.
    rss_phases: [u64; 3],
}

/// The measured peaks of `spec` (in a child process) and its plan.
fn measure(spec: &str) -> (Measured, MemoryPlan) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "memory::measure_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("LLAMA_PRO_MEMORY_CASE", spec)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("MEASURED ").map(|(_, m)| m))
        .unwrap_or_else(|| {
            panic!(
                "{spec}: no measurement:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (c, i) = spec_inputs(spec);
    let m = Measured {
        rss: v[0],
        live: v[1],
        rss_phases: [v[3], v[4], v[5]],
    };
    (m, MemoryPlan::for_training(&c, &i))
}

/// Predicted and measured peaks of the S and M shapes on the CPU, as a Markdown table (the
/// README's figures):
/// `cargo test --release --test it memory::memory_report_cpu -- --ignored --nocapture`.
#[test]
#[ignore = "a report (about 2 minutes): run it by name"]
fn memory_report_cpu() {
    let specs = [
        "case=S;sel=expanded",
        "case=S;sel=all",
        "case=S;sel=expanded;ck=1",
        "case=S;sel=all;ck=1",
        "case=S;sel=expanded;att=composed",
        "case=S;sel=all;att=composed",
        "case=S;sel=all;att=composed;ck=1",
        "case=S;sel=expanded;dtype=bf16;att=composed",
        "case=S;sel=lora;lora=8",
        "case=S;sel=expanded;accum=2",
        "case=S;sel=expanded;seq=512;batch=2",
        "case=S;sel=expanded;seq=512;batch=2;att=composed",
        "case=M;sel=expanded",
        "case=M;sel=all",
        "case=M;sel=all;ck=1",
        "case=M;sel=expanded;att=composed",
        "case=M;sel=all;att=composed",
        "case=M;sel=expanded;dtype=bf16;att=composed",
    ];
    println!(
        "| run | predicted peak (phase) | live peak | live / pred. | + allowance | resident peak | resident / pred. |"
    );
    println!("|---|---|---|---|---|---|---|");
    let only = std::env::var("LLAMA_PRO_MEMORY_ONLY").ok();
    for spec in specs {
        if only.as_ref().is_some_and(|o| !spec.contains(o.as_str())) {
            continue;
        }
        let (m, plan) = measure(spec);
        if std::env::var("LLAMA_PRO_MEMORY_VERBOSE").is_ok() {
            println!("{plan}\nresident per phase: {:?}", m.rss_phases.map(human));
        }
        let live = plan.total_bytes() - plan.bytes("allowance");
        println!(
            "| `{spec}` | {} ({}) | {} | {:.2} | {} | {} | {:.2} |",
            human(live),
            plan.phases[plan.peak_phase].name,
            human(m.live),
            m.live as f64 / live as f64,
            human(plan.total_bytes()),
            human(m.rss),
            m.rss as f64 / plan.total_bytes() as f64
        );
    }
}

/// Bytes of the model's parameters by trainability, read from the tensors themselves (their
/// element counts and dtypes), and the element counts.
#[derive(Default, Debug)]
struct ParamBytes {
    frozen: u64,
    trainable: u64,
    adapters: u64,
    trainable_elems: u64,
    adapter_elems: u64,
}

impl<B: burn::tensor::backend::Backend> llama_pro::core::params::NamedVisitor<B> for ParamBytes {
    fn visit<const D: usize>(&mut self, name: &str, p: &burn::module::Param<Tensor<B, D>>) {
        let t = p.val();
        let n = t.shape().num_elements() as u64;
        let bytes = n * t.dtype().size() as u64;
        let lora = name.ends_with(".lora_a") || name.ends_with(".lora_b");
        match (p.is_require_grad(), lora) {
            (false, _) => self.frozen += bytes,
            (true, false) => {
                self.trainable += bytes;
                self.trainable_elems += n;
            }
            (true, true) => {
                self.adapters += bytes;
                self.adapter_elems += n;
            }
        }
    }
}

fn param_bytes<B: burn::tensor::backend::Backend>(
    m: &llama_pro::core::LlamaForCausalLM<B>,
) -> ParamBytes {
    let mut v = ParamBytes::default();
    llama_pro::core::params::visit_named(m, &mut v);
    v
}

/// Weights, gradients and AdamW state in the plan are the byte counts of a real model prepared
/// as the trainer prepares it (selection, LoRA, mixed precision), and the gradients those that a
/// real backward pass produces.
#[test]
fn plan_line_items_are_the_real_models_parameters() {
    let device = Default::default();
    let base = LlamaConfig::tiny(256).init::<Ad>(&device, 0);
    let (expanded, map) = expand_model(
        base,
        &ExpansionPlan::Interleaved {
            groups: 2,
            copies: 1,
        },
        None,
    )
    .unwrap();
    let config = expanded.config.clone();
    let cases: [(&str, DType, Option<usize>); 5] = [
        ("expanded", DType::F32, None),
        ("expanded+embed_tokens", DType::BF16, None),
        ("all", DType::F32, None),
        ("layers[1].mlp+norm", DType::F16, None),
        ("lora", DType::F32, Some(2)),
    ];
    for (spec, dtype, lora) in cases {
        let sel = Selection::parse(spec).unwrap();
        let mut inputs = PlanInputs::new(sel.clone(), map.clone());
        inputs.dtype = dtype;
        let lora_cfg = lora.map(|rank| LoraConfig {
            rank,
            ..LoraConfig::default()
        });
        inputs.lora = lora_cfg.clone();
        let model = match &lora_cfg {
            Some(l) => expanded.clone().with_lora(l, 0).unwrap(),
            None => expanded.clone(),
        };
        let (model, _) = set_trainable(model, &sel, &map).unwrap();
        let model = if dtype == DType::F32 {
            model
        } else {
            model.mixed_precision(dtype)
        };
        let real = param_bytes(&model);
        let plan = MemoryPlan::for_training(&config, &inputs);
        println!("{spec} {dtype}: {real:?}");
        assert_eq!(plan.bytes("weights_frozen"), real.frozen, "{spec} {dtype}");
        assert_eq!(
            plan.bytes("weights_trainable"),
            real.trainable,
            "{spec} {dtype}"
        );
        assert_eq!(plan.bytes("lora_adapters"), real.adapters, "{spec} {dtype}");
        let elems = real.trainable_elems + real.adapter_elems;
        assert_eq!(plan.trainable, elems, "{spec}");
        assert_eq!(plan.bytes("adamw"), 8 * elems, "{spec}: two f32 moments");
        // The gradients a backward pass really produces (f32, trainable parameters only).
        let ids: Vec<i64> = (0..2 * 12).map(|i| (i * 37 % 256) as i64).collect();
        let ids = Tensor::<Ad, 2, Int>::from_data(TensorData::new(ids, [2, 12]), &device);
        let mask = Tensor::<Ad, 2>::ones([2, 12], &device);
        let (sum, _) = causal_lm_loss_sum(model.forward(ids.clone()), ids, mask);
        let grads = sum.backward();
        let grad_bytes: u64 = model
            .named_grads(&grads)
            .into_iter()
            .filter_map(|(_, g)| g)
            .map(|g| g.shape().num_elements() as u64 * g.dtype().size() as u64)
            .sum();
        assert_eq!(plan.bytes("gradients"), grad_bytes, "{spec} {dtype}");
        // Mixed precision keeps a compute-dtype copy of each trainable matrix.
        if dtype != DType::F32 {
            assert!(plan.bytes("weight_casts") > 0, "{spec}");
        } else {
            assert_eq!(plan.bytes("weight_casts"), 0, "{spec}");
        }
    }
}

/// With the fused kernels the activations are linear in the sequence length (attention keeps
/// an O(seq) log-sum-exp); composed, burn's attention keeps three `[batch, heads, seq, seq]`
/// tensors per block, a quadratic term of exactly that size.
#[test]
fn activations_grow_linearly_with_kernels_and_quadratically_composed() {
    let (c, base) = spec_inputs("case=M;sel=all");
    let act = |seq: usize, att: AttentionKind| {
        let mut i = base.clone();
        i.seq_len = seq;
        i.attention = att;
        MemoryPlan::for_training(&c, &i).bytes("activations")
    };
    let k = |s| act(s, AttentionKind::Kernel);
    assert_eq!(k(512), 2 * k(256));
    assert_eq!(k(2048), 8 * k(256));
    let p = |s| act(s, AttentionKind::Composed);
    let d1 = p(512) - 2 * p(256);
    let d2 = p(1024) - 2 * p(512);
    assert_eq!(d2, 4 * d1, "a pure quadratic term");
    let (b, h, layers) = (
        base.batch_size as u64,
        c.num_attention_heads as u64,
        c.num_hidden_layers as u64,
    );
    // f(2s) - 2 f(s) = 2 q s² with q = 3 [b, h] f32 per block.
    assert_eq!(d1, 2 * 3 * b * h * 4 * layers * 256 * 256);
    assert!(p(256) > k(256));
}

/// Blocks below the lowest trainable one keep nothing; checkpointing lowers the composed
/// estimate and (truthfully) raises the kernels' one.
#[test]
fn frozen_blocks_below_and_checkpointing_in_the_plan() {
    let (c, base) = spec_inputs("case=M;sel=all");
    let with = |sel: &str, att: AttentionKind, ck: bool| {
        let mut i = base.clone();
        i.selection = Selection::parse(sel).unwrap();
        i.attention = att;
        i.checkpointing = ck;
        MemoryPlan::for_training(&c, &i)
    };
    let l = c.num_hidden_layers;
    let top = with(&format!("layers[{}]", l - 1), AttentionKind::Kernel, false);
    let mid = with("layers[5]", AttentionKind::Kernel, false);
    let bottom = with("layers[0]", AttentionKind::Kernel, false);
    assert_eq!(top.tracked_blocks, 1);
    assert_eq!(mid.tracked_blocks, l - 5);
    assert_eq!(bottom.tracked_blocks, l);
    let act = |p: &MemoryPlan| p.bytes("activations");
    assert!(act(&top) < act(&mid) && act(&mid) < act(&bottom));
    // A block that is tracked but frozen keeps less than a trainable one (no matmul inputs).
    assert!(act(&bottom) < act(&with("all", AttentionKind::Kernel, false)));
    for sel in ["all", "expanded"] {
        let off = with(sel, AttentionKind::Composed, false);
        let on = with(sel, AttentionKind::Composed, true);
        assert!(
            act(&on) < act(&off) && on.total_bytes() < off.total_bytes(),
            "{sel}: composed checkpointing {} vs {}",
            human(act(&on)),
            human(act(&off))
        );
        let off = with(sel, AttentionKind::Kernel, false);
        let on = with(sel, AttentionKind::Kernel, true);
        assert!(act(&on) > act(&off), "{sel}: kernels keep their outputs");
        assert!(on.items.iter().any(|i| i.note.contains("more, not less")));
    }
}

/// The CPU's measured peaks against the plan, in child processes: the live bytes (a counting
/// allocator) within 12% of the predicted peak before the allowance, the resident peak within
/// 15% of the predicted total. The README's table comes from `memory_report_cpu`.
#[test]
fn measured_peak_matches_the_plan_on_the_cpu() {
    for spec in [
        "case=S;sel=expanded",
        "case=S;sel=all",
        "case=S;sel=expanded;att=composed",
    ] {
        let (m, plan) = measure(spec);
        let live = plan.total_bytes() - plan.bytes("allowance");
        let (r_live, r_rss) = (
            m.live as f64 / live as f64,
            m.rss as f64 / plan.total_bytes() as f64,
        );
        println!(
            "{spec}: live {} / predicted {} = {r_live:.2}; resident {} / predicted total {} = {r_rss:.2}",
            human(m.live),
            human(live),
            human(m.rss),
            human(plan.total_bytes())
        );
        assert!((0.88..=1.12).contains(&r_live), "{spec}: live {r_live:.2}");
        assert!(
            (0.85..=1.15).contains(&r_rss),
            "{spec}: resident {r_rss:.2}"
        );
    }
}

/// `train --dry-run` checks the run, prints the plan and the fit, and writes nothing; bad
/// values are named by their flag.
#[test]
fn train_dry_run_prints_the_plan_and_writes_nothing() {
    let model = expanded_fixture("llama-mha-f32", "mem-dry");
    let out = tmpdir("mem-dry-out").join("run");
    let data = fixtures().join("train/seqs.jsonl");
    let args = |extra: &[&str]| -> Vec<String> {
        [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--dry-run",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let run = |extra: &[&str]| run_ok(&args(extra).iter().map(String::as_str).collect::<Vec<_>>());
    let err = |extra: &[&str]| run_err(&args(extra).iter().map(String::as_str).collect::<Vec<_>>());
    let text = run(&[]);
    for want in [
        "memory plan: pro, f32, 2 x 64 tokens",
        "frozen weights (f32)",
        "AdamW moments",
        "activations saved for backward",
        "predicted peak:",
        "device cpu:",
        "fits (",
        "nothing written",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    assert!(!out.exists(), "a dry run created {}", out.display());
    // A GPU's memory is not read: given, the plan says whether it fits and what would help.
    let text = run(&[
        "--device",
        "cuda",
        "--method",
        "full",
        "--device-memory",
        "1MB",
    ]);
    assert!(
        text.contains("does not fit (needs") && text.contains("device has 976.6 KiB"),
        "{text}"
    );
    let text = run(&["--device", "cuda"]);
    assert!(text.contains("unknown: pass --device-memory"), "{text}");
    let text = run(&["--checkpointing", "--dtype", "bf16"]);
    assert!(
        text.contains("bf16") && text.contains("checkpointing on") && text.contains("f32 masters"),
        "{text}"
    );
    assert!(!out.exists());
    for (extra, want) in [
        (&["--device-memory", "lots"][..], "--device-memory"),
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--seq-len", "1"][..], "--seq-len"),
        (&["--trainable", "layers[99]"][..], "--trainable"),
        (
            &["--method", "lora", "--lora-targets", "wq"][..],
            "--lora-targets",
        ),
        (&["--attention", "flash"][..], "--attention"),
        (&["--data", "/nonexistent-llama-pro.txt"][..], "--data"),
    ] {
        let e = err(extra);
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

/// `inspect --memory` prints the same plan as the library computes; `--json` includes it.
#[test]
fn inspect_memory_text_and_json() {
    let model = expanded_fixture("llama-mha-f32", "mem-inspect");
    let m = model.to_str().unwrap();
    let text = run_ok(&["inspect", m, "--memory", "--seq", "32", "--batch", "2"]);
    assert!(
        text.contains("memory plan: pro") && text.contains("predicted peak:"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&run_ok(&[
        "inspect",
        m,
        "--memory",
        "--json",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--dtype",
        "bf16",
        "--method",
        "full",
        "--device",
        "cuda",
        "--device-memory",
        "80GB",
    ]))
    .unwrap();
    let mem = &v["memory"];
    let hf = llama_pro::core::HfConfig::from_path(&model).unwrap();
    let cfg = llama_pro::train::config::TrainConfig {
        model: model.clone(),
        method: llama_pro::train::config::Method::Full,
        seq_len: 32,
        batch_size: 2,
        dtype: DType::BF16,
        device: llama_pro::core::device::DeviceSpec::Cuda(0),
        ..Default::default()
    };
    let plan = MemoryPlan::for_training(
        &hf.config,
        &PlanInputs::from_train_config(&cfg, &hf).unwrap(),
    );
    assert_eq!(mem["total_bytes"], plan.total_bytes());
    assert_eq!(mem["dtype"], "bf16");
    assert_eq!(mem["fits"], true);
    assert_eq!(mem["device_memory_bytes"], 80_000_000_000u64);
    assert_eq!(mem["trainable_parameters"], v["parameters"]);
    // Full training in bf16: every weight is an f32 master, nothing frozen.
    let item = |k: &str| {
        mem["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == k)
            .map(|i| i["bytes"].as_u64().unwrap())
    };
    assert_eq!(item("weights_frozen"), Some(0));
    assert_eq!(
        item("weights_trainable"),
        Some(4 * v["parameters"].as_u64().unwrap())
    );
    assert!(v.get("memory").is_some());
    // Without --memory there is no plan, and its flags require it.
    let plain: serde_json::Value =
        serde_json::from_str(&run_ok(&["inspect", m, "--json"])).unwrap();
    assert!(plain["memory"].is_null());
    let e = run_err(&["inspect", m, "--seq-len", "64"]);
    assert!(e.contains("--memory"), "{e}");
    let e = run_err(&["inspect", m, "--memory", "--seq", "1"]);
    assert!(e.contains("--seq-len"), "{e}");
    // A model that was never expanded plans full training by default; pro is refused.
    let base = model_dir("llama-mha-f32");
    let b = base.to_str().unwrap();
    assert!(run_ok(&["inspect", b, "--memory"]).contains("memory plan: full"));
    let e = run_err(&["inspect", b, "--memory", "--method", "pro"]);
    assert!(
        e.contains("--trainable") && e.contains("no expanded blocks"),
        "{e}"
    );
}
