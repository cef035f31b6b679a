//! The model's side of interleaved pipeline stages (`interleaved_schedule`): running a pass's
//! ticks, each stage's tasks and then the tick's hand-overs in one all-to-all over the stages,
//! for training passes, forward-only passes (`pipelined_nll`) and the idle passes of a
//! data-parallel peer with nothing to run.

use crate::activations::Activations;
use crate::batch::Batch;
use crate::grad_sink::GradSink;
use crate::interleaved_schedule::{self, Message, Shape, Tick};
use crate::layers::moe;
use crate::model::Model;
use crate::model_pipeline::{dres, PipelineLoss, Run};
use crate::part_slots::{part_pools, ChunkActs, PartSlots};
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
        ChunkOrder::OneForwardOneBackward => [shape.one_forward_one_backward(), Vec::new()],
    }
}

/// A tick's hand-overs on a stage: the buffers to copy them from and to (staging), reused
/// tick after tick.
pub(crate) struct HandOvers<B: Backend> {
    send: B::Buf,
    received: B::Buf,
}

impl<B: Backend> HandOvers<B> {
    /// Staging for a stage's messages of at most `message_len` values: it sends and receives
    /// at most two a tick (a part's output and another's input gradient).
    pub fn new(b: &B, message_len: usize) -> Self {
        Self { send: b.zeros(2 * message_len), received: b.zeros(2 * message_len) }
    }

    /// Whether it stages messages of `message_len` values.
    pub fn fits(&self, b: &B, message_len: usize) -> bool {
        b.len(&self.send) >= 2 * message_len
    }

    /// Tick `tick`'s hand-overs of stage `pp.stage()`: `sent`, the messages its tasks
    /// produced with the buffers holding them (in task order), and those it receives, each of
    /// `len_of` values; one all-to-all over the stages. Returns each received message and
    /// where it lies in `self.received` (pieces come in stage order, a stage's in its task
    /// order).
    pub fn exchange(
        &mut self,
        b: &B,
        (pp, tick): (&Pipeline<B>, &Tick),
        sent: &[(Message, &B::Slice)],
        len_of: &dyn Fn(&Message) -> usize,
    ) -> Vec<(Message, Range<usize>)> {
        let (me, stages) = (pp.stage(), pp.group.size());
        let mut order: Vec<&(Message, &B::Slice)> = sent.iter().collect();
        order.sort_by_key(|(m, _)| m.to);
        let (mut send_counts, mut at) = (vec![0; stages], 0);
        for (m, source) in order {
            let len = len_of(m);
            b.copy(b.slice_mut(&mut self.send, at..at + len), source);
            send_counts[m.to] += len;
            at += len;
        }
        let mut received: Vec<Message> = tick.messages.iter().filter(|m| m.to == me).copied().collect();
        received.sort_by_key(|m| m.from);
        let mut recv_counts = vec![0; stages];
        let mut places = Vec::with_capacity(received.len());
        let mut into = 0;
        for m in received {
            let len = len_of(&m);
            recv_counts[m.from] += len;
            places.push((m, into..into + len));
            into += len;
        }
        let what = "interleaved pipeline: hand-overs";
        let send = b.slice(&self.send, 0..at);
        let recv = b.slice_mut(&mut self.received, 0..into);
        pp.group
            .all_to_allv(send, &send_counts, recv, &recv_counts, what)
            .unwrap_or_else(|e| panic!("pipeline: {e:#}"));
        places
    }

    /// A received message's values.
    pub fn values(&self, b: &B, at: Range<usize>) -> &B::Slice {
        b.slice(&self.received, at)
    }
}

impl<B: Backend> Run<'_, B> {
    /// One tick of an interleaved pass on this stage: its tasks, then the tick's hand-overs
    /// (outputs into the next virtual stage's input, gradients into the previous one's
    /// `dres`).
    pub(crate) fn tick(
        &mut self,
        model: &mut Model<B>,
        (tick, hand_overs): (&Tick, &mut HandOvers<B>),
        loss: &mut PipelineLoss,
        grads: &mut dyn GradSink<B>,
    ) {
        let (b, pp, me) = (self.b, self.pp, self.pp.stage());
        for t in &tick.tasks[me] {
            if t.backward {
                self.backward(model, t.part, t.chunk, loss, grads);
            } else {
                if !pp.part_embeds(t.part) {
                    self.acts.take_input(t.part, t.chunk);
                }
                self.forward(model, t.part, t.chunk, loss);
            }
        }
        if tick.messages.is_empty() {
            return;
        }
        let shape = Shape { stages: pp.group.size(), parts: pp.parts(), chunks: self.chunks.len() };
        let sent: Vec<(Message, &B::Slice)> = (tick.tasks[me].iter())
            .filter_map(|t| shape.message(me, *t).map(|m| (m, t)))
            .map(|(m, t)| (m, sent_values(self.acts.peek(t.part, t.chunk), t.backward)))
            .collect();
        let len = b.len(&self.acts.acts.pools[0][0].layer_inputs[0]);
        for (m, at) in hand_overs.exchange(b, (pp, tick), &sent, &|_| len) {
            let values = hand_overs.values(b, at);
            if m.gradient {
                b.copy(dres(self.acts.get(m.part, m.chunk)), values);
            } else {
                self.acts.arrive(b, (m.part, m.chunk), values);
            }
        }
    }
}

/// What a task on `a` hands on: with `backward` the gradient of the part's input, else the
/// part's output.
fn sent_values<B: Backend>(a: &Activations<B>, backward: bool) -> &B::Slice {
    match backward {
        true => &a.grad.as_ref().expect("training activations").dres,
        false => a.layer_inputs.last().expect("a part's output"),
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
        let pool_of = part_pools(&self.config, &pp);
        let (slot_of, counts) = interleaved_schedule::slots(&shape, &ticks, (me, &pool_of), true);
        let training_layout = self.config.sequence_parallel.is_some();
        let held = self.forward_parts.take();
        let layout = (&self.config, &pp);
        let counted = (pool_of.as_slice(), counts.as_slice());
        let held = ChunkActs::new(b, layout, held, counted, (chunk_rows, seq), (training_layout, false, false));
        let runs: Vec<Range<usize>> = (0..pp.parts()).map(|v| pp.part_layers(v)).collect();
        let mut slots = PartSlots::new(held, (pool_of, &runs), Some(slot_of), chunks.len());
        let message_len = b.len(&slots.acts.pools[0][0].layer_inputs[0]);
        let mut hand_overs = slots.acts.ticks.hand_overs(b, message_len);
        for tick in &ticks {
            for t in &tick.tasks[me] {
                if !pp.part_embeds(t.part) {
                    slots.take_input(t.part, t.chunk);
                }
                let a = slots.get(t.part, t.chunk);
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
            let sent: Vec<(Message, &B::Slice)> = (tick.tasks[me].iter())
                .filter_map(|t| shape.message(me, *t).map(|m| (m, t)))
                .map(|(m, t)| (m, sent_values(slots.peek(t.part, t.chunk), false)))
                .collect();
            for (m, at) in hand_overs.exchange(b, (&pp, tick), &sent, &|_| message_len) {
                slots.arrive(b, (m.part, m.chunk), hand_overs.values(b, at));
            }
        }
        slots.acts.ticks.keep(hand_overs);
        self.forward_parts = Some(slots.into_acts());
    }

    /// `idle_forward` of a forward-only pass over interleaved stages: this stage's forwards in
    /// their order, each an idle forward of its part's layers.
    pub(crate) fn interleaved_idle_forward(&mut self, b: &B, chunks: usize) {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let shape = Shape { stages: pp.group.size(), parts: pp.parts(), chunks };
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
        grads.chunks_next(pp.chunks);
        for &task in first.iter().chain(&then).flat_map(|t| &t.tasks[me]) {
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
