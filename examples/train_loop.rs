//! LLaMA Pro in a few lines: load a HuggingFace model, expand it with identity blocks, check that
//! it still computes the same function, train only the new blocks on a domain text, and export.
//!
//!     cargo run --release --example train_loop [MODEL_DIR] [DOMAIN.txt]
//!
//! Defaults to the small model shipped in `tests/fixtures` and `examples/data/code.txt`.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use llama_pro::core::burn::backend::{Autodiff, Flex};
use llama_pro::core::burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use llama_pro::core::expand::{ExpansionPlan, LayerMap, expand_model};
use llama_pro::core::freeze::{Selection, set_trainable};
use llama_pro::core::save::{SaveOptions, save_pretrained};
use llama_pro::core::{DType, LlamaForCausalLM, Tokenizer};
use llama_pro::train::data::read_sequences;
use llama_pro::train::eval::{evaluate, pad_batch};

type B = Autodiff<Flex>;

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().collect();
    let model_dir = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or(root.join("tests/fixtures/models/llama-mha-f32"));
    let data = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or(root.join("examples/data/code.txt"));
    let device = Default::default();

    // 1. Load a HuggingFace checkpoint and its tokenizer.
    let (base, hf) = LlamaForCausalLM::<B>::from_pretrained(&model_dir, &device, Some(DType::F32))
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let tok = Tokenizer::from_dir(&model_dir, hf.config.bos_token_id, &hf.config.eos_token_ids)?;
    let seqs = read_sequences(&data, Some(&tok), hf.config.vocab_size, 64)?;
    println!(
        "{}: {} layers, {} parameters; {} training sequences",
        model_dir.display(),
        hf.config.num_hidden_layers,
        base.num_parameters(),
        seqs.len()
    );

    // 2. Expand: interleaved, one zero-initialised copy after every group of 2 blocks.
    let plan = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    };
    let (model, map): (_, LayerMap) = expand_model(base.clone(), &plan, None)?;
    println!("expanded with {plan}: layers {}", map.compact());

    // 3. The expanded model computes exactly what the original did.
    let (ids, _) = pad_batch::<B>(&seqs[..4], &device);
    let delta = (base.forward(ids.clone()) - model.forward(ids))
        .abs()
        .max()
        .into_scalar();
    println!("identity check: max |Δlogits| = {delta}");
    ensure!(delta == 0.0, "expansion is not the identity");

    // 4. Train only the new blocks (the originals are frozen: no gradient, no optimizer state).
    let (mut model, summary) = set_trainable(model, &Selection::parse("expanded")?, &map)?;
    println!("{summary}");
    let before = evaluate(&model, &seqs, 16, &device, |_| {})?;
    let mut optim = AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init();
    for step in 0..30 {
        let batch = &seqs[(step * 8) % seqs.len()..][..8.min(seqs.len() - (step * 8) % seqs.len())];
        let (ids, mask) = pad_batch::<B>(batch, &device);
        let (sum, count) =
            llama_pro::core::model::causal_lm_loss_sum(model.forward(ids.clone()), ids, mask);
        let loss = sum / count;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let after = evaluate(&model, &seqs, 16, &device, |_| {})?;
    println!(
        "domain loss: {:.4} -> {:.4} after 30 steps on the new blocks only",
        before.loss, after.loss
    );
    ensure!(after.loss < before.loss, "the new blocks did not learn");

    // 5. Export a HuggingFace directory that transformers loads.
    let out = std::env::temp_dir().join("llama-pro-train-loop");
    let mut hf_out = hf.clone();
    hf_out.raw.insert(
        llama_pro::core::expand::CONFIG_KEY.into(),
        map.to_config_value(&plan.to_string(), hf.config.num_hidden_layers),
    );
    save_pretrained(
        &model,
        &hf_out,
        Some(&model_dir),
        &out,
        &SaveOptions {
            overwrite: true,
            ..Default::default()
        },
    )?;
    println!("exported to {}", out.display());
    Ok(())
}
