//! Runs on the terminal: a progress bar and log lines, drawn from the trainer's events.

use indicatif::{ProgressBar, ProgressStyle};
use llama_pro::train::trainer::{Event, Observer, forgetting_table};

/// A bar of `len` items (hidden when `hidden`), e.g. `eval [=====>   ] 12/40 sequences`.
pub fn bar(len: u64, prefix: &str, unit: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{eta}})");
    bar.set_style(style(&template));
    bar.set_prefix(prefix.to_string());
    bar
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `llama-pro train` on the terminal: set-up lines, a tokenization bar, the training bar with the
/// latest loss, a log line every `log_every` steps, evaluations, the final table.
pub struct TrainProgress {
    log_every: usize,
    bar: ProgressBar,
    tokenize: Option<ProgressBar>,
    total_steps: usize,
    mfu: Option<(f64, f64)>,
}

impl TrainProgress {
    /// Log a line every `log_every` steps (0: none).
    pub fn new(log_every: usize) -> Self {
        Self {
            log_every,
            bar: ProgressBar::hidden(),
            tokenize: None,
            total_steps: 0,
            mfu: None,
        }
    }

    fn say(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }
}

impl Observer for TrainProgress {
    fn on_event(&mut self, event: &Event<'_>) {
        match event {
            Event::Info(s) | Event::Phase(s) => self.say(s),
            Event::Warning(s) => self.say(&format!("warning: {s}")),
            Event::Tokenizing { path, done, total } => {
                let b = self.tokenize.get_or_insert_with(|| {
                    let b = ProgressBar::new(*total as u64);
                    b.set_style(style(
                        "tokenize [{bar:30}] {pos}/{len} documents ({elapsed}, eta {eta}) {msg}",
                    ));
                    b
                });
                b.set_length(*total as u64);
                b.set_position(*done as u64);
                b.set_message(path.display().to_string());
                if done == total {
                    b.finish_and_clear();
                    self.tokenize = None;
                }
            }
            Event::Start {
                step,
                total_steps,
                flops_per_token,
                peak_flops,
            } => {
                self.total_steps = *total_steps;
                self.mfu = peak_flops.map(|p| (*flops_per_token, p));
                self.bar = ProgressBar::new(*total_steps as u64);
                self.bar
                    .set_style(style("train [{bar:30}] {pos}/{len} {msg} ({eta})"));
                self.bar.set_position(*step as u64);
            }
            Event::Step(m) => {
                self.bar.set_message(format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s",
                    m.loss, m.lr, m.tokens_per_sec
                ));
                self.bar.inc(1);
                if self.log_every > 0 && m.step % self.log_every == 0 {
                    let gn: Vec<String> = m
                        .group_grad_norms
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.3}"))
                        .collect();
                    let mfu = self
                        .mfu
                        .map(|(f, p)| format!("  MFU {:.1}%", 100.0 * m.tokens_per_sec * f / p))
                        .unwrap_or_default();
                    self.say(&format!(
                        "step {:>6}  loss {:.4}  lr {:.3e}  grad-norm {:.3} [{}]  {:.0} tok/s{mfu}",
                        m.step,
                        m.loss,
                        m.lr,
                        m.grad_norm,
                        gn.join(", "),
                        m.tokens_per_sec
                    ));
                }
            }
            Event::Eval { step, results } => {
                for (k, v) in results.iter() {
                    let when = match *step {
                        0 => "eval before ".to_string(),
                        s if s == self.total_steps => continue,
                        s => format!("eval step {s} "),
                    };
                    self.say(&format!(
                        "{when} {k}: loss {:.4}  ppl {:.2}",
                        v.loss, v.perplexity
                    ));
                }
            }
            Event::Checkpoint { .. } => {}
            Event::End(r) => {
                if r.interrupted {
                    self.bar.abandon_with_message(format!(
                        "interrupted: checkpoint written at step {}",
                        r.steps
                    ));
                } else {
                    self.bar.finish_and_clear();
                    eprintln!("\n{}", forgetting_table(r));
                    if let Some(d) = &r.model_dir {
                        eprintln!("model written to {}", d.display());
                    }
                }
            }
        }
    }
}

/// `llama-pro demo` on the terminal: one bar over every method's steps, with the method as
/// prefix and the latest loss; the demo's own lines above it.
pub struct DemoProgress {
    bar: ProgressBar,
}

impl DemoProgress {
    /// A bar of `total_steps` (all methods).
    pub fn new(total_steps: usize) -> Self {
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(style(
            "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        ));
        Self { bar }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Observer for DemoProgress {
    fn on_event(&mut self, event: &Event<'_>) {
        match event {
            Event::Phase(name) => self.bar.set_prefix(name.to_string()),
            Event::Info(s) => self.bar.suspend(|| eprintln!("{s}")),
            Event::Warning(s) => self.bar.suspend(|| eprintln!("warning: {s}")),
            Event::Step(m) => {
                self.bar.inc(1);
                self.bar.set_message(format!("loss {:.3}", m.loss));
            }
            _ => {}
        }
    }
}
