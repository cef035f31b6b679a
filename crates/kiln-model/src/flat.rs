//! Training state as llm.c keeps it: parameters, gradients and each optimizer moment are one
//! flat buffer apiece, every tensor a range of it, so an optimizer step, a gradient collective
//! or a ZeRO shard is one call over a range instead of a loop over tensors.
//!
//! Order: every tensor but the routed experts, in `Weights::iter` order, then the routed
//! experts in the same order. Data and expert parallel treat the two groups differently (every
//! rank holds the first; an expert group splits the second), so each is one contiguous range,
//! and within each a layer's tensors are contiguous too (ZeRO-2 hands them over layer by layer).

use crate::weights::{LayerWeights, TensorSpec, Weights};
use kiln_core::Backend;
use std::ops::Range;

#[derive(Clone, Debug)]
pub struct FlatLayout {
    /// Each tensor's values in the flat buffer.
    pub ranges: Weights<Range<usize>>,
    /// `0..dense` holds every tensor but the routed experts, `dense..total` the routed experts.
    pub dense: usize,
    pub total: usize,
    /// Runs of consecutive tensors that do or do not take weight decay (matrices do; norms and
    /// biases do not, as the Hugging Face Trainer groups parameters), covering `0..total`.
    pub decay_runs: Vec<(Range<usize>, bool)>,
}

impl FlatLayout {
    pub fn new(layout: &Weights<TensorSpec>) -> Self {
        let specs = layout.iter();
        let dense: usize = specs.iter().filter(|s| !s.is_routed_experts()).map(|s| s.numel()).sum();
        let (mut dense_at, mut expert_at) = (0, dense);
        let ranges = layout.map(|s| {
            let at = if s.is_routed_experts() { &mut expert_at } else { &mut dense_at };
            *at += s.numel();
            *at - s.numel()..*at
        });
        let total = expert_at;
        let mut by_start: Vec<(Range<usize>, bool)> =
            ranges.iter().into_iter().zip(&specs).map(|(r, s)| (r.clone(), s.shape.len() >= 2)).collect();
        by_start.sort_by_key(|(r, _)| r.start);
        let mut decay_runs: Vec<(Range<usize>, bool)> = Vec::new();
        for (r, decays) in by_start {
            match decay_runs.last_mut() {
                Some((last, d)) if *d == decays && last.end == r.start => last.end = r.end,
                _ => decay_runs.push((r, decays)),
            }
        }
        Self { ranges, dense, total, decay_runs }
    }

    /// The routed experts' range.
    pub fn experts(&self) -> Range<usize> {
        self.dense..self.total
    }

    /// Layer `l`'s tensors: the range of its dense ones and the range of its routed experts
    /// (empty for a dense layer).
    pub fn layer(&self, l: usize) -> (Range<usize>, Range<usize>) {
        let spans = |experts: bool| {
            let layer = &self.ranges.layers[l];
            let mut it = layer.refs().into_iter().filter(|r| (r.start >= self.dense) == experts && !r.is_empty());
            let first = it.next().cloned();
            first.map_or(0..0, |f| it.fold(f, |acc, r| acc.start.min(r.start)..acc.end.max(r.end)))
        };
        (spans(false), spans(true))
    }

    /// The most values one layer holds (dense and routed experts together).
    pub fn largest_layer(&self) -> usize {
        (0..self.ranges.layers.len()).map(|l| self.layer(l)).map(|(d, e)| d.len() + e.len()).max().unwrap_or(0)
    }

    /// The values outside the layers.
    pub fn outer_len(&self) -> usize {
        self.outer().iter().map(|r| r.len()).sum()
    }

    /// The dense ranges outside the layers: the embedding, and the final norm with the head and
    /// score, which close the dense tensors.
    pub fn outer(&self) -> [Range<usize>; 2] {
        [self.ranges.embed.clone(), self.ranges.norm.start..self.dense]
    }

    /// The ranges of the tensors outside the layers, in a `Weights` with no layers.
    pub fn outer_ranges(&self) -> Weights<Range<usize>> {
        Weights { layers: Vec::new(), ..self.ranges.clone() }
    }

    /// Where each tensor outside the layers lies when `outer`'s ranges are laid end to end (a
    /// `Weights` with no layers).
    pub fn packed_outer(&self) -> Weights<Range<usize>> {
        let segments = self.outer();
        self.outer_ranges().map(|r| packed(&[r], &segments).remove(0))
    }

    /// Where each of layer `l`'s tensors lies when its dense and routed-expert ranges
    /// (`layer`) are laid end to end.
    pub fn packed_layer(&self, l: usize) -> LayerWeights<Range<usize>> {
        let (dense, experts) = self.layer(l);
        let ranges = &self.ranges.layers[l];
        let mut local = packed(&ranges.refs(), &[dense, experts]).into_iter();
        ranges.map(&mut |_| local.next().expect("one range per tensor"))
    }

    /// A view of every tensor of `flat`.
    pub fn views<'a, B: Backend>(&self, b: &B, flat: &'a B::Slice) -> Weights<&'a B::Slice> {
        self.ranges.map(|r| b.slice(flat, r.clone()))
    }

    /// A mutable view of every tensor of `flat`.
    pub fn views_mut<'a, B: Backend>(&self, b: &B, flat: &'a mut B::Slice) -> Weights<&'a mut B::Slice> {
        let mut parts = carve(b, flat, &self.ranges.iter()).into_iter();
        self.ranges.map(|_| parts.next().expect("one view per tensor"))
    }

    /// Mutable views of layer `l`'s tensors in `flat`.
    pub fn layer_views_mut<'a, B: Backend>(
        &self,
        b: &B,
        l: usize,
        flat: &'a mut B::Slice,
    ) -> LayerWeights<&'a mut B::Slice> {
        layer_views(b, flat, &self.ranges.layers[l])
    }

    /// Mutable views of the tensors outside the layers (a `Weights` with no layers) in `flat`.
    pub fn outer_views_mut<'a, B: Backend>(&self, b: &B, flat: &'a mut B::Slice) -> Weights<&'a mut B::Slice> {
        outer_views(b, flat, &self.ranges)
    }
}

/// The values two ranges share (empty, at the later start, when they share none).
pub fn overlap(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    start..a.end.min(b.end).max(start)
}

/// Where the tensors of `ranges` lie when the flat `segments` (each tensor inside one) are laid
/// end to end.
fn packed(ranges: &[&Range<usize>], segments: &[Range<usize>]) -> Vec<Range<usize>> {
    ranges
        .iter()
        .map(|r| {
            let mut at = 0;
            for s in segments {
                if s.start <= r.start && r.end <= s.end {
                    return at + r.start - s.start..at + r.end - s.start;
                }
                at += s.len();
            }
            unreachable!("a tensor outside its segments")
        })
        .collect()
}

/// Mutable views of a layer's tensors at `ranges` of `flat`.
pub fn layer_views<'a, B: Backend>(
    b: &B,
    flat: &'a mut B::Slice,
    ranges: &LayerWeights<Range<usize>>,
) -> LayerWeights<&'a mut B::Slice> {
    let mut parts = carve(b, flat, &ranges.refs()).into_iter();
    ranges.map(&mut |_| parts.next().expect("one view per tensor"))
}

/// Mutable views of the tensors outside the layers (embedding, final norm, head, score) at
/// `ranges` of `flat`, in a `Weights` with no layers (`ranges.layers` is not read).
pub fn outer_views<'a, B: Backend>(
    b: &B,
    flat: &'a mut B::Slice,
    ranges: &Weights<Range<usize>>,
) -> Weights<&'a mut B::Slice> {
    let r = ranges;
    let mut wanted: Vec<&Range<usize>> =
        [Some(&r.embed), Some(&r.norm), r.lm_head.as_ref(), r.score.as_ref()].into_iter().flatten().collect();
    wanted.extend(r.hc_head.iter().flat_map(|h| h.refs()));
    let mut parts = carve(b, flat, &wanted).into_iter();
    let mut take = || parts.next().expect("one view per tensor");
    Weights {
        embed: take(),
        layers: Vec::new(),
        norm: take(),
        lm_head: r.lm_head.as_ref().map(|_| take()),
        score: r.score.as_ref().map(|_| take()),
        hc_head: r.hc_head.as_ref().map(|h| h.map(&mut |_| take())),
    }
}

/// Mutable views of `ranges` (disjoint, in any order) of `flat`, in the order given.
fn carve<'a, B: Backend>(b: &B, flat: &'a mut B::Slice, ranges: &[&Range<usize>]) -> Vec<&'a mut B::Slice> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut out: Vec<Option<&'a mut B::Slice>> = (0..ranges.len()).map(|_| None).collect();
    let (mut rest, mut at) = (flat, 0);
    for i in order {
        let r = ranges[i];
        assert!(r.start >= at, "flat views overlap");
        let (_, from) = b.split_at_mut(rest, r.start - at);
        let (view, after) = b.split_at_mut(from, r.len());
        out[i] = Some(view);
        (rest, at) = (after, r.end);
    }
    out.into_iter().map(|v| v.expect("a view per range")).collect()
}
