//! Preference losses of one (chosen, rejected) pair as functions of the policy's sequence
//! log-probs, with their gradients, as TRL defines them. Let πc, πr be the summed log-probs
//! of the chosen and rejected completions, π̄ = π / length their per-token means, and ρ the
//! reference model's. Then, with h the logit each loss acts on:
//!
//!   sigmoid (DPO; cDPO with label smoothing ε):
//!       h = β((πc − πr) − (ρc − ρr)),  ℓ = −(1−ε)·log σ(h) − ε·log σ(−h)
//!   hinge (SLiC):  ℓ = max(0, 1 − h), same h
//!   ipo:  h = (π̄c − π̄r) − (ρ̄c − ρ̄r),  ℓ = (h − 1/(2β))²
//!   simpo (reference-free):  h = β(π̄c − π̄r) − γ,  ℓ = −(1−ε)·log σ(h) − ε·log σ(−h)
//!   orpo (reference-free):  h = (π̄c − π̄r) − (log(1 − e^π̄c) − log(1 − e^π̄r)),
//!       ℓ = −β·log σ(h)   (its SFT term, the mean nll of chosen tokens, is added per token)
//!
//! Rewards, for metrics: β(πc − ρc) and β(πr − ρr) (sigmoid, hinge), on the means for ipo,
//! β·π̄ for simpo and orpo.

use serde::{Deserialize, Serialize};

/// The loss functions `kiln dpo` combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    Sigmoid,
    Ipo,
    Hinge,
    Simpo,
    Orpo,
}

impl LossKind {
    /// Whether the loss compares against a reference model.
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Sigmoid | Self::Ipo | Self::Hinge)
    }
}

/// Hyper-parameters shared by the losses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossParams {
    pub beta: f64,
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ.
    pub simpo_gamma: f64,
}

/// Log-probs of one pair: sums over completion tokens, and completion lengths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_len: usize,
    pub rejected_len: usize,
    /// The reference model's sums, when a loss needs them.
    pub reference: Option<(f64, f64)>,
}

/// A pair's loss, its gradient with respect to the summed log-probs, and the rewards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

fn log_sigmoid(x: f64) -> f64 {
    // log σ(x) = −log(1 + e^−x), computed without overflow on either side.
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `−(1−ε)·log σ(h) − ε·log σ(−h)` and its derivative in h.
fn smoothed_logistic(h: f64, eps: f64) -> (f64, f64) {
    let loss = -(1.0 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h);
    let grad = -(1.0 - eps) * sigmoid(-h) + eps * sigmoid(h);
    (loss, grad)
}

/// The loss of one pair under `kind`.
pub fn pair_loss(kind: LossKind, p: &LossParams, x: &PairLogps) -> PairLoss {
    let (nc, nr) = (x.chosen_len.max(1) as f64, x.rejected_len.max(1) as f64);
    let (mc, mr) = (x.chosen / nc, x.rejected / nr);
    let (rc, rr) = x.reference.unwrap_or((0.0, 0.0));
    if kind.needs_reference() {
        assert!(x.reference.is_some(), "{kind:?} needs the reference model's log-probs");
    }
    let beta = p.beta;
    match kind {
        LossKind::Sigmoid | LossKind::Hinge => {
            let h = beta * ((x.chosen - x.rejected) - (rc - rr));
            let (loss, dh) = match kind {
                LossKind::Sigmoid => smoothed_logistic(h, p.label_smoothing),
                _ => ((1.0 - h).max(0.0), if h < 1.0 { -1.0 } else { 0.0 }),
            };
            PairLoss {
                loss,
                d_chosen: beta * dh,
                d_rejected: -beta * dh,
                reward_chosen: beta * (x.chosen - rc),
                reward_rejected: beta * (x.rejected - rr),
            }
        }
        LossKind::Ipo => {
            let h = (mc - mr) - (rc / nc - rr / nr);
            let target = 1.0 / (2.0 * beta);
            let dh = 2.0 * (h - target);
            PairLoss {
                loss: (h - target).powi(2),
                d_chosen: dh / nc,
                d_rejected: -dh / nr,
                reward_chosen: beta * (mc - rc / nc),
                reward_rejected: beta * (mr - rr / nr),
            }
        }
        LossKind::Simpo => {
            let h = beta * (mc - mr) - p.simpo_gamma;
            let (loss, dh) = smoothed_logistic(h, p.label_smoothing);
            PairLoss {
                loss,
                d_chosen: beta * dh / nc,
                d_rejected: -beta * dh / nr,
                reward_chosen: beta * mc,
                reward_rejected: beta * mr,
            }
        }
        LossKind::Orpo => {
            // log(1 − e^m) with m < 0; d/dm [m − log(1 − e^m)] = 1 / (1 − e^m).
            let log1m_exp = |m: f64| (-m.exp()).ln_1p();
            let h = (mc - mr) - (log1m_exp(mc) - log1m_exp(mr));
            let loss = -beta * log_sigmoid(h);
            let dh = -beta * sigmoid(-h);
            PairLoss {
                loss,
                d_chosen: dh / (1.0 - mc.exp()) / nc,
                d_rejected: -dh / (1.0 - mr.exp()) / nr,
                reward_chosen: beta * mc,
                reward_rejected: beta * mr,
            }
        }
    }
}
