//! Where pipeline parallel cuts the layers, as the planner estimates a cut and kiln trains it
//! (`train.pp_layers`, `kiln plan --pp-layers`): evenly (the first L mod P stages one layer
//! more), as given, or balanced.
//!
//! Balanced: a layer costs the weights its matrix products read per token (attention and MLP;
//! of an MoE layer the shared experts, `top_k` of the routed ones and the router), and the
//! last stage adds the LM head's `vocab · hidden`. The cut minimises the largest stage's cost
//! over every cut into runs of at least one layer (a dynamic programme over the layers), since
//! the slowest stage sets a pipeline's pace. Attention's scores, quadratic in the sequence,
//! are the same per layer and are left out. The same costs give the planner's pace: the
//! slowest stage's share of the work, times the stages.

use crate::model::ModelShape;
use anyhow::{bail, Result};

/// How the layers are cut into stages.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StageCut {
    /// As evenly as they go, the first stages one more.
    #[default]
    Even,
    /// The largest stage's cost as small as it goes (see the module).
    Balanced,
    /// This many layers per stage, in stage order.
    Given(Vec<usize>),
}

impl StageCut {
    /// `even`, `balanced`, or each stage's layers (`9,9,8,6`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "even" => Ok(Self::Even),
            "balanced" => Ok(Self::Balanced),
            counts => counts
                .split(',')
                .map(|c| c.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Given)
                .map_err(|_| {
                    anyhow::anyhow!("pipeline cut `{s}`: expected even, balanced or each stage's layers (9,9,8,6)")
                }),
        }
    }

    /// The layers of each of `stages` stages of `m`, or why the cut cannot cut it.
    pub fn counts(&self, m: &ModelShape, stages: usize) -> Result<Vec<usize>> {
        let n = m.layers;
        if stages > n {
            bail!("pp = {stages} stages for the model's {n} layers: at most one stage per layer");
        }
        Ok(match self {
            Self::Even => even(n, stages),
            Self::Balanced => balanced(&layer_costs(m), head_cost(m), stages),
            Self::Given(counts) => {
                if counts.len() != stages || counts.contains(&0) || counts.iter().sum::<usize>() != n {
                    bail!("pipeline cut {counts:?}: give {stages} stages (pp) of at least one layer each, {n} layers in all");
                }
                counts.clone()
            }
        })
    }
}

/// `layers` over `stages` as evenly as they go, the first `layers % stages` one more.
pub fn even(layers: usize, stages: usize) -> Vec<usize> {
    (0..stages).map(|s| layers / stages + usize::from(s < layers % stages)).collect()
}

/// The weights each layer's matrix products read per token: the dense layers (DeepSeek's
/// `first_k_dense_replace`) first, then the MoE layers.
pub fn layer_costs(m: &ModelShape) -> Vec<f64> {
    let p = &m.params;
    let attention = p.attention / m.layers as f64;
    let moe_layers = m.moe.as_ref().map_or(0, |moe| moe.layers);
    let dense_layers = m.layers - moe_layers;
    let dense = attention + p.dense_mlp / dense_layers.max(1) as f64;
    let moe = m.moe.as_ref().map_or(0.0, |moe| {
        let per_layer = |total: f64| total / moe.layers.max(1) as f64;
        attention + moe.active as f64 * moe.expert_params + per_layer(p.shared_experts) + per_layer(p.router)
    });
    (0..m.layers).map(|l| if l < dense_layers { dense } else { moe }).collect()
}

/// The LM head's weights, read per token on the last stage.
pub fn head_cost(m: &ModelShape) -> f64 {
    m.vocab * m.hidden
}

/// The slowest stage's share of the work, times the stages: how much longer a pipeline of
/// stages of `counts` layers takes than one whose stages share the work equally (1 for one
/// stage, more where the head or uneven layers load one stage).
pub fn pace(m: &ModelShape, counts: &[usize]) -> f64 {
    let costs = layer_costs(m);
    let last = counts.len() - 1;
    let mut at = 0;
    let stage_costs: Vec<f64> = (counts.iter().enumerate())
        .map(|(s, &c)| {
            let layers: f64 = costs[at..at + c].iter().sum();
            at += c;
            layers + if s == last { head_cost(m) } else { 0.0 }
        })
        .collect();
    let total: f64 = stage_costs.iter().sum();
    stage_costs.iter().copied().fold(0.0, f64::max) * counts.len() as f64 / total
}

/// Layers per stage minimising the largest stage's cost, the last stage adding `head`; of equal
/// cuts, the one whose later stages are longest (the first stage also holds the embedding
/// and, under 1F1B, the most activations in flight).
pub fn balanced(costs: &[f64], head: f64, stages: usize) -> Vec<usize> {
    let n = costs.len();
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |s, c| {
            *s += c;
            Some(*s)
        }))
        .collect();
    let run = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[s][i]: the smallest largest-stage cost of the first i layers in s stages, with
    // from[s][i] the start of the last of them.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut from = vec![vec![0; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for i in s..=n {
            let extra = if s == stages { head } else { 0.0 };
            for j in s - 1..i {
                let cost = best[s - 1][j].max(run(j, i) + extra);
                if cost < best[s][i] {
                    (best[s][i], from[s][i]) = (cost, j);
                }
            }
        }
    }
    let mut counts = vec![0; stages];
    let mut end = n;
    for s in (1..=stages).rev() {
        let start = from[s][end];
        counts[s - 1] = end - start;
        end = start;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_minimises_the_largest_stage() {
        // Costs 1, 1, 4, 1, 1 and a head of 2 over 3 stages: [1 1] [4] [1 1 + 2] = max 4.
        assert_eq!(balanced(&[1.0, 1.0, 4.0, 1.0, 1.0], 2.0, 3), [2, 1, 2]);
        // Every stage keeps a layer even when the head outweighs them all.
        assert_eq!(balanced(&[1.0; 4], 100.0, 3), [1, 2, 1]);
    }

    #[test]
    fn cuts_parse_and_refuse_what_does_not_cut_the_layers() {
        assert_eq!(StageCut::parse("balanced").unwrap(), StageCut::Balanced);
        assert_eq!(StageCut::parse("9, 9,8,6").unwrap(), StageCut::Given(vec![9, 9, 8, 6]));
        assert!(StageCut::parse("9,x").unwrap_err().to_string().contains("each stage's layers"));
        assert_eq!(even(61, 16), [[4; 13].as_slice(), &[3; 3]].concat());
    }
}
