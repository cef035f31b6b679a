//! Generation under pipeline parallel: a prefill's prompts or a decode step's rows (one token
//! per running sequence), cut into the pipeline's chunks, flow through the stages as a
//! forward-only pass's do (stage s runs chunk c while stage s + 1 runs chunk c − 1; over
//! interleaved stages on the forward ticks of `interleaved_schedule`), each chunk's keys and
//! values going into its own sequences' cache rows, the last stage computing each chunk's
//! logits as the chunk leaves it.

use crate::activations::{Activations, ActivationsPool};
use crate::batch::Batch;
use crate::interleaved_schedule::{Message, Shape};
use crate::kv_cache::{CachePlan, KvCache};
use crate::model::Model;
use crate::pipeline::Pipeline;
use crate::pipeline_schedule::{forwards_then_backwards, Op};
use kiln_core::Backend;
use std::ops::Range;

/// One chunk of a generation step: its rows, their batch, tokens and (decoding) cached spans
/// in the step's, and the step's tokens whose logits it computes (`wanted`, at `at` in it).
struct Chunk {
    rows: Range<usize>,
    batch: Batch,
    tokens: Range<usize>,
    spans: Range<usize>,
    wanted: Vec<usize>,
    at: Vec<i32>,
}

/// `batch`'s rows cut into `count` chunks, for the step `plan`.
fn chunks(batch: &Batch, plan: &CachePlan, count: usize) -> Vec<Chunk> {
    let seq = batch.seq;
    // Decoding, each token's cached spans (a prompt's and its own), as many per token.
    let spans = plan.decode.map_or(0, |(starts, _)| starts.len() / batch.rows);
    (0..count)
        .map(|c| {
            let rows = kiln_dist::shard(batch.rows, c, count);
            let tokens = rows.start * seq..rows.end * seq;
            let (wanted, at) = (plan.logits_at.iter().enumerate())
                .filter(|(_, &t)| tokens.contains(&(t as usize)))
                .map(|(i, &t)| (i, t - tokens.start as i32))
                .unzip();
            let batch = batch.rows_padded(rows.clone(), rows.len());
            Chunk { spans: rows.start * spans..rows.end * spans, rows, batch, tokens, wanted, at }
        })
        .collect()
}

impl<B: Backend> Model<B> {
    /// Whether a generation step runs as `pipelined_generation`: a prefill or decode step of
    /// several rows under pipeline parallel. Not under expert parallel or ZeRO-3, whose
    /// per-layer collectives a data-parallel peer with nothing to run meets with one idle
    /// forward, nor for DeepSeek-V4, whose caches plan a step as a whole.
    pub(crate) fn generates_in_chunks(&self, batch: &Batch) -> bool {
        let chunked = self.pipeline.as_ref().is_some_and(|pp| pp.chunks > 1);
        chunked && batch.rows > 1 && self.expert_parallel.is_none() && self.shards.is_none() && !self.is_v4()
    }

    /// A generation step of `batch` (a prefill of prompts, or a decode step of one token per
    /// row) under pipeline parallel, in chunks (see the module). Returns the logits of
    /// `plan.logits_at` (`[k, vocab]`) on every stage, as `forward_cached` does.
    pub(crate) fn pipelined_generation(
        &mut self,
        b: &B,
        batch: &Batch,
        cache: &mut KvCache<B>,
        plan: &CachePlan,
    ) -> Vec<f32> {
        let pp = self.pipeline.clone().expect("a pipeline stage");
        let chunks = chunks(batch, plan, pp.chunks.min(batch.rows));
        let vocab = self.whole_config().vocab_size;
        let mut logits = vec![0.0; if pp.is_last() { plan.logits_at.len() * vocab } else { 0 }];
        // Decode steps reuse their chunks' activations; a prefill's (of its prompts' length)
        // are laid out for it, as an unpipelined prefill's are.
        let mut pool = match plan.decode {
            Some(_) => self.decode_chunks.take().unwrap_or_else(|| ActivationsPool::new(&self.config, 1, false, false)),
            None => ActivationsPool::new(&self.config, batch.seq, false, false),
        };
        let mut step = Step { cache, plan, logits: &mut logits };
        match pp.parts() {
            1 => self.generation_stage_after_stage(b, &pp, &chunks, &mut pool, &mut step),
            _ => self.generation_on_ticks(b, &pp, &chunks, &mut pool, &mut step),
        }
        if plan.decode.is_some() {
            self.decode_chunks = Some(pool);
        }
        pp.from_last(b, &logits, plan.logits_at.len() * vocab, "pipeline: logits")
    }

    /// The chunks on the forward-only schedule of 1F1B's stages.
    fn generation_stage_after_stage(
        &mut self,
        b: &B,
        pp: &Pipeline<B>,
        chunks: &[Chunk],
        pool: &mut ActivationsPool<B>,
        step: &mut Step<B>,
    ) {
        let (what, last) = ("pipeline: hidden states forward", self.config.num_layers);
        for op in forwards_then_backwards(pp.stage(), pp.group.size(), chunks.len())[0].iter().copied() {
            match op {
                Op::RecvForward(c) => pp.recv_prev(b, &mut pool.get(b, chunks[c].rows.len()).layer_inputs[0], what),
                Op::Forward(c) => self.generation_chunk(b, pool.get(b, chunks[c].rows.len()), &chunks[c], 0, step),
                Op::SendForward(c) => pp.send_next(b, &pool.get(b, chunks[c].rows.len()).layer_inputs[last], what),
                other => unreachable!("{other:?} in a forward-only schedule"),
            }
        }
    }

    /// The chunks through interleaved stages on the forward ticks: a chunk's activations hold
    /// every layer of the stage, so a part reads its input at its first layer's place (copied
    /// there from where it waited, as chunks of the same rows share activations) and hands on
    /// its last layer's output in the tick it runs.
    fn generation_on_ticks(
        &mut self,
        b: &B,
        pp: &Pipeline<B>,
        chunks: &[Chunk],
        pool: &mut ActivationsPool<B>,
        step: &mut Step<B>,
    ) {
        let me = pp.stage();
        let shape = Shape { stages: pp.group.size(), parts: pp.parts(), chunks: chunks.len() };
        let message_len: Vec<usize> =
            chunks.iter().map(|c| b.len(&pool.get(b, c.rows.len()).layer_inputs[0])).collect();
        let mut buffers = std::mem::take(&mut self.generation_ticks);
        let mut hand_overs = buffers.hand_overs(b, message_len.iter().copied().max().unwrap_or(0));
        let inbox = &mut buffers.inbox;
        for tick in &shape.forwards_then_backwards()[0] {
            let mut sent = None;
            for t in &tick.tasks[me] {
                let (run, a) = (pp.part_layers(t.part), pool.get(b, chunks[t.chunk].rows.len()));
                if !pp.part_embeds(t.part) {
                    inbox.take_into(b, (t.part, t.chunk), &mut a.layer_inputs[run.start]);
                }
                self.generation_chunk(b, a, &chunks[t.chunk], t.part, step);
                sent = shape.message(me, *t).map(|m| (m, run.end));
            }
            if tick.messages.is_empty() {
                continue;
            }
            let source = sent.map(|(m, end)| (m, &*pool.get(b, chunks[m.chunk].rows.len()).layer_inputs[end]));
            let sent: Vec<(Message, &B::Slice)> = source.into_iter().collect();
            for (m, at) in hand_overs.exchange(b, (pp, tick), &sent, &|m| message_len[m.chunk]) {
                inbox.put(b, (m.part, m.chunk), hand_overs.values(b, at));
            }
        }
        buffers.keep(hand_overs);
        self.generation_ticks = buffers;
    }

    /// Chunk `chunk`'s forward through part `part` of this stage, in `a`; after the last
    /// virtual stage, its logits into the step's.
    fn generation_chunk(&mut self, b: &B, a: &mut Activations<B>, chunk: &Chunk, part: usize, step: &mut Step<B>) {
        let plan = step.plan;
        let chunk_plan = CachePlan {
            rows: &plan.rows[chunk.tokens.clone()],
            decode: plan.decode.map(|(starts, lengths)| (&starts[chunk.spans.clone()], &lengths[chunk.spans.clone()])),
            logits_at: &chunk.at,
        };
        self.forward_layers(b, a, &chunk.batch, None, Some((&mut *step.cache, &chunk_plan)), Some(part));
        if self.pipeline.as_ref().is_some_and(|pp| pp.part_heads(part)) {
            let vocab = self.whole_config().vocab_size;
            let chunk_logits = self.logits_at(b, a, &chunk.at);
            for (&i, row) in chunk.wanted.iter().zip(chunk_logits.chunks_exact(vocab)) {
                step.logits[i * vocab..(i + 1) * vocab].copy_from_slice(row);
            }
        }
    }
}

/// A generation step under way: the cache its chunks write, its plan, and the logits the last
/// stage fills.
struct Step<'a, 'p, B: Backend> {
    cache: &'a mut KvCache<B>,
    plan: &'a CachePlan<'p>,
    logits: &'a mut Vec<f32>,
}
