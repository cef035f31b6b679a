//! AdamW over a model's parameters, with f32 moments laid out once beside them.

use kiln_core::{AdamW as Hyper, Backend};
use kiln_model::{TensorSpec, Weights};

pub struct AdamW<B: Backend> {
    /// Hyper-parameters; `hyper.step` counts the updates taken so far.
    pub hyper: Hyper,
    m: Weights<B::Buf>,
    v: Weights<B::Buf>,
}

impl<B: Backend> AdamW<B> {
    /// PyTorch's defaults for betas and eps.
    pub fn new(b: &B, shapes: &Weights<TensorSpec>, lr: f32, weight_decay: f32) -> Self {
        Self {
            hyper: Hyper { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0 },
            m: shapes.map(|s| b.zeros(s.numel())),
            v: shapes.map(|s| b.zeros(s.numel())),
        }
    }

    /// One update of every parameter from its gradient.
    pub fn step(&mut self, b: &B, params: &mut Weights<B::Buf>, grads: &Weights<B::Buf>) {
        self.hyper.step += 1;
        let moments = self.m.iter_mut().into_iter().zip(self.v.iter_mut());
        for ((p, g), (m, v)) in params.iter_mut().into_iter().zip(grads.iter()).zip(moments) {
            b.adamw(p, g, m, v, self.hyper);
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
    /// The first and second moments, named like the parameters.
    pub fn moments(&self) -> (&Weights<B::Buf>, &Weights<B::Buf>) {
        (&self.m, &self.v)
    }

    pub fn moments_mut(&mut self) -> (&mut Weights<B::Buf>, &mut Weights<B::Buf>) {
        (&mut self.m, &mut self.v)
    }
}
