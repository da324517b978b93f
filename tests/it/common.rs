//! Shared helpers: fixture paths, golden tensors, comparisons.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, backend::Backend};
use safetensors::{Dtype, SafeTensors};

/// The CPU backend the tests run on.
pub type Cpu = burn::backend::Flex;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub const MODELS: &[&str] = &[
    "llama-mha-f32",
    "llama-gqa-tied-sharded-f32",
    "llama3-gqa-headdim-bf16",
    "qwen2-bias-f32",
    "mistral-window-f32",
];

/// Tensors recorded by transformers for one model.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(name: &str) -> Self {
        let path = fixtures()
            .join("golden")
            .join(format!("{name}.safetensors"));
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("golden file parses");
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("golden tensor {key} missing"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let (dt, shape, data) = self.view(key);
        assert_eq!(dt, Dtype::F32, "{key}");
        (
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            shape,
        )
    }

    pub fn f64(&self, key: &str) -> Vec<f64> {
        let (dt, _, data) = self.view(key);
        assert_eq!(dt, Dtype::F64, "{key}");
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn i64(&self, key: &str) -> (Vec<i64>, Vec<usize>) {
        let (dt, shape, data) = self.view(key);
        assert_eq!(dt, Dtype::I64, "{key}");
        (
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            shape,
        )
    }

    pub fn ids<B: Backend>(
        &self,
        key: &str,
        device: &B::Device,
    ) -> Tensor<B, 2, burn::tensor::Int> {
        let (v, s) = self.i64(key);
        Tensor::from_data(burn::tensor::TensorData::new(v, [s[0], s[1]]), device)
    }

    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(key)
            .is_ok()
    }
}

pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<f32>, Vec<usize>) {
    let shape = t.dims().to_vec();
    let v = t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    (v, shape)
}

/// Largest absolute difference; panics on shape mismatch or NaN.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut m = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert!(
            x.is_finite() && y.is_finite(),
            "non-finite value: {x} vs {y}"
        );
        m = m.max((x - y).abs());
    }
    m
}

/// Assert `got` is within `tol` of golden `key`, printing the measured difference.
pub fn assert_close<B: Backend, const D: usize>(
    label: &str,
    got: Tensor<B, D>,
    golden: &Golden,
    key: &str,
    tol: f32,
) -> f32 {
    let (g, gs) = to_vec(got);
    let (e, es) = golden.f32(key);
    assert_eq!(gs, es, "{label} {key}: shape");
    let d = max_abs_diff(&g, &e);
    println!("{label:<28} {key:<18} max|Δ| = {d:.3e} (tol {tol:.0e})");
    assert!(d <= tol, "{label} {key}: max |Δ| = {d} > {tol}");
    d
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llama-pro-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copy a fixture model directory to a scratch location to damage it.
pub fn copy_model(name: &str, tag: &str) -> PathBuf {
    let dst = tmpdir(tag);
    for e in std::fs::read_dir(model_dir(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// `model` expanded interleaved with N = 2, P = 1 (4 → 6 layers, new 2 and 5) into a scratch dir.
pub fn expanded_fixture(model: &str, tag: &str) -> PathBuf {
    use llama_pro::core::expand::{ExpansionPlan, expand_checkpoint};
    let out = tmpdir(tag).join("m");
    let plan = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    };
    expand_checkpoint(
        &model_dir(model),
        &out,
        &plan,
        &llama_pro::core::save::SaveOptions::default(),
    )
    .unwrap();
    out
}

/// Train with `train` on backend `B` without output, calling `on_step` after every step;
/// when it returns false the run stops as on Ctrl-C (checkpoint, `interrupted`).
pub fn train_on<B: burn::tensor::backend::AutodiffBackend>(
    cfg: &llama_pro::train::config::TrainConfig,
    device: &B::Device,
    mut on_step: impl FnMut(&llama_pro::train::trainer::StepMetrics) -> bool,
) -> Result<llama_pro::train::trainer::TrainReport, llama_pro::train::TrainError> {
    use llama_pro::train::trainer::Event;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut observer = |e: &Event<'_>| {
        if let Event::Step(m) = e
            && !on_step(m)
        {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    llama_pro::train::trainer::train::<B>(cfg.clone(), device, &mut observer, &stop)
}

/// Train on the CPU and collect the run's information and warning lines.
pub fn train_cpu_lines(
    cfg: &llama_pro::train::config::TrainConfig,
) -> (
    Result<llama_pro::train::trainer::TrainReport, llama_pro::train::TrainError>,
    Vec<String>,
) {
    use llama_pro::train::trainer::Event;
    let mut lines = Vec::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut observer = |e: &Event<'_>| match e {
        Event::Info(s) => lines.push(s.to_string()),
        Event::Warning(s) => lines.push(format!("warning: {s}")),
        _ => {}
    };
    let r = llama_pro::train::trainer::train::<burn::backend::Autodiff<Cpu>>(
        cfg.clone(),
        &Default::default(),
        &mut observer,
        &stop,
    );
    (r, lines)
}

/// [`train_on`] the CPU (autodiff).
pub fn train_cpu(
    cfg: &llama_pro::train::config::TrainConfig,
    on_step: impl FnMut(&llama_pro::train::trainer::StepMetrics) -> bool,
) -> Result<llama_pro::train::trainer::TrainReport, llama_pro::train::TrainError> {
    train_on::<burn::backend::Autodiff<Cpu>>(cfg, &Default::default(), on_step)
}

/// `tok` gives the ids recorded by transformers in the golden file `{"text", "ids"}` cases
/// (a list, or an object with a `cases` list); returns how many cases were checked.
pub fn assert_tokenizer_cases(tok: &llama_pro::core::Tokenizer, golden: &Path) -> usize {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let cases = v.get("cases").unwrap_or(&v).as_array().unwrap();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "text {text:?}");
    }
    cases.len()
}
