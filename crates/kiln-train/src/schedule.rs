//! Learning-rate schedule: linear warm-up, then cosine decay to a floor.
//!
//!   lr(s) = lr · s / warmup                                   for s ≤ warmup
//!   lr(s) = min + (lr − min) · ½(1 + cos(π · (s − warmup) / (total − warmup)))   after

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The schedule of a run's `[train]` section over `steps_per_epoch` (used when the run
    /// gives `epochs` rather than `steps`).
    pub fn for_run(t: &crate::config::TrainSection, steps_per_epoch: u64) -> Self {
        let total_steps = t.steps.unwrap_or_else(|| t.epochs.unwrap_or(1) * steps_per_epoch.max(1));
        Self { lr: t.lr, min_lr: t.min_lr, warmup_steps: t.warmup_steps, total_steps }
    }

    /// Learning rate of the 1-based optimizer step `step`.
    pub fn lr(&self, step: u64) -> f32 {
        if step <= self.warmup_steps && self.warmup_steps > 0 {
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * cosine) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        let s = Schedule { lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 14 };
        assert_eq!(s.lr(1), 0.25);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.55).abs() < 1e-6, "{}", s.lr(9));
        assert!((s.lr(14) - 0.1).abs() < 1e-6);
        assert!(s.lr(6) < s.lr(5));
    }
}
