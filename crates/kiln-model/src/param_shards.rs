//! ZeRO-3's parameters: each rank holds its shard of every parameter space (the dense tensors
//! over the data-parallel ranks, the routed experts over their replicas), the shards laid end
//! to end in `Model::params`. A forward all-gathers the tensors outside the layers (embedding,
//! final norm, head) once, then each layer's tensors before the layer runs; a backward gathers
//! each layer again, last to first. With prefetch (the default) the gather of the layer that
//! runs next is started as a layer starts, and completes behind its compute: a rank holds its
//! shard, two layers and the outer tensors, never the whole model.
//!
//! The gathered outer tensors stay valid until the next optimizer step, and every backward
//! follows a forward of the same weights, so backward does not gather them again, nor the
//! layer the forward ended on. Every rank gathers in the same order: a rank with fewer passes
//! in a step runs idle ones (`Model::idle_forward`, `Model::idle_pass`).
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
use kiln_dist::{Comm, InFlight, Owned};
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

/// A layer's gathered tensors: its dense ones and its routed experts, each segment (`FlatLayout::layer`)
/// in a buffer of its own, none for an empty one.
type LayerParts<B> = [Option<Owned<<B as Backend>::Slice>>; 2];

/// The gathers of a layer, started: each segment's under way on its space's ranks.
struct LayerGathers<B: Backend> {
    layer: usize,
    parts: [Option<(usize, InFlight<B::Slice>)>; 2],
}

pub struct ParamShards<B: Backend> {
    spaces: Vec<ShardedSpace<B>>,
    /// Where each layer's tensors lie in its parts (0: dense, 1: routed experts), and the
    /// outer ones in `outer`.
    layer_ranges: Vec<LayerWeights<(usize, Range<usize>)>>,
    outer_ranges: Weights<Range<usize>>,
    /// The layer last gathered and its parts.
    layer: Option<(usize, LayerParts<B>)>,
    /// The gathers of the layer expected next, under way.
    ahead: Option<LayerGathers<B>>,
    /// Gather buffers not in use, for the next gather of their length.
    free: Vec<Owned<B::Slice>>,
    /// Values in every gather buffer made so far.
    buffered: usize,
    /// The tensors outside the layers, gathered: `FlatLayout::outer`'s ranges end to end.
    outer: B::Buf,
    /// Whether the next layer's gather is started before the current layer runs.
    pub prefetch: bool,
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
        let layer_ranges = (0..flat.ranges.layers.len())
            .map(|l| {
                let segments = flat.layer(l);
                flat.ranges.layers[l].map(&mut |r| {
                    let (part, segment) = if r.start >= flat.dense { (1, &segments.1) } else { (0, &segments.0) };
                    match r.is_empty() {
                        true => (0, 0..0),
                        false => (part, r.start - segment.start..r.end - segment.start),
                    }
                })
            })
            .collect();
        Self {
            spaces,
            layer_ranges,
            outer_ranges: flat.packed_outer(),
            layer: None,
            ahead: None,
            free: Vec::new(),
            buffered: 0,
            outer: b.zeros(flat.outer_len()),
            prefetch: true,
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
        b.len(shard) + self.buffered + b.len(&self.outer)
    }

    /// This rank's shard of the flat range `r` (inside one space), where it lies in the flat
    /// layout and in the shard buffer.
    pub fn local(&self, r: &Range<usize>) -> Option<(Range<usize>, Range<usize>)> {
        let space = self.spaces.iter().find(|s| s.contains(r))?;
        let part = overlap(r, space.mine());
        let start = space.at + part.start - space.mine().start;
        Some((part.clone(), start..start + part.len()))
    }

    /// The space holding the flat range `segment`, by index.
    fn space_of(&self, segment: &Range<usize>) -> usize {
        self.spaces.iter().position(|s| s.contains(segment)).expect("a segment inside one space")
    }

    /// This rank's values of `segment` (in `shard`) and every rank's count of them.
    fn chunk<'a>(
        &self,
        b: &B,
        shard: &'a B::Slice,
        space: usize,
        segment: &Range<usize>,
    ) -> (&'a B::Slice, Vec<usize>) {
        let space = &self.spaces[space];
        let counts = space.shards.iter().map(|shard| overlap(segment, shard).len()).collect();
        let mine = overlap(segment, space.mine());
        let from = if mine.is_empty() { space.at } else { space.at + mine.start - space.mine().start };
        (b.slice(shard, from..from + mine.len()), counts)
    }

    /// A gather buffer of `len` values: a free one of that length, else a new one.
    fn buffer(&mut self, b: &B, len: usize) -> Owned<B::Slice> {
        match self.free.iter().position(|f| b.len(f) == len) {
            Some(i) => self.free.swap_remove(i),
            None => {
                self.buffered += len;
                Box::new(b.zeros(len))
            }
        }
    }

    /// Starts gathering layer `l`'s segments (collectives). Free buffers of other lengths (a
    /// layer of another shape: dense among MoE layers) are dropped first, so a rank holds at
    /// most two layers' buffers.
    fn start_layer(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice, l: usize) -> LayerGathers<B> {
        let segments = flat.layer(l);
        let lengths = [segments.0.len(), segments.1.len()];
        for unused in self.free.extract_if(.., |f| !lengths.contains(&b.len(f))) {
            self.buffered -= b.len(&unused);
        }
        let mut parts = [None, None];
        for (part, segment) in parts.iter_mut().zip([segments.0, segments.1]).filter(|(_, s)| !s.is_empty()) {
            let space = self.space_of(&segment);
            let out = self.buffer(b, segment.len());
            let (chunk, counts) = self.chunk(b, shard, space, &segment);
            let started = self.spaces[space].comm.start_all_gather_v(chunk, &counts, out, &self.what);
            *part = Some((space, started.unwrap_or_else(|e| panic!("ZeRO-3: {e:#}"))));
        }
        LayerGathers { layer: l, parts }
    }

    /// Waits for `gathers`; their parts.
    fn finish_layer(&self, gathers: LayerGathers<B>) -> LayerParts<B> {
        gathers.parts.map(|part| {
            part.map(|(space, started)| {
                self.spaces[space].comm.finish(started, &self.what).unwrap_or_else(|e| panic!("ZeRO-3: {e:#}"))
            })
        })
    }

    /// Gathers layer `l`'s tensors (collectives), unless they are the layer last gathered;
    /// then, with prefetch, starts gathering layer `next`, the one to run after it. Every
    /// rank of a space makes the same calls, so they start and skip the same gathers.
    pub fn gather_layer(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice, l: usize, next: Option<usize>) {
        if self.layer.as_ref().is_none_or(|(held, _)| *held != l) {
            if let Some((_, old)) = self.layer.take() {
                self.free.extend(old.into_iter().flatten());
            }
            let gathers = match self.ahead.take() {
                Some(ahead) if ahead.layer == l => ahead,
                other => {
                    // Gathered ahead for another order: completed and let go.
                    if let Some(other) = other {
                        let parts = self.finish_layer(other);
                        self.free.extend(parts.into_iter().flatten());
                    }
                    self.start_layer(b, flat, shard, l)
                }
            };
            self.layer = Some((l, self.finish_layer(gathers)));
        }
        let next = next.filter(|&n| self.prefetch && n != l);
        if let Some(n) = next.filter(|&n| self.ahead.as_ref().is_none_or(|a| a.layer != n)) {
            if let Some(other) = self.ahead.take() {
                let parts = self.finish_layer(other);
                self.free.extend(parts.into_iter().flatten());
            }
            self.ahead = Some(self.start_layer(b, flat, shard, n));
        }
    }

    /// Gathers the tensors outside the layers (collectives). A forward starts with it, after
    /// any optimizer step: the layer held from before is stale.
    pub fn gather_outer(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice) {
        if let Some((_, old)) = self.layer.take() {
            self.free.extend(old.into_iter().flatten());
        }
        let mut at = 0;
        for segment in flat.outer().iter().filter(|s| !s.is_empty()) {
            let space = self.space_of(segment);
            let (chunk, counts) = self.chunk(b, shard, space, segment);
            let into = b.slice_mut(&mut self.outer, at..at + segment.len());
            let gathered = self.spaces[space].comm.all_gather_v(chunk, &counts, into, &self.what);
            gathered.unwrap_or_else(|e| panic!("ZeRO-3: {e:#}"));
            at += segment.len();
        }
    }

    /// Views of layer `l`'s tensors, as last gathered.
    pub fn layer_views<'a>(&'a self, b: &B, l: usize) -> LayerWeights<&'a B::Slice> {
        let parts = match &self.layer {
            Some((held, parts)) if *held == l => parts,
            _ => panic!("ZeRO-3: layer {l}'s weights were not gathered"),
        };
        self.layer_ranges[l].map(&mut |(part, r)| match &parts[*part] {
            Some(buffer) => b.slice(buffer, r.clone()),
            None => b.slice(&self.outer, 0..0),
        })
    }

    /// Views of the tensors outside the layers (a `Weights` with no layers), as last gathered.
    pub fn outer_views<'a>(&'a self, b: &B) -> Weights<&'a B::Slice> {
        self.outer_ranges.map(|r| b.slice(&self.outer, r.clone()))
    }

    /// Every parameter gathered, a layer (then the outer tensors) at a time, into `whole` (a
    /// collective).
    pub fn gather_all(&mut self, b: &B, flat: &FlatLayout, shard: &B::Slice, whole: &mut B::Slice) {
        self.gather_outer(b, flat, shard);
        let mut at = 0;
        for s in flat.outer() {
            b.copy(b.slice_mut(whole, s.clone()), b.slice(&self.outer, at..at + s.len()));
            at += s.len();
        }
        for l in 0..flat.ranges.layers.len() {
            self.gather_layer(b, flat, shard, l, None);
            let (segments, (_, parts)) = (flat.layer(l), self.layer.as_ref().expect("a layer gathered"));
            for (segment, part) in [segments.0, segments.1].into_iter().zip(parts) {
                if let Some(part) = part {
                    b.copy(b.slice_mut(whole, segment), &**part);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::weights::layout;
    use kiln_core::Cpu;
    use kiln_dist::Local;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// One rank, counting the gathers it starts.
    #[derive(Default)]
    struct Counting {
        started: AtomicUsize,
    }

    impl Comm for Counting {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            1
        }
        fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> anyhow::Result<()> {
            Local.all_reduce_sum(buf, what)
        }
        fn reduce_scatter_v_sum(&self, buf: &[f32], c: &[usize], out: &mut [f32], what: &str) -> anyhow::Result<()> {
            Local.reduce_scatter_v_sum(buf, c, out, what)
        }
        fn all_gather_v(&self, chunk: &[f32], c: &[usize], out: &mut [f32], what: &str) -> anyhow::Result<()> {
            Local.all_gather_v(chunk, c, out, what)
        }
        fn start_all_gather_v(
            &self,
            chunk: &[f32],
            c: &[usize],
            out: Owned<[f32]>,
            what: &str,
        ) -> anyhow::Result<InFlight<[f32]>> {
            self.started.fetch_add(1, Ordering::Relaxed);
            Local.start_all_gather_v(chunk, c, out, what)
        }
        fn all_to_allv(&self, s: &[f32], sc: &[usize], r: &mut [f32], rc: &[usize], w: &str) -> anyhow::Result<()> {
            Local.all_to_allv(s, sc, r, rc, w)
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> anyhow::Result<()> {
            Local.all_reduce_sum_f64(buf, what)
        }
        fn all_gather_u64(&self, mine: &[u64], out: &mut [u64], what: &str) -> anyhow::Result<()> {
            Local.all_gather_u64(mine, out, what)
        }
        fn all_to_all_u64(&self, send: &[u64], recv: &mut [u64], what: &str) -> anyhow::Result<()> {
            Local.all_to_all_u64(send, recv, what)
        }
        fn barrier(&self, what: &str) -> anyhow::Result<()> {
            Local.barrier(what)
        }
        fn split(&self, color: usize, what: &str) -> anyhow::Result<Arc<dyn Comm>> {
            Local.split(color, what)
        }
    }

    /// A three-layer Llama's layout, its parameters numbered 0, 1, 2, ... in flat order.
    fn three_layers() -> (FlatLayout, Vec<f32>) {
        let config = Config::parse(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                "max_position_embeddings": 64}"#,
        )
        .unwrap();
        let flat = FlatLayout::new(&layout(&config));
        let params = (0..flat.total).map(|v| v as f32).collect();
        (flat, params)
    }

    /// Gathers layer `l` (then `next`) and checks its views are the layer's parameters.
    fn gather_and_check(
        shards: &mut ParamShards<Cpu>,
        flat: &FlatLayout,
        params: &[f32],
        l: usize,
        next: Option<usize>,
    ) {
        shards.gather_layer(&Cpu, flat, params, l, next);
        let (views, ranges) = (shards.layer_views(&Cpu, l), &flat.ranges.layers[l]);
        for (view, range) in views.refs().into_iter().zip(ranges.refs()) {
            assert_eq!(**view, params[range.clone()], "layer {l}");
        }
    }

    #[test]
    fn each_layer_gathers_the_next_one_ahead_and_backward_reuses_the_last() {
        let (flat, params) = three_layers();
        let layer_len = flat.layer(0).0.len();
        for prefetch in [true, false] {
            let comm = Arc::new(Counting::default());
            let ranks = ShardRanks::<Cpu> { dense: comm.clone(), experts: comm.clone() };
            let mut shards = ParamShards::new(&Cpu, &flat, ranks.spaces(&flat));
            shards.prefetch = prefetch;
            // Forward: with prefetch, layer 1's gather is under way once layer 0's completes.
            shards.gather_outer(&Cpu, &flat, &params);
            gather_and_check(&mut shards, &flat, &params, 0, Some(1));
            assert_eq!(comm.started.load(Ordering::Relaxed), if prefetch { 2 } else { 1 });
            gather_and_check(&mut shards, &flat, &params, 1, Some(2));
            gather_and_check(&mut shards, &flat, &params, 2, None);
            assert_eq!(comm.started.load(Ordering::Relaxed), 3);
            // Backward starts on the layer the forward ended on: held, not gathered again.
            for l in (0..3).rev() {
                gather_and_check(&mut shards, &flat, &params, l, l.checked_sub(1));
            }
            assert_eq!(comm.started.load(Ordering::Relaxed), 5);
            // A gather ahead that is not used (layer 1 started, layer 2 asked) is let go.
            shards.gather_outer(&Cpu, &flat, &params);
            gather_and_check(&mut shards, &flat, &params, 0, Some(1));
            gather_and_check(&mut shards, &flat, &params, 2, None);
            assert_eq!(comm.started.load(Ordering::Relaxed), if prefetch { 8 } else { 7 });
            // Held: the shard (here every parameter), the outer tensors and one gathered
            // layer, or two with prefetch.
            let layers = if prefetch { 2 } else { 1 };
            assert_eq!(shards.held_len(&Cpu, &params), flat.total + flat.outer_len() + layers * layer_len);
        }
    }
}
