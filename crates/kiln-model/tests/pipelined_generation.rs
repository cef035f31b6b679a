//! Generation under pipeline parallel: a prefill's prompts and a decode step's rows, cut into
//! chunks, flow through the stages (`Model::pipelined_generation`), and every stage returns
//! the one-process generations, sampled tokens and log-probs alike, over continuous batching
//! with more prompts than slots (the first prefill takes 4 prompts of 1 to 7 tokens, padded):
//! Llama, DeepSeek-V3, and DeepSeek-V4 with a sliding window of 5 and compressed layers of
//! rates 2 to 8 (entries completed during decode), 2 and 4 hyper-connected streams.

use kiln_core::Cpu;
use kiln_dist::Threads;
use kiln_model::generator::{generate, Generation, Request};
use kiln_model::model_share::ModelShare;
use kiln_model::sampler::SamplingParams;
use kiln_model::Model;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case).join("model")
}

fn requests() -> Vec<Request> {
    let prompts = [vec![3, 14, 15], vec![9, 2, 6, 5, 35, 8, 9], vec![7], vec![11, 12, 13, 14], vec![1, 2], vec![4, 4]];
    (prompts.into_iter().enumerate())
        .map(|(i, prompt)| Request {
            prompt,
            params: SamplingParams { temperature: 1.0, max_new_tokens: 4 + i, seed: i as u64, ..Default::default() },
        })
        .collect()
}

fn assert_same(case: &str, got: &[Generation], want: &[Generation]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.tokens, w.tokens, "{case}: request {i}'s tokens");
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a - b).abs() < 1e-5, "{case}: request {i}'s log-probs {:?} against {:?}", g.logprobs, w.logprobs);
        }
    }
}

#[test]
fn prefills_and_decode_steps_cut_into_chunks_through_two_stages_give_the_one_process_generations() {
    for case in ["llama", "deepseek_v3", "deepseek_v4", "deepseek_v4_hc4"] {
        let want = generate(&Cpu, &mut Model::load(&Cpu, &fixture(case)).unwrap(), &requests(), 4, &mut |_, _| false);
        std::thread::scope(|s| {
            let ranks: Vec<_> = (Threads::new(2, Duration::from_secs(60)).into_iter())
                .map(|comm| {
                    s.spawn(move || {
                        let share = ModelShare { stages: Some(Arc::new(comm)), ..ModelShare::whole() };
                        let mut model = Model::load_share(&Cpu, &fixture(case), share, None).unwrap();
                        model.set_pipeline_chunks(3, false);
                        generate(&Cpu, &mut model, &requests(), 4, &mut |_, _| false)
                    })
                })
                .collect();
            for rank in ranks {
                assert_same(case, &rank.join().expect("a stage failed"), &want);
            }
        });
    }
}
