//! What the on-policy recipes (GRPO, distillation) share: each step's prompts drawn, completions sampled with the KV-cache generator and laid out as
//! training rows, and completions scored by the reward functions.
//!
//! Under ZeRO-3 the policy is gathered whole for sampling (`Model::unshard`), as DeepSpeed's
//! hybrid engine and verl's resharding do: each rank decodes its own prompts for as many
//! steps as they need, so per-layer gathers, which every rank must join in the same order,
//! cannot serve generation.

use crate::rewards::{External, Reward, RewardFn, Sample};
use anyhow::Result;
use kiln_core::rng::Rng;
use kiln_core::Backend;
use kiln_data::prompts::PromptRow;
use kiln_data::Tokenizer;
use kiln_model::generator::{generate, generate_observed, Generation, Request};
use kiln_model::sampler::SamplingParams;
use kiln_model::Model;
use std::sync::mpsc;

/// The `n` prompts of 0-based step `step`: a pure function of seed and step, like the SFT
/// data order, so a resumed run draws what an uninterrupted one would.
pub fn step_prompts(prompts: &[PromptRow], seed: u64, step: u64, n: usize) -> Vec<&PromptRow> {
    let mut rng = Rng::new(seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (0..n).map(|_| &prompts[rng.below(prompts.len())]).collect()
}

/// The requests of `group` completions of each prompt with `params`. Completion `i` of the
/// batch draws with seed `seed·φ ^ (first + i)`: `first` is its step-wide index, so a
/// completion's draw does not depend on which rank samples it.
fn group_requests(
    prompts: &[&PromptRow],
    group: usize,
    params: &SamplingParams,
    (seed, first): (u64, usize),
) -> Vec<Request> {
    prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, group))
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.ids.clone(),
            params: SamplingParams {
                seed: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (first + i) as u64,
                ..params.clone()
            },
        })
        .collect()
}

/// Samples `group` completions of each prompt with `params` (seeds as [`group_requests`]),
/// each with the index of its prompt.
pub fn sample<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    prompts: &[&PromptRow],
    group: usize,
    params: &SamplingParams,
    seeds: (u64, usize),
) -> Vec<(usize, Generation)> {
    let requests = group_requests(prompts, group, params, seeds);
    model.unshard(b);
    let out = generate(b, model, &requests, requests.len(), &mut |_, _| false);
    model.reshard();
    out.into_iter().enumerate().map(|(i, g)| (i / group, g)).collect()
}

/// Sampled completions (each with its prompt's index) and their rewards: the weighted total
/// and each function's.
pub struct Scored {
    pub outs: Vec<(usize, Generation)>,
    pub total: Vec<f64>,
    pub per: Vec<Vec<f64>>,
}

/// [`sample`], with the completions scored by `rewards`. Rewards computed outside this process
/// (programs, endpoints) score each group on a thread of their own as soon as all its
/// completions have finished, while the others still decode; the rest score at the end.
pub fn sample_and_score<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    (prompts, group): (&[&PromptRow], usize),
    (params, seeds): (&SamplingParams, (u64, usize)),
    (tokenizer, rewards): (&Tokenizer, &[Reward<B>]),
) -> Result<Scored> {
    let requests = group_requests(prompts, group, params, seeds);
    let external: Vec<(String, External)> = rewards
        .iter()
        .filter_map(|r| match &r.function {
            RewardFn::External(e) => Some((r.name.clone(), e.clone())),
            _ => None,
        })
        .collect();
    let text = |g: &Generation| tokenizer.decode(&g.tokens.iter().map(|&x| x as u32).collect::<Vec<_>>());
    let overlap = !external.is_empty();
    let (outs, texts, early) = std::thread::scope(|scope| {
        let (finished_groups, arrivals) = mpsc::channel::<(usize, Vec<String>)>();
        let scorer = scope.spawn(move || -> Result<Vec<(usize, Vec<Vec<f64>>)>> {
            arrivals
                .into_iter()
                .map(|(p, texts)| {
                    let samples: Vec<Sample> = texts.iter().map(|c| sample_of(prompts[p], c)).collect();
                    let scores = external.iter().map(|(name, e)| e.score(name, &samples)).collect::<Result<_>>()?;
                    Ok((p, scores))
                })
                .collect()
        });
        // Each completion's text, decoded as it finishes.
        let mut texts = vec![String::new(); requests.len()];
        let mut left = vec![group; prompts.len()];
        let mut finished = |i: usize, g: &Generation| {
            texts[i] = text(g);
            let p = i / group;
            left[p] -= 1;
            if overlap && left[p] == 0 {
                // The scorer only stops receiving when it has failed: its error is reported below.
                let _ = finished_groups.send((p, texts[p * group..(p + 1) * group].to_vec()));
            }
        };
        model.unshard(b);
        let outs = generate_observed(b, model, &requests, requests.len(), &mut |_, _| false, &mut finished);
        model.reshard();
        drop(finished_groups);
        (outs, texts, scorer.join().expect("the reward thread panicked"))
    });
    let mut early_by_prompt: Vec<Vec<Vec<f64>>> = vec![Vec::new(); prompts.len()];
    early?.into_iter().for_each(|(p, scores)| early_by_prompt[p] = scores);
    let outs: Vec<(usize, Generation)> = outs.into_iter().enumerate().map(|(i, g)| (i / group, g)).collect();
    let samples: Vec<Sample> = texts.iter().enumerate().map(|(i, c)| sample_of(prompts[i / group], c)).collect();
    let mut external_index = 0;
    let per: Vec<Vec<f64>> = rewards
        .iter()
        .map(|r| match &r.function {
            RewardFn::External(_) => {
                let k = external_index;
                external_index += 1;
                Ok((0..samples.len()).map(|i| early_by_prompt[i / group][k][i % group]).collect())
            }
            _ => r.score(b, &samples),
        })
        .collect::<Result<_>>()?;
    let total = (0..samples.len()).map(|i| rewards.iter().zip(&per).map(|(r, v)| r.weight * v[i]).sum()).collect();
    Ok(Scored { outs, total, per })
}

/// A completion of `row`'s prompt as the rewards receive it.
fn sample_of<'a>(row: &'a PromptRow, completion: &'a str) -> Sample<'a> {
    Sample { prompt: &row.text, completion, answer: row.answer.as_deref(), columns: Some(&row.columns) }
}

/// A sampled completion as a training row: prompt + completion (+ the stop token when it
/// stopped on one), cut to `seq`, with the prompt's length.
pub fn completion_row(
    prompt: &[i32],
    tokens: &[i32],
    stopped: bool,
    stop_ids: &[i32],
    seq: usize,
) -> (Vec<i32>, usize) {
    let mut ids = [prompt, tokens].concat();
    if stopped {
        ids.extend(stop_ids);
    }
    ids.truncate(seq);
    (ids, prompt.len())
}

/// The row length a micro-batch of completion rows (`(ids, prompt length)`) trains on: its
/// longest row rounded up to a multiple of 32 (so few layouts recur), at most `max_seq`.
/// Padding every row to `data.max_seq_len` computed up to twice the tokens there are.
pub fn row_length(chunk: &[(Vec<i32>, usize)], max_seq: usize) -> usize {
    let longest = chunk.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1);
    longest.next_multiple_of(32).min(max_seq)
}
