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
    /// With interleaved stages, the last and the first stage (the last stage hands a virtual
    /// stage's output to the first, which runs the next).
    wrap: Option<Group<B>>,
    /// The layers of every virtual stage, in order; stage s holds virtual stages s, s + P, ..
    /// (one per stage without interleaving).
    pub stage_layers: Vec<Range<usize>>,
    /// The chunks a training pass's rows are cut into for the schedule (at most one per row),
    /// or with `fixed_chunks` exactly this many, short passes padded: the same on every rank,
    /// so that data-parallel peers run the same per-chunk collectives (ZeRO-2's reductions,
    /// ZeRO-3's gathers) whatever their rows.
    pub chunks: usize,
    pub fixed_chunks: bool,
    /// The chunks a generation step's rows are cut into (at most one per row; under expert
    /// parallel exactly this many, the chunks beyond the rows empty).
    pub generation_chunks: usize,
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
            wrap: self.wrap.clone(),
            stage_layers: self.stage_layers.clone(),
            chunks: self.chunks,
            fixed_chunks: self.fixed_chunks,
            generation_chunks: self.generation_chunks,
            whole: Arc::clone(&self.whole),
            whole_layout: Arc::clone(&self.whole_layout),
        }
    }
}

/// The config of stage `stage` of `stages` whose layers are cut into the virtual stages
/// `stage_layers` (stage s holds virtual stages s, s + P, s + 2P, .. : one run without
/// interleaving): its layers, and which of the embedding and head it holds (DeepSeek-V4: its
/// layers' attention and routing kinds).
pub fn stage_config(whole: &Config, stage: usize, stages: usize, stage_layers: &[Range<usize>]) -> Config {
    let layers: Vec<usize> = stage_layers.iter().skip(stage).step_by(stages).flat_map(Range::clone).collect();
    let last = stage + 1 == stages;
    let mut config = whole.clone();
    config.num_layers = layers.len();
    config.layer_windows = layers.iter().map(|&l| whole.layer_windows[l]).collect();
    if let AttentionKind::V4(v4) = &mut config.attention {
        v4.layers = layers.iter().map(|&l| v4.layers[l]).collect();
        v4.hash_layers = layers.iter().map(|&l| v4.hash_layers[l]).collect();
    }
    let embedding = stage == 0 || (last && whole.tie_word_embeddings && whole.num_labels.is_none());
    config.stage = Some(Stage { layers, embedding, head: last });
    config
}

/// `config` (a stage's) narrowed to its layers `run` (a virtual stage's, for the activations
/// of one of its passes).
pub(crate) fn run_config(config: &Config, run: Range<usize>) -> Config {
    let mut narrowed = config.clone();
    narrowed.num_layers = run.len();
    narrowed.layer_windows = config.layer_windows[run.clone()].to_vec();
    if let AttentionKind::V4(v4) = &mut narrowed.attention {
        v4.layers = v4.layers[run.clone()].to_vec();
        v4.hash_layers = v4.hash_layers[run.clone()].to_vec();
    }
    if let Some(stage) = &mut narrowed.stage {
        stage.layers = stage.layers[run].to_vec();
    }
    narrowed
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
    /// parallel with this rank's routed experts), into the virtual stages `stage_layers` (a
    /// multiple of `group.size()` of them: stage s holds virtual stages s, s + P, ..);
    /// collective over `group` (it forms the neighbour pairs).
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
        let interleaved = stage_layers.len() > stages;
        let wrap = (interleaved && ends && stages > 1).then(|| Arc::clone(&ends_group));
        let tied = (tied_head && ends).then_some(ends_group);
        Ok(Self {
            group,
            prev,
            next,
            tied,
            wrap,
            stage_layers,
            chunks: 1,
            fixed_chunks: false,
            generation_chunks: 1,
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

    /// The virtual stages each stage holds (V; 1 without interleaving).
    pub fn parts(&self) -> usize {
        self.stage_layers.len() / self.group.size()
    }

    /// This stage's local layers of its part `v` (its virtual stage v·P + s).
    pub fn part_layers(&self, v: usize) -> Range<usize> {
        let stages = self.group.size();
        let held = |j: usize| self.stage_layers[j * stages + self.stage()].len();
        let start: usize = (0..v).map(held).sum();
        start..start + held(v)
    }

    /// Whether part `v` of this stage begins with the embedding (the first virtual stage).
    pub fn part_embeds(&self, v: usize) -> bool {
        self.is_first() && v == 0
    }

    /// Whether part `v` of this stage ends with the final norm and head (the last virtual stage).
    pub fn part_heads(&self, v: usize) -> bool {
        self.is_last() && v + 1 == self.parts()
    }

    /// Receives part `v`'s input: the output of the virtual stage before it, from the previous
    /// stage (from the last stage for the first stage's later parts).
    pub fn recv_part_input(&self, b: &B, v: usize, buf: &mut B::Slice, what: &str) {
        let from = if self.is_first() { self.wrap.as_ref().filter(|_| v > 0) } else { self.prev.as_ref() };
        hand_over::<B>(b, from.expect("a virtual stage before"), None, Some(buf), what);
    }

    /// Sends part `v`'s output to the virtual stage after it, on the next stage (on the first
    /// for the last stage's earlier parts).
    pub fn send_part_output(&self, b: &B, v: usize, buf: &B::Slice, what: &str) {
        let to = if self.is_last() { self.wrap.as_ref().filter(|_| v + 1 < self.parts()) } else { self.next.as_ref() };
        hand_over::<B>(b, to.expect("a virtual stage after"), Some(buf), None, what);
    }

    /// Receives dL/d(part `v`'s output) from the virtual stage after it.
    pub fn recv_part_output_grad(&self, b: &B, v: usize, buf: &mut B::Slice, what: &str) {
        let from =
            if self.is_last() { self.wrap.as_ref().filter(|_| v + 1 < self.parts()) } else { self.next.as_ref() };
        hand_over::<B>(b, from.expect("a virtual stage after"), None, Some(buf), what);
    }

    /// Sends dL/d(part `v`'s input) to the virtual stage before it.
    pub fn send_part_input_grad(&self, b: &B, v: usize, buf: &B::Slice, what: &str) {
        let to = if self.is_first() { self.wrap.as_ref().filter(|_| v > 0) } else { self.prev.as_ref() };
        hand_over::<B>(b, to.expect("a virtual stage before"), Some(buf), None, what);
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
        let (me, stages) = (self.stage(), self.group.size());
        let last = stages - 1;
        let stage =
            |l: usize| self.stage_layers.iter().position(|r| r.contains(&l)).expect("a stage per layer") % stages;
        let tied_copy = me == last && self.tied.is_some();
        let mut places = vec![Place { owner: 0, local: Some(0), held: me == 0 || tied_copy }];
        let mut local = 1;
        for (l, layer) in self.whole_layout.layers.iter().enumerate() {
            for _ in layer.refs() {
                let here = stage(l) == me;
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
