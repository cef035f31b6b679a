//! The model's side of interleaved pipeline stages (`interleaved_schedule`): running a pass's
//! ticks, each stage's task and then the tick's hand-overs in one all-to-all over the stages,
//! for training passes, forward-only passes (`pipelined_nll`) and the idle passes of a
//! data-parallel peer with nothing to run.

use crate::activations::Activations;
use crate::batch::Batch;
use crate::grad_sink::GradSink;
use crate::interleaved_schedule::{self, Message, Shape, Tick};
use crate::layers::moe;
use crate::model::Model;
use crate::model_pipeline::{dres, PipelineLoss, Run};
use crate::pipeline::Pipeline;
use crate::pipeline_schedule::ChunkOrder;
use kiln_core::Backend;
use std::ops::Range;

/// The ticks of a pass of `chunks` chunks over `pp`'s interleaved stages in `order`, in two
/// halves: with `ForwardsFirst` every forward, then every backward (the weights are chosen
/// between them); else all of them, then none.
pub(crate) fn interleaved_ticks<B: Backend>(pp: &Pipeline<B>, chunks: usize, order: ChunkOrder) -> [Vec<Tick>; 2] {
    let shape = Shape { stages: pp.group.size(), parts: pp.parts(), chunks };
    match order {
        ChunkOrder::ForwardsFirst | ChunkOrder::Unchunked => shape.forwards_then_backwards(),
        ChunkOrder::Interleaved => [shape.one_forward_one_backward(), Vec::new()],
    }
}

/// The messages of `tick` this stage sends (at most one) and receives (in stage order).
fn hand_overs(tick: &Tick, me: usize) -> (Option<&Message>, Vec<&Message>) {
    let sent = tick.messages.iter().find(|m| m.from == me);
    let mut received: Vec<&Message> = tick.messages.iter().filter(|m| m.to == me).collect();
    received.sort_by_key(|m| m.from);
    (sent, received)
}

/// One tick's hand-overs on stage `me`: `sent` (what its task produced, from `source`) and,
/// into `staging`, those received; one all-to-all over the stages. Returns where each
/// received message lies in `staging`.
fn exchange<B: Backend>(
    b: &B,
    pp: &Pipeline<B>,
    tick: &Tick,
    source: Option<&B::Slice>,
    staging: &mut B::Buf,
) -> Vec<(Message, Range<usize>)> {
    let me = pp.stage();
    let (sent, received) = hand_overs(tick, me);
    let len = source.map_or(0, |s| b.len(s));
    let message_len = b.len(staging) / 2;
    let stages = pp.group.size();
    let mut send_counts = vec![0; stages];
    if let Some(m) = sent {
        send_counts[m.to] = len;
    }
    let mut recv_counts = vec![0; stages];
    for m in &received {
        recv_counts[m.from] = message_len;
    }
    let empty = b.zeros(0);
    let what = "interleaved pipeline: hand-overs";
    let total = received.len() * message_len;
    let into = b.slice_mut(staging, 0..total);
    pp.group
        .all_to_allv(source.unwrap_or(&empty), &send_counts, into, &recv_counts, what)
        .unwrap_or_else(|e| panic!("pipeline: {e:#}"));
    received.into_iter().enumerate().map(|(i, m)| (*m, i * message_len..(i + 1) * message_len)).collect()
}

impl<B: Backend> Run<'_, B> {
    /// One tick of an interleaved pass on this stage: its task, then the tick's hand-overs
    /// (outputs into the next virtual stage's input, gradients into the previous one's
    /// `dres`).
    pub(crate) fn tick(
        &mut self,
        model: &mut Model<B>,
        tick: &Tick,
        loss: &mut PipelineLoss,
        grads: &mut dyn GradSink<B>,
    ) {
        let (b, pp, me) = (self.b, self.pp, self.pp.stage());
        let task = tick.tasks[me];
        match task {
            Some(t) if t.backward => self.backward(model, t.part, t.chunk, loss, grads),
            Some(t) => self.forward(model, t.part, t.chunk, loss),
            None => {}
        }
        if tick.messages.is_empty() {
            return;
        }
        let message_len = b.len(&self.acts[0][0].layer_inputs[0]);
        let mut staging = b.zeros(2 * message_len);
        let sent = tick.messages.iter().find(|m| m.from == me);
        let source: Option<&B::Slice> = match (sent, task) {
            (Some(_), Some(t)) if t.backward => Some(dres(self.acts_of(t.part, t.chunk))),
            (Some(_), Some(t)) => Some(self.acts_of(t.part, t.chunk).layer_inputs.last().expect("a part's output")),
            _ => None,
        };
        for (m, at) in exchange(b, pp, tick, source, &mut staging) {
            let a = self.acts_of(m.part, m.chunk);
            let into = if m.gradient { dres(a) } else { &mut a.layer_inputs[0] };
            b.copy(into, b.slice(&staging, at));
        }
    }
}

impl<B: Backend> Model<B> {
    /// `pipelined_nll` over interleaved stages: the chunks' forwards on the forward-only
    /// ticks, each (part, chunk) in activations of its part's, laid out as training's are;
    /// the last virtual stage's nll and correctness into `acts`.
    pub(crate) fn interleaved_nll(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        chunks: &[Batch],
        rows: &[Range<usize>],
    ) {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let (me, seq, chunk_rows) = (pp.stage(), chunks[0].seq, chunks[0].rows);
        let shape = Shape { stages: pp.group.size(), parts: pp.parts(), chunks: chunks.len() };
        let [ticks, _] = shape.forwards_then_backwards();
        let (slot_of, slots) = interleaved_schedule::slots(&shape, &ticks, me, true);
        let training_layout = self.config.sequence_parallel.is_some();
        let mut held = std::mem::take(&mut self.forward_parts);
        let fits =
            |h: &[Activations<B>], n: usize| h.len() >= n && h.iter().all(|a| a.rows == chunk_rows && a.seq == seq);
        if held.len() != slots.len() || !held.iter().zip(&slots).all(|(h, &n)| fits(h, n)) {
            held = (0..slots.len())
                .map(|v| {
                    let run = pp.part_layers(v);
                    let new = || {
                        Activations::for_part(b, &self.config, run.clone(), (chunk_rows, seq), (training_layout, false))
                    };
                    (0..slots[v]).map(|_| new()).collect()
                })
                .collect();
        }
        let message_len = b.len(&held[0][0].layer_inputs[0]);
        let mut staging = b.zeros(2 * message_len);
        let slot = |part: usize, chunk: usize| slot_of[part * chunks.len() + chunk];
        for tick in &ticks {
            let task = tick.tasks[me];
            if let Some(t) = task {
                let a = &mut held[t.part][slot(t.part, t.chunk)];
                self.forward_layers(b, a, &chunks[t.chunk], None, None, Some(t.part));
                if pp.part_heads(t.part) {
                    self.lm_head_forward(b, a);
                    self.cross_entropy_forward(b, a);
                    let r = &rows[t.chunk];
                    let (tokens, n) = (r.start * seq..r.end * seq, r.len() * seq);
                    b.copy(b.slice_mut(&mut acts.nll, tokens.clone()), b.slice(&a.nll, 0..n));
                    b.copy(b.slice_mut(&mut acts.correct, tokens), b.slice(&a.correct, 0..n));
                }
            }
            if tick.messages.is_empty() {
                continue;
            }
            let source = task
                .filter(|_| tick.messages.iter().any(|m| m.from == me))
                .map(|t| &**held[t.part][slot(t.part, t.chunk)].layer_inputs.last().expect("a part's output"));
            for (m, at) in exchange(b, &pp, tick, source, &mut staging) {
                let a = &mut held[m.part][slot(m.part, m.chunk)];
                b.copy(&mut a.layer_inputs[0], b.slice(&staging, at));
            }
        }
        self.forward_parts = held;
    }

    /// `idle_forward` of a forward-only pass over interleaved stages: this stage's forwards in
    /// their order, each an idle forward of its part's layers.
    pub(crate) fn interleaved_idle_forward(&mut self, b: &B) {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let shape = Shape { stages: pp.group.size(), parts: pp.parts(), chunks: pp.chunks };
        for task in shape.tasks(pp.stage(), ChunkOrder::ForwardsFirst, true, 0) {
            self.idle_chunk_forward(b, &[pp.part_layers(task.part)]);
        }
    }

    /// `idle_pass` over interleaved stages: this stage's tasks in their order, each an idle
    /// forward or backward of its part's layers, and the outer gradients ended once.
    pub(crate) fn interleaved_idle_pass(
        &mut self,
        b: &B,
        grads: &mut dyn GradSink<B>,
        recompute: bool,
        order: ChunkOrder,
    ) {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let [first, then] = interleaved_ticks(&pp, pp.chunks, order);
        let me = pp.stage();
        let mut served: Vec<Option<Vec<Option<moe::Served<B>>>>> = (0..pp.parts() * pp.chunks).map(|_| None).collect();
        for task in first.iter().chain(&then).filter_map(|t| t.tasks[me]) {
            let (run, at) = (pp.part_layers(task.part), task.part * pp.chunks + task.chunk);
            if task.backward {
                let chunk = served[at].take().expect("a chunk's forward before its backward");
                self.idle_chunk_backward(b, grads, recompute, chunk, &[run]);
            } else {
                served[at] = Some(self.idle_chunk_forward(b, &[run]));
            }
        }
        grads.outer(b);
        grads.outer_done(b);
    }
}
