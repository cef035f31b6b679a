//! Batched generation with a key/value cache, on the same model code and kernels as
//! training. Each request takes a free cache slot and its prompt's slot: the completions of
//! one prompt (a GRPO group) share one prefill and one cached copy of the prompt, which all of
//! them attend (`PromptPool`); then every step decodes one token for all running sequences at
//! once, each attending its prompt's rows and its own. A sequence that stops frees its slot for
//! the next waiting request (continuous batching), so prompts of different lengths finish
//! independently.
//!
//! Under expert parallel every forward needs the whole expert group, so the ranks of a group
//! go round by round together: in each, a rank prefills or decodes when it has sequences to,
//! and otherwise serves its experts to the ranks that do, until no rank has any left.

use crate::kv_cache::{CachePlan, CacheShape, KvCache, Placement};
use crate::prompt_pool::PromptPool;
use crate::sampler::{logprob_entropy, sample, SamplingParams};
use crate::{Activations, ActivationsPool, Batch, CompletionRows, Model};
use kiln_core::rng::Rng;
use kiln_core::{Backend, FrozenWeights};
use rayon::prelude::*;
use std::collections::HashSet;

pub struct Request {
    pub prompt: Vec<i32>,
    pub params: SamplingParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token, or the caller's stop condition (stop strings).
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New tokens, without the stop token.
    pub tokens: Vec<i32>,
    /// log p(token) under the model, log softmax of its logits, for every new token.
    pub logprobs: Vec<f32>,
    /// Entropy (nats) of the model's next-token distribution, softmax of the logits, at
    /// every new token.
    pub entropies: Vec<f32>,
    pub finish: FinishReason,
}

/// A running sequence.
struct Running {
    request: usize,
    at: Placement,
    /// Prompt and new tokens; the last one is not in the cache yet.
    tokens: Vec<i32>,
    out: Generation,
    rng: Rng,
}

/// The log-prob of every completion token of `rows` computed by the training forward on the
/// training layout (in `acts` laid out for its batch): bit for bit what a training step on the
/// same rows computes, so the numbers a trainer keeps from rollout (the sampling policy's, the
/// reference's) never disagree with training.
pub fn training_logprobs<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    acts: &mut Activations<B>,
    rows: &CompletionRows,
) -> Vec<Vec<f32>> {
    let nll = model.nll(b, acts, &rows.batch);
    rows.per_completion(&nll).map(|n| n.iter().map(|x| -x).collect()).collect()
}

/// Generates for every request, at most `max_batch` at a time; `stop(request, new_tokens)`
/// may end a sequence early (stop strings). Outputs come back in request order.
pub fn generate<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    requests: &[Request],
    max_batch: usize,
    stop: &mut dyn FnMut(usize, &[i32]) -> bool,
) -> Vec<Generation> {
    generate_observed(b, model, requests, max_batch, stop, &mut |_, _| {})
}

/// [`generate`], calling `finished(request, generation)` as each sequence finishes, while the
/// others still decode (a rollout scores finished groups with external rewards meanwhile).
pub fn generate_observed<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    requests: &[Request],
    max_batch: usize,
    stop: &mut dyn FnMut(usize, &[i32]) -> bool,
    finished: &mut dyn FnMut(usize, &Generation),
) -> Vec<Generation> {
    // The weights stay as they are while sampling: their packed forms are reused.
    let _frozen = FrozenWeights::new(b);
    let slots = max_batch.min(requests.len()).max(1);
    let share = !model.is_v4();
    // Prompts held at once: no more than the sequences reading them, nor than distinct ones.
    let distinct = requests.iter().map(|r| r.prompt.as_slice()).collect::<HashSet<_>>().len();
    let shape = CacheShape {
        slots,
        own_len: requests.iter().map(|r| r.params.max_new_tokens).max().unwrap_or(0).max(1),
        prompts: if share { distinct.clamp(1, slots) } else { slots },
        prompt_len: requests.iter().map(|r| r.prompt.len()).max().unwrap_or(1),
    };
    let mut cache = KvCache::new(b, &model.config, shape, model.matmul_precision());
    let mut prompts = PromptPool::new(shape.prompts, share);
    let vocab = model.whole_config().vocab_size;
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut waiting = 0..requests.len();
    let mut running: Vec<Running> = Vec::new();
    let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
    let mut decode_acts = ActivationsPool::new(&model.config, 1, false, false);

    // Appends `draw`; true when the sequence is finished.
    let advance = |r: &mut Running, draw: Draw, stop: &mut dyn FnMut(usize, &[i32]) -> bool| -> bool {
        let params = &requests[r.request].params;
        if params.stop_ids.contains(&draw.token) {
            r.out.finish = FinishReason::Stop;
            return true;
        }
        r.out.tokens.push(draw.token);
        r.out.logprobs.push(draw.logprob);
        r.out.entropies.push(draw.entropy);
        r.tokens.push(draw.token);
        if stop(r.request, &r.out.tokens) {
            r.out.finish = FinishReason::Stop;
            return true;
        }
        r.out.tokens.len() >= params.max_new_tokens
    };

    loop {
        // Admit waiting requests into free slots; prefill, together and right-padded, the
        // prompts not held already.
        let admitted: Vec<(usize, usize)> = std::iter::from_fn(|| {
            (!free.is_empty()).then(|| waiting.next()).flatten().map(|r| (r, free.pop().expect("checked")))
        })
        .collect();
        let mut fresh = Vec::with_capacity(admitted.len());
        let mut prefills = Vec::new();
        for &(request, slot) in &admitted {
            let prompt = &requests[request].prompt;
            assert!(!prompt.is_empty(), "request {request}: empty prompt");
            let (prompt_slot, opened) = prompts.place(prompt);
            let at = Placement { slot, prompt: prompt_slot, prompt_len: prompt.len() };
            if opened {
                prefills.push(at);
            }
            let out = Generation {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                entropies: Vec::new(),
                finish: FinishReason::Length,
            };
            let rng = Rng::new(requests[request].params.seed);
            fresh.push(Running { request, at, tokens: prompt.clone(), out, rng });
        }
        let work = !admitted.is_empty() || !running.is_empty() || !waiting.is_empty();
        let [prefilling, working] = in_group(model, [!prefills.is_empty(), work], "prefill round");
        if !working {
            break;
        }
        if prefills.is_empty() && prefilling {
            model.idle_generation_step(b);
        }
        if !prefills.is_empty() {
            let seq = prefills.iter().map(|at| at.prompt_len).max().expect("not empty");
            let mut batch = Batch::padding(prefills.len(), seq);
            let mut rows = vec![-1; prefills.len() * seq];
            let mut last = Vec::with_capacity(prefills.len());
            for (i, &at) in prefills.iter().enumerate() {
                for (p, &id) in prompts.tokens(at.prompt).iter().enumerate() {
                    let t = i * seq + p;
                    (batch.ids[t], batch.positions[t], batch.segments[t]) = (id, p as i32, 0);
                    rows[t] = cache.row(at, p);
                }
                last.push((i * seq + at.prompt_len - 1) as i32);
            }
            let mut acts = Activations::new(b, &model.config, prefills.len(), seq, false, false);
            let plan = CachePlan { rows: &rows, decode: None, logits_at: &last };
            let logits = model.forward_cached(b, &mut acts, &batch, &mut cache, &plan);
            for (at, logits) in prefills.iter().zip(logits.chunks_exact(vocab)) {
                prompts.set_logits(at.prompt, logits);
            }
        }
        if !fresh.is_empty() {
            let logits: Vec<&[f32]> = fresh.iter().map(|r| prompts.logits(r.at.prompt)).collect();
            let draws = draw_all(&mut fresh, &logits, requests);
            for (mut r, draw) in fresh.into_iter().zip(draws) {
                let finished_now = requests[r.request].params.max_new_tokens == 0 || advance(&mut r, draw, stop);
                if finished_now {
                    free.push(r.at.slot);
                    prompts.leave(r.at.prompt);
                    finished(r.request, &r.out);
                    done[r.request] = Some(r.out);
                } else {
                    running.push(r);
                }
            }
        }
        let [decoding] = in_group(model, [!running.is_empty()], "decode round");
        if running.is_empty() {
            if decoding {
                model.idle_generation_step(b);
            }
            continue;
        }
        // One decode step for every running sequence.
        let n = running.len();
        let mut batch = Batch::padding(n, 1);
        let (mut rows, mut starts, mut lengths) =
            (Vec::with_capacity(n), Vec::with_capacity(2 * n), Vec::with_capacity(2 * n));
        for (i, r) in running.iter().enumerate() {
            let pos = r.tokens.len() - 1;
            (batch.ids[i], batch.positions[i], batch.segments[i]) = (r.tokens[pos], pos as i32, 0);
            rows.push(cache.row(r.at, pos));
            let (s, l) = cache.decode_ranges(r.at, pos);
            starts.extend(s);
            lengths.extend(l);
        }
        let acts = decode_acts.get(b, n);
        let every: Vec<i32> = (0..n as i32).collect();
        let plan = CachePlan { rows: &rows, decode: Some((&starts, &lengths)), logits_at: &every };
        let logits = model.forward_cached(b, acts, &batch, &mut cache, &plan);
        let logits: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
        let draws = draw_all(&mut running, &logits, requests);
        let mut still = Vec::with_capacity(n);
        for (mut r, draw) in running.drain(..).zip(draws) {
            if advance(&mut r, draw, stop) {
                free.push(r.at.slot);
                prompts.leave(r.at.prompt);
                finished(r.request, &r.out);
                done[r.request] = Some(r.out);
            } else {
                still.push(r);
            }
        }
        running = still;
    }
    done.into_iter().map(|g| g.expect("every request finishes")).collect()
}

/// A sequence's next token and the model's log-prob of it and entropy there.
struct Draw {
    token: i32,
    logprob: f32,
    entropy: f32,
}

/// The next token of every sequence of `running` from its `logits`, drawn with its own
/// generator: in parallel, as each sequence's draws depend only on it.
fn draw_all(running: &mut [Running], logits: &[&[f32]], requests: &[Request]) -> Vec<Draw> {
    running
        .par_iter_mut()
        .zip(logits)
        .map(|(r, &logits)| {
            let token = sample(logits, &requests[r.request].params, &mut r.rng);
            let (logprob, entropy) = logprob_entropy(logits, token);
            Draw { token: token as i32, logprob, entropy }
        })
        .collect()
}

/// Whether any rank of the model's expert group (just this one without expert parallel) has
/// each of `flags` set.
fn in_group<B: Backend, const N: usize>(model: &Model<B>, flags: [bool; N], what: &str) -> [bool; N] {
    let Some(ep) = model.expert_parallel() else { return flags };
    let mut counts = flags.map(|f| f64::from(u8::from(f)));
    ep.group.all_reduce_sum_f64(&mut counts, &format!("generation: {what}")).unwrap_or_else(|e| panic!("{e:#}"));
    counts.map(|c| c > 0.0)
}
