//! Prompt-shared training rows (`CompletionRows`: a group's prompt once, its completions after
//! it, several groups to a row) against one row per completion: the same log-probs and the
//! same gradients, up to f32 rounding, on dense, grouped-query, MLA and mixture-of-experts
//! models.

use kiln_core::rng::Rng;
use kiln_core::Cpu;
use kiln_model::{Activations, CompletionRows, Model};
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case).join("model")
}

/// Three prompts: one with three completions (one of a single token), one with two, and a
/// one-token prompt with one; long enough that rows cross attention's 64-token blocks.
fn completions(vocab: usize) -> Vec<(Vec<i32>, usize)> {
    let mut rng = Rng::new(11);
    let mut tokens = |n: usize| (0..n).map(|_| rng.below(vocab) as i32).collect::<Vec<_>>();
    let mut out = Vec::new();
    for (prompt_len, lengths) in [(23, vec![40, 1, 29]), (9, vec![17, 70]), (1, vec![12])] {
        let prompt = tokens(prompt_len);
        for n in lengths {
            out.push(([prompt.clone(), tokens(n)].concat(), prompt_len));
        }
    }
    out
}

/// Every completion token's log-prob and the gradient of `Σ w·logp` (a weight per completion
/// token, as the policy losses give) with `rows`.
fn logprobs_and_gradient(model: &mut Model<Cpu>, rows: &CompletionRows, weights: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
    let b = Cpu;
    let mut acts = Activations::new(&b, &model.config, rows.batch.rows, rows.batch.seq, true, false);
    let mut grads = model.grads(&b);
    let mut weights_of = |_: &[f32]| rows.scatter(weights);
    let (_, nll) = model.forward_backward_with(&b, &mut acts, &rows.batch, &mut grads, &mut weights_of);
    (rows.per_completion(&nll).flatten().map(|x| -x).collect(), grads.flat)
}

#[test]
fn prompt_shared_rows_train_as_separate_rows() {
    for case in ["llama", "qwen3", "deepseek_v3"] {
        let mut model = Model::load(&Cpu, &fixture(case)).unwrap();
        assert!(model.can_share_prompts(), "{case}");
        let sequences = completions(model.config.vocab_size);
        let weights: Vec<Vec<f32>> = sequences
            .iter()
            .enumerate()
            .map(|(k, (ids, p))| (0..ids.len() - p).map(|t| ((k * 7 + t) % 5) as f32 * 0.1 - 0.2).collect())
            .collect();
        let separate = CompletionRows::new(&sequences, 1024, false, 0.0);
        let shared = CompletionRows::new(&sequences, 1024, true, 0.0);
        assert_eq!((separate.batch.rows, shared.batch.rows), (6, 1), "{case}: the three groups on one row");
        let positions = |rows: &CompletionRows| rows.batch.segments.iter().filter(|&&s| s >= 0).count();
        assert_eq!(positions(&separate) - positions(&shared), 22 * 2 + 8, "{case}: each prompt once");

        let (logp, grad) = logprobs_and_gradient(&mut model, &separate, &weights);
        let (logp_shared, grad_shared) = logprobs_and_gradient(&mut model, &shared, &weights);
        assert_eq!(logp.len(), logp_shared.len());
        let logp_error = logp.iter().zip(&logp_shared).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(logp_error < 1e-5, "{case}: log-probs differ by {logp_error:e}");
        let scale = grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let worst = grad.iter().zip(&grad_shared).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(scale > 0.0 && worst < 5e-6 * scale, "{case}: gradients differ by {worst:e} of {scale:e}");
        eprintln!("{case}: log-probs within {logp_error:e}, gradients within {:e} of the largest", worst / scale);
    }
}
