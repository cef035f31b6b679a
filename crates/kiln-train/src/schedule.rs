//! Learning-rate schedules as transformers defines them (`get_scheduler`), evaluated, as its
//! `LambdaLR` does, at `s`, the count of optimizer steps already taken (0 for the first step):
//! with W warm-up steps and T steps in all,
//!
//!   warm-up (s < W):       lr · s / W            (every schedule but `constant`)
//!   constant:              lr
//!   linear:                lr · max(0, (T − s) / (T − W))
//!   cosine:                lr · ½(1 + cos(π · p)),   p = (s − W) / (T − W)
//!   cosine_with_min_lr:    min + (lr − min) · ½(1 + cos(π · p))

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithMinLr,
}

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The schedule of a run's `[train]` section over `steps_per_epoch` (used when the run
    /// gives `epochs` rather than `steps`); `warmup_ratio`, when given, sets the warm-up to
    /// ⌈ratio · total⌉ steps, as transformers does.
    pub fn for_run(t: &crate::config::TrainSection, steps_per_epoch: u64) -> Self {
        let total_steps = t.steps.unwrap_or_else(|| t.epochs.unwrap_or(1) * steps_per_epoch.max(1));
        let warmup_steps = match t.warmup_ratio {
            Some(ratio) => (ratio * total_steps as f64).ceil() as u64,
            None => t.warmup_steps,
        };
        Self { kind: t.lr_schedule, lr: t.lr, min_lr: t.min_lr, warmup_steps, total_steps }
    }

    /// Learning rate of the optimizer step taken after `done` steps.
    pub fn lr(&self, done: u64) -> f32 {
        let (s, w, t) = (done as f64, self.warmup_steps as f64, self.total_steps as f64);
        let (lr, min) = (self.lr as f64, self.min_lr as f64);
        if self.kind != ScheduleKind::Constant && s < w {
            return (lr * s / w.max(1.0)) as f32;
        }
        let progress = (s - w) / (t - w).max(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let rate = match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => lr,
            ScheduleKind::Linear => lr * ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => lr * cosine.max(0.0),
            ScheduleKind::CosineWithMinLr => min + (lr - min) * cosine.max(0.0),
        };
        rate as f32
    }
}
