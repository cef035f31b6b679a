//! DeepSeek's group-limited top-k router (see `backend::Routing`).
//!
//! Forward per token: s = score(z); pick groups, then experts, on s + bias (or take the given
//! experts); w = s_sel · scale, divided by (Σ s_sel + 1e-20) when normalising.
//! Backward: with S = Σ_sel s + 1e-20 and g = dw · scale,
//!   normalised:  ds_m = g_m / S − (Σ_j g_j s_j) / S²   for selected m, 0 elsewhere
//!   plain:       ds_m = g_m
//!   dz = ds · s'(z):  σ: s(1 − s);  √softplus: σ(z) / 2s, with σ(z) = 1 − e^(−s²) since
//!   s² = log(1 + e^z) (1 above softplus's threshold, where s² = z).

use crate::backend::{Routing, Scoring};
use crate::fast_exp::sigmoid;

/// PyTorch's softplus threshold: above it softplus(z) is z.
const SOFTPLUS_THRESHOLD: f32 = 20.0;

fn score(scoring: Scoring, z: f32) -> f32 {
    match scoring {
        Scoring::Sigmoid => sigmoid(z),
        Scoring::SqrtSoftplus => {
            if z > SOFTPLUS_THRESHOLD {
                z.sqrt()
            } else {
                z.exp().ln_1p().sqrt()
            }
        }
    }
}

/// ds/dz from the score s alone.
fn score_grad(scoring: Scoring, s: f32) -> f32 {
    match scoring {
        Scoring::Sigmoid => s * (1.0 - s),
        Scoring::SqrtSoftplus if s == 0.0 => 0.0,
        Scoring::SqrtSoftplus if s * s > SOFTPLUS_THRESHOLD => 0.5 / s,
        Scoring::SqrtSoftplus => -(-s * s).exp_m1() / (2.0 * s),
    }
}
use rayon::prelude::*;

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    out.extend(0..values.len());
    out.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    out.truncate(k);
}

fn check(spec: &Routing) {
    let Routing { experts, top_k, groups, top_groups, .. } = *spec;
    assert!(groups > 0 && experts % groups == 0, "moe_route: {experts} experts do not split into {groups} groups");
    assert!(top_groups <= groups && top_groups > 0, "moe_route: top_groups {top_groups} of {groups} groups");
    assert!(experts / groups >= 2, "moe_route: groups need at least two experts (their score sums the best two)");
    assert!(
        top_k <= top_groups * (experts / groups),
        "moe_route: top_k {top_k} exceeds the experts of the kept groups"
    );
}

pub fn forward(
    weights: &mut [f32],
    indices: &mut [i32],
    scores: &mut [f32],
    logits: &[f32],
    bias: &[f32],
    spec: Routing,
) {
    check(&spec);
    let Routing { scoring, fixed, tokens, experts, top_k: k, groups, top_groups, normalize, scale } = spec;
    assert!(logits.len() == tokens * experts && scores.len() == logits.len() && (fixed || bias.len() == experts));
    assert!(weights.len() == tokens * k && indices.len() == tokens * k, "moe_route: outputs must be [tokens, top_k]");
    let per_group = experts / groups;
    scores
        .par_chunks_mut(experts)
        .zip(logits.par_chunks(experts))
        .zip(weights.par_chunks_mut(k).zip(indices.par_chunks_mut(k)))
        .for_each(|((s, z), (w, idx))| {
            s.iter_mut().zip(z).for_each(|(s, &z)| *s = score(scoring, z));
            if fixed {
                assert!(idx.iter().all(|&e| (e as usize) < experts), "moe_route: a given expert is out of range");
                let sum: f32 = idx.iter().map(|&e| s[e as usize]).sum::<f32>() + 1e-20;
                for (w, &e) in w.iter_mut().zip(idx.iter()) {
                    let s = s[e as usize];
                    *w = if normalize { s / sum } else { s } * scale;
                }
                return;
            }
            let biased: Vec<f32> = s.iter().zip(bias).map(|(s, b)| s + b).collect();
            let mut order = Vec::with_capacity(experts);
            let group_scores: Vec<f32> = biased
                .chunks(per_group)
                .map(|g| {
                    top_k(g, 2, &mut order);
                    g[order[0]] + g[order[1]]
                })
                .collect();
            top_k(&group_scores, top_groups, &mut order);
            let mut masked = vec![f32::NEG_INFINITY; experts];
            for &g in &order {
                masked[g * per_group..(g + 1) * per_group].copy_from_slice(&biased[g * per_group..(g + 1) * per_group]);
            }
            top_k(&masked, k, &mut order);
            let sum: f32 = order.iter().map(|&e| s[e]).sum::<f32>() + 1e-20;
            for (j, &e) in order.iter().enumerate() {
                idx[j] = e as i32;
                w[j] = if normalize { s[e] / sum } else { s[e] } * scale;
            }
        });
}

pub fn backward(dlogits: &mut [f32], dweights: &[f32], scores: &[f32], indices: &[i32], spec: Routing) {
    let Routing { scoring, tokens, experts, top_k: k, normalize, scale, .. } = spec;
    assert!(dlogits.len() == tokens * experts && scores.len() == dlogits.len());
    assert!(
        dweights.len() == tokens * k && indices.len() == tokens * k,
        "moe_route_backward: [tokens, top_k] expected"
    );
    dlogits
        .par_chunks_mut(experts)
        .zip(scores.par_chunks(experts))
        .zip(dweights.par_chunks(k).zip(indices.par_chunks(k)))
        .for_each(|((dz, s), (dw, idx))| {
            dz.fill(0.0);
            let sum: f32 = idx.iter().map(|&e| s[e as usize]).sum::<f32>() + 1e-20;
            let dot: f32 = idx.iter().zip(dw).map(|(&e, &g)| g * scale * s[e as usize]).sum();
            for (&e, &g) in idx.iter().zip(dw) {
                let e = e as usize;
                let ds = if normalize { g * scale / sum - dot / (sum * sum) } else { g * scale };
                // `+=`: a table may give a token one expert twice.
                dz[e] += ds * score_grad(scoring, s[e]);
            }
        });
}
