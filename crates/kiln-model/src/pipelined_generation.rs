//! Generation under pipeline parallel: a prefill's prompts or a decode step's rows (one token
//! per running sequence), cut into the pipeline's chunks, flow through the stages as a
//! forward-only pass's do (stage s runs chunk c while stage s + 1 runs chunk c − 1; over
//! interleaved stages on the forward ticks of `interleaved_schedule`), each chunk's keys and
//! values going into its own sequences' cache rows, the last stage computing each chunk's
//! logits as the chunk leaves it. Under expert parallel a stage's data-parallel peers exchange
//! tokens in every chunk's MoE layers, so each runs the same chunks, those beyond its rows
//! empty (an idle forward), and a peer with nothing to generate idle chunks
//! (`idle_generation_step`); under ZeRO-3 the stages run on the model gathered for generation.

use crate::activations::{Activations, ActivationsPool};
use crate::batch::Batch;
use crate::interleaved_schedule::{Message, Shape};
use crate::kv_cache::{CachePlan, KvCache};
use crate::model::Model;
use crate::pipeline::Pipeline;
use crate::pipeline_schedule::{forwards_then_backwards, ChunkOrder, Op};
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
    /// Whether a generation step runs as `pipelined_generation`: a prefill or decode step
    /// under pipeline parallel, of several rows or, under expert parallel, of any. Not with
    /// the parameters sharded (ZeRO-3 generates on the gathered model, `Model::unshard`).
    /// DeepSeek-V4's caches are planned per forward (`V4Step`), so per chunk: a chunk's
    /// sequences' sliding rows and compressed entries.
    pub(crate) fn generates_in_chunks(&self, batch: &Batch) -> bool {
        self.chunked_generation() && (batch.rows > 1 || self.expert_parallel.is_some())
    }

    /// Whether generation under pipeline parallel runs in the pipeline's chunks.
    fn chunked_generation(&self) -> bool {
        let chunked = self.pipeline.as_ref().is_some_and(|pp| pp.generation_chunks > 1);
        chunked && !self.params_sharded()
    }

    /// The chunks a generation step of `rows` is cut into. Under expert parallel every
    /// data-parallel peer runs the pipeline's chunks, whatever its rows (the chunks beyond
    /// them empty, an idle forward), so that their per-layer expert exchanges meet.
    fn generation_chunks(&self, pp: &Pipeline<B>, rows: usize) -> usize {
        match self.expert_parallel {
            Some(_) => pp.generation_chunks,
            None => pp.generation_chunks.min(rows),
        }
    }

    /// What a data-parallel peer runs for a generation step it has no rows in, while another
    /// runs one: the forwards whose per-layer collectives (expert exchanges, ZeRO-3's
    /// gathers) the other's step meets, chunk by chunk where it runs in chunks.
    pub fn idle_generation_step(&mut self, b: &B) {
        let chunked = self.chunked_generation() && self.expert_parallel.is_some();
        match self.pipeline.clone().filter(|_| chunked) {
            Some(pp) if pp.parts() > 1 => self.interleaved_idle_forward(b, pp.generation_chunks),
            Some(pp) => {
                let stage = 0..self.config.num_layers;
                for _ in 0..pp.generation_chunks {
                    self.idle_chunk_forward(b, std::slice::from_ref(&stage));
                }
            }
            None => self.idle_forward(b, ChunkOrder::Unchunked),
        }
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
        let chunks = chunks(batch, plan, self.generation_chunks(&pp, batch.rows));
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
        let layers = 0..last;
        for op in forwards_then_backwards(pp.stage(), pp.group.size(), chunks.len())[0].iter().copied() {
            match op {
                // An empty chunk is empty on every stage: nothing to hand over.
                Op::RecvForward(c) | Op::SendForward(c) if chunks[c].rows.is_empty() => {}
                Op::Forward(c) if chunks[c].rows.is_empty() => {
                    self.idle_chunk_forward(b, std::slice::from_ref(&layers));
                }
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
        let message_len: Vec<usize> = (chunks.iter())
            .map(|c| match c.rows.len() {
                0 => 0,
                rows => b.len(&pool.get(b, rows).layer_inputs[0]),
            })
            .collect();
        let mut buffers = std::mem::take(&mut self.generation_ticks);
        let mut hand_overs = buffers.hand_overs(b, message_len.iter().copied().max().unwrap_or(0));
        let inbox = &mut buffers.inbox;
        for tick in &shape.forwards_then_backwards()[0] {
            let mut sent = None;
            for t in &tick.tasks[me] {
                let run = pp.part_layers(t.part);
                if chunks[t.chunk].rows.is_empty() {
                    self.idle_chunk_forward(b, &[run]);
                    continue;
                }
                let a = pool.get(b, chunks[t.chunk].rows.len());
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
                if !at.is_empty() {
                    inbox.put(b, (m.part, m.chunk), hand_overs.values(b, at));
                }
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
