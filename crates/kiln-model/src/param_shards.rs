//! ZeRO-3's parameters: each rank holds its shard of every parameter space (the dense tensors
//! over the data-parallel ranks, the routed experts over their replicas), the shards laid end
//! to end in `Model::params`. A forward all-gathers the tensors outside the layers (embedding,
//! final norm, head) once, then each layer's tensors just before the layer runs, into a buffer
//! the next layer reuses; a backward gathers each layer again, last to first. So a rank holds
//! its shard, one layer and the outer tensors, never the whole model.
//!
//! The gathered outer tensors stay valid until the next optimizer step, and every backward
//! follows a forward of the same weights, so backward does not gather them again. Every rank
//! gathers in the same order: a rank with fewer passes in a step runs idle ones
//! (`Model::idle_forward`, `Model::idle_pass`).
//!
//! For what needs every tensor at once, `Model::unshard` gathers the whole model (on every
//! rank for generation, whose steps differ between ranks; on the ranks that write for a
//! checkpoint) and `Model::reshard` drops it again.

use crate::flat::{overlap, FlatLayout};
use crate::weights::{LayerWeights, Weights};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::sync::Arc;

/// The ranks of a parameter space, as `Comm` over the backend's buffers.
pub type SpaceRanks<B> = Arc<dyn Comm<<B as Backend>::Slice>>;

/// One parameter space and how its ranks shard it.
struct ShardedSpace<B: Backend> {
    comm: SpaceRanks<B>,
    /// Every rank's shard of the space, absolute in the flat layout, in rank order.
    shards: Vec<Range<usize>>,
    /// Where this rank's shard starts in the shard buffer.
    at: usize,
}

impl<B: Backend> ShardedSpace<B> {
    fn mine(&self) -> &Range<usize> {
        &self.shards[self.comm.rank()]
    }

    fn contains(&self, r: &Range<usize>) -> bool {
        let (first, last) = (&self.shards[0], &self.shards[self.shards.len() - 1]);
        first.start <= r.start && r.end <= last.end
    }
}

pub struct ParamShards<B: Backend> {
    spaces: Vec<ShardedSpace<B>>,
    /// Where each layer's tensors, and the outer ones, lie in their gather buffers.
    layer_ranges: Vec<LayerWeights<Range<usize>>>,
    outer_ranges: Weights<Range<usize>>,
    /// One layer's tensors (dense, then routed experts), gathered.
    layer: B::Buf,
    /// The tensors outside the layers, gathered: `FlatLayout::outer`'s ranges end to end.
    outer: B::Buf,
    /// While unsharded: this rank's shards, kept for `reshard`.
    pub(crate) parked: Option<B::Buf>,
    /// Names the gathers in errors.
    pub what: String,
}

impl<B: Backend> ParamShards<B> {
    /// Shards of `flat` over `spaces` (each a range of the flat layout and its ranks, sharded
    /// as `kiln_dist::shard` does); returns them with this rank's shard of `whole` cut out.
    pub fn new(
        b: &B,
        flat: &FlatLayout,
        spaces: Vec<(Range<usize>, SpaceRanks<B>)>,
        whole: &B::Slice,
    ) -> (Self, B::Buf) {
        let mut at = 0;
        let spaces: Vec<ShardedSpace<B>> = spaces
            .into_iter()
            .map(|(range, comm)| {
                let shards = (0..comm.size()).map(|r| kiln_dist::shard_in(&range, r, comm.size())).collect();
                let space = ShardedSpace { comm, shards, at };
                at += space.mine().len();
                space
            })
            .collect();
        let me = Self {
            spaces,
            layer_ranges: (0..flat.ranges.layers.len()).map(|l| flat.packed_layer(l)).collect(),
            outer_ranges: flat.packed_outer(),
            layer: b.zeros(flat.largest_layer()),
            outer: b.zeros(flat.outer_len()),
            parked: None,
            what: String::new(),
        };
        let mut shard = b.zeros(at);
        me.cut(b, whole, &mut shard);
        (me, shard)
    }

    /// Values held for the weights: the shard buffer's and the gather buffers'.
    pub fn held_len(&self, b: &B, shard: &B::Slice) -> usize {
        b.len(shard) + b.len(&self.layer) + b.len(&self.outer)
    }

    /// This rank's shard of the flat range `r` (inside one space), where it lies in the flat
    /// layout and in the shard buffer.
    pub fn local(&self, r: &Range<usize>) -> Option<(Range<usize>, Range<usize>)> {
        let space = self.spaces.iter().find(|s| s.contains(r))?;
        let part = overlap(r, space.mine());
        let start = space.at + part.start - space.mine().start;
        Some((part.clone(), start..start + part.len()))
    }

    /// `out` ← the flat `segments` laid end to end, each gathered from the ranks of its space.
    fn gather(
        b: &B,
        spaces: &[ShardedSpace<B>],
        what: &str,
        shard: &B::Slice,
        segments: &[Range<usize>],
        out: &mut B::Slice,
    ) {
        let mut at = 0;
        for segment in segments.iter().filter(|s| !s.is_empty()) {
            let space = spaces.iter().find(|s| s.contains(segment)).expect("a segment inside one space");
            let counts: Vec<usize> = space.shards.iter().map(|shard| overlap(segment, shard).len()).collect();
            let mine = overlap(segment, space.mine());
            let from = if mine.is_empty() { space.at } else { space.at + mine.start - space.mine().start };
            let chunk = b.slice(shard, from..from + mine.len());
            let into = b.slice_mut(out, at..at + segment.len());
            space.comm.all_gather_v(chunk, &counts, into, what).unwrap_or_else(|e| panic!("ZeRO-3: {e:#}"));
            at += segment.len();
        }
    }

    /// Gathers layer `l`'s tensors (a collective).
    pub fn gather_layer(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice, l: usize) {
        let (dense, experts) = flat.layer(l);
        let out = b.slice_mut(&mut self.layer, 0..dense.len() + experts.len());
        Self::gather(b, &self.spaces, &self.what, shard, &[dense, experts], out);
    }

    /// Gathers the tensors outside the layers (a collective).
    pub fn gather_outer(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice) {
        Self::gather(b, &self.spaces, &self.what, shard, &flat.outer(), &mut self.outer);
    }

    /// Views of layer `l`'s tensors, as last gathered.
    pub fn layer_views<'a>(&'a self, b: &B, l: usize) -> LayerWeights<&'a B::Slice> {
        self.layer_ranges[l].map(&mut |r| b.slice(&self.layer, r.clone()))
    }

    /// Views of the tensors outside the layers (a `Weights` with no layers), as last gathered.
    pub fn outer_views<'a>(&'a self, b: &B) -> Weights<&'a B::Slice> {
        self.outer_ranges.map(|r| b.slice(&self.outer, r.clone()))
    }

    /// Every parameter gathered, a layer (then the outer tensors) at a time, into `whole` where
    /// this rank passes one (a collective: the others only take part, holding one layer).
    pub fn gather_all(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice, mut whole: Option<&mut B::Slice>) {
        let mut place = |gathered: &B::Slice, segments: &[Range<usize>]| {
            let Some(whole) = whole.as_deref_mut() else { return };
            let mut at = 0;
            for s in segments {
                b.copy(b.slice_mut(whole, s.clone()), b.slice(gathered, at..at + s.len()));
                at += s.len();
            }
        };
        for l in 0..flat.ranges.layers.len() {
            self.gather_layer(b, flat, shard, l);
            let (dense, experts) = flat.layer(l);
            place(&self.layer, &[dense, experts]);
        }
        self.gather_outer(b, flat, shard);
        place(&self.outer, &flat.outer());
    }

    /// This rank's shards cut out of `whole`, into `shard`.
    pub fn cut(&self, b: &B, whole: &B::Slice, shard: &mut B::Slice) {
        for s in &self.spaces {
            b.copy(b.slice_mut(shard, s.at..s.at + s.mine().len()), b.slice(whole, s.mine().clone()));
        }
    }
}
