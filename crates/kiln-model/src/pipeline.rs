//! Pipeline parallel: the P ranks of a pipeline each hold a contiguous run of the layers (a
//! stage), the first also the embedding, the last the final norm and head (and, when the head
//! is tied to it, a copy of the embedding). A forward runs stage after stage:
//!
//!   stage 0:   h₀ = embed(ids);  h = layers₀(h₀);  send h →
//!   stage s:   receive h;  h = layers_s(h);  send h →
//!   stage P−1: receive h;  logits = head(norm(layers_{P−1}(h)));  loss
//!
//! and backward the other way, each stage receiving dL/d(its output) from the next and sending
//! dL/d(its input) to the previous. The loss, the per-token nll and anything else the caller
//! reads on the host are the last stage's, handed to every stage, so every rank of the run
//! sees the same numbers and takes the same decisions.
//!
//! A tied embedding has two copies, on the first and the last stage, whose gradients are
//! summed over the two before the update (`tied`), so both take the same step.
//!
//! The hand-offs are gathers over two-rank groups of neighbouring stages, in which only the
//! sender contributes: a point-to-point send on any collective layer (MPI, NCCL, threads).

use crate::config::{AttentionKind, Config, Stage};
use crate::weights::{TensorSpec, Weights};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::sync::Arc;

type Group<B> = Arc<dyn Comm<<B as Backend>::Slice>>;

/// The stages of one pipeline and this rank's place in it.
pub struct Pipeline<B: Backend> {
    /// The P stages, rank s holding stage s.
    pub group: Group<B>,
    /// Two-rank groups with the previous and the next stage (the lower stage is rank 0).
    prev: Option<Group<B>>,
    next: Option<Group<B>>,
    /// The first and the last stage, which both hold a tied embedding.
    pub tied: Option<Group<B>>,
    /// The layers of every stage, in stage order.
    pub stage_layers: Vec<Range<usize>>,
    /// The chunks a training pass's rows are cut into for the schedule (at most one per row),
    /// or with `fixed_chunks` exactly this many, short passes padded: the same on every rank,
    /// so that data-parallel peers run the same per-chunk collectives (ZeRO-2's reductions,
    /// ZeRO-3's gathers) whatever their rows.
    pub chunks: usize,
    pub fixed_chunks: bool,
    /// The whole model's config and layout (what checkpoints hold; under expert parallel with
    /// this rank's routed experts), shared by clones.
    pub whole: Arc<Config>,
    pub whole_layout: Arc<Weights<TensorSpec>>,
}

impl<B: Backend> Clone for Pipeline<B> {
    fn clone(&self) -> Self {
        Self {
            group: Arc::clone(&self.group),
            prev: self.prev.clone(),
            next: self.next.clone(),
            tied: self.tied.clone(),
            stage_layers: self.stage_layers.clone(),
            chunks: self.chunks,
            fixed_chunks: self.fixed_chunks,
            whole: Arc::clone(&self.whole),
            whole_layout: Arc::clone(&self.whole_layout),
        }
    }
}

/// The config of stage `stage` of the stages whose layers are `stage_layers`: its layers, and
/// which of the embedding and head it holds (DeepSeek-V4: its layers' attention and routing
/// kinds).
pub fn stage_config(whole: &Config, stage: usize, stage_layers: &[Range<usize>]) -> Result<Config, String> {
    let layers = stage_layers[stage].clone();
    let last = stage + 1 == stage_layers.len();
    let mut config = whole.clone();
    config.num_layers = layers.len();
    config.layer_windows = whole.layer_windows[layers.clone()].to_vec();
    if let AttentionKind::V4(v4) = &mut config.attention {
        v4.layers = v4.layers[layers.clone()].to_vec();
        v4.hash_layers = v4.hash_layers[layers.clone()].to_vec();
    }
    let embedding = stage == 0 || (last && whole.tie_word_embeddings && whole.num_labels.is_none());
    config.stage = Some(Stage { first_layer: layers.start, embedding, head: last });
    Ok(config)
}

/// Where a tensor of the whole model lives in a pipeline: the stage that owns it (whose values
/// a checkpoint takes), its index among this stage's tensors (`None` for another stage's
/// layer), and whether this stage holds its values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Place {
    pub owner: usize,
    pub local: Option<usize>,
    pub held: bool,
}

impl<B: Backend> Pipeline<B> {
    /// The pipeline `group` cutting the model `whole`, laid out as `whole_layout` (under expert
    /// parallel with this rank's routed experts), into `group.size()` stages of the layers
    /// `stage_layers`; collective over `group` (it forms the neighbour pairs).
    pub fn new(
        group: Group<B>,
        whole: &Config,
        whole_layout: Weights<TensorSpec>,
        stage_layers: Vec<Range<usize>>,
    ) -> anyhow::Result<Self> {
        let (stage, stages) = (group.rank(), group.size());
        // Pairs (0,1), (2,3), .. and (1,2), (3,4), ..: each stage meets its neighbours in one
        // of the two splits.
        let even = group.split(stage / 2, "pipeline neighbours (even pairs)")?;
        let odd = group.split(stage.div_ceil(2), "pipeline neighbours (odd pairs)")?;
        let (with_next, with_prev) = if stage.is_multiple_of(2) { (even, odd) } else { (odd, even) };
        let prev = (stage > 0).then_some(with_prev);
        let next = (stage + 1 < stages).then_some(with_next);
        let ends = stage == 0 || stage + 1 == stages;
        let tied_head = whole.tie_word_embeddings && whole.num_labels.is_none() && stages > 1;
        let ends_group = group.split(usize::from(!ends), "pipeline first and last stages")?;
        let tied = (tied_head && ends).then_some(ends_group);
        Ok(Self {
            group,
            prev,
            next,
            tied,
            stage_layers,
            chunks: 1,
            fixed_chunks: false,
            whole: Arc::new(whole.clone()),
            whole_layout: Arc::new(whole_layout),
        })
    }

    pub fn stage(&self) -> usize {
        self.group.rank()
    }

    pub fn is_first(&self) -> bool {
        self.stage() == 0
    }

    pub fn is_last(&self) -> bool {
        self.stage() + 1 == self.group.size()
    }

    /// The last stage's `values` (`len` of them) on every stage; a collective over the stages.
    pub fn from_last(&self, b: &B, values: &[f32], len: usize, what: &str) -> Vec<f32> {
        let stages = self.group.size();
        let counts: Vec<usize> = (0..stages).map(|s| if s + 1 == stages { len } else { 0 }).collect();
        let chunk = b.upload(if self.is_last() { values } else { &[] });
        let mut out = b.zeros(len);
        self.group.all_gather_v(&chunk, &counts, &mut out, what).unwrap_or_else(|e| panic!("pipeline: {e:#}"));
        b.read(&out)
    }

    /// The last stage's `value` on every stage.
    pub fn scalar_from_last(&self, value: f64, what: &str) -> f64 {
        let mut sum = [if self.is_last() { value } else { 0.0 }];
        self.group.all_reduce_sum_f64(&mut sum, what).unwrap_or_else(|e| panic!("pipeline: {e:#}"));
        sum[0]
    }

    /// Sends `buf` (this stage's output, forward) to the next stage.
    pub fn send_next(&self, b: &B, buf: &B::Slice, what: &str) {
        hand_over::<B>(b, self.next.as_ref().expect("a next stage"), Some(buf), None, what);
    }

    /// Receives the previous stage's output into `buf`.
    pub fn recv_prev(&self, b: &B, buf: &mut B::Slice, what: &str) {
        hand_over::<B>(b, self.prev.as_ref().expect("a previous stage"), None, Some(buf), what);
    }

    /// Sends `buf` (dL/d(this stage's input), backward) to the previous stage.
    pub fn send_prev(&self, b: &B, buf: &B::Slice, what: &str) {
        hand_over::<B>(b, self.prev.as_ref().expect("a previous stage"), Some(buf), None, what);
    }

    /// Receives dL/d(this stage's output) from the next stage into `buf`.
    pub fn recv_next(&self, b: &B, buf: &mut B::Slice, what: &str) {
        hand_over::<B>(b, self.next.as_ref().expect("a next stage"), None, Some(buf), what);
    }

    /// Sends `send` (a chunk's output) to the next stage and receives `recv` (another chunk's
    /// output gradient) from it, in one exchange.
    pub fn send_next_recv_next(&self, b: &B, send: &B::Slice, recv: &mut B::Slice, what: &str) {
        hand_over::<B>(b, self.next.as_ref().expect("a next stage"), Some(send), Some(recv), what);
    }

    /// Sends `send` (a chunk's input gradient) to the previous stage and receives `recv`
    /// (another chunk's input) from it, in one exchange.
    pub fn send_prev_recv_prev(&self, b: &B, send: &B::Slice, recv: &mut B::Slice, what: &str) {
        hand_over::<B>(b, self.prev.as_ref().expect("a previous stage"), Some(send), Some(recv), what);
    }

    /// Every tensor of the whole model, in `Weights::iter` order, placed in the pipeline.
    pub(crate) fn places(&self) -> Vec<Place> {
        let (me, last) = (self.stage(), self.group.size() - 1);
        let stage = |l: usize| self.stage_layers.iter().position(|r| r.contains(&l)).expect("a stage per layer");
        let mine = &self.stage_layers[me];
        let tied_copy = me == last && self.tied.is_some();
        let mut places = vec![Place { owner: 0, local: Some(0), held: me == 0 || tied_copy }];
        let mut local = 1;
        for (l, layer) in self.whole_layout.layers.iter().enumerate() {
            for _ in layer.refs() {
                let here = mine.contains(&l);
                places.push(Place { owner: stage(l), local: here.then_some(local), held: here });
                local += usize::from(here);
            }
        }
        // The final norm, head and score close the list: the last stage's.
        for _ in places.len()..self.whole_layout.iter().len() {
            places.push(Place { owner: last, local: Some(local), held: me == last });
            local += 1;
        }
        places
    }

    /// Whole tensor `spec` from the stage `owner` that holds it (`values` there, ignored on the
    /// others), a collective over the stages, on a stage that passes `keep`.
    pub fn join_tensor(&self, b: &B, spec: &TensorSpec, owner: usize, values: &[f32], keep: bool) -> Option<Vec<f32>> {
        let (me, n) = (self.stage(), spec.numel());
        let counts: Vec<usize> = (0..self.group.size()).map(|s| if s == owner { n } else { 0 }).collect();
        let chunk = b.upload(if owner == me { values } else { &[] });
        let mut out = b.zeros(n);
        let what = format!("pipeline parallel: gathering {}", spec.name);
        self.group.all_gather_v(&chunk, &counts, &mut out, &what).unwrap_or_else(|e| panic!("{e:#}"));
        keep.then(|| b.read(&out))
    }
}

/// One hand-over between neighbouring stages over their two-rank `pair`: this rank contributes
/// `send` (if any) and receives the other's contribution into `recv` (if any), at once.
fn hand_over<B: Backend>(b: &B, pair: &Group<B>, send: Option<&B::Slice>, recv: Option<&mut B::Slice>, what: &str) {
    let fail = |e: anyhow::Error| panic!("pipeline: {e:#}");
    let (sent, received) = (send.map_or(0, |s| b.len(s)), recv.as_ref().map_or(0, |r| b.len(r)));
    let counts = if pair.rank() == 0 { [sent, received] } else { [received, sent] };
    let empty = b.zeros(0);
    let chunk = send.unwrap_or(&empty);
    match recv {
        Some(recv) if sent == 0 => pair.all_gather_v(chunk, &counts, recv, what).unwrap_or_else(fail),
        recv => {
            let mut both = b.zeros(sent + received);
            pair.all_gather_v(chunk, &counts, &mut both, what).unwrap_or_else(fail);
            if let Some(recv) = recv {
                let theirs = if pair.rank() == 0 { sent..sent + received } else { 0..received };
                b.copy(recv, b.slice(&both, theirs));
            }
        }
    }
}
