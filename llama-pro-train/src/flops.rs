//! Model FLOPs of a training step and an estimate of the device's peak, for the MFU a run
//! prints (model FLOPs utilisation, as PaLM defines it: the FLOPs the model needs, not the ones
//! a kernel happens to execute, over the hardware's peak).

use llama_pro_core::LlamaConfig;

/// FLOPs per trained token of one optimizer step.
///
/// Matmuls count 2 FLOPs per multiply-add. Forward: every linear layer (2 × its parameters) and
/// attention (QKᵀ and AV over the full window, 4 · H · hd · s per layer, PaLM's convention).
/// Backward: activation gradients (2 × parameters, 8 · H · hd · s for attention) only from the
/// top down to the lowest block with a trainable parameter (burn builds no graph below it), and
/// weight gradients (2 ×) only for trainable parameters. With everything trainable this is
/// PaLM's 6N + 12 · L · H · hd · s.
///
/// `lowest_trainable_layer`: the lowest block with a trainable parameter (`None`: only the final
/// norm/head, or embeddings, train); `trainable_matmul_params`: trainable parameters that are
/// matmul weights (embedding rows are a lookup: no FLOPs).
pub fn train_flops_per_token(
    c: &LlamaConfig,
    seq_len: usize,
    lowest_trainable_layer: Option<usize>,
    embeddings_train: bool,
    trainable_matmul_params: usize,
) -> f64 {
    let (d, f, l) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers,
    );
    let hd = c.head_dim as f64;
    let (h, kv) = (c.num_attention_heads as f64, c.num_key_value_heads as f64);
    let layer = d * h * hd + 2.0 * d * kv * hd + h * hd * d + 3.0 * d * f;
    let head = c.vocab_size as f64 * d;
    let attn = 4.0 * h * hd * seq_len as f64;
    let forward = 2.0 * (l as f64 * layer + head) + l as f64 * attn;
    // Backward through the blocks from the top down to the lowest trainable one (all of them
    // when the embeddings train).
    let through = if embeddings_train {
        l
    } else {
        lowest_trainable_layer.map_or(0, |m| l - m)
    };
    let backward_act = 2.0 * (through as f64 * layer + head) + 2.0 * through as f64 * attn;
    let backward_w = 2.0 * trainable_matmul_params as f64;
    forward + backward_act + backward_w
}

/// Peak f32 FLOP/s of this machine's CPU, estimated from `/proc/cpuinfo` (Linux): threads ×
/// clock × f32 FLOPs per cycle (32 for AVX2+FMA and AMD's AVX-512, 64 for Intel's AVX-512, 8
/// otherwise), with a description. `None` where it cannot be read.
pub fn cpu_peak_flops() -> Option<(f64, String)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let mhz: f64 = field("cpu MHz")?.parse().ok()?;
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let amd = field("vendor_id").is_some_and(|v| v.contains("AMD"));
    let per_cycle = if has("avx512f") && !amd {
        64.0
    } else if has("avx2") && has("fma") || has("avx512f") {
        32.0
    } else {
        8.0
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let peak = threads * mhz * 1e6 * per_cycle;
    Some((
        peak,
        format!(
            "{} threads x {:.2} GHz x {per_cycle} f32 FLOP/cycle ({})",
            threads,
            mhz / 1000.0,
            field("model name").unwrap_or_else(|| "cpu".into())
        ),
    ))
}
