//! DeepSeek-V3's group-limited top-k router (see `backend::Routing`).
//!
//! Forward per token: s = σ(z); pick groups, then experts, on s + bias;
//! w = s_sel · scale, divided by (Σ s_sel + 1e-20) when normalising.
//! Backward: with S = Σ_sel s + 1e-20 and g = dw · scale,
//!   normalised:  ds_m = g_m / S − (Σ_j g_j s_j) / S²   for selected m, 0 elsewhere
//!   plain:       ds_m = g_m
//!   dz = ds · s(1 − s)

use crate::backend::Routing;
use crate::fast_exp::sigmoid;
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
    let Routing { tokens, experts, top_k: k, groups, top_groups, normalize, scale } = spec;
    assert!(logits.len() == tokens * experts && scores.len() == logits.len() && bias.len() == experts);
    assert!(weights.len() == tokens * k && indices.len() == tokens * k, "moe_route: outputs must be [tokens, top_k]");
    let per_group = experts / groups;
    scores
        .par_chunks_mut(experts)
        .zip(logits.par_chunks(experts))
        .zip(weights.par_chunks_mut(k).zip(indices.par_chunks_mut(k)))
        .for_each(|((s, z), (w, idx))| {
            s.iter_mut().zip(z).for_each(|(s, &z)| *s = sigmoid(z));
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
    let Routing { tokens, experts, top_k: k, normalize, scale, .. } = spec;
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
                dz[e] = ds * s[e] * (1.0 - s[e]);
            }
        });
}
