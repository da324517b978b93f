//! LLaMA Pro step by step, with the trainer driven by hand: load a HuggingFace model, expand it
//! in memory with identity blocks, check that it still computes the same function, train only
//! the new blocks on a domain text with `Trainer::step`, evaluate, export.
//!
//!     cargo run --release --example train_loop [MODEL_DIR] [DOMAIN.txt]
//!
//! Defaults to the small model shipped in `tests/fixtures` and `examples/data/code.txt`.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use llama_pro::core::burn::backend::{Autodiff, Flex};
use llama_pro::core::expand::{CONFIG_KEY, ExpansionPlan, expand_model, verify_identity};
use llama_pro::core::{DType, LlamaForCausalLM};
use llama_pro::train::config::{DataSource, EvalSet, TrainConfig};
use llama_pro::train::trainer::{TrainData, TrainModel, Trainer, silent};

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

    // 1. Load a HuggingFace checkpoint.
    let (base, mut hf) =
        LlamaForCausalLM::<B>::from_pretrained(&model_dir, &device, Some(DType::F32))
            .with_context(|| format!("loading {}", model_dir.display()))?;
    println!(
        "{}: {} layers, {} parameters",
        model_dir.display(),
        hf.config.num_hidden_layers,
        base.num_parameters()
    );

    // 2. Expand: interleaved, one zero-initialised copy after every group of 2 blocks.
    let plan = ExpansionPlan::Interleaved {
        groups: 2,
        copies: 1,
    };
    let (model, map) = expand_model(base.clone(), &plan, None)?;
    println!("expanded with {plan}: layers {}", map.compact());

    // 3. The expanded model computes exactly what the original did.
    let delta = verify_identity(&base, &model)?;
    println!("identity check: max |Δlogits| = {delta}");
    ensure!(delta == 0.0, "expansion is not the identity");

    // 4. Train only the new blocks (the default `method`: the originals are frozen, no gradient,
    //    no optimizer state), evaluating on the training text itself.
    let out = std::env::temp_dir().join("llama-pro-train-loop");
    let config = TrainConfig {
        model: model_dir.clone(),
        data: vec![DataSource::new(&data)],
        eval: vec![EvalSet {
            name: "domain".into(),
            path: data.clone(),
        }],
        output: out.clone(),
        max_steps: Some(30),
        batch_size: 8,
        seq_len: 64,
        lr: 3e-3,
        token_cache: false,
        overwrite: true, // replace the previous run of this example
        ..Default::default()
    };
    let layers = hf.config.num_hidden_layers;
    hf.config = model.config.clone();
    hf.raw.insert(
        CONFIG_KEY.into(),
        map.to_config_value(&plan.to_string(), layers),
    );
    let model = TrainModel::new(&config, model, hf, map, &model_dir, &mut silent())?;
    println!("{}", model.info.summary);
    let data = TrainData::load(&config, &model, &mut silent())?;
    let mut trainer = Trainer::<B>::new(config, model, data)?;
    let before = trainer.evaluate()?["domain"].loss;
    while !trainer.is_done() {
        let m = trainer.step()?;
        if m.step % 10 == 0 {
            println!("step {:>3}  loss {:.4}  lr {:.2e}", m.step, m.loss, m.lr);
        }
    }

    // 5. Save, evaluate and export a HuggingFace directory that transformers loads.
    let report = trainer.finish()?;
    let after = report.eval_after["domain"].loss;
    println!("domain loss: {before:.4} -> {after:.4} after 30 steps on the new blocks only");
    ensure!(after < before, "the new blocks did not learn");
    println!("exported to {}", out.join("model").display());
    Ok(())
}
