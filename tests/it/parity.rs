//! Our LLaMA against transformers' outputs on the golden fixtures.

use llama_pro::core::model::causal_lm_loss_sum;
use llama_pro::core::{DType, KvCache, LlamaForCausalLM};

use crate::common::*;

/// Logits, every block output, the final norm, losses and KV-cache logits in f32 ≤ 1e-4.
pub fn parity_on<B: burn::tensor::backend::Backend>(device: &B::Device) {
    parity_within::<B>(device, 1e-4)
}

/// [`parity_on`] with activations within `tol` (losses within `tol / 10`).
pub fn parity_within<B: burn::tensor::backend::Backend>(device: &B::Device, tol: f32) {
    for name in MODELS {
        let golden = Golden::open(name);
        let (model, _) =
            LlamaForCausalLM::<B>::from_pretrained(model_dir(name), device, Some(DType::F32))
                .unwrap();
        let ids = golden.ids::<B>("input_ids", device);
        let out = model.forward_with_hidden(ids.clone());
        // bf16 checkpoints: transformers computed `logits_f32` with the same weights upcast.
        let logits_key = if golden.has("logits_f32") {
            "logits_f32"
        } else {
            "logits"
        };
        assert_close(name, out.logits.clone(), &golden, logits_key, tol);
        if logits_key == "logits" {
            for (i, h) in out.layer_outputs.into_iter().enumerate() {
                assert_close(name, h, &golden, &format!("layer_{i}"), tol);
            }
            assert_close(name, out.final_hidden, &golden, "final_hidden", tol);

            // Loss with labels = input_ids.
            let mask = burn::tensor::Tensor::<B, 2>::ones(ids.dims(), device);
            let (s, c) = causal_lm_loss_sum(out.logits.clone(), ids.clone(), mask);
            let loss = to_vec(s).0[0] / to_vec(c).0[0];
            let want = golden.f32("loss").0[0];
            println!("{name:<28} loss ours {loss:.7} transformers {want:.7}");
            assert!(
                (loss - want).abs() <= tol / 10.0,
                "{name}: loss {loss} vs {want}"
            );

            // Right-padded batch: pad positions ignored as labels -100.
            let pids = golden.ids::<B>("pad_input_ids", device);
            let (m, shape) = golden.i64("pad_mask");
            let mask = burn::tensor::Tensor::<B, 2>::from_data(
                burn::tensor::TensorData::new(
                    m.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                    [shape[0], shape[1]],
                ),
                device,
            );
            let (s, c) = causal_lm_loss_sum(model.forward(pids.clone()), pids, mask);
            let loss = to_vec(s).0[0] / to_vec(c).0[0];
            let want = golden.f32("pad_loss").0[0];
            assert!(
                (loss - want).abs() <= tol / 10.0,
                "{name}: padded loss {loss} vs {want}"
            );

            // KV cache: prefix then single steps, against transformers and our full forward.
            let (all, _) = golden.i64("input_ids");
            let seq = all.len() / 2;
            let prefix = 10;
            let mut cache = KvCache::new(model.config.num_hidden_layers);
            let row: Vec<i64> = all[..seq].to_vec();
            let t = |v: Vec<i64>| {
                let n = v.len();
                burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
                    burn::tensor::TensorData::new(v, [1, n]),
                    device,
                )
            };
            let pl = model.forward_cached(t(row[..prefix].to_vec()), &mut cache);
            assert_close(name, pl, &golden, "kv_prefix_logits", tol);
            let full = model.forward(t(row.clone()));
            let mut steps = Vec::new();
            let mut worst_vs_full = 0f32;
            for p in prefix..seq {
                let l = model.forward_cached(t(vec![row[p]]), &mut cache);
                let (lv, _) = to_vec(l.clone());
                let (fv, _) = to_vec(full.clone().narrow(1, p, 1));
                worst_vs_full = worst_vs_full.max(max_abs_diff(&lv, &fv));
                steps.push(l.reshape([1, model.config.vocab_size]));
            }
            println!("{name:<28} kv-cache vs full forward max|Δ| = {worst_vs_full:.3e}");
            assert_close(
                name,
                burn::tensor::Tensor::cat(steps, 0),
                &golden,
                "kv_step_logits",
                tol,
            );
            assert!(
                worst_vs_full <= tol / 10.0,
                "{name}: KV-cache logits differ from the full forward by {worst_vs_full}"
            );
        }
    }
}

#[test]
fn parity_with_transformers_f32_cpu() {
    parity_on::<Cpu>(&Default::default());
}

/// bf16 checkpoint computed in bf16: the same function up to bf16 rounding (transformers' eager
/// attention does its softmax in f32, ours in bf16), so the bound is loose but would still catch
/// a wrong operation (logits are O(1) here).
#[test]
fn parity_with_transformers_bf16_compute() {
    let device = Default::default();
    let name = "llama3-gqa-headdim-bf16";
    let golden = Golden::open(name);
    let (model, _) =
        LlamaForCausalLM::<Cpu>::from_pretrained(model_dir(name), &device, Some(DType::BF16))
            .unwrap();
    assert_eq!(model.dtype(), DType::BF16);
    let logits = model.forward(golden.ids::<Cpu>("input_ids", &device));
    let d = assert_close(name, logits.clone(), &golden, "logits", 0.1);
    let (l, _) = to_vec(logits);
    let scale = l.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("bf16 logits: max|Δ| {d:.3e} for max|logit| {scale:.2}");
}

/// Runs the same parity test on wgpu when built with `--features wgpu` and an adapter exists
/// (opt in with LLAMA_PRO_TEST_WGPU=1: on a CPU-only machine the software adapter takes minutes).
#[cfg(feature = "wgpu")]
#[test]
fn parity_with_transformers_f32_wgpu() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    parity_on::<llama_pro::core::device::WgpuBackend>(&Default::default());
}

#[cfg(feature = "cuda")]
#[test]
fn parity_with_transformers_f32_cuda() {
    if std::env::var("LLAMA_PRO_TEST_CUDA").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_CUDA=1 to run on CUDA");
        return;
    }
    parity_on::<burn::backend::Cuda>(&Default::default());
}

#[test]
fn tokenizer_matches_transformers() {
    let dir = fixtures().join("tokenizer");
    let tok = llama_pro::core::Tokenizer::from_dir(&dir, Some(1), &[2]).unwrap();
    assert!(assert_tokenizer_cases(&tok, &fixtures().join("tokenizer_cases.json")) >= 5);
    // EOS comes from tokenizer_config.json when neither generation nor model config give it.
    let t2 = llama_pro::core::Tokenizer::from_dir(&dir, None, &[]).unwrap();
    assert_eq!(t2.eos_token_ids, vec![2]);
}

/// Identities that do not need transformers: RMSNorm of a constant row is the weight.
#[test]
fn rmsnorm_of_constant_rows_is_the_weight() {
    use llama_pro::core::norm::RmsNormConfig;
    use llama_pro::core::weights::RandomInit;
    let device = Default::default();
    let mut src = RandomInit::<Cpu>::new(&device, DType::F32, 0);
    let norm = RmsNormConfig { size: 8, eps: 0.0 }
        .load("n", &mut src)
        .unwrap();
    let x = burn::tensor::Tensor::<Cpu, 2>::full([3, 8], 2.5, &device);
    let (y, _) = to_vec(norm.forward(x));
    assert!(y.iter().all(|v| (v - 1.0).abs() < 1e-6), "{y:?}");
}

/// Building blocks of the cached path on wgpu against the CPU backend: concatenation of strided
/// views, attention with one query, reading back narrowed views, single-row linear layers.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_cached_attention_pieces_match_cpu() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Tensor, TensorData};
    type W = llama_pro::core::device::WgpuBackend;
    let dw = Default::default();
    let dc = Default::default();
    let data = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    };
    let (b, h, s, d) = (1, 4, 10, 16);
    // K as the model makes it: [b, s, h, d] reshaped from a projection, swapped to [b, h, s, d].
    let mk = |n: usize, seed| {
        let v = data(b * n * h * d, seed);
        (
            Tensor::<W, 4>::from_data(TensorData::new(v.clone(), [b, n, h, d]), &dw)
                .swap_dims(1, 2),
            Tensor::<Cpu, 4>::from_data(TensorData::new(v, [b, n, h, d]), &dc).swap_dims(1, 2),
        )
    };
    let (kw0, kc0) = mk(s, 1);
    let (kw1, kc1) = mk(1, 2);
    let catw = Tensor::cat(vec![kw0.clone(), kw1.clone()], 2);
    let catc = Tensor::cat(vec![kc0.clone(), kc1.clone()], 2);
    let d_cat = max_abs_diff(&to_vec(catw.clone()).0, &to_vec(catc.clone()).0);
    println!("cat of strided views: max|Δ| wgpu vs cpu = {d_cat:.3e}");
    let (qw, qc) = mk(1, 3);
    let (vw0, vc0) = mk(s + 1, 4);
    let opts = |c| AttentionModuleOptions {
        scale: Some(0.25),
        softcap: None,
        is_causal: c,
    };
    let aw = attention(
        qw.clone(),
        catw.clone(),
        vw0.clone(),
        None,
        None,
        opts(false),
    );
    let ac = attention(
        qc.clone(),
        catc.clone(),
        vc0.clone(),
        None,
        None,
        opts(false),
    );
    let d_att = max_abs_diff(&to_vec(aw).0, &to_vec(ac).0);
    println!(
        "attention, 1 query x {} keys: max|Δ| wgpu vs cpu = {d_att:.3e}",
        s + 1
    );
    // The same with contiguous K (materialised from host data).
    let kwc = Tensor::<W, 4>::from_data(catc.clone().into_data(), &dw);
    let aw2 = attention(qw, kwc, vw0, None, None, opts(false));
    let d_att2 = max_abs_diff(
        &to_vec(aw2).0,
        &to_vec(attention(qc, catc, vc0, None, None, opts(false))).0,
    );
    println!("attention with contiguous K: max|Δ| = {d_att2:.3e}");
    // Reading back a narrowed view of a [1, 16, 64] tensor, and a 1-row linear with a transposed weight.
    let v = data(16 * 64, 5);
    let tw = Tensor::<W, 3>::from_data(TensorData::new(v.clone(), [1, 16, 64]), &dw);
    let tc = Tensor::<Cpu, 3>::from_data(TensorData::new(v, [1, 16, 64]), &dc);
    let d_narrow = (0..16)
        .map(|p| {
            max_abs_diff(
                &to_vec(tw.clone().narrow(1, p, 1)).0,
                &to_vec(tc.clone().narrow(1, p, 1)).0,
            )
        })
        .fold(0f32, f32::max);
    println!("narrow(1, p, 1) read back: max|Δ| = {d_narrow:.3e}");
    let wv = data(32 * 64, 6);
    let ww = Tensor::<W, 2>::from_data(TensorData::new(wv.clone(), [32, 64]), &dw);
    let wc = Tensor::<Cpu, 2>::from_data(TensorData::new(wv, [32, 64]), &dc);
    let lin = |m: usize| {
        let x = data(m * 64, 7);
        let yw = burn::tensor::module::linear(
            Tensor::<W, 3>::from_data(TensorData::new(x.clone(), [1, m, 64]), &dw),
            ww.clone().transpose(),
            None,
        );
        let yc = burn::tensor::module::linear(
            Tensor::<Cpu, 3>::from_data(TensorData::new(x, [1, m, 64]), &dc),
            wc.clone().transpose(),
            None,
        );
        max_abs_diff(&to_vec(yw).0, &to_vec(yc).0)
    };
    let (d_lin1, d_lin10) = (lin(1), lin(10));
    println!("linear with transposed weight: 1 row max|Δ| = {d_lin1:.3e}, 10 rows {d_lin10:.3e}");
    assert!(
        d_cat < 1e-6
            && d_att < 1e-5
            && d_att2 < 1e-5
            && d_narrow == 0.0
            && d_lin1 < 1e-4
            && d_lin10 < 1e-4
    );
}

/// The KV cache itself on wgpu vs CPU after a prefix and after one more step (this caught burn's
/// fusion bug at a single position; see `device::WgpuBackend`).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_kv_cache_contents_match_cpu() {
    if std::env::var("LLAMA_PRO_TEST_WGPU").is_err() {
        eprintln!("skipped: set LLAMA_PRO_TEST_WGPU=1 to run on wgpu");
        return;
    }
    use burn::tensor::{Int, Tensor, TensorData};
    use llama_pro::core::{DType, KvCache, LlamaForCausalLM};
    type W = llama_pro::core::device::WgpuBackend;
    let (dw, dc) = (Default::default(), Default::default());
    let name = "llama-mha-f32";
    let (mw, _) =
        LlamaForCausalLM::<W>::from_pretrained(model_dir(name), &dw, Some(DType::F32)).unwrap();
    let (mc, _) =
        LlamaForCausalLM::<Cpu>::from_pretrained(model_dir(name), &dc, Some(DType::F32)).unwrap();
    let (all, _) = Golden::open(name).i64("input_ids");
    let (mut cw, mut cc) = (KvCache::<W>::new(4), KvCache::<Cpu>::new(4));
    let lw = mw.forward_cached(
        Tensor::<W, 2, Int>::from_data(TensorData::new(all[..10].to_vec(), [1, 10]), &dw),
        &mut cw,
    );
    let lc = mc.forward_cached(
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(all[..10].to_vec(), [1, 10]), &dc),
        &mut cc,
    );
    println!(
        "prefix logits: max|Δ| = {:.3e}",
        max_abs_diff(&to_vec(lw).0, &to_vec(lc).0)
    );
    let cache_diff = |cw: &KvCache<W>, cc: &KvCache<Cpu>| -> f32 {
        cw.layers
            .iter()
            .zip(&cc.layers)
            .map(|(a, b)| {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                max_abs_diff(&to_vec(a.k.clone()).0, &to_vec(b.k.clone()).0)
                    .max(max_abs_diff(&to_vec(a.v.clone()).0, &to_vec(b.v.clone()).0))
            })
            .fold(0f32, f32::max)
    };
    let d0 = cache_diff(&cw, &cc);
    println!("cache after prefix: max|Δ| = {d0:.3e}");
    let sw = mw.forward_cached(
        Tensor::<W, 2, Int>::from_data(TensorData::new(vec![all[10]], [1, 1]), &dw),
        &mut cw,
    );
    let sc = mc.forward_cached(
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![all[10]], [1, 1]), &dc),
        &mut cc,
    );
    let d1 = max_abs_diff(&to_vec(sw).0, &to_vec(sc).0);
    println!(
        "step logits: max|Δ| = {d1:.3e}; cache after step: max|Δ| = {:.3e}",
        cache_diff(&cw, &cc)
    );
    // Same step without any cache: full forward over 11 tokens, last position.
    let fw = mw.forward(Tensor::<W, 2, Int>::from_data(
        TensorData::new(all[..11].to_vec(), [1, 11]),
        &dw,
    ));
    let fc = mc.forward(Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(all[..11].to_vec(), [1, 11]),
        &dc,
    ));
    println!(
        "full 11-token forward: max|Δ| = {:.3e}",
        max_abs_diff(&to_vec(fw).0, &to_vec(fc).0)
    );
    assert!(d0 < 1e-5 && d1 < 1e-4);
}
