//! Attention sinks (see `Backend::attention_sinks_forward`): a per-head logit σ_h that joins
//! every query's softmax with a zero value.
//!
//! Forward, per query i and head h with the keys' log-sum-exp l and output o:
//!   l' = log(e^l + e^σ),  o' = o · e^(l − l')
//! Backward: the probabilities over keys are e^(s − l') and the sink's is p_σ = e^(σ − l'), so
//! with D = do·o' (the softmax's Σ_j p_j dp_j, the sink's value being zero)
//!   dσ = p_σ (0 − D) = −e^(σ − l') D
//! and q, k, v take FlashAttention's backward with o' and l'.

use super::sparse_attention::log_add_exp;
use crate::backend::Attention;
use rayon::prelude::*;

fn check(out_len: usize, lse_len: usize, sinks_len: usize, spec: &Attention) {
    let tokens = spec.batch * spec.seq;
    assert!(
        out_len == tokens * spec.q_heads * spec.v_head_dim && lse_len == tokens * spec.q_heads,
        "attention_sinks: out must be [tokens, q_heads, v_head_dim] and lse [batch, q_heads, seq]"
    );
    assert_eq!(sinks_len, spec.q_heads, "attention_sinks: one sink per query head");
}

pub fn forward(out: &mut [f32], lse: &mut [f32], sinks: &[f32], spec: Attention) {
    check(out.len(), lse.len(), sinks.len(), &spec);
    let (seq, heads, dv) = (spec.seq, spec.q_heads, spec.v_head_dim);
    out.par_chunks_mut(seq * heads * dv).zip(lse.par_chunks_mut(heads * seq)).for_each(|(out, lse)| {
        for (h, lse) in lse.chunks_mut(seq).enumerate() {
            for (i, l) in lse.iter_mut().enumerate() {
                let merged = log_add_exp(*l, sinks[h]);
                let keep = if *l == f32::NEG_INFINITY { 0.0 } else { (*l - merged).exp() };
                out[(i * heads + h) * dv..][..dv].iter_mut().for_each(|o| *o *= keep);
                *l = merged;
            }
        }
    });
}

pub fn backward(dsinks: &mut [f32], dout: &[f32], out: &[f32], lse: &[f32], sinks: &[f32], spec: Attention) {
    check(out.len(), lse.len(), sinks.len(), &spec);
    assert_eq!(dout.len(), out.len(), "attention_sinks_backward: dout must be shaped as out");
    assert_eq!(dsinks.len(), sinks.len(), "attention_sinks_backward: one gradient per sink");
    let (seq, heads, dv) = (spec.seq, spec.q_heads, spec.v_head_dim);
    for (h, ds) in dsinks.iter_mut().enumerate() {
        let per_row: Vec<f32> = (0..spec.batch)
            .into_par_iter()
            .map(|b| {
                let mut sum = 0.0f32;
                for i in 0..seq {
                    let at = ((b * seq + i) * heads + h) * dv;
                    let d: f32 = dout[at..at + dv].iter().zip(&out[at..at + dv]).map(|(a, b)| a * b).sum();
                    sum -= (sinks[h] - lse[(b * heads + h) * seq + i]).exp() * d;
                }
                sum
            })
            .collect();
        *ds += per_row.iter().sum::<f32>();
    }
}
