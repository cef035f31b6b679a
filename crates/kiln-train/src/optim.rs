//! AdamW over a model's parameters, with f32 moments laid out once beside them.
//!
//! Weight decay applies to matrices only (embeddings, projections), not to norm weights or
//! biases (1-D tensors), as the Hugging Face Trainer (and so TRL) groups parameters.

use kiln_core::{AdamW as Hyper, Backend};
use kiln_model::{TensorSpec, Weights};

pub struct AdamW<B: Backend> {
    /// Hyper-parameters; `hyper.step` counts the updates taken so far.
    pub hyper: Hyper,
    m: Weights<B::Buf>,
    v: Weights<B::Buf>,
    /// Per tensor, in `Weights::iter` order: whether weight decay applies.
    decays: Vec<bool>,
    /// Parameters updated.
    numel: usize,
}

impl<B: Backend> AdamW<B> {
    /// PyTorch's defaults for betas and eps.
    pub fn new(b: &B, shapes: &Weights<TensorSpec>, lr: f32, weight_decay: f32) -> Self {
        Self {
            hyper: Hyper { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0 },
            m: shapes.map(|s| b.zeros(s.numel())),
            v: shapes.map(|s| b.zeros(s.numel())),
            decays: shapes.iter().into_iter().map(|s| s.shape.len() >= 2).collect(),
            numel: shapes.iter().into_iter().map(|s| s.numel()).sum(),
        }
    }

    /// One update of every parameter from its gradient.
    pub fn step(&mut self, b: &B, params: &mut Weights<B::Buf>, grads: &Weights<B::Buf>) {
        self.hyper.step += 1;
        let moments = self.m.iter_mut().into_iter().zip(self.v.iter_mut());
        let tensors = params.iter_mut().into_iter().zip(grads.iter()).zip(moments).zip(&self.decays);
        for (((p, g), (m, v)), &decays) in tensors {
            let hyper = if decays { self.hyper } else { Hyper { weight_decay: 0.0, ..self.hyper } };
            b.adamw(p, g, m, v, hyper);
        }
    }
}

/// Sets every gradient to zero.
pub fn zero_grads<B: Backend>(b: &B, grads: &mut Weights<B::Buf>) {
    for g in grads.iter_mut() {
        b.fill(g, 0.0);
    }
}

impl<B: Backend> AdamW<B> {
    /// Bytes of the two moments.
    pub fn state_bytes(&self) -> usize {
        self.numel * 8
    }

    /// The first and second moments, named like the parameters.
    pub fn moments(&self) -> (&Weights<B::Buf>, &Weights<B::Buf>) {
        (&self.m, &self.v)
    }

    pub fn moments_mut(&mut self) -> (&mut Weights<B::Buf>, &mut Weights<B::Buf>) {
        (&mut self.m, &mut self.v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Cpu;
    use kiln_model::{Config, Model};

    #[test]
    fn decay_spares_norms_and_biases() {
        let config = Config::parse(
            r#"{"model_type": "qwen2", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        let b = Cpu;
        let mut model = Model::random(&b, config, 0);
        let before: Vec<Vec<f32>> = model.params.iter().into_iter().map(|p| b.read(p)).collect();
        let grads = model.zeros_like_params(&b);
        let mut opt = AdamW::new(&b, &model.layout, 0.5, 0.1);
        opt.step(&b, &mut model.params, &grads);
        // With zero gradients only decay moves a parameter: by the factor 1 - lr·λ.
        for ((spec, p), old) in model.layout.iter().into_iter().zip(model.params.iter()).zip(&before) {
            let factor = if spec.shape.len() >= 2 { 0.95 } else { 1.0 };
            for (new, old) in b.read(p).iter().zip(old) {
                assert!((new - old * factor).abs() <= 1e-6, "{}: {old} -> {new}", spec.name);
            }
        }
    }
}
