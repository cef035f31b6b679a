//! The model's side of pipeline parallel (`pipeline`): keeping one stage of a whole model,
//! running a training pass's chunks (its rows) through the stages on a schedule
//! (`pipeline_schedule`: 1F1B, or GPipe where the loss's weights need every chunk's forward;
//! with interleaved stages the ticks of `interleaved_schedule`, run in `model_interleaved`),
//! and handing the last stage's results to every stage. Generation's chunks:
//! `pipelined_generation`.

use crate::activations::Activations;
use crate::batch::Batch;
use crate::grad_sink::GradSink;
use crate::interleaved_schedule::{self, Shape, Tick};
use crate::model::{Model, WeightsOf};
use crate::model_interleaved::interleaved_ticks;
use crate::part_slots::{part_pools, ChunkActs, PartSlots};
use crate::pipeline::Pipeline;
use crate::pipeline_schedule::{chunks_in_flight, forwards_then_backwards, ChunkOrder, Op};
use kiln_core::Backend;
use std::ops::Range;

/// What the last stage computes from a chunk's logits.
pub(crate) enum PipelineLoss<'a> {
    /// `Σ weight·nll`, the weights the batch's, or chosen from every token's nll.
    Nll(Option<WeightsOf<'a>>),
    /// `Σ weight·KL(p‖q)` against the teacher's logits (`[tokens, vocab]`, `pipelined`'s
    /// `teacher`).
    Kl,
}

impl PipelineLoss<'_> {
    /// The order of a pass's chunks: every forward first where the weights are still to be
    /// chosen, else 1F1B.
    fn order(&self) -> ChunkOrder {
        match self {
            Self::Nll(Some(_)) => ChunkOrder::ForwardsFirst,
            Self::Nll(None) | Self::Kl => ChunkOrder::OneForwardOneBackward,
        }
    }
}

impl<B: Backend> Model<B> {
    /// The stages this rank's model is one of, under pipeline parallel.
    pub fn pipeline(&self) -> Option<&Pipeline<B>> {
        self.pipeline.as_ref()
    }

    /// Pipeline parallel: cuts every training pass's rows into `chunks` chunks (fewer for a
    /// pass with fewer rows, or with `fixed` exactly that many, padded) for the schedule, and
    /// generation steps' rows into as many (`set_generation_chunks` sets another count); every
    /// rank of the run must set the same.
    pub fn set_pipeline_chunks(&mut self, chunks: usize, fixed: bool) {
        let pp = self.pipeline.as_mut().expect("a pipeline stage");
        (pp.chunks, pp.fixed_chunks, pp.generation_chunks) = (chunks.max(1), fixed, chunks.max(1));
    }

    /// Pipeline parallel: cuts generation steps' rows into `chunks` chunks (see
    /// `pipelined_generation`); every rank of the run must set the same.
    pub fn set_generation_chunks(&mut self, chunks: usize) {
        self.pipeline.as_mut().expect("a pipeline stage").generation_chunks = chunks.max(1);
    }

    /// Whether this rank computes the head and the loss: not an earlier pipeline stage.
    pub(crate) fn holds_head(&self) -> bool {
        self.pipeline.as_ref().is_none_or(Pipeline::is_last)
    }

    /// `values` (`len` of them) of the last pipeline stage on every stage; `values` itself
    /// without pipeline parallel.
    pub(crate) fn last_stage_values(&self, b: &B, values: &[f32], len: usize, what: &str) -> Vec<f32> {
        match &self.pipeline {
            Some(pp) => pp.from_last(b, values, len, what),
            None => values.to_vec(),
        }
    }

    /// `value` of the last pipeline stage on every stage.
    pub(crate) fn last_stage_scalar(&self, value: f64, what: &str) -> f64 {
        match &self.pipeline {
            Some(pp) => pp.scalar_from_last(value, what),
            None => value,
        }
    }

    /// A training pass of `batch` under pipeline parallel: its rows, cut into the pipeline's
    /// `chunks` (padded to the same rows), go through the stages on the schedule, each chunk
    /// in activations of its own (`chunk_acts`), parameter gradients added into `grads`. On
    /// the last stage every token's nll and correctness land in `acts` (for
    /// `correct_tokens`). Returns the loss and, with chosen weights, the nll, on every stage.
    pub(crate) fn pipelined(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
        (mut loss, teacher): (PipelineLoss, Option<&B::Slice>),
    ) -> (f64, Option<Vec<f32>>) {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let (stage, stages, seq) = (pp.stage(), pp.group.size(), batch.seq);
        let (rows, chunks) = chunks_of(&pp, batch);
        let chunk_rows = chunks[0].rows;
        grads.chunks_next(chunks.len());
        // GPipe where the loss's weights need every chunk's forward, else 1F1B (interleaved
        // over the parts with interleaved stages); an idle pass of a data-parallel peer
        // (`Model::idle_pass`) runs the same order.
        let order = loss.order();
        let schedule = if pp.parts() > 1 {
            Schedule::Ticks(interleaved_ticks(&pp, chunks.len(), order))
        } else {
            Schedule::Ops(match order {
                ChunkOrder::ForwardsFirst => forwards_then_backwards(stage, stages, chunks.len()),
                order => [order.ops(stage, stages, chunks.len()), Vec::new()],
            })
        };
        let pool_of = part_pools(&self.config, &pp);
        let (slot_of, counts) = match &schedule {
            Schedule::Ops(ops) => (None, vec![chunks_in_flight(&ops.concat())]),
            Schedule::Ticks(ticks) => {
                let shape = Shape { stages, parts: pp.parts(), chunks: chunks.len() };
                let (slot_of, counts) = interleaved_schedule::slots(&shape, &ticks.concat(), (stage, &pool_of), false);
                (Some(slot_of), counts)
            }
        };
        let held = self.chunk_acts.take();
        let layout = (&self.config, &pp);
        let counted = (pool_of.as_slice(), counts.as_slice());
        let held = ChunkActs::new(b, layout, held, counted, (chunk_rows, seq), (true, acts.recompute, true));
        let runs: Vec<Range<usize>> = (0..pp.parts()).map(|v| pp.part_layers(v)).collect();
        let slots = PartSlots::new(held, (pool_of, &runs), slot_of, chunks.len());
        let mut run = Run { b, pp: &pp, acts: slots, chunks: &chunks, rows: &rows, out: acts, teacher, loss_sum: 0.0 };
        let (first, then) = match &schedule {
            Schedule::Ops([first, then]) => (Steps::Ops(first), Steps::Ops(then)),
            Schedule::Ticks([first, then]) => (Steps::Ticks(first), Steps::Ticks(then)),
        };
        run.steps(self, first, &mut loss, grads);
        let mut nll = None;
        if let PipelineLoss::Nll(Some(weights_of)) = &mut loss {
            let n = batch.rows * seq;
            let mine = if pp.is_last() { b.read(&run.out.nll) } else { Vec::new() };
            let all = pp.from_last(b, &mine, n, "pipeline: nll");
            let weights = weights_of(&all);
            assert_eq!(weights.len(), n, "one weight per token");
            if pp.is_last() {
                let head = pp.parts() - 1;
                for (c, r) in rows.iter().enumerate() {
                    let mut padded = vec![0.0; chunk_rows * seq];
                    padded[..r.len() * seq].copy_from_slice(&weights[r.start * seq..r.end * seq]);
                    b.write(&mut run.acts.get(head, c).inputs.weights, &padded);
                }
            }
            nll = Some(all);
        }
        run.steps(self, then, &mut loss, grads);
        if matches!(schedule, Schedule::Ticks(_)) {
            // Under interleaving the outer gradients end once a pass, on every stage.
            grads.outer_done(b);
        }
        self.chunk_acts = Some(run.acts.into_acts());
        (pp.scalar_from_last(run.loss_sum, "pipeline: loss"), nll)
    }

    /// Every token's nll of `batch` under pipeline parallel, on every stage. Its rows, cut into
    /// the chunks a training pass takes (the same rows, so the numbers of training's forward),
    /// pass through the stages one after another: stage s runs chunk c while stage s + 1 runs
    /// chunk c − 1 (the forwards of `forwards_then_backwards`). A chunk's activations are done
    /// once it is handed on, so a stage holds one chunk's (`forward_chunk`).
    pub(crate) fn pipelined_nll(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) -> Vec<f32> {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let (rows, chunks) = chunks_of(&pp, batch);
        if pp.parts() > 1 {
            self.interleaved_nll(b, acts, &chunks, &rows);
            let mine = if pp.is_last() { b.read(&acts.nll) } else { Vec::new() };
            return pp.from_last(b, &mine, batch.rows * batch.seq, "pipeline: nll");
        }
        let (chunk_rows, seq, last) = (chunks[0].rows, batch.seq, self.config.num_layers);
        // Laid out as training's chunks are (under sequence parallel, the stream cut by
        // tokens), so the numbers are bit for bit a training forward's (`training_logprobs`).
        let training_layout = self.config.sequence_parallel.is_some();
        let mut a = match self.forward_chunk.take() {
            Some(a) if a.rows == chunk_rows && a.seq == seq => a,
            _ => {
                let (layers, layout) = (0..self.config.num_layers, (training_layout, false));
                Activations::for_part(b, &self.config, layers, (chunk_rows, seq), layout, pp.is_last())
            }
        };
        let what = "pipeline: hidden states forward";
        for op in forwards_then_backwards(pp.stage(), pp.group.size(), chunks.len())[0].iter().copied() {
            match op {
                Op::RecvForward(_) => pp.recv_prev(b, &mut a.layer_inputs[0], what),
                Op::Forward(c) => {
                    self.forward_layers(b, &mut a, &chunks[c], None, None, Some(0));
                    if pp.is_last() {
                        self.lm_head_forward(b, &mut a);
                        self.cross_entropy_forward(b, &mut a);
                        let (tokens, n) = (rows[c].start * seq..rows[c].end * seq, rows[c].len() * seq);
                        b.copy(b.slice_mut(&mut acts.nll, tokens.clone()), b.slice(&a.nll, 0..n));
                        b.copy(b.slice_mut(&mut acts.correct, tokens), b.slice(&a.correct, 0..n));
                    }
                }
                Op::SendForward(_) => pp.send_next(b, &a.layer_inputs[last], what),
                other => unreachable!("{other:?} in a forward-only schedule"),
            }
        }
        self.forward_chunk = Some(a);
        let mine = if pp.is_last() { b.read(&acts.nll) } else { Vec::new() };
        pp.from_last(b, &mine, batch.rows * seq, "pipeline: nll")
    }
}

/// `batch`'s rows cut into the pipeline's chunks (fewer for fewer rows, or with fixed chunks
/// exactly that many), and the chunks, each padded to the first's rows.
fn chunks_of<B: Backend>(pp: &Pipeline<B>, batch: &Batch) -> (Vec<Range<usize>>, Vec<Batch>) {
    let count = if pp.fixed_chunks { pp.chunks } else { pp.chunks.min(batch.rows).max(1) };
    let rows: Vec<Range<usize>> = (0..count).map(|c| kiln_dist::shard(batch.rows, c, count)).collect();
    let chunk_rows = rows[0].len().max(1);
    let chunks = rows.iter().map(|r| batch.rows_padded(r.clone(), chunk_rows)).collect();
    (rows, chunks)
}

/// A pass's schedule: 1F1B's or GPipe's steps of one stage, or with interleaved stages the
/// ticks of every stage (`interleaved_schedule`); each in two halves, between which
/// `ForwardsFirst` chooses the weights.
enum Schedule {
    Ops([Vec<Op>; 2]),
    Ticks([Vec<Tick>; 2]),
}

/// One half of a `Schedule`.
enum Steps<'a> {
    Ops(&'a [Op]),
    Ticks(&'a [Tick]),
}

/// A pipelined pass under way: the chunks' activations (per part; without interleaving chunk
/// c in slot c mod their number), the caller's activations that collect the last stage's
/// per-token results, and the loss so far.
pub(crate) struct Run<'a, B: Backend> {
    pub b: &'a B,
    pub pp: &'a Pipeline<B>,
    pub acts: PartSlots<B>,
    pub chunks: &'a [Batch],
    /// The rows of the pass each chunk holds (before its padding).
    pub rows: &'a [Range<usize>],
    pub out: &'a mut Activations<B>,
    pub teacher: Option<&'a B::Slice>,
    pub loss_sum: f64,
}

impl<B: Backend> Run<'_, B> {
    fn steps(&mut self, model: &mut Model<B>, steps: Steps, loss: &mut PipelineLoss, grads: &mut dyn GradSink<B>) {
        match steps {
            Steps::Ops(ops) => ops.iter().for_each(|&op| self.op(model, op, loss, grads)),
            Steps::Ticks(ticks) => {
                let message_len = self.b.len(&self.acts.acts.pools[0][0].layer_inputs[0]);
                let mut hand_overs = self.acts.acts.ticks.hand_overs(self.b, message_len);
                ticks.iter().for_each(|tick| self.tick(model, (tick, &mut hand_overs), loss, grads));
                self.acts.acts.ticks.keep(hand_overs);
            }
        }
    }

    fn op(&mut self, model: &mut Model<B>, op: Op, loss: &mut PipelineLoss, grads: &mut dyn GradSink<B>) {
        let (b, pp) = (self.b, self.pp);
        let forward = "pipeline: hidden states forward";
        let backward = "pipeline: hidden-state gradients backward";
        match op {
            Op::RecvForward(c) => pp.recv_prev(b, &mut self.acts.get(0, c).layer_inputs[0], forward),
            Op::Forward(c) => self.forward(model, 0, c, loss),
            Op::SendForward(c) => pp.send_next(b, stage_output(self.acts.peek(0, c)), forward),
            Op::SendForwardRecvBackward(j, i) => {
                let (send, recv) = self.acts.pair(j, i);
                pp.send_next_recv_next(b, stage_output(send), dres(recv), backward);
            }
            Op::Backward(c) => {
                self.backward(model, 0, c, loss, grads);
                if pp.is_first() {
                    grads.outer_done(b);
                }
            }
            Op::SendBackward(c) => {
                pp.send_prev(b, dres(self.acts.get(0, c)), backward);
                grads.outer_done(b);
            }
            Op::SendBackwardRecvForward(i, j) if self.acts.place_of(0, i) == self.acts.place_of(0, j) => {
                // A slot whose chunk's backward is done takes the next chunk's input.
                let a = self.acts.get(0, i);
                let s = a.grad.as_ref().expect("training activations");
                pp.send_prev_recv_prev(b, &s.dres, &mut a.layer_inputs[0], forward);
                grads.outer_done(b);
            }
            Op::SendBackwardRecvForward(i, j) => {
                let (send, recv) = self.acts.pair(i, j);
                pp.send_prev_recv_prev(b, dres(send), &mut recv.layer_inputs[0], forward);
                grads.outer_done(b);
            }
            Op::RecvBackward(c) => pp.recv_next(b, dres(self.acts.get(0, c)), backward),
        }
    }

    /// Chunk `c`'s forward through part `part` of this stage; after the last virtual stage,
    /// its loss too: with the batch's weights (or the teacher) the loss's gradient at the
    /// logits at once, with weights still to be chosen only the nll.
    pub fn forward(&mut self, model: &mut Model<B>, part: usize, c: usize, loss: &PipelineLoss) {
        let (b, seq, rows) = (self.b, self.chunks[c].seq, self.rows[c].clone());
        let heads = self.pp.part_heads(part);
        let chunk = &self.chunks[c];
        let a = self.acts.get(part, c);
        // The chunk's padding rows are no one's: their routes do not count in the loads.
        model.forward_layers(b, a, chunk, Some(rows.len() * seq), None, Some(part));
        if !heads {
            return;
        }
        model.lm_head_forward(b, a);
        let vocab = model.config.vocab_size;
        let weights = &chunk.weights;
        match loss {
            PipelineLoss::Nll(None) => self.loss_sum += nll_gradient(b, model, a, weights),
            PipelineLoss::Nll(Some(_)) => model.cross_entropy_forward(b, a),
            PipelineLoss::Kl => {
                // The teacher's logits of the chunk's rows, and for its padding (weight 0) none.
                let per_row = seq * vocab;
                let teacher = self.teacher.expect("the teacher's logits");
                let theirs = b.slice(teacher, rows.start * per_row..rows.end * per_row);
                let padded = (rows.len() < a.rows).then(|| {
                    let mut padded = b.zeros(a.rows * per_row);
                    b.copy(b.slice_mut(&mut padded, 0..rows.len() * per_row), theirs);
                    padded
                });
                let teacher = padded.as_deref().unwrap_or(theirs);
                model.reverse_kl_backward(b, a, teacher);
                self.loss_sum += weighted_sum(&b.read(&a.nll), weights);
            }
        }
        let (tokens, n) = (rows.start * seq..rows.end * seq, rows.len() * seq);
        b.copy(b.slice_mut(&mut self.out.nll, tokens.clone()), b.slice(&a.nll, 0..n));
        b.copy(b.slice_mut(&mut self.out.correct, tokens), b.slice(&a.correct, 0..n));
    }

    /// Chunk `c`'s backward through part `part` of this stage (after the last virtual stage,
    /// from the loss: with chosen weights, its gradient at the logits first).
    pub fn backward(
        &mut self,
        model: &mut Model<B>,
        part: usize,
        c: usize,
        loss: &PipelineLoss,
        grads: &mut dyn GradSink<B>,
    ) {
        let (b, heads, chunk) = (self.b, self.pp.part_heads(part), &self.chunks[c]);
        self.acts.lend_scratch(part, c);
        let a = self.acts.get(part, c);
        if !heads {
            model.backward_stage(b, a, chunk, grads, Some(part));
        } else {
            if let PipelineLoss::Nll(Some(_)) = loss {
                // The weights chosen after the forwards, which `pipelined` wrote.
                let weights = b.read(&a.inputs.weights);
                self.loss_sum += nll_gradient(b, model, a, &weights);
            }
            model.backward_from_logits(b, a, chunk, grads, Some(part));
        }
        self.acts.return_scratch(part, c);
    }
}

/// A chunk's output on this stage.
fn stage_output<B: Backend>(a: &Activations<B>) -> &B::Slice {
    a.layer_inputs.last().expect("the stage's output")
}

/// The gradient scratch's dL/d(residual stream) of a chunk's activations.
pub(crate) fn dres<B: Backend>(a: &mut Activations<B>) -> &mut B::Slice {
    &mut a.grad.as_mut().expect("training activations").dres
}

/// A chunk's cross-entropy from its logits: the nll (and correctness) of every token, and
/// the gradient of `Σ weight·nll` in place of the logits. Returns `Σ weight·nll`, `weights`
/// being those of `a.inputs.weights`.
fn nll_gradient<B: Backend>(b: &B, model: &Model<B>, a: &mut Activations<B>, weights: &[f32]) -> f64 {
    model.cross_entropy_backward(b, a);
    weighted_sum(&b.read(&a.nll), weights)
}

/// `Σ nll·weight` in f64.
fn weighted_sum(values: &[f32], weights: &[f32]) -> f64 {
    values.iter().zip(weights).map(|(&v, &w)| v as f64 * w as f64).sum()
}
