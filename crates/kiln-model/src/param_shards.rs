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
//! A rank reads only its shard from the checkpoint (`ModelShare::params`), and a checkpoint is
//! written as its layers are gathered (`Model::visit_weights`): a rank never holds the whole
//! model to load or save it.
//!
//! Generation, whose steps differ between ranks, needs every tensor at once: `Model::unshard`
//! gathers the whole model on every rank and `Model::reshard` drops it again.

use crate::flat::{overlap, FlatLayout};
use crate::weights::{LayerWeights, Weights};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::sync::Arc;

/// The ranks of a parameter space, as `Comm` over the backend's buffers.
pub type SpaceRanks<B> = Arc<dyn Comm<<B as Backend>::Slice>>;

/// ZeRO-3's ranks: those that shard the dense parameters (the data-parallel ranks) and those
/// that shard the routed experts (their replicas under expert parallel, else the same ranks).
pub struct ShardRanks<B: Backend> {
    pub dense: SpaceRanks<B>,
    pub experts: SpaceRanks<B>,
}

impl<B: Backend> ShardRanks<B> {
    /// The spaces of the parameters laid out as `flat` (the dense tensors, then the routed
    /// experts if any) with the ranks that share each: what ZeRO shards, for the weights
    /// (`ParamShards`) and the optimizer state alike.
    pub fn spaces(&self, flat: &FlatLayout) -> Vec<(Range<usize>, SpaceRanks<B>)> {
        let mut spaces = vec![(0..flat.dense, Arc::clone(&self.dense))];
        if flat.total > flat.dense {
            spaces.push((flat.experts(), Arc::clone(&self.experts)));
        }
        spaces
    }
}

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
    /// as `kiln_dist::shard` does).
    pub fn new(b: &B, flat: &FlatLayout, spaces: Vec<(Range<usize>, SpaceRanks<B>)>) -> Self {
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
        Self {
            spaces,
            layer_ranges: (0..flat.ranges.layers.len()).map(|l| flat.packed_layer(l)).collect(),
            outer_ranges: flat.packed_outer(),
            layer: b.zeros(flat.largest_layer()),
            outer: b.zeros(flat.outer_len()),
            parked: None,
            what: String::new(),
        }
    }

    /// `tensors` (each local tensor's values inside this rank's shards, as `local` finds them;
    /// `flat` lays them out) uploaded into a buffer of this rank's shards.
    pub fn upload(&self, b: &B, flat: &FlatLayout, tensors: &Weights<Vec<f32>>) -> B::Buf {
        let held = self.spaces.iter().map(|s| s.mine().len()).sum();
        let mut shard = b.zeros(held);
        for (r, values) in flat.ranges.iter().into_iter().zip(tensors.iter()) {
            if let Some((_, at)) = self.local(r).filter(|(part, _)| !part.is_empty()) {
                b.write(b.slice_mut(&mut shard, at), values);
            }
        }
        shard
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

    /// Every parameter gathered, a layer (then the outer tensors) at a time, into `whole` (a
    /// collective).
    pub fn gather_all(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice, whole: &mut B::Slice) {
        let place = |whole: &mut B::Slice, gathered: &B::Slice, segments: &[Range<usize>]| {
            let mut at = 0;
            for s in segments {
                b.copy(b.slice_mut(whole, s.clone()), b.slice(gathered, at..at + s.len()));
                at += s.len();
            }
        };
        for l in 0..flat.ranges.layers.len() {
            self.gather_layer(b, flat, shard, l);
            let (dense, experts) = flat.layer(l);
            place(whole, &self.layer, &[dense, experts]);
        }
        self.gather_outer(b, flat, shard);
        place(whole, &self.outer, &flat.outer());
    }
}
