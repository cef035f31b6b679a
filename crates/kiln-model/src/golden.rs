//! Parity with transformers, for any backend: logits, log-probs, greedy continuations (without
//! a cache and with the KV-cache generator), the loss and every parameter gradient, with
//! activations kept and recomputed, of tiny random models of each supported `model_type`, as
//! written by `tools/golden/llama_family.py` and `tools/golden/deepseek_v3.py`. A backend
//! proves itself end to end by instantiating [`golden_tests!`]:
//!
//! ```ignore
//! kiln_model::golden_tests!(kiln_core::Cpu);
//! ```

use crate::generator::{generate, Request};
use crate::sampler::SamplingParams;
use crate::{Activations, Batch, Model};
use kiln_core::Backend;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

/// Generates one `#[test]` per golden case for the backend expression given.
#[macro_export]
macro_rules! golden_tests {
    ($backend:expr) => {
        $crate::golden_tests!(@tests $backend; llama, mistral, qwen2, qwen3, deepseek_v3, deepseek_v3_plain);
    };
    (@tests $backend:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                $crate::golden::check(&$backend, stringify!($case));
            }
        )*
    };
}

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case)
}

struct Golden {
    sequences: Vec<Vec<i32>>,
    seq: usize,
    greedy: Vec<i32>,
    tensors: Vec<(String, Vec<f32>)>,
}

impl Golden {
    fn load(case: &str) -> Self {
        let bytes = std::fs::read(fixture(case).join("golden.safetensors")).expect("golden fixture");
        let st = SafeTensors::deserialize(&bytes).expect("golden safetensors");
        let ints = |name: &str| -> (Vec<usize>, Vec<i64>) {
            let v = st.tensor(name).unwrap();
            assert_eq!(v.dtype(), Dtype::I64);
            (v.shape().to_vec(), v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect())
        };
        let (shape, ids) = ints("input_ids");
        let (_, lengths) = ints("lengths");
        let greedy = ints("greedy").1.into_iter().map(|t| t as i32).collect();
        let seq = shape[1];
        let sequences = lengths
            .iter()
            .enumerate()
            .map(|(r, &len)| ids[r * seq..r * seq + len as usize].iter().map(|&i| i as i32).collect())
            .collect();
        let tensors = st
            .tensors()
            .into_iter()
            .filter(|(_, v)| v.dtype() == Dtype::F32)
            .map(|(n, v)| (n, v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
            .collect();
        Self { sequences, seq, greedy, tensors }
    }

    fn get(&self, name: &str) -> &[f32] {
        &self.tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("golden tensor {name}")).1
    }
}

/// `|got − want| ≤ rtol·(|want| + max|want|·1e-1)`: relative, with a floor tied to the
/// tensor's scale so that entries near zero are not held to an impossible standard.
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rtol * (w.abs() + 0.1 * scale);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: kiln {g}, transformers {w} (|diff| {:.3e} > {tol:.3e})",
            (g - w).abs()
        );
    }
}

/// Checks backend `b` on the golden case `case` (a directory of `tests/fixtures`).
pub fn check<B: Backend>(b: &B, case: &str) {
    let golden = Golden::load(case);
    let mut model = Model::load(b, &fixture(case).join("model")).expect("load model");
    let batch = Batch::causal_lm(&golden.sequences);
    assert_eq!(batch.seq, golden.seq);
    let vocab = model.config.vocab_size;

    // Logits at real (non-padding) positions.
    let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, true, false);
    model.forward(b, &mut acts, &batch);
    let logits = b.read(&acts.logits);
    let want = golden.get("logits");
    for (r, s) in golden.sequences.iter().enumerate() {
        let range = r * batch.seq * vocab..(r * batch.seq + s.len()) * vocab;
        assert_close(&format!("{case} logits row {r}"), &logits[range.clone()], &want[range], 1e-5);
    }

    // Log-probs of the next token.
    let nll = model.nll(b, &mut acts, &batch);
    let want = golden.get("logprobs");
    for (r, s) in golden.sequences.iter().enumerate() {
        for t in 0..s.len() - 1 {
            let (got, want) = (-nll[r * batch.seq + t], want[r * (batch.seq - 1) + t]);
            assert!((got - want).abs() < 1e-5, "{case} logprob[{r},{t}]: kiln {got}, transformers {want}");
        }
    }

    // Greedy decoding continues the first row's first 6 tokens as transformers' generate does,
    // without a cache and with the KV-cache generator.
    let greedy = crate::generate::greedy(b, &mut model, &[golden.sequences[0][..6].to_vec()], 5, &[]);
    assert_eq!(greedy[0], golden.greedy, "{case}: greedy continuation");
    let params = SamplingParams { temperature: 0.0, max_new_tokens: 5, ..Default::default() };
    let request = Request { prompt: golden.sequences[0][..6].to_vec(), params };
    let cached = generate(b, &mut model, &[request], 4, &mut |_, _| false);
    assert_eq!(cached[0].tokens, golden.greedy, "{case}: greedy continuation with the KV cache");

    // Loss and every gradient, with activations kept and with them recomputed.
    for recompute in [false, true] {
        let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, true, recompute);
        let mut grads = model.grads(b);
        let loss = model.forward_backward(b, &mut acts, &batch, &mut grads);
        let want_loss = golden.get("loss")[0] as f64;
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "{case} loss: kiln {loss}, transformers {want_loss}"
        );
        for (spec, g) in model.layout.iter().into_iter().zip(grads.views(b).iter()) {
            let what = format!("{case} (recompute={recompute}) grad {}", spec.name);
            if spec.name.ends_with("e_score_correction_bias") {
                assert!(b.read(g).iter().all(|&v| v == 0.0), "{what}: the correction bias gets no gradient");
                continue;
            }
            assert_close(&what, &b.read(g), golden.get(&format!("grad.{}", spec.name)), 1e-4);
        }
    }
}
