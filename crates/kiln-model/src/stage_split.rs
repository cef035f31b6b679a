//! How pipeline parallel cuts the layers into stages: evenly, given, or balanced by compute.
//!
//! Balanced: each layer costs the weights its matrix products read per token (attention and
//! MLP, of an MoE layer the shared experts and `top_k` of the routed ones), and the last stage
//! adds the LM head's `vocab · hidden`. The cut minimises the largest stage's cost over every
//! cut into runs of at least one layer (`kiln_plan::stages::balanced`, the planner's own cut,
//! which `kiln plan --pp-layers balanced` estimates), since the slowest stage sets a
//! pipeline's pace. At Llama-3-8B's shape the head costs 2.4 layers, so
//! pp = 4 cuts 8 + 9 + 9 + 6 layers (largest stage 9 layer-costs) where the even cut's last
//! stage carries 8 + 2.4. Attention's scores (quadratic in the sequence) are left out: they
//! are the same per layer and so move no cut in the supported models.

use crate::config::Config;
use crate::weights::{self, TensorSpec};
use kiln_plan::stages::balanced;
use std::ops::Range;

/// How the layers are cut into stages.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StageSplit {
    /// As evenly as they go, the first stages one more (`kiln plan`'s even spread).
    #[default]
    Even,
    /// The largest stage's compute as small as it goes (see the module).
    Balanced,
    /// This many layers per stage, in stage order.
    Given(Vec<usize>),
}

impl StageSplit {
    /// The layers of each of `stages` stages of `whole`, or why the split cannot cut it.
    pub fn layers(&self, whole: &Config, stages: usize) -> Result<Vec<Range<usize>>, String> {
        let n = whole.num_layers;
        if stages > n {
            return Err(format!(
                "{stages} stages (pp, times vpp under interleaving) for the model's {n} layers: at most one stage per layer"
            ));
        }
        let counts = match self {
            Self::Even => (0..stages).map(|s| kiln_dist::shard(n, s, stages).len()).collect(),
            Self::Balanced => balanced(&layer_costs(whole), head_cost(whole), stages),
            Self::Given(counts) => {
                if counts.len() != stages || counts.contains(&0) || counts.iter().sum::<usize>() != n {
                    return Err(format!(
                        "`train.pp_layers` = {counts:?}: give {stages} stages (pp) of at least one layer each, \
                         {n} layers in all"
                    ));
                }
                counts.clone()
            }
        };
        Ok(counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c)..*at)).collect())
    }
}

/// The weights each layer's matrix products read per token.
fn layer_costs(whole: &Config) -> Vec<f64> {
    let active = whole.moe.as_ref().map_or(1.0, |m| m.top_k as f64 / m.experts as f64);
    let per_token = |s: &TensorSpec| s.numel() as f64 * if s.is_routed_experts() { active } else { 1.0 };
    (weights::layout(whole).layers.iter())
        .map(|layer| {
            let mut cost = 0.0;
            layer.map(&mut |s: &TensorSpec| cost += per_token(s));
            cost
        })
        .collect()
}

/// The LM head's weights (none for a reward model's score).
fn head_cost(whole: &Config) -> f64 {
    match whole.num_labels {
        None => (whole.vocab_size * whole.hidden_size) as f64,
        Some(labels) => (labels * whole.hidden_size) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(vocab: usize, layers: usize) -> Config {
        Config::parse(&format!(
            r#"{{"model_type": "llama", "vocab_size": {vocab}, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": {layers}, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 8192}}"#
        ))
        .unwrap()
    }

    #[test]
    fn even_and_given_cuts() {
        let c = llama(1000, 5);
        assert_eq!(StageSplit::Even.layers(&c, 2).unwrap(), vec![0..3, 3..5]);
        assert_eq!(StageSplit::Given(vec![1, 4]).layers(&c, 2).unwrap(), vec![0..1, 1..5]);
        for bad in [vec![2, 2], vec![5, 0], vec![1, 1, 3]] {
            let err = StageSplit::Given(bad.clone()).layers(&c, 2).unwrap_err();
            assert!(err.contains("`train.pp_layers`") && err.contains("5 layers"), "{bad:?}: {err}");
        }
        assert!(StageSplit::Even.layers(&c, 6).unwrap_err().contains("at most one stage per layer"));
    }

    #[test]
    fn balanced_stages_take_the_head_into_account() {
        // Llama-3-8B: a layer reads 218M weights per token, the head 525M (2.4 layers).
        let c = llama(128_256, 32);
        let split = StageSplit::Balanced.layers(&c, 4).unwrap();
        assert_eq!(split.iter().map(|r| r.len()).collect::<Vec<_>>(), [8, 9, 9, 6]);
        // With a small head the cut is the even one.
        let small = llama(1000, 32);
        assert_eq!(StageSplit::Balanced.layers(&small, 4).unwrap(), StageSplit::Even.layers(&small, 4).unwrap());
    }
}
