//! How the ranks of a run turn their gradients into one update, for every layout: gradients
//! summed over the ranks that hold each parameter, clipped to the global norm, AdamW applied.
//!
//! The flat parameters (`kiln_model::flat`) form one or two spaces: the dense tensors, which
//! every rank holds, and the routed experts, which every rank holds too or, under expert
//! parallel, each expert group splits, a share per rank, so that the space of a rank's share
//! is over its replicas (the ranks of the other groups holding the same share). Per space:
//!
//! - replicated (ZeRO 0): the gradients are all-reduced, after backward or, with
//!   `train.overlap_grad_reduce`, in buckets during the step's last backward
//!   (`crate::grad_buckets`); every rank updates the whole space;
//! - ZeRO-1: reduce-scattered; each rank updates its shard with the moments it alone holds,
//!   and an all-gather gives every rank every updated shard;
//! - ZeRO-2: as ZeRO-1, but backward hands over each layer's gradients as soon as they are
//!   complete (a reduce-scatter into the shard), so no rank ever holds whole gradients;
//! - ZeRO-3: as ZeRO-2, and the model holds only its shards of the weights as well
//!   (`kiln_model::param_shards`), so the update needs no all-gather: forward and backward
//!   gather each layer as they reach it.
//!
//! The global norm sums each rank's squares over the ranks that split the space: the shards'
//! ranks under ZeRO, and the expert group for the routed experts under expert parallel.
//!
//! With Muon (`crate::muon`) the hidden matrices take Muon's update, its momentum in the
//! space's first moment, and everything else AdamW's. Under ZeRO a rank updates the matrices
//! inside its shard alone; a matrix that a shard boundary cuts has its momentum (elementwise)
//! updated piece by piece on the ranks holding the pieces, the pieces all-gathered, and the
//! Newton–Schulz iteration run on each of those ranks, which applies its own piece.

use crate::grad_buckets::{GradBuckets, Reached};
use crate::muon::{self, Matrix, MuonSettings, Scratch};
use crate::optim::adamw_step;
use crate::started_reductions::StartedReductions;
use anyhow::Result;
use kiln_core::{AdamW as Hyper, Backend};
use kiln_dist::Comm;
use kiln_model::flat::{layer_views, outer_views, overlap};
use kiln_model::param_shards::ShardRanks;
use kiln_model::weights::LayerWeights;
use kiln_model::{FlatGrads, FlatLayout, GradSink, Model, Weights};
use std::ops::Range;
use std::sync::Arc;

/// A group of ranks whose collectives move `B`'s buffers.
pub type Ranks<B> = Arc<dyn Comm<<B as Backend>::Slice>>;

/// The ranks that share the dense parameters' update (`world`, the data-parallel ranks) and
/// the routed experts' (`replicas` under expert parallel, else the same ranks); ZeRO-3 shards
/// the weights over them as the optimizer state (`ModelShare::params`).
pub fn shard_ranks<B: Backend>(world: &Ranks<B>, replicas: Option<Ranks<B>>) -> ShardRanks<B> {
    ShardRanks { dense: Arc::clone(world), experts: replicas.unwrap_or_else(|| Arc::clone(world)) }
}

/// One group of parameters and the ranks that share its update.
pub struct Space<B: Backend> {
    /// Its values in the flat buffers.
    pub range: Range<usize>,
    /// The ranks that hold these parameters.
    pub comm: Ranks<B>,
    /// Under expert parallel, for the routed experts: the ranks that split them.
    expert_group: Option<Ranks<B>>,
    /// The values this rank updates (all of `range`, or its ZeRO shard), and every rank's count.
    pub mine: Range<usize>,
    /// Where `mine` starts in the parameters `step` updates: at `mine.start` of the whole
    /// parameters, or (ZeRO-3) after the shards of the spaces before it.
    held_at: usize,
    counts: Vec<usize>,
    /// AdamW's moments of `mine`.
    pub m: B::Buf,
    pub v: B::Buf,
    /// ZeRO: the summed gradients of `mine`, and room for one reduction's share of them.
    shard: Option<(B::Buf, B::Buf)>,
    /// Stem of its moments' shard files in checkpoints.
    pub name: String,
}

impl<B: Backend> Space<B> {
    /// Every rank's shard of the space.
    fn shards(&self) -> Vec<Range<usize>> {
        (0..self.counts.len()).map(|r| self.shard_of(r)).collect()
    }

    /// `range` over the ranks of `comm`, whole on each or (`sharded`) a shard apiece.
    pub(crate) fn new(b: &B, range: Range<usize>, comm: Ranks<B>, sharded: bool, name: String) -> Self {
        let (rank, size) = (comm.rank(), comm.size());
        let (mine, counts) = match sharded {
            true => (kiln_dist::shard_in(&range, rank, size), kiln_dist::shard_counts(range.len(), size)),
            false => (range.clone(), vec![range.len()]),
        };
        let n = mine.len();
        let shard = sharded.then(|| (b.zeros(n), b.zeros(n)));
        let held_at = mine.start;
        Self { range, comm, expert_group: None, mine, held_at, counts, m: b.zeros(n), v: b.zeros(n), shard, name }
    }

    /// Whether this rank updates a shard (ZeRO) rather than the whole space.
    pub fn sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// ZeRO: sums `data`, the gradients of the flat `segments` laid end to end, over the
    /// space's ranks, each adding the part inside its shard into its summed gradients.
    fn reduce_segments(&mut self, b: &B, data: &B::Slice, segments: &[Range<usize>], what: &str) -> Result<()> {
        let counts = self.counts_in_shards(segments);
        let (grads, received) = self.shard.as_mut().expect("a sharded space");
        let piece = b.slice_mut(received, 0..counts[self.comm.rank()]);
        self.comm.reduce_scatter_v_sum(data, &counts, piece, what)?;
        land_in(b, (grads, &self.mine), piece, segments, Landing::Add);
        Ok(())
    }

    /// ZeRO: the summed gradients of this rank's shard.
    #[cfg(test)]
    pub(crate) fn summed_shard(&self) -> &B::Slice {
        &self.shard.as_ref().expect("a sharded space").0
    }

    /// ZeRO: how many values of the flat `segments` fall in each rank's shard, in rank order.
    pub(crate) fn counts_in_shards(&self, segments: &[Range<usize>]) -> Vec<usize> {
        let shards = self.shards();
        shards.iter().map(|shard| segments.iter().map(|s| overlap(s, shard).len()).sum()).collect()
    }

    /// ZeRO: `received`, this rank's piece of a reduction of `segments` (their values inside
    /// its shard, in order), into its summed gradients.
    pub(crate) fn land(&mut self, b: &B, received: &B::Slice, segments: &[Range<usize>], landing: Landing) {
        let (grads, _) = self.shard.as_mut().expect("a sharded space");
        land_in(b, (grads, &self.mine), received, segments, landing);
    }

    /// Rank `r`'s shard of the space.
    fn shard_of(&self, r: usize) -> Range<usize> {
        kiln_dist::shard_in(&self.range, r, self.counts.len())
    }
}

/// How a reduction's piece enters a shard's summed gradients: added (ZeRO-2, whose backwards
/// each reduce their own gradients), or set (ZeRO-1, one reduction of the step's whole ones).
#[derive(Clone, Copy)]
pub(crate) enum Landing {
    Add,
    Set,
}

/// `received`, the values of `segments` inside the shard `mine` (in order), into the shard's
/// summed gradients `grads`.
fn land_in<B: Backend>(
    b: &B,
    (grads, mine): (&mut B::Slice, &Range<usize>),
    received: &B::Slice,
    segments: &[Range<usize>],
    landing: Landing,
) {
    let mut at = 0;
    for part in segments.iter().map(|s| overlap(s, mine)).filter(|p| !p.is_empty()) {
        let into = b.slice_mut(grads, part.start - mine.start..part.end - mine.start);
        let from = b.slice(received, at..at + part.len());
        match landing {
            Landing::Add => b.add_assign(into, from),
            Landing::Set => b.copy(into, from),
        }
        at += part.len();
    }
}

/// The summed gradients a space's rank updates from: its shard's, or the space's `range` of
/// the whole gradients.
fn held<'a, B: Backend>(
    b: &B,
    shard: &'a mut Option<(B::Buf, B::Buf)>,
    whole: Option<&'a mut FlatGrads<B>>,
    range: &Range<usize>,
) -> &'a mut B::Slice {
    match (shard, whole) {
        (Some((grads, _)), _) => grads,
        (None, Some(whole)) => b.slice_mut(&mut whole.flat, range.clone()),
        (None, None) => unreachable!("a replicated space keeps whole gradients"),
    }
}

/// Muon on the matrices that the boundaries of `shards` cut (see the module notes), for the
/// rank of `comm` that holds `shards[rank]` with its parameters `params`, the summed gradients
/// `grads` and momentum `m` of it.
#[allow(clippy::too_many_arguments)]
fn muon_on_cut_matrices<B: Backend>(
    b: &B,
    (comm, shards): (&Ranks<B>, &[Range<usize>]),
    (settings, matrices, scratch): (&MuonSettings, &[Matrix], &mut Scratch<B>),
    (params, grads): (&mut B::Slice, &B::Slice),
    m: &mut B::Slice,
    lr_decay: (f32, f32),
    what: &str,
) -> Result<()> {
    let space = shards[0].start..shards[shards.len() - 1].end;
    let cut: Vec<&Matrix> = matrices
        .iter()
        .filter(|x| x.range.start >= space.start && x.range.end <= space.end)
        .filter(|x| !shards.iter().any(|s| s.start <= x.range.start && x.range.end <= s.end))
        .collect();
    if cut.is_empty() {
        return Ok(());
    }
    let (rank, mine) = (comm.rank(), &shards[comm.rank()]);
    let pieces: Vec<Vec<Range<usize>>> =
        shards.iter().map(|shard| cut.iter().map(|x| overlap(&x.range, shard)).collect()).collect();
    let counts: Vec<usize> = pieces.iter().map(|p| p.iter().map(|r| r.len()).sum()).collect();
    // This rank's pieces of the momentum-updated matrices, end to end.
    let mut own = b.zeros(counts[rank]);
    let mut at = 0;
    for piece in pieces[rank].iter().filter(|p| !p.is_empty()) {
        let local = piece.start - mine.start..piece.end - mine.start;
        let (update, buf) = (b.slice_mut(&mut own, at..at + piece.len()), b.slice_mut(m, local.clone()));
        b.muon_momentum(update, buf, b.slice(grads, local), settings.momentum, settings.nesterov);
        at += piece.len();
    }
    let mut gathered = b.zeros(counts.iter().sum());
    comm.all_gather_v(&own, &counts, &mut gathered, what)?;
    // Rank r's pieces start after the pieces of the ranks before it.
    let mut cursor: Vec<usize> = counts.iter().scan(0, |sum, &c| Some(std::mem::replace(sum, *sum + c))).collect();
    for (i, x_spec) in cut.iter().enumerate() {
        let x = scratch.update(b, x_spec.range.len());
        for (r, rank_pieces) in pieces.iter().enumerate() {
            let piece = &rank_pieces[i];
            if piece.is_empty() {
                continue;
            }
            let into = piece.start - x_spec.range.start..piece.end - x_spec.range.start;
            b.copy(b.slice_mut(x, into), b.slice(&gathered, cursor[r]..cursor[r] + piece.len()));
            cursor[r] += piece.len();
        }
        let my_piece = &pieces[rank][i];
        if my_piece.is_empty() {
            continue;
        }
        muon::orthogonalise(b, settings, scratch, (x_spec.rows, x_spec.cols));
        let x = scratch.update(b, x_spec.range.len());
        let x_piece = b.slice_mut(x, my_piece.start - x_spec.range.start..my_piece.end - x_spec.range.start);
        let own = my_piece.start - mine.start..my_piece.end - mine.start;
        muon::apply(b, settings, lr_decay, x_spec, b.slice_mut(params, own), x_piece);
    }
    Ok(())
}

/// The update of every parameter from the step's gradients, in whatever layout the run uses.
pub struct DataParallel<B: Backend> {
    flat: Arc<FlatLayout>,
    pub spaces: Vec<Space<B>>,
    /// The gradients of every parameter (ZeRO 0 and 1); ZeRO-2 keeps only the spaces' shards.
    whole: Option<FlatGrads<B>>,
    /// ZeRO-2: the gradients of the layer backward is filling, and of the tensors outside the
    /// layers, which a backward adds into at its start (final norm, head) and end (embedding).
    scratch: B::Buf,
    outer_scratch: B::Buf,
    pub hyper: Hyper,
    /// ZeRO on several ranks: each rank holds (and checkpoints) shards of the moments.
    pub sharded: bool,
    /// ZeRO-3 on several ranks: the parameters `step` updates are this rank's shards.
    pub shards_weights: bool,
    /// Names the collectives in errors ("gradients at step 12").
    pub what: String,
    /// Muon's settings and matrices, when it updates the hidden matrices.
    muon: Option<(MuonSettings, Vec<Matrix>, Scratch<B>)>,
    /// The runs of tensors AdamW updates, with their weight decay: every tensor, or with Muon
    /// the tensors outside its matrices.
    adamw_runs: Vec<(Range<usize>, bool)>,
    /// Under tensor parallel, the group that splits the layers' tensors and the flat ranges of
    /// the tensors it cuts (see `norm`).
    tensor_parallel: Option<(Ranks<B>, Vec<Range<usize>>)>,
    /// Under pipeline parallel, the stages (whose squares add up in `norm`) and, on the first
    /// and last stage of a model with a tied head, the two of them and the embedding's range.
    pipeline: Option<(Ranks<B>, Option<TiedEmbedding<B>>)>,
    /// With whole gradients (ZeRO 0 and 1), their sums started in buckets behind the step's
    /// last backward (under pipeline parallel, its last chunk's).
    buckets: Option<GradBuckets<B>>,
    /// ZeRO-2 and 3: the reductions backward has started and not yet finished (with
    /// `train.overlap_grad_reduce`; else each is waited for as it starts).
    reductions: Option<StartedReductions<B>>,
}

/// The embedding's two copies under pipeline parallel with a tied head: the first stage's
/// (input) and the last stage's (head). Their gradients are summed over the two before the
/// update, and the norm counts the first stage's.
struct TiedEmbedding<B: Backend> {
    ends: Ranks<B>,
    range: Range<usize>,
    /// Where the embedding lies among ZeRO-2's outer gradients.
    packed: Range<usize>,
    /// This is the last stage's copy.
    copy: bool,
}

impl<B: Backend> TiedEmbedding<B> {
    fn sum(&self, grads: &mut B::Slice, what: &str) -> Result<()> {
        self.ends.all_reduce_sum(grads, &format!("{what}: tied embedding"))
    }
}

/// `runs` without the values of `matrices` (sorted, each inside one run).
fn without(runs: &[(Range<usize>, bool)], matrices: &[Matrix]) -> Vec<(Range<usize>, bool)> {
    let mut out = Vec::new();
    for (run, decays) in runs {
        let mut at = run.start;
        for m in matrices.iter().filter(|m| m.range.start >= run.start && m.range.end <= run.end) {
            if m.range.start > at {
                out.push((at..m.range.start, *decays));
            }
            at = m.range.end;
        }
        if at < run.end {
            out.push((at..run.end, *decays));
        }
    }
    out
}

impl<B: Backend> DataParallel<B> {
    /// The update of `model`'s parameters over `world`, with ZeRO stage `zero`; under expert
    /// parallel `replicas` are the ranks holding the same experts as this one. With `muon`,
    /// Muon updates the hidden matrices.
    pub fn new(
        b: &B,
        model: &Model<B>,
        (world, replicas): (&Ranks<B>, Option<Ranks<B>>),
        zero: u8,
        hyper: Hyper,
        muon: Option<MuonSettings>,
    ) -> Self {
        let flat = Arc::clone(&model.flat);
        let sharded = zero >= 1 && world.size() > 1;
        let muon = muon.map(|settings| {
            let matrices = muon::matrices(&model.layout, &flat);
            let scratch = Scratch::new(b, &matrices);
            (settings, matrices, scratch)
        });
        let adamw_runs = match &muon {
            Some((_, matrices, _)) => without(&flat.decay_runs, matrices),
            None => flat.decay_runs.clone(),
        };
        let tensor_parallel = model.tensor_parallel().map(|tp| {
            assert!(muon.is_none(), "Muon orthogonalises whole matrices, which tensor parallel cuts");
            (Arc::clone(&tp.group), tp.cut_ranges(&model.layout, &flat.ranges))
        });
        let pipeline = model.pipeline().map(|pp| {
            let tied = pp.tied.as_ref().map(|ends| TiedEmbedding {
                ends: Arc::clone(ends),
                range: flat.ranges.embed.clone(),
                packed: flat.packed_outer().embed,
                copy: pp.is_last(),
            });
            (Arc::clone(&pp.group), tied)
        });
        // Under tensor and pipeline parallel each rank has moments of its own blocks and stage.
        let mut cut = String::new();
        if let Some(pp) = model.pipeline() {
            cut += &format!("pp{}of{}_", pp.group.rank(), pp.group.size());
        }
        if let Some(tp) = model.tensor_parallel() {
            cut += &format!("tp{}of{}_", tp.group.rank(), tp.group.size());
        }
        let ep = model.expert_parallel();
        let ranks = shard_ranks::<B>(world, replicas);
        let names =
            [format!("{cut}adam_shard"), format!("{cut}adam_expert_shard-{}", ep.map_or(0, |ep| ep.group.rank()))];
        let mut spaces: Vec<Space<B>> = ranks
            .spaces(&flat)
            .into_iter()
            .zip(names)
            .map(|((range, comm), name)| Space::new(b, range, comm, sharded, name))
            .collect();
        if let Some(experts) = spaces.get_mut(1) {
            experts.expert_group = ep.map(|ep| Arc::clone(&ep.group));
        }
        let stage_two = zero >= 2 && sharded;
        let scratch = b.zeros(if stage_two { flat.largest_layer() } else { 0 });
        let outer_scratch = b.zeros(if stage_two { flat.outer_len() } else { 0 });
        let whole = (!stage_two).then(|| FlatGrads::new(b, &flat));
        let shards_weights = Self::shards_weights(zero, world);
        if shards_weights {
            let mut at = 0;
            for space in &mut spaces {
                space.held_at = at;
                at += space.mine.len();
            }
        }
        let what = String::new();
        Self {
            flat,
            spaces,
            whole,
            scratch,
            outer_scratch,
            hyper,
            sharded,
            shards_weights,
            what,
            muon,
            adamw_runs,
            tensor_parallel,
            pipeline,
            buckets: None,
            reductions: None,
        }
    }

    /// Whether the gradients' reduction starts during backward (`train.overlap_grad_reduce`):
    /// whole gradients' in buckets during the step's last backward (under pipeline parallel,
    /// its last chunks'); ZeRO-2/3's as each backward hands each layer over.
    pub fn overlap_grad_reduce(&mut self, on: bool) {
        let whole = self.whole.is_some();
        self.buckets = (on && whole).then(|| GradBuckets::new(&self.flat, &self.spaces)).flatten();
        self.reductions = (on && !whole).then(StartedReductions::default);
    }

    /// The next backward is the step's last (no gradients are added after it): its
    /// gradients' all-reduce starts bucket by bucket as backward completes them.
    pub fn last_backward_next(&mut self) {
        if let Some(buckets) = &mut self.buckets {
            buckets.arm();
        }
    }

    /// After the step's backwards and before its other collectives: starts whatever of the
    /// gradients' reduction this rank's backwards have not started (under pipeline parallel
    /// the embedding's, after a tied head's copy is summed with the first stage's).
    pub fn start_reduce(&mut self, b: &B) -> Result<()> {
        let (Some(buckets), Some(whole)) = (&mut self.buckets, &mut self.whole) else { return Ok(()) };
        if let Some((_, Some(tied))) = &self.pipeline {
            tied.sum(b.slice_mut(&mut whole.flat, tied.range.clone()), &self.what)?;
        }
        buckets.start_rest(b, (whole, &mut self.spaces), &self.what)
    }

    /// Whether ZeRO stage `zero` over `world` shards the weights (ZeRO-3 on several ranks).
    pub fn shards_weights(zero: u8, world: &Ranks<B>) -> bool {
        zero >= 3 && world.size() > 1
    }

    /// Under ZeRO-3, the ranks that shard the weights (those of the dense and the expert
    /// spaces), for a frozen model sharded as the trained one is.
    pub fn weight_shard_ranks(&self) -> Option<ShardRanks<B>> {
        let dense = Arc::clone(&self.spaces[0].comm);
        let experts = self.spaces.get(1).map_or_else(|| Arc::clone(&dense), |s| Arc::clone(&s.comm));
        self.shards_weights.then_some(ShardRanks { dense, experts })
    }

    /// The startup line that says which optimizer updates what.
    pub fn describe_optimizer(&self) -> String {
        match &self.muon {
            None => "optimizer: AdamW".into(),
            Some((_, matrices, _)) => {
                let muon: usize = matrices.iter().map(|m| m.range.len()).sum();
                format!(
                    "optimizer: Muon for {} matrices ({muon} values), AdamW for the other {} values",
                    matrices.len(),
                    self.flat.total - muon
                )
            }
        }
    }

    /// Sets every gradient to zero for a new step.
    pub fn zero_grads(&mut self, b: &B) {
        match &mut self.whole {
            Some(whole) => b.fill(&mut whole.flat, 0.0),
            None => self.spaces.iter_mut().filter_map(|s| s.shard.as_mut()).for_each(|(g, _)| b.fill(g, 0.0)),
        }
    }

    /// Sums the step's gradients over the ranks (each rank keeping what it updates).
    pub fn reduce(&mut self, b: &B) -> Result<()> {
        if let Some(reductions) = &mut self.reductions {
            reductions.finish(b, &mut self.spaces, &self.what)?;
        }
        let Some(whole) = &mut self.whole else { return Ok(()) };
        if let Some(buckets) = &mut self.buckets {
            return buckets.finish(b, (whole, &mut self.spaces), &self.what);
        }
        if let Some((_, Some(tied))) = &self.pipeline {
            tied.sum(b.slice_mut(&mut whole.flat, tied.range.clone()), &self.what)?;
        }
        for space in &mut self.spaces {
            let grads = b.slice_mut(&mut whole.flat, space.range.clone());
            match &mut space.shard {
                Some((shard, _)) => space.comm.reduce_scatter_v_sum(grads, &space.counts, shard, &self.what)?,
                None if space.comm.size() > 1 => space.comm.all_reduce_sum(grads, &self.what)?,
                None => {}
            }
        }
        Ok(())
    }

    /// The global norm of the summed gradients (after `reduce`). Under tensor parallel the
    /// tensors the group cuts add their squares over the group; the others, whole and equal on
    /// every rank of it, count once (each rank adds 1/T of their squares). Under pipeline
    /// parallel the stages' squares add up, a tied embedding's counted on the first stage.
    pub fn norm(&mut self, b: &B) -> Result<f64> {
        let mut squares = 0.0;
        let copy = match &self.pipeline {
            Some((_, Some(tied))) if tied.copy => Some(tied.range.clone()),
            _ => None,
        };
        for space in &mut self.spaces {
            let grads = held(b, &mut space.shard, self.whole.as_mut(), &space.range);
            let mine = &space.mine;
            let squares_in = |r: &Range<usize>| {
                let p = overlap(r, mine);
                match p.is_empty() {
                    true => 0.0,
                    false => b.sum_squares(b.slice(grads, p.start - mine.start..p.end - mine.start)),
                }
            };
            let all = b.sum_squares(grads) - copy.as_ref().map_or(0.0, squares_in);
            let mut sum = [match &self.tensor_parallel {
                None => all,
                Some((group, cut)) => {
                    // The vocabulary-parallel embedding is cut: its tied copy, left out of
                    // `all`, is left out here too.
                    let cut: f64 = cut.iter().filter(|r| copy.as_ref() != Some(*r)).map(squares_in).sum();
                    (all - cut) / group.size() as f64 + cut
                }
            }];
            if space.sharded() {
                space.comm.all_reduce_sum_f64(&mut sum, &self.what)?;
            }
            if let Some(group) = &space.expert_group {
                group.all_reduce_sum_f64(&mut sum, &self.what)?;
            }
            squares += sum[0];
        }
        let groups = [self.tensor_parallel.as_ref().map(|t| &t.0), self.pipeline.as_ref().map(|p| &p.0)];
        for group in groups.into_iter().flatten() {
            let mut sum = [squares];
            group.all_reduce_sum_f64(&mut sum, &self.what)?;
            squares = sum[0];
        }
        Ok(squares.sqrt())
    }

    /// AdamW (and Muon) at rate `lr` on the summed gradients scaled by `scale` (clipping),
    /// then, under ZeRO-1/2, every rank's updated shard gathered into `params`. `params` are
    /// the whole parameters, or under ZeRO-3 this rank's shards of them.
    pub fn step(&mut self, b: &B, params: &mut B::Slice, lr: f32, scale: f32) -> Result<()> {
        self.hyper.step += 1;
        self.hyper.lr = lr;
        let (hyper, runs) = (self.hyper, &self.adamw_runs);
        for space in &mut self.spaces {
            let (mine, shards, sharded) = (space.mine.clone(), space.shards(), space.sharded());
            let grads = held(b, &mut space.shard, self.whole.as_mut(), &space.range);
            if scale != 1.0 {
                b.scale(grads, scale);
            }
            // The values of `mine`, indexed from `mine.start`.
            let own = b.slice_mut(params, space.held_at..space.held_at + mine.len());
            let (m, v) = (&mut space.m, &mut space.v);
            adamw_step(b, hyper, runs, &mine, (&mut *own, grads), (m, v));
            if let Some((settings, matrices, scratch)) = &mut self.muon {
                let lr_decay = (lr, hyper.weight_decay);
                for matrix in matrices.iter().filter(|x| x.range.start >= mine.start && x.range.end <= mine.end) {
                    let local = matrix.range.start - mine.start..matrix.range.end - mine.start;
                    let param = b.slice_mut(own, local.clone());
                    let momentum = b.slice_mut(&mut space.m, local.clone());
                    muon::step(b, (settings, scratch), lr_decay, matrix, (param, b.slice(grads, local)), momentum);
                }
                if sharded {
                    let at = (&space.comm, &shards[..]);
                    let grads = &*grads;
                    muon_on_cut_matrices(
                        b,
                        at,
                        (settings, matrices, scratch),
                        (own, grads),
                        &mut space.m,
                        lr_decay,
                        &self.what,
                    )?;
                }
            }
            if let (Some((spent, _)), false) = (&mut space.shard, self.shards_weights) {
                // The shard's gradients are spent: they carry the updated values to the others.
                b.copy(spent, b.slice(params, mine.clone()));
                space.comm.all_gather_v(spent, &space.counts, b.slice_mut(params, space.range.clone()), &self.what)?;
            }
        }
        Ok(())
    }

    /// Whether backward's gradients are summed over the ranks as it goes (ZeRO-2), which makes
    /// every backward a collective.
    pub fn reduces_in_backward(&self) -> bool {
        self.whole.is_none()
    }

    /// Bytes of gradients held between backwards.
    pub fn gradient_bytes(&self) -> usize {
        4 * match &self.whole {
            Some(_) => self.flat.total,
            None => self.spaces.iter().map(|s| s.mine.len()).sum(),
        }
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.spaces.iter().map(|s| 8 * s.mine.len()).sum()
    }
}

/// ZeRO-2: hands the gradients of `segments` of the dense space (or, with `experts`, the
/// routed experts' space), laid end to end in `data`, to that space's reduction: started, with
/// `reductions`, else waited for.
fn reduce_part<B: Backend>(
    b: &B,
    (spaces, reductions): (&mut [Space<B>], Option<&mut StartedReductions<B>>),
    (dense, what): (usize, &str),
    data: &B::Slice,
    segments: &[Range<usize>],
    experts: bool,
) {
    let Some(space) = spaces.iter().position(|s| (s.range.start >= dense) == experts) else { return };
    match reductions {
        Some(reductions) => reductions.start(b, (spaces, space), data, segments, what),
        None => spaces[space].reduce_segments(b, data, segments, what),
    }
    .unwrap_or_else(|e| panic!("ZeRO-2: {e:#}"));
}

impl<B: Backend> GradSink<B> for DataParallel<B> {
    fn chunks_next(&mut self, chunks: usize) {
        if let Some(buckets) = &mut self.buckets {
            buckets.chunks_next(chunks);
        }
    }

    fn layer(&mut self, b: &B, l: usize) -> LayerWeights<&mut B::Slice> {
        if let Some(whole) = &mut self.whole {
            if let Some(buckets) = &self.buckets {
                buckets.check_open(Reached::Layer(l));
            }
            return whole.layer(b, l);
        }
        let (dense, experts) = self.flat.layer(l);
        let scratch = b.slice_mut(&mut self.scratch, 0..dense.len() + experts.len());
        b.fill(scratch, 0.0);
        layer_views(b, scratch, &self.flat.packed_layer(l))
    }

    fn layer_done(&mut self, b: &B, l: usize) {
        if let Some(whole) = &mut self.whole {
            if let Some(buckets) = &mut self.buckets {
                buckets.reached(b, Reached::Layer(l), (whole, &mut self.spaces), &self.what);
            }
            return;
        }
        let (dense, experts) = self.flat.layer(l);
        let at = (self.flat.dense, self.what.as_str());
        let (dense_part, experts_part) = b.split_at_mut(&mut self.scratch, dense.len());
        let reduce = (&mut self.spaces[..], self.reductions.as_mut());
        reduce_part(b, reduce, at, dense_part, &[dense], false);
        if !experts.is_empty() {
            let reduce = (&mut self.spaces[..], self.reductions.as_mut());
            reduce_part(b, reduce, at, b.slice(experts_part, 0..experts.len()), &[experts], true);
        }
    }

    fn head_done(&mut self, b: &B) {
        if let (Some(buckets), Some(whole)) = (&mut self.buckets, &mut self.whole) {
            buckets.reached(b, Reached::Head, (whole, &mut self.spaces), &self.what);
        }
    }

    fn outer(&mut self, b: &B) -> Weights<&mut B::Slice> {
        if let Some(whole) = &mut self.whole {
            if let Some(buckets) = &self.buckets {
                buckets.check_open(Reached::Embedding);
            }
            return whole.outer(b);
        }
        outer_views(b, &mut self.outer_scratch, &self.flat.packed_outer())
    }

    fn outer_done(&mut self, b: &B) {
        // Under pipeline parallel the embedding's buckets wait for `start_reduce`.
        if let (Some(buckets), Some(whole), None) = (&mut self.buckets, &mut self.whole, &self.pipeline) {
            buckets.reached(b, Reached::Embedding, (whole, &mut self.spaces), &self.what);
        }
        if self.whole.is_none() {
            if let Some((_, Some(tied))) = &self.pipeline {
                let grads = b.slice_mut(&mut self.outer_scratch, tied.packed.clone());
                tied.sum(grads, &self.what).unwrap_or_else(|e| panic!("ZeRO-2: {e:#}"));
            }
            let at = (self.flat.dense, self.what.as_str());
            let reduce = (&mut self.spaces[..], self.reductions.as_mut());
            reduce_part(b, reduce, at, &self.outer_scratch, &self.flat.outer(), false);
            b.fill(&mut self.outer_scratch, 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_keeps_what_muon_does_not_take() {
        let runs = vec![(0..10, false), (10..40, true), (40..44, false)];
        let m = |r: Range<usize>| Matrix { range: r, rows: 1, cols: 1 };
        let matrices = [m(10..20), m(25..40)];
        assert_eq!(without(&runs, &matrices), vec![(0..10, false), (20..25, true), (40..44, false)]);
        assert_eq!(without(&runs, &[]), runs);
    }
}
