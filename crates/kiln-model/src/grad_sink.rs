//! Where backward puts the parameter gradients. Backward visits the layers last to first,
//! asking for each layer's gradient buffers just before it and saying when it is done, then
//! finishes the gradients outside the layers (embedding, final norm, LM head, score). Whole
//! gradients (`Weights`) are one sink; a sharded one (ZeRO-2) sums each layer's gradients over
//! the ranks as soon as they are done, keeps its share and frees the rest.

use crate::weights::{LayerWeights, Weights};
use kiln_core::Backend;

pub trait GradSink<B: Backend> {
    /// Layer `l`'s gradient buffers, which its backward adds into.
    fn layer(&mut self, l: usize) -> &mut LayerWeights<B::Buf>;
    /// Layer `l`'s gradients of this backward are complete.
    fn layer_done(&mut self, l: usize);
    /// The gradients outside the layers, in a `Weights` whose `layers` backward leaves alone.
    fn outer(&mut self) -> &mut Weights<B::Buf>;
    /// The outer gradients of this backward are complete: the backward has ended.
    fn outer_done(&mut self);
}

/// Whole gradients: every backward adds into the same buffers.
impl<B: Backend> GradSink<B> for Weights<B::Buf> {
    fn layer(&mut self, l: usize) -> &mut LayerWeights<B::Buf> {
        &mut self.layers[l]
    }

    fn layer_done(&mut self, _: usize) {}

    fn outer(&mut self) -> &mut Weights<B::Buf> {
        self
    }

    fn outer_done(&mut self) {}
}
