//! The KV-cache generator against the cache-free reference: continuous batching over more
//! prompts than slots, prompts of different lengths, stop tokens and stop conditions, and the
//! reported log-probs against the training forward's.

use kiln_core::{Cpu, Precision};
use kiln_model::generate::greedy;
use kiln_model::generator::{generate, FinishReason, Request};
use kiln_model::sampler::SamplingParams;
use kiln_model::{Activations, Batch, CompletionRows, Model};
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case).join("model")
}

fn prompts() -> Vec<Vec<i32>> {
    vec![vec![3, 14, 15], vec![9, 2, 6, 5, 35, 8, 9], vec![7], vec![11, 12, 13, 14, 15, 16, 17, 18, 19, 20], vec![1, 2]]
}

#[test]
fn continuous_batching_matches_the_cache_free_reference() {
    for case in ["llama", "mistral", "deepseek_v3", "deepseek_v4", "deepseek_v4_hc4"] {
        let b = Cpu;
        let mut model = Model::load(&b, &fixture(case)).unwrap();
        let requests: Vec<Request> = prompts()
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| Request {
                prompt,
                params: SamplingParams { temperature: 0.0, max_new_tokens: 3 + i, ..Default::default() },
            })
            .collect();
        let out = generate(&b, &mut model, &requests, 2, &mut |_, _| false);
        for (r, g) in requests.iter().zip(&out) {
            let want = greedy(&b, &mut model, std::slice::from_ref(&r.prompt), r.params.max_new_tokens, &[]);
            assert_eq!(g.tokens, want[0], "{case}: prompt {:?}", r.prompt);
            assert_eq!(g.finish, FinishReason::Length);

            // The reported log-probs are the model's: the training forward gives the same.
            let full = [r.prompt.clone(), g.tokens.clone()].concat();
            let batch = Batch::causal_lm(std::slice::from_ref(&full));
            let mut acts = Activations::new(&b, &model.config, 1, full.len(), false, false);
            let nll = model.nll(&b, &mut acts, &batch);
            for (t, &lp) in g.logprobs.iter().enumerate() {
                let train = -nll[r.prompt.len() - 1 + t];
                assert!((lp - train).abs() < 1e-4, "{case}: logprob {t}: sampler {lp}, training {train}");
            }
        }
    }
}

/// The completions of a group share their prompt: it is prefilled and cached once, and every
/// completion attends its rows. A completion admitted while others of its prompt still decode
/// (more completions than slots, the first of each group finishing early) joins the cached
/// prompt without a prefill. Each completion samples what it samples when generated on its
/// own, in both cases.
#[test]
fn completions_sharing_a_prompt_sample_as_they_do_alone() {
    for case in ["llama", "deepseek_v3", "deepseek_v4"] {
        let b = Cpu;
        let mut model = Model::load(&b, &fixture(case)).unwrap();
        let requests: Vec<Request> = prompts()[..3]
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, 4))
            .enumerate()
            .map(|(i, prompt)| Request {
                prompt: prompt.clone(),
                params: SamplingParams {
                    temperature: 1.0,
                    max_new_tokens: if i % 4 == 0 { 3 } else { 8 },
                    seed: i as u64,
                    ..Default::default()
                },
            })
            .collect();
        let together = generate(&b, &mut model, &requests, requests.len(), &mut |_, _| false);
        let staggered = generate(&b, &mut model, &requests, 3, &mut |_, _| false);
        for (i, r) in requests.iter().enumerate() {
            let alone = generate(&b, &mut model, std::slice::from_ref(r), 1, &mut |_, _| false).remove(0);
            for (how, shared) in [("together", &together[i]), ("staggered", &staggered[i])] {
                assert_eq!(shared.tokens, alone.tokens, "{case}: request {i} {how}");
                let gap = shared.logprobs.iter().zip(&alone.logprobs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(gap <= 1e-5, "{case}: request {i} {how}: log-probs differ by {gap}");
            }
        }
        let distinct: std::collections::HashSet<_> = together.iter().map(|g| g.tokens.clone()).collect();
        assert!(distinct.len() > 3, "{case}: the completions of a prompt must differ");
    }
}

#[test]
fn stop_tokens_and_stop_conditions_end_sequences_independently() {
    let b = Cpu;
    let mut model = Model::load(&b, &fixture("llama")).unwrap();
    let prompt = vec![3, 14, 15];
    let free = greedy(&b, &mut model, std::slice::from_ref(&prompt), 6, &[]).remove(0);
    let greedy_params = SamplingParams { temperature: 0.0, max_new_tokens: 6, ..Default::default() };
    let requests = vec![
        Request { prompt: prompt.clone(), params: SamplingParams { stop_ids: vec![free[2]], ..greedy_params.clone() } },
        Request { prompt: prompt.clone(), params: greedy_params.clone() },
        Request { prompt: prompt.clone(), params: greedy_params },
    ];
    // The third request stops after two tokens by the caller's condition (a stop string).
    let out = generate(&b, &mut model, &requests, 3, &mut |request, tokens| request == 2 && tokens.len() == 2);
    let first_stop = free.iter().position(|&t| t == free[2]).unwrap();
    assert_eq!(out[0].tokens, free[..first_stop].to_vec());
    assert_eq!(out[0].finish, FinishReason::Stop);
    assert_eq!(out[1].tokens, free);
    assert_eq!(out[1].finish, FinishReason::Length);
    assert_eq!((out[2].tokens.as_slice(), out[2].finish), (&free[..2], FinishReason::Stop));
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let b = Cpu;
    let mut model = Model::load(&b, &fixture("qwen3")).unwrap();
    let request = |seed| Request {
        prompt: vec![5, 6, 7],
        params: SamplingParams { temperature: 1.0, top_p: 0.95, max_new_tokens: 12, seed, ..Default::default() },
    };
    let a = generate(&b, &mut model, &[request(1), request(2), request(1)], 2, &mut |_, _| false);
    assert_eq!(a[0].tokens, a[2].tokens, "same seed, same tokens, whatever the batch");
    assert_ne!(a[0].tokens, a[1].tokens, "different seeds differ");
}

#[test]
fn rescored_sampler_logprobs_equal_the_training_step_exactly() {
    rescored_logprobs_equal_the_training_step(Precision::F32);
}

/// In mixed precision too: every row of a bf16 product is computed the same way whatever the
/// batch, so rollouts and training steps agree bit for bit.
#[test]
fn rescored_sampler_logprobs_equal_the_training_step_exactly_in_bf16() {
    let bf16 = rescored_logprobs_equal_the_training_step(Precision::Bf16);
    let f32 = rescored_logprobs_equal_the_training_step(Precision::F32);
    assert_ne!(bf16, f32, "the bf16 model must compute in bf16");
}

/// The largest difference between corresponding log-probs of `a` and `b`.
fn max_difference<'a>(a: impl Iterator<Item = &'a Vec<f32>>, b: &[Vec<f32>]) -> f32 {
    a.zip(b).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0, f32::max)
}

/// Checks one precision's rollout log-probs against its training step, and returns them.
fn rescored_logprobs_equal_the_training_step(precision: Precision) -> Vec<Vec<f32>> {
    let b = Cpu;
    let mut model = Model::load(&b, &fixture("qwen3")).unwrap();
    model.set_matmul_precision(precision);
    let requests: Vec<Request> = prompts()
        .into_iter()
        .map(|prompt| Request {
            prompt,
            params: SamplingParams { temperature: 1.0, max_new_tokens: 6, seed: 3, ..Default::default() },
        })
        .collect();
    let out = generate(&b, &mut model, &requests, 3, &mut |_, _| false);
    let sequences: Vec<(Vec<i32>, usize)> = requests
        .iter()
        .zip(&out)
        .map(|(r, g)| ([r.prompt.clone(), g.tokens.clone()].concat(), r.prompt.len()))
        .collect();
    let rows = CompletionRows::new(&sequences, 16, false, 0.0);
    let (r, seq) = (rows.batch.rows, rows.batch.seq);
    let mut rollout_acts = Activations::new(&b, &model.config, r, seq, false, false);
    let rollout = kiln_model::generator::training_logprobs(&b, &mut model, &mut rollout_acts, &rows);
    // A training step on the same batch: the nll its backward starts from.
    let batch = Batch::completions(&sequences, seq, 1.0);
    let mut acts = Activations::new(&b, &model.config, r, seq, true, false);
    let mut grads = model.grads(&b);
    let (_, nll) = model.forward_backward_with(&b, &mut acts, &batch, &mut grads, &mut |nll| vec![0.0; nll.len()]);
    for (r, ((ids, p), lp)) in sequences.iter().zip(&rollout).enumerate() {
        let train: Vec<f32> = (p - 1..ids.len() - 1).map(|t| -nll[r * seq + t]).collect();
        assert_eq!(lp, &train, "sequence {r}: rollout and training log-probs must be bit-identical");
    }
    // And the sampler's own (KV-cache) log-probs are the training's up to rounding. In f32,
    // f32 rounding. In bf16 the cache also stores keys and values as bf16 (as a bf16 model's
    // cache does in transformers), so the sampler may differ from the bf16 training forward by
    // as much as bf16 products differ from f32 ones: no more than the bf16 training log-probs
    // differ from the f32 training's on the same tokens.
    let sampler_error = max_difference(out.iter().map(|g| &g.logprobs), &rollout);
    let tolerance = match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16 => {
            model.set_matmul_precision(Precision::F32);
            let f32 = kiln_model::generator::training_logprobs(&b, &mut model, &mut rollout_acts, &rows);
            max_difference(f32.iter(), &rollout)
        }
    };
    eprintln!("{precision:?}: sampler against training log-probs: {sampler_error:.2e} (at most {tolerance:.2e})");
    assert!(sampler_error <= tolerance, "{precision:?}: sampler log-probs {sampler_error:.2e} from the training's");
    rollout
}
