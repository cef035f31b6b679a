//! The head of a sequence-classification model (`score`, `[labels, hidden]`, a reward model's
//! with one label): a sequence's scores are the head applied to the final hidden state (after
//! the last norm) of its last token.
//!
//!   h_i = xf[t_i];  s_i = h_i·Wₛᵀ
//!   ∂L/∂Wₛ += Σ_i (∂L/∂s_i)ᵀ·h_i;  ∂L/∂xf[t_i] = ∂L/∂s_i·Wₛ   (0 at other tokens)

use crate::activations::Activations;
use crate::batch::Batch;
use crate::grad_sink::GradSink;
use crate::model::Model;
use kiln_core::{Backend, Matmul};

impl<B: Backend> Model<B> {
    /// Rows of `[labels, hidden]` in the score head (panics without one).
    fn labels(&self) -> usize {
        self.config.num_labels.expect("a sequence-classification model (a score head)")
    }

    /// The final hidden states of the batch's tokens `positions`, `[positions.len(), hidden]`.
    fn hidden_at(&self, b: &B, acts: &Activations<B>, positions: &B::Index, k: usize) -> B::Buf {
        let d = self.config.hidden_size;
        let mut h = b.zeros(k * d);
        b.embedding_forward(&mut h, &acts.xf, positions, d);
        h
    }

    /// The scores (`[positions.len(), labels]`) of the batch's tokens `positions` (indices into
    /// its `rows × seq` tokens), after `forward_hidden`.
    pub fn score_forward(&self, b: &B, acts: &Activations<B>, positions: &[i32]) -> Vec<f32> {
        let (k, d, labels) = (positions.len(), self.config.hidden_size, self.labels());
        let h = self.hidden_at(b, acts, &b.upload_index(positions), k);
        let head = self.weights(b).score.expect("a score head");
        let mut scores = b.zeros(k * labels);
        b.matmul(&mut scores, &h, head, Matmul::linear(k, d, labels));
        b.read(&scores)
    }

    /// Backward from `dscores` = ∂L/∂scores of the tokens `positions` through the head and the
    /// transformer (after `forward_hidden` over `batch`); parameter gradients go into `grads`.
    pub fn score_backward(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        positions: &[i32],
        dscores: &[f32],
        grads: &mut dyn GradSink<B>,
    ) {
        let (k, d, labels) = (positions.len(), self.config.hidden_size, self.labels());
        let index = b.upload_index(positions);
        let h = self.hidden_at(b, acts, &index, k);
        let ds = b.upload(dscores);
        let dscore = grads.outer(b).score.expect("a score head's gradient");
        b.matmul(dscore, &ds, &h, Matmul::linear_dw(k, d, labels));
        let mut dh = b.zeros(k * d);
        b.matmul(&mut dh, &ds, self.weights(b).score.expect("a score head"), Matmul::linear_dx(k, d, labels, false));
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        b.fill(&mut s.dxn, 0.0);
        b.embedding_backward(&mut s.dxn, &dh, &index, d);
        self.backward_hidden(b, acts, batch, grads);
    }
}
