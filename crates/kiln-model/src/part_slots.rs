//! The activations a pipeline stage holds for the chunks in flight: slots of activations,
//! each a chunk's forward until its backward, in pools of the stage's parts laid out alike
//! (with interleaved stages each part is a run of layers; runs of the same layers' kinds
//! share one pool, so a slot a part's backward frees serves another part's forward); one
//! gradient scratch that every chunk's backward borrows (a slot keeps only the gradient it
//! receives or sends, `dres`); and the inputs that arrived before their forward (`Inbox`).

use crate::activations::{Activations, GradScratch};
use crate::config::Config;
use crate::model_interleaved::HandOvers;
use crate::pipeline::{run_config, Pipeline};
use kiln_core::Backend;
use std::collections::HashMap;
use std::ops::Range;

/// Which pool each part of `pp`'s stage (local config `config`) takes its slots from: the
/// first part laid out as it is (the same layers' kinds and windows, and the head or not).
pub fn part_pools<B: Backend>(config: &Config, pp: &Pipeline<B>) -> Vec<usize> {
    let layout = |v: usize| {
        let run = pp.part_layers(v);
        let moe: Vec<bool> = run.clone().map(|l| config.is_moe_layer(l)).collect();
        let mut part = run_config(config, run);
        part.stage = None;
        (part, moe, pp.part_heads(v))
    };
    let layouts: Vec<_> = (0..pp.parts()).map(layout).collect();
    (0..layouts.len()).map(|v| layouts.iter().position(|l| *l == layouts[v]).expect("itself")).collect()
}

/// A stage's activations for the chunks of a pass: the pools' slots and (training) the
/// gradient scratch their backwards share.
pub struct ChunkActs<B: Backend> {
    pub pools: Vec<Vec<Activations<B>>>,
    scratch: Option<GradScratch<B>>,
    /// Interleaved stages: the ticks' staging and waiting inputs, kept from pass to pass.
    pub ticks: TickBuffers<B>,
}

/// The buffers interleaved ticks hand over through: the all-to-all's staging (`HandOvers`)
/// and the inputs waiting for their forward (`Inbox`), kept between passes so that a pass
/// allocates none once the shapes repeat.
pub(crate) struct TickBuffers<B: Backend> {
    hand_overs: Option<HandOvers<B>>,
    pub inbox: Inbox<B>,
}

impl<B: Backend> Default for TickBuffers<B> {
    fn default() -> Self {
        Self { hand_overs: None, inbox: Inbox::default() }
    }
}

impl<B: Backend> TickBuffers<B> {
    /// The staging for messages of at most `message_len` values, taken out (put it back with
    /// `keep`); laid out anew only when the last one is too small.
    pub fn hand_overs(&mut self, b: &B, message_len: usize) -> HandOvers<B> {
        match self.hand_overs.take() {
            Some(h) if h.fits(b, message_len) => h,
            _ => HandOvers::new(b, message_len),
        }
    }

    pub fn keep(&mut self, hand_overs: HandOvers<B>) {
        self.hand_overs = Some(hand_overs);
    }
}

impl<B: Backend> ChunkActs<B> {
    /// `counts[p]` activations of `rows × seq` for each pool p of `pp`'s stage (local config
    /// `config`; laid out for the first part `pool_of` puts in the pool; `training`, laid out
    /// as training's are), taken from `held` where they fit (the last pass's); with
    /// `backward` the shared scratch.
    pub fn new(
        b: &B,
        (config, pp): (&Config, &Pipeline<B>),
        held: Option<Self>,
        (pool_of, counts): (&[usize], &[usize]),
        (rows, seq): (usize, usize),
        (training, recompute, backward): (bool, bool, bool),
    ) -> Self {
        let fits = |a: &Activations<B>| {
            a.rows == rows && a.seq == seq && a.recompute == (recompute && training) && a.grad.is_some() == training
        };
        if let Some(held) = held.filter(|h| {
            h.scratch.is_some() == backward
                && h.pools.len() == counts.len()
                && h.pools.iter().zip(counts).all(|(pool, &n)| pool.len() >= n && pool.iter().all(fits))
        }) {
            return held;
        }
        let pools: Vec<Vec<Activations<B>>> = (0..counts.len())
            .map(|pool| {
                let v = pool_of.iter().position(|&p| p == pool).expect("a part per pool");
                let (run, heads) = (pp.part_layers(v), pp.part_heads(v));
                let layout = (training, recompute);
                (0..counts[pool])
                    .map(|_| Activations::for_part(b, config, run.clone(), (rows, seq), layout, heads))
                    .collect()
            })
            .collect();
        let here = pools[0][0].sequence.as_ref().map_or(rows * seq, |sp| sp.tokens.len());
        let scratch = backward.then(|| GradScratch::new(b, config, (rows * seq, here)));
        Self { pools, scratch, ticks: TickBuffers::default() }
    }
}

/// A stage's activation slots for one pass.
pub struct PartSlots<B: Backend> {
    pub acts: ChunkActs<B>,
    /// Each part's pool, and the part's first local layer.
    pool_of: Vec<usize>,
    first_layer: Vec<usize>,
    /// The slot of part v's chunk c at `v · chunks + c`; without, chunk c's is c mod slots.
    slot_of: Option<Vec<usize>>,
    chunks: usize,
}

impl<B: Backend> PartSlots<B> {
    /// `acts`' pools for the parts of `runs` (`pool_of[v]` part v's), placed by `slot_of`.
    pub fn new(
        acts: ChunkActs<B>,
        (pool_of, runs): (Vec<usize>, &[Range<usize>]),
        slot_of: Option<Vec<usize>>,
        chunks: usize,
    ) -> Self {
        let first_layer = runs.iter().map(|r| r.start).collect();
        Self { acts, pool_of, first_layer, slot_of, chunks }
    }

    /// The pool and slot of part `part`'s chunk `chunk`.
    pub fn place_of(&self, part: usize, chunk: usize) -> (usize, usize) {
        let pool = self.pool_of[part];
        let slot = match &self.slot_of {
            Some(slot_of) => slot_of[part * self.chunks + chunk],
            None => chunk % self.acts.pools[pool].len(),
        };
        (pool, slot)
    }

    /// Part `part`'s chunk `chunk`'s activations, laid out for the part's layers.
    pub fn get(&mut self, part: usize, chunk: usize) -> &mut Activations<B> {
        let (pool, slot) = self.place_of(part, chunk);
        let a = &mut self.acts.pools[pool][slot];
        a.first_layer = self.first_layer[part];
        a
    }

    /// Part `part`'s chunk `chunk`'s activations, to read.
    pub fn peek(&self, part: usize, chunk: usize) -> &Activations<B> {
        let (pool, slot) = self.place_of(part, chunk);
        &self.acts.pools[pool][slot]
    }

    /// Two chunks' activations of part 0 at once (in different slots).
    pub fn pair(&mut self, a: usize, b: usize) -> (&mut Activations<B>, &mut Activations<B>) {
        let ((pool, s), (_, r)) = (self.place_of(0, a), self.place_of(0, b));
        assert_ne!(s, r, "two chunks in flight share activations");
        let acts = &mut self.acts.pools[pool];
        if s < r {
            let (low, high) = acts.split_at_mut(r);
            (&mut low[s], &mut high[0])
        } else {
            let (low, high) = acts.split_at_mut(s);
            (&mut high[0], &mut low[r])
        }
    }

    /// Keeps `values`, part `part`'s chunk `chunk`'s input, until its forward.
    pub fn arrive(&mut self, b: &B, (part, chunk): (usize, usize), values: &B::Slice) {
        self.acts.ticks.inbox.put(b, (part, chunk), values);
    }

    /// Moves the input that arrived for part `part`'s chunk `chunk` into its activations.
    pub fn take_input(&mut self, part: usize, chunk: usize) {
        let mut input = self.acts.ticks.inbox.take((part, chunk));
        std::mem::swap(&mut self.get(part, chunk).layer_inputs[0], &mut input);
        self.acts.ticks.inbox.spare.push(input);
    }

    /// Lends the shared gradient scratch to part `part`'s chunk `chunk` for its backward
    /// (the chunk keeps its own `dres`), until `return_scratch`.
    pub fn lend_scratch(&mut self, part: usize, chunk: usize) {
        self.swap_scratch(part, chunk, false);
    }

    /// Takes back what `lend_scratch` lent.
    pub fn return_scratch(&mut self, part: usize, chunk: usize) {
        self.swap_scratch(part, chunk, true);
    }

    /// Swaps the chunk's scratch with the shared one and then their `dres` back (returning:
    /// the other way round).
    fn swap_scratch(&mut self, part: usize, chunk: usize, returning: bool) {
        let (pool, slot) = self.place_of(part, chunk);
        let own = self.acts.pools[pool][slot].grad.as_mut().expect("training activations");
        let shared = self.acts.scratch.as_mut().expect("a training pass's scratch");
        if returning {
            std::mem::swap(&mut own.dres, &mut shared.dres);
        }
        std::mem::swap(own, shared);
        if !returning {
            std::mem::swap(&mut own.dres, &mut shared.dres);
        }
    }

    /// The activations back, for the next pass.
    pub fn into_acts(self) -> ChunkActs<B> {
        self.acts
    }
}

/// Inputs that arrived before their forward, by (part, chunk), in buffers reused as they go
/// (kept between passes in `TickBuffers`).
pub(crate) struct Inbox<B: Backend> {
    waiting: HashMap<(usize, usize), B::Buf>,
    spare: Vec<B::Buf>,
}

impl<B: Backend> Default for Inbox<B> {
    fn default() -> Self {
        Self { waiting: HashMap::new(), spare: Vec::new() }
    }
}

impl<B: Backend> Inbox<B> {
    /// Keeps a copy of `values`, the input of `at` = (part, chunk).
    pub fn put(&mut self, b: &B, at: (usize, usize), values: &B::Slice) {
        // Spares of another length (an earlier step's chunks) are let go, not hoarded.
        let mut buf = match self.spare.iter().position(|s| b.len(s) == b.len(values)) {
            Some(i) => self.spare.swap_remove(i),
            None => {
                self.spare.clear();
                b.zeros(b.len(values))
            }
        };
        b.copy(&mut buf, values);
        self.waiting.insert(at, buf);
    }

    /// The input of `at`, taken out (its buffer back with `spare`).
    fn take(&mut self, at: (usize, usize)) -> B::Buf {
        self.waiting.remove(&at).unwrap_or_else(|| panic!("interleaved pipeline: no input arrived for {at:?}"))
    }

    /// Copies the input of `at` into `dst`.
    pub fn take_into(&mut self, b: &B, at: (usize, usize), dst: &mut B::Slice) {
        let buf = self.take(at);
        b.copy(dst, &buf);
        self.spare.push(buf);
    }
}
