//! The gradients of a step: whole on every rank, or (ZeRO-2) only this rank's chunk of them.
//!
//! ZeRO-2 keeps, of the summed gradients, just the chunk of the flat parameter index space
//! whose moments the rank holds (`zero.rs`). Backward hands over each layer's gradients the
//! moment they are complete; they are reduce-scattered over the ranks (each receiving the sum
//! of the part that falls in its chunk), added into the chunk and freed, and the embedding,
//! final norm, head and score likewise at the end of the backward. No rank holds more than
//! one layer's whole gradients besides those, and between backwards only its chunk.

use kiln_core::Cpu;
use kiln_dist::Comm;
use kiln_model::weights::LayerWeights;
use kiln_model::{GradSink, TensorSpec, Weights};
use std::ops::Range;

pub enum Grads {
    Whole(Weights<Vec<f32>>),
    Sharded(Box<ShardedGrads>),
}

impl Grads {
    /// Sets every gradient to zero for a new step.
    pub fn zero(&mut self) {
        match self {
            Self::Whole(w) => crate::optim::zero_grads(&Cpu, w),
            Self::Sharded(s) => s.mine.fill(0.0),
        }
    }

    /// Bytes of gradients held between backwards.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Whole(w) => w.iter().into_iter().map(|g| g.len() * 4).sum(),
            Self::Sharded(s) => s.mine.len() * 4,
        }
    }
}

impl GradSink<Cpu> for Grads {
    fn layer(&mut self, l: usize) -> &mut LayerWeights<Vec<f32>> {
        match self {
            Self::Whole(w) => &mut w.layers[l],
            Self::Sharded(s) => s.layer(l),
        }
    }

    fn layer_done(&mut self, l: usize) {
        match self {
            Self::Whole(_) => {}
            Self::Sharded(s) => s.layer_done(l),
        }
    }

    fn outer(&mut self) -> &mut Weights<Vec<f32>> {
        match self {
            Self::Whole(w) => w,
            Self::Sharded(s) => s.outer(),
        }
    }

    fn outer_done(&mut self) {
        match self {
            Self::Whole(_) => {}
            Self::Sharded(s) => s.outer_done(),
        }
    }
}

/// ZeRO-2: this rank's chunk of the summed gradients, filled layer by layer.
pub struct ShardedGrads {
    comm: &'static dyn Comm,
    layout: Weights<TensorSpec>,
    /// Flat range of each layer's tensors; the embedding is `0..embed`, the final norm, head
    /// and score `tail..total`.
    layers: Vec<Range<usize>>,
    embed: usize,
    tail: usize,
    /// Chunk length and this rank's chunk, as `ShardedAdamW` cuts them.
    chunk: usize,
    range: Range<usize>,
    /// Σ over ranks and backwards of the gradients in `range`.
    pub mine: Vec<f32>,
    /// The layer whose backward is running, and the outer gradients while a backward runs.
    current: LayerWeights<Vec<f32>>,
    outer: Weights<Vec<f32>>,
    /// Names the reductions in errors ("gradients at step 12").
    pub what: String,
}

impl ShardedGrads {
    pub fn new(comm: &'static dyn Comm, layout: &Weights<TensorSpec>, chunk: usize, range: Range<usize>) -> Self {
        let numel = |specs: Vec<&TensorSpec>| specs.iter().map(|s| s.numel()).sum::<usize>();
        let embed = layout.embed.numel();
        let mut at = embed;
        let layers = layout
            .layers
            .iter()
            .map(|l| {
                let n = numel(l.refs());
                at += n;
                at - n..at
            })
            .collect();
        let outer = outer_of(layout, |_| Vec::new());
        Self {
            comm,
            layout: layout.clone(),
            layers,
            embed,
            tail: at,
            chunk,
            mine: vec![0.0; range.len()],
            range,
            current: layout.layers[0].map(&mut |_| Vec::new()),
            outer,
            what: String::new(),
        }
    }

    /// Sums `data` — the gradients of the flat `segments`, in order — over the ranks, each
    /// adding the part inside its chunk into `mine`.
    fn reduce(&mut self, segments: &[Range<usize>], data: &[f32]) {
        let (size, chunk) = (self.comm.size(), self.chunk);
        let owned = |r: usize| r * chunk..(r + 1) * chunk;
        let overlap =
            |a: &Range<usize>, b: &Range<usize>| a.start.max(b.start)..a.end.min(b.end).max(a.start.max(b.start));
        let counts: Vec<usize> =
            (0..size).map(|r| segments.iter().map(|s| overlap(s, &owned(r)).len()).sum()).collect();
        let mut summed = vec![0f32; counts[self.comm.rank()]];
        self.comm
            .reduce_scatter_v_sum(data, &counts, &mut summed, &self.what)
            .unwrap_or_else(|e| panic!("ZeRO-2: {e:#}"));
        let mut at = 0;
        for s in segments {
            let mine = overlap(s, &self.range);
            if mine.is_empty() {
                continue;
            }
            let into = &mut self.mine[mine.start - self.range.start..mine.end - self.range.start];
            into.iter_mut().zip(&summed[at..at + mine.len()]).for_each(|(g, x)| *g += x);
            at += mine.len();
        }
    }

    /// Takes part in a step's reductions without gradients of its own, for a rank with fewer
    /// micro-batches than the others in the step.
    pub fn idle_backward(&mut self) {
        for l in (0..self.layers.len()).rev() {
            self.layer(l);
            self.layer_done(l);
        }
        self.outer();
        self.outer_done();
    }
}

impl GradSink<Cpu> for ShardedGrads {
    fn layer(&mut self, l: usize) -> &mut LayerWeights<Vec<f32>> {
        self.current = self.layout.layers[l].map(&mut |s| vec![0.0; s.numel()]);
        &mut self.current
    }

    fn layer_done(&mut self, l: usize) {
        let done = std::mem::replace(&mut self.current, self.layout.layers[l].map(&mut |_| Vec::new()));
        let flat: Vec<f32> = done.refs().into_iter().flatten().copied().collect();
        self.reduce(&[self.layers[l].clone()], &flat);
    }

    fn outer(&mut self) -> &mut Weights<Vec<f32>> {
        if self.outer.embed.is_empty() {
            self.outer = outer_of(&self.layout, |s| vec![0.0; s.numel()]);
        }
        &mut self.outer
    }

    fn outer_done(&mut self) {
        let outer = std::mem::replace(&mut self.outer, outer_of(&self.layout, |_| Vec::new()));
        let flat: Vec<f32> = outer.iter().into_iter().flatten().copied().collect();
        let total = self.tail + flat.len() - self.embed;
        self.reduce(&[0..self.embed, self.tail..total], &flat);
    }
}

/// The tensors outside the layers (embedding, final norm, head, score), made by `f`.
fn outer_of(layout: &Weights<TensorSpec>, mut f: impl FnMut(&TensorSpec) -> Vec<f32>) -> Weights<Vec<f32>> {
    Weights {
        embed: f(&layout.embed),
        layers: Vec::new(),
        norm: f(&layout.norm),
        lm_head: layout.lm_head.as_ref().map(&mut f),
        score: layout.score.as_ref().map(&mut f),
    }
}
