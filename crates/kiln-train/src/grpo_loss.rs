//! GRPO's advantages and clipped policy loss with its variants, as TRL's GRPOTrainer defines
//! them, with the gradient in every completion token's log-prob.
//!
//! Advantages of a group of completions of one prompt with rewards r:
//!   A = r − mean_group(r), divided by (std_group(r) + 1e-4) (`group`), by the std of the whole
//!   batch plus 1e-4 (`batch`), or not at all (`none`); std is the unbiased estimate.
//!
//! Per completion token t with log-probs l (policy), o (the policy that sampled), ρ (reference):
//!   log w = l_t − o_t (token level) or mean_t(l_t − o_t) (sequence level, GSPO)
//!   c = e^{log w},  ℓ_t = −min(c·A, clip(c, 1 − ε_low, 1 + ε_high)·A) + β·k3_t
//!   k3_t = e^{ρ_t − l_t} − (ρ_t − l_t) − 1   (the KL estimator of DeepSeekMath)
//! aggregated as TRL does over a step of M micro-batches (over all ranks; TRL's gradient
//! accumulation steps times processes), each micro-batch's share being
//!   grpo:    mean over its completions of (Σ_t ℓ_t / length), / M
//!   bnpo:    Σ ℓ / (its completion tokens), / M
//!   dr_grpo: Σ ℓ / (its completions · max_completion_length), / M
//!   dapo:    Σ ℓ / (completion tokens of the whole step, `num_items`)
//! The clipped branch carries no gradient; ∂c/∂l = c.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportanceLevel {
    Token,
    Sequence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

/// TRL's epsilon in the reward standard deviation.
const STD_EPS: f64 = 1e-4;

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = if x.len() > 1 { x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Advantages of `rewards`, laid out as consecutive groups of `group_size` completions.
pub fn advantages(rewards: &[f64], group_size: usize, scale: ScaleRewards) -> Vec<f64> {
    assert!(group_size > 0 && rewards.len().is_multiple_of(group_size), "rewards must fill whole groups");
    let batch_std = mean_std(rewards).1;
    rewards
        .chunks(group_size)
        .flat_map(|group| {
            let (mean, std) = mean_std(group);
            group.iter().map(move |r| match scale {
                ScaleRewards::Group => (r - mean) / (std + STD_EPS),
                ScaleRewards::Batch => (r - mean) / (batch_std + STD_EPS),
                ScaleRewards::None => r - mean,
            })
        })
        .collect()
}

/// Whether every completion of a group got the same reward (DAPO's dynamic sampling drops
/// such groups: their advantages are all zero).
pub fn group_is_flat(rewards: &[f64]) -> bool {
    rewards.windows(2).all(|w| w[0] == w[1])
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyLossParams {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// KL weight; 0: no reference model.
    pub beta: f64,
    pub aggregation: Aggregation,
    pub level: ImportanceLevel,
    /// For `dr_grpo`.
    pub max_completion_length: usize,
    /// For `dapo`: completion tokens of the whole step (generation batch).
    pub num_items: usize,
    /// Micro-batches in the step over all ranks; a call to `policy_loss` sees one.
    pub micro_batches: usize,
}

/// One completion's per-token log-probs (policy, sampling policy, and reference when β > 0)
/// and its advantage.
pub struct Completion<'a> {
    pub logp: &'a [f64],
    pub old_logp: &'a [f64],
    pub ref_logp: Option<&'a [f64]>,
    pub advantage: f64,
}

/// A micro-batch's share of the update's loss, ∂loss/∂logp for every token of every
/// completion, and metrics over the micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyLoss {
    pub loss: f64,
    pub dlogp: Vec<Vec<f64>>,
    /// Mean k3 over completion tokens (0 without a reference).
    pub kl: f64,
    /// Fractions of completion tokens clipped below (A < 0) and above (A > 0).
    pub clipped_low: f64,
    pub clipped_high: f64,
}

/// The policy loss of a micro-batch of completions.
pub fn policy_loss(batch: &[Completion], p: &PolicyLossParams) -> PolicyLoss {
    let tokens: usize = batch.iter().map(|c| c.logp.len()).sum();
    let (completions, m) = (batch.len().max(1) as f64, p.micro_batches.max(1) as f64);
    let weight = |len: usize| -> f64 {
        match p.aggregation {
            Aggregation::Grpo => 1.0 / (len.max(1) as f64 * completions * m),
            Aggregation::Bnpo => 1.0 / (tokens.max(1) as f64 * m),
            Aggregation::DrGrpo => 1.0 / (completions * p.max_completion_length as f64 * m),
            Aggregation::Dapo => 1.0 / p.num_items.max(1) as f64,
        }
    };
    let (mut loss, mut kl_sum, mut low, mut high) = (0.0, 0.0, 0usize, 0usize);
    let mut dlogp = Vec::with_capacity(batch.len());
    for c in batch {
        let len = c.logp.len();
        let w = weight(len);
        let a = c.advantage;
        let log_ratio: Vec<f64> = c.logp.iter().zip(c.old_logp).map(|(l, o)| l - o).collect();
        let seq_log_w = log_ratio.iter().sum::<f64>() / len.max(1) as f64;
        let mut d = vec![0.0; len];
        // Sequence level: every token's term depends on all log-probs through the mean.
        let mut seq_grad = 0.0;
        for t in 0..len {
            let log_w = match p.level {
                ImportanceLevel::Token => log_ratio[t],
                ImportanceLevel::Sequence => seq_log_w,
            };
            let coef = log_w.exp();
            let clipped = coef.clamp(1.0 - p.epsilon_low, 1.0 + p.epsilon_high);
            let (unclipped_term, clipped_term) = (coef * a, clipped * a);
            loss += w * -unclipped_term.min(clipped_term);
            if unclipped_term <= clipped_term {
                // ∂(−c·A)/∂log w = −c·A.
                match p.level {
                    ImportanceLevel::Token => d[t] += w * -coef * a,
                    ImportanceLevel::Sequence => seq_grad += w * -coef * a / len as f64,
                }
            }
            if coef < 1.0 - p.epsilon_low && a < 0.0 {
                low += 1;
            }
            if coef > 1.0 + p.epsilon_high && a > 0.0 {
                high += 1;
            }
            if let (Some(r), true) = (c.ref_logp, p.beta != 0.0) {
                let diff = r[t] - c.logp[t];
                let k3 = diff.exp() - diff - 1.0;
                loss += w * p.beta * k3;
                kl_sum += k3;
                d[t] += w * p.beta * (1.0 - diff.exp());
            }
        }
        d.iter_mut().for_each(|g| *g += seq_grad);
        dlogp.push(d);
    }
    let n = tokens.max(1) as f64;
    PolicyLoss { loss, dlogp, kl: kl_sum / n, clipped_low: low as f64 / n, clipped_high: high as f64 / n }
}
