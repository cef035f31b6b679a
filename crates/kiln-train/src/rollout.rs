//! What the on-policy recipes (GRPO, distillation) share: each step's prompts drawn, completions sampled with the KV-cache generator and laid out as
//! training rows, and completions scored by the reward functions.

use crate::rewards::{Reward, Sample};
use anyhow::Result;
use kiln_core::rng::Rng;
use kiln_core::Backend;
use kiln_data::prompts::PromptRow;
use kiln_data::Tokenizer;
use kiln_model::generator::{generate, Generation, Request};
use kiln_model::sampler::SamplingParams;
use kiln_model::Model;

/// The `n` prompts of 0-based step `step`: a pure function of seed and step, like the SFT
/// data order, so a resumed run draws what an uninterrupted one would.
pub fn step_prompts(prompts: &[PromptRow], seed: u64, step: u64, n: usize) -> Vec<&PromptRow> {
    let mut rng = Rng::new(seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (0..n).map(|_| &prompts[rng.below(prompts.len())]).collect()
}

/// Samples `group` completions of each prompt with `params`, each with the index of its
/// prompt. Completion `i` of the batch draws with seed `seed·φ ^ (first + i)`: `first` is its
/// step-wide index, so a completion's draw does not depend on which rank samples it.
pub fn sample<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    prompts: &[&PromptRow],
    group: usize,
    params: &SamplingParams,
    (seed, first): (u64, usize),
) -> Vec<(usize, Generation)> {
    let requests: Vec<Request> = prompts
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
        .collect();
    let out = generate(b, model, &requests, requests.len(), &mut |_, _| false);
    out.into_iter().enumerate().map(|(i, g)| (i / group, g)).collect()
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

/// Each completion's text, with the index of its prompt.
pub fn decode_all(tokenizer: &Tokenizer, outs: &[(usize, Generation)]) -> Vec<(usize, String)> {
    outs.iter().map(|(p, g)| (*p, tokenizer.decode(&g.tokens.iter().map(|&x| x as u32).collect::<Vec<_>>()))).collect()
}

/// Rewards of completions (texts, each with its prompt's index in `prompts`): the weighted
/// total and each function's.
pub fn score<B: Backend>(
    b: &B,
    rewards: &[Reward<B>],
    prompts: &[&PromptRow],
    texts: &[(usize, String)],
) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let samples: Vec<Sample> = texts
        .iter()
        .map(|(p, c)| {
            let row = prompts[*p];
            Sample { prompt: &row.text, completion: c, answer: row.answer.as_deref(), columns: Some(&row.columns) }
        })
        .collect();
    let per: Vec<Vec<f64>> = rewards.iter().map(|r| r.score(b, &samples)).collect::<Result<_>>()?;
    let total = (0..samples.len()).map(|i| rewards.iter().zip(&per).map(|(r, v)| r.weight * v[i]).sum()).collect();
    Ok((total, per))
}
