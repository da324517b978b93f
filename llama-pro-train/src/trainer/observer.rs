//! What a run tells the outside world while it goes: one [`Event`] type, one [`Observer`] trait.
//!
//! The trainer and the data loader never print. The command line renders events as a progress bar
//! and log lines; [`MetricsLog`](super::MetricsLog) writes them to `metrics.jsonl`; the loss plot
//! (feature `plot`) redraws `loss.png`; a program that embeds training passes a closure.

use std::collections::BTreeMap;
use std::path::Path;

use crate::eval::EvalResult;

use super::{StepMetrics, TrainReport};

/// Something that happened in a run.
#[derive(Debug)]
pub enum Event<'a> {
    /// A line of information: what was loaded, which parameters train, what was held out.
    Info(&'a str),
    /// Something the user should know; the run goes on.
    Warning(&'a str),
    /// A new part of a longer job begins (the demo: one training run per method).
    Phase(&'a str),
    /// Tokenizing a data file (before its tokens are cached): documents done of `total`.
    Tokenizing {
        /// The file.
        path: &'a Path,
        /// Documents tokenized so far.
        done: usize,
        /// Documents in the file.
        total: usize,
    },
    /// The run is set up and about to train from `step` (0, or the step a resumed run continues
    /// from) to `total_steps`.
    Start {
        /// Optimizer steps already done.
        step: usize,
        /// Optimizer steps of the whole run.
        total_steps: usize,
        /// Model FLOPs per trained token (for an MFU from a step's tokens per second).
        flops_per_token: f64,
        /// The device's peak FLOP/s, when known.
        peak_flops: Option<f64>,
    },
    /// An optimizer step finished.
    Step(&'a StepMetrics),
    /// Every evaluation set was evaluated after `step` optimizer steps.
    Eval {
        /// Optimizer steps done.
        step: usize,
        /// Loss per set.
        results: &'a BTreeMap<String, EvalResult>,
    },
    /// A checkpoint of `step` was written to `dir`.
    Checkpoint {
        /// Optimizer steps done.
        step: usize,
        /// The checkpoint directory.
        dir: &'a Path,
    },
    /// The run ended: finished and exported, or interrupted after its checkpoint.
    End(&'a TrainReport),
}

/// Receives a run's events.
pub trait Observer {
    /// Called for every event, in order.
    fn on_event(&mut self, event: &Event<'_>);
}

impl<F: FnMut(&Event<'_>)> Observer for F {
    fn on_event(&mut self, event: &Event<'_>) {
        self(event)
    }
}

/// An observer that ignores everything.
pub fn silent() -> impl Observer {
    |_: &Event<'_>| {}
}

/// Several observers, each seeing every event in turn.
#[derive(Default)]
pub struct Observers<'a>(Vec<&'a mut dyn Observer>);

impl<'a> Observers<'a> {
    /// No observer yet.
    pub fn new() -> Self {
        Self(Vec::new())
    }
    /// Add one.
    pub fn push(&mut self, o: &'a mut dyn Observer) {
        self.0.push(o);
    }
}

impl Observer for Observers<'_> {
    fn on_event(&mut self, event: &Event<'_>) {
        for o in &mut self.0 {
            o.on_event(event);
        }
    }
}
