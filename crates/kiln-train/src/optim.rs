//! AdamW over flat buffers (`kiln_model::flat`): one backend call per run of tensors that share
//! their weight decay, matrices decaying and norm weights and biases not, as the Hugging Face
//! Trainer (and so TRL) groups parameters.

use kiln_core::{AdamW, Backend};
use kiln_model::flat::overlap;
use std::ops::Range;

/// One AdamW update of the flat values `span`: `params`, `grads`, `m` and `v` hold exactly
/// those values; `decay_runs` (absolute ranges) say where weight decay applies.
pub fn adamw_step<B: Backend>(
    b: &B,
    hyper: AdamW,
    decay_runs: &[(Range<usize>, bool)],
    span: &Range<usize>,
    (params, grads): (&mut B::Slice, &B::Slice),
    (m, v): (&mut B::Slice, &mut B::Slice),
) {
    for (run, decays) in decay_runs {
        let part = overlap(run, span);
        if part.is_empty() {
            continue;
        }
        let local = part.start - span.start..part.end - span.start;
        let hyper = if *decays { hyper } else { AdamW { weight_decay: 0.0, ..hyper } };
        b.adamw(
            b.slice_mut(params, local.clone()),
            b.slice(grads, local.clone()),
            b.slice_mut(m, local.clone()),
            b.slice_mut(v, local),
            hyper,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Cpu;
    use kiln_model::{Config, FlatLayout, Model};

    #[test]
    fn decay_spares_norms_and_biases() {
        let config = Config::parse(
            r#"{"model_type": "qwen2", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        let b = Cpu;
        let mut model = Model::random(&b, config, 0);
        let before = model.tensors(&b);
        let flat = FlatLayout::new(&model.layout);
        let n = flat.total;
        let hyper = AdamW { lr: 0.5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 1 };
        let (grads, mut m, mut v) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        adamw_step(&b, hyper, &flat.decay_runs, &(0..n), (&mut model.params, &grads), (&mut m, &mut v));
        // With zero gradients only decay moves a parameter: by the factor 1 - lr·λ.
        let after = model.tensors(&b);
        for ((spec, new), old) in model.layout.iter().into_iter().zip(after.iter()).zip(before.iter()) {
            let factor = if spec.shape.len() >= 2 { 0.95 } else { 1.0 };
            for (new, old) in new.iter().zip(old.iter()) {
                assert!((new - old * factor).abs() <= 1e-6, "{}: {old} -> {new}", spec.name);
            }
        }
    }
}
