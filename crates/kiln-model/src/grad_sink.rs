//! Where backward puts the parameter gradients. Backward visits the layers last to first,
//! asking for each layer's gradient views just before it and saying when it is done, then
//! finishes the gradients outside the layers (embedding, final norm, LM head, score); under
//! pipeline parallel it does so once per chunk of the pass (`chunks_next`). Whole gradients
//! (`FlatGrads`) are one sink; a sharded one (ZeRO-2) sums each layer's gradients over the
//! ranks as soon as they are done and keeps its share.

use crate::flat::FlatLayout;
use crate::weights::{LayerWeights, Weights};
use kiln_core::Backend;
use std::sync::Arc;

pub trait GradSink<B: Backend> {
    /// The coming pass's backward runs in `chunks` chunks (pipeline parallel's schedules; else
    /// one): each chunk's backward hands every layer of the stage (`layer_done`) and the head
    /// (`head_done`) over once, and their gradients of the pass are complete at the last.
    fn chunks_next(&mut self, _: usize) {}
    /// Layer `l`'s gradient views, which its backward adds into.
    fn layer(&mut self, b: &B, l: usize) -> LayerWeights<&mut B::Slice>;
    /// Layer `l`'s gradients of this backward are complete.
    fn layer_done(&mut self, b: &B, l: usize);
    /// The gradients of the final norm, the LM head and the score (every one outside the
    /// layers but the embedding's) of this backward are complete, before any layer's.
    fn head_done(&mut self, _: &B) {}
    /// The gradients outside the layers, in a `Weights` with no layers.
    fn outer(&mut self, b: &B) -> Weights<&mut B::Slice>;
    /// The outer gradients of this backward are complete: the backward has ended.
    fn outer_done(&mut self, b: &B);
}

/// Whole gradients: one flat buffer laid out like the parameters, which every backward adds
/// into.
pub struct FlatGrads<B: Backend> {
    pub flat: B::Buf,
    pub layout: Arc<FlatLayout>,
}

impl<B: Backend> FlatGrads<B> {
    /// Zeroed gradients for parameters laid out as `layout`.
    pub fn new(b: &B, layout: &Arc<FlatLayout>) -> Self {
        Self { flat: b.zeros(layout.total), layout: Arc::clone(layout) }
    }

    /// A view of every tensor's gradient.
    pub fn views(&self, b: &B) -> Weights<&B::Slice> {
        self.layout.views(b, &self.flat)
    }
}

impl<B: Backend> GradSink<B> for FlatGrads<B> {
    fn layer(&mut self, b: &B, l: usize) -> LayerWeights<&mut B::Slice> {
        self.layout.layer_views_mut(b, l, &mut self.flat)
    }

    fn layer_done(&mut self, _: &B, _: usize) {}

    fn outer(&mut self, b: &B) -> Weights<&mut B::Slice> {
        self.layout.outer_views_mut(b, &mut self.flat)
    }

    fn outer_done(&mut self, _: &B) {}
}
