//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to `min_lr`.
//!
//! Written by hand because burn 0.21 has no warmup-then-cosine in one scheduler and the formula is
//! a few lines: with `w` warmup steps and `T` total steps, step `t` (0-based) gets
//! `lr · (t + 1) / w` while `t < w` (transformers' `get_cosine_schedule_with_warmup` uses `t / w`,
//! which wastes the first step on lr = 0), then for `p = (t − w) / max(1, T − w)`:
//! constant `lr`; linear `min + (lr − min)(1 − p)`; cosine `min + (lr − min)(1 + cos πp) / 2`.

use serde::{Deserialize, Serialize};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Constant after warmup.
    Constant,
    /// Linear decay to `min_lr`.
    Linear,
    /// Cosine decay to `min_lr` (the paper).
    Cosine,
}

impl ScheduleKind {
    /// Every kind, as the help lists them.
    pub const ALL: [ScheduleKind; 3] = [Self::Constant, Self::Linear, Self::Cosine];

    /// The name in configuration files and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        }
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = crate::TrainError;
    fn from_str(s: &str) -> crate::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                crate::TrainError::setting(
                    "lr_schedule",
                    format!("{s:?}: expected constant, linear or cosine"),
                )
            })
    }
}

/// A learning-rate schedule over a fixed number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Total optimizer steps.
    pub total_steps: usize,
    /// Decay shape.
    pub kind: ScheduleKind,
}

impl Schedule {
    /// Learning rate of optimizer step `t` (0-based).
    pub fn lr(&self, t: usize) -> f64 {
        if t < self.warmup_steps {
            return self.lr * (t + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((t - self.warmup_steps) as f64 / span as f64).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.min_lr + (self.lr - self.min_lr) * (1.0 - p),
            ScheduleKind::Cosine => {
                self.min_lr
                    + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}
