//! Parity with transformers, for any backend: logits, log-probs, greedy continuations (without
//! a cache and with the KV-cache generator), the loss and every parameter gradient, with
//! activations kept and recomputed, of tiny random models of each supported `model_type`, as
//! written by `tools/golden/llama_family.py` and `tools/golden/deepseek_v3.py`; and in bf16
//! mixed precision, log-probs and loss against transformers under bf16 autocast
//! (`tools/golden/bf16_autocast.py`). A backend proves itself end to end by instantiating
//! [`golden_tests!`]:
//!
//! ```ignore
//! kiln_model::golden_tests!(kiln_core::Cpu);
//! ```
//!
//! or, for a device that may be absent, `golden_tests!(optional expr)` with an `Option` of the
//! backend (the tests pass without checking where it is `None`).

use crate::activations::FfnActs;
use crate::generator::{generate, Request};
use crate::sampler::SamplingParams;
use crate::{Activations, Batch, Model, ModelShare};
use kiln_core::Backend;
use kiln_dist::Comm;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;
use std::sync::Arc;

/// Generates one `#[test]` per golden case for the backend expression given, in f32 and (in
/// the module `bf16`) in bf16 mixed precision.
#[macro_export]
macro_rules! golden_tests {
    (optional $backend:expr) => {
        $crate::golden_tests!(@tests (|| $backend); llama, mistral, qwen2, qwen3, deepseek_v3, deepseek_v3_plain);
    };
    ($backend:expr) => {
        $crate::golden_tests!(@tests (|| Some($backend)); llama, mistral, qwen2, qwen3, deepseek_v3, deepseek_v3_plain);
    };
    (@tests $backend:tt; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                if let Some(b) = $backend() {
                    $crate::golden::check(&b, stringify!($case));
                }
            }
        )*
        mod bf16 {
            $(
                #[test]
                fn $case() {
                    if let Some(b) = $backend() {
                        $crate::golden::check_bf16(&b, stringify!($case));
                    }
                }
            )*
        }
    };
}

/// The fixture folder of `case`: under `KILN_FIXTURES` when set (test binaries run on another
/// machine, as tools/gpu/check.sh does), else the repository's `tests/fixtures`.
fn fixture(case: &str) -> PathBuf {
    let root = std::env::var_os("KILN_FIXTURES")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"), PathBuf::from);
    root.join(case)
}

pub struct Golden {
    sequences: Vec<Vec<i32>>,
    seq: usize,
    /// Prompts and transformers' greedy continuation of each.
    greedy: Vec<(Vec<i32>, Vec<i32>)>,
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
        let seq = shape[1];
        let sequences: Vec<Vec<i32>> = lengths
            .iter()
            .enumerate()
            .map(|(r, &len)| ids[r * seq..r * seq + len as usize].iter().map(|&i| i as i32).collect())
            .collect();
        // Either `greedy` [prompts, new] of each row's first `greedy_prompt_lengths[r]` tokens,
        // or (older fixtures) `greedy` [new] of the first row's first 6.
        let prompt_lengths = st.tensor("greedy_prompt_lengths").map_or(vec![6], |_| ints("greedy_prompt_lengths").1);
        let greedy = match st.tensor("greedy") {
            Err(_) => Vec::new(),
            Ok(_) => {
                let tokens: Vec<i32> = ints("greedy").1.into_iter().map(|t| t as i32).collect();
                let new = tokens.len() / prompt_lengths.len();
                let prompts = prompt_lengths.iter().enumerate().map(|(r, &n)| sequences[r][..n as usize].to_vec());
                prompts.zip(tokens.chunks(new).map(<[i32]>::to_vec)).collect()
            }
        };
        Self { sequences, seq, greedy, tensors: f32_tensors(&st) }
    }

    fn get(&self, name: &str) -> &[f32] {
        get(&self.tensors, name)
    }
}

fn f32_tensors(st: &SafeTensors) -> Vec<(String, Vec<f32>)> {
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == Dtype::F32)
        .map(|(n, v)| (n, v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect()
}

fn get<'a>(tensors: &'a [(String, Vec<f32>)], name: &str) -> &'a [f32] {
    &tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("golden tensor {name}")).1
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

/// Checks backend `b` on the golden case `case` (a directory of `tests/fixtures`): logits,
/// log-probs, greedy continuations, the loss and every gradient.
pub fn check<B: Backend>(b: &B, case: &str) {
    let (golden, mut model) = check_training(b, case);
    // Greedy decoding continues the prompts as transformers' generate does, without a cache,
    // and with the cache generator: all prompts at once (their sequences at different
    // positions), and one at a time (each reusing the slot the one before left).
    assert!(!golden.greedy.is_empty(), "{case}: the fixture has no greedy continuation");
    for (prompt, want) in &golden.greedy {
        let greedy = crate::generate::greedy(b, &mut model, std::slice::from_ref(prompt), want.len(), &[]);
        assert_eq!(&greedy[0], want, "{case}: greedy continuation of {prompt:?}");
    }
    let requests: Vec<Request> = (golden.greedy.iter())
        .map(|(prompt, want)| {
            let params = SamplingParams { temperature: 0.0, max_new_tokens: want.len(), ..Default::default() };
            Request { prompt: prompt.clone(), params }
        })
        .collect();
    for max_batch in [requests.len(), 1] {
        let cached = generate(b, &mut model, &requests, max_batch, &mut |_, _| false);
        for (got, (prompt, want)) in cached.iter().zip(&golden.greedy) {
            assert_eq!(&got.tokens, want, "{case}: cached greedy continuation of {prompt:?} ({max_batch} at a time)");
        }
    }
}

/// `check` without generation: logits, log-probs, the loss and every gradient (with
/// activations kept and recomputed). Returns the fixture and the model.
pub fn check_training<B: Backend>(b: &B, case: &str) -> (Golden, Model<B>) {
    let golden = Golden::load(case);
    let mut model = Model::load(b, &fixture(case).join("model")).expect("load model");
    let batch = Batch::causal_lm(&golden.sequences);
    assert_eq!(batch.seq, golden.seq);
    let vocab = model.config.vocab_size;

    // Logits at real (non-padding) positions. DeepSeek-V4's hyper-connections add rounding
    // steps the other architectures lack (20 Sinkhorn normalisations in each of two per layer,
    // the streams mixed in and out): its worst logit differs by 6.2e-6 at a logit scale of 3,
    // against 3.1e-6 for the others, so it is held to 2e-5 instead of 1e-5 here (log-probs,
    // loss and gradients keep the common tolerances).
    let logits_rtol = if model.config.model_type == crate::ModelType::DeepseekV4 { 2e-5 } else { 1e-5 };
    let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, true, false);
    model.forward(b, &mut acts, &batch);
    let logits = b.read(&acts.logits);
    let want = golden.get("logits");
    for (r, s) in golden.sequences.iter().enumerate() {
        let range = r * batch.seq * vocab..(r * batch.seq + s.len()) * vocab;
        assert_close(&format!("{case} logits row {r}"), &logits[range.clone()], &want[range], logits_rtol);
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

    // Loss and every gradient, with activations kept and with them recomputed.
    for recompute in [false, true] {
        let grads = checked_training_pass(b, &mut model, (&batch, &golden), recompute, case);
        for (spec, g) in model.layout.iter().into_iter().zip(grads.views(b).iter()) {
            let what = format!("{case} (recompute={recompute}) grad {}", spec.name);
            if spec.name.ends_with("e_score_correction_bias") || spec.name.ends_with("ffn.gate.bias") {
                assert!(b.read(g).iter().all(|&v| v == 0.0), "{what}: the correction bias gets no gradient");
                continue;
            }
            assert_close(&what, &b.read(g), golden.get(&format!("grad.{}", spec.name)), 1e-4);
        }
    }
    (golden, model)
}

/// Checks one rank of a tensor-parallel group `group` on the golden case `case`: the rank's
/// block of the vocabulary's logits (and no more), every token's log-prob, the loss, the
/// rank's block of every gradient, and greedy continuations, without and with the cache.
/// With `sequence_parallel`, the training activations cut the residual stream by tokens.
pub fn check_tensor_parallel<B: Backend>(b: &B, case: &str, group: Arc<dyn Comm<B::Slice>>, sequence_parallel: bool) {
    let golden = Golden::load(case);
    let (rank, t) = (group.rank(), group.size());
    let share = ModelShare { tensors: Some(group), sequence_parallel, ..ModelShare::whole() };
    let mut model = Model::load_share(b, &fixture(case).join("model"), share, None).expect("load model");
    let what = format!("{case}, rank {rank} of tp={t} (sequence parallel: {sequence_parallel})");
    let batch = Batch::causal_lm(&golden.sequences);
    let whole_vocab = model.whole_config().vocab_size;
    let block = kiln_dist::shard(whole_vocab, rank, t);
    assert_eq!(model.config.vocab_size, block.len(), "{what}: the rank's vocabulary");

    // The rank's columns of the logits, at real positions; no rank holds whole rows.
    let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, true, false);
    model.forward(b, &mut acts, &batch);
    let logits = b.read(&acts.logits);
    assert_eq!(logits.len(), batch.rows * batch.seq * block.len(), "{what}: logits held");
    let want = golden.get("logits");
    for (r, s) in golden.sequences.iter().enumerate() {
        let rows = r * batch.seq..r * batch.seq + s.len();
        let got: Vec<f32> = rows.clone().flat_map(|i| logits[i * block.len()..][..block.len()].to_vec()).collect();
        let mine: Vec<f32> = rows.flat_map(|i| want[i * whole_vocab + block.start..][..block.len()].to_vec()).collect();
        assert_close(&format!("{what} logits row {r}"), &got, &mine, 1e-5);
    }
    let nll = model.nll(b, &mut acts, &batch);
    let want = golden.get("logprobs");
    for (r, s) in golden.sequences.iter().enumerate() {
        for i in 0..s.len() - 1 {
            let (got, want) = (-nll[r * batch.seq + i], want[r * (batch.seq - 1) + i]);
            assert!((got - want).abs() < 1e-5, "{what} logprob[{r},{i}]: kiln {got}, transformers {want}");
        }
    }

    // Under sequence parallel the residual stream holds the rank's tokens only.
    let n = batch.rows * batch.seq;
    let here = if sequence_parallel { kiln_dist::shard(n, rank, t).len() } else { n };
    let width = model.config.hidden_size * crate::activations::streams(&model.config);
    assert_eq!(b.len(&acts.layer_inputs[0]), here * width, "{what}: residual stream held");

    for recompute in [false, true] {
        let what = format!("{what}, recompute={recompute}");
        let grads = checked_training_pass(b, &mut model, (&batch, &golden), recompute, &what);
        let wholes = model.whole_layout().iter();
        for ((spec, whole), g) in model.layout.iter().into_iter().zip(wholes).zip(grads.views(b).iter()) {
            if spec.name.ends_with("e_score_correction_bias") || spec.name.ends_with("ffn.gate.bias") {
                assert!(b.read(g).iter().all(|&v| v == 0.0), "{what}: the correction bias gets no gradient");
                continue;
            }
            let cut = crate::tensor_parallel::Cut::of(whole, spec);
            let golden_grad = golden.get(&format!("grad.{}", spec.name));
            let want = crate::tensor_parallel::slice(golden_grad, &whole.shape, cut, (rank, t));
            assert_close(&format!("{what} grad {} ({cut:?})", spec.name), &b.read(g), &want, 1e-4);
        }
    }

    for (prompt, want) in &golden.greedy {
        let greedy = crate::generate::greedy(b, &mut model, std::slice::from_ref(prompt), want.len(), &[]);
        assert_eq!(&greedy[0], want, "{what}: greedy continuation of {prompt:?}");
        let params = SamplingParams { temperature: 0.0, max_new_tokens: want.len(), ..Default::default() };
        let cached = generate(b, &mut model, &[Request { prompt: prompt.clone(), params }], 1, &mut |_, _| false);
        assert_eq!(&cached[0].tokens, want, "{what}: cached greedy continuation of {prompt:?}");
    }
}

/// The gradients of a training pass over `batch` (layer activations kept, or recomputed in
/// backward), its loss checked against transformers'.
fn checked_training_pass<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    (batch, golden): (&Batch, &Golden),
    recompute: bool,
    what: &str,
) -> crate::grad_sink::FlatGrads<B> {
    let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, true, recompute);
    let mut grads = model.grads(b);
    let loss = model.forward_backward(b, &mut acts, batch, &mut grads);
    let want = golden.get("loss")[0] as f64;
    assert!((loss - want).abs() <= 1e-5 * want.abs(), "{what} loss: kiln {loss}, transformers {want}");
    grads
}

/// The experts every token was routed to in every MoE layer of the last forward, each
/// token's choices as a sorted set: `[layer][token]`.
fn routes<B: Backend>(b: &B, acts: &Activations<B>, top_k: usize) -> Vec<Vec<Vec<i32>>> {
    (acts.layers.iter())
        .filter_map(|l| match &l.ffn {
            FfnActs::Moe(m) => Some(m.routes(b)),
            FfnActs::Dense(_) => None,
        })
        .map(|idx| {
            idx.chunks(top_k)
                .map(|c| {
                    let mut c = c.to_vec();
                    c.sort_unstable();
                    c
                })
                .collect()
        })
        .collect()
}

/// Checks backend `b` in bf16 mixed precision on the golden case `case`: next-token log-probs
/// and the training loss against transformers' forward under bf16 autocast.
///
/// The tolerance is the case's own bf16 noise: `noise = max |autocast − f32|` over transformers'
/// log-probs. kiln and PyTorch round to bf16 at different places (PyTorch also rounds every
/// product's output and attention's products; kiln keeps f32 sums and f32 attention), so each
/// sits within its own noise of the f32 value and the two within the sum of both noises. kiln
/// is held to `|kiln − autocast| ≤ 2·noise` per log-prob and for the loss (a mean of
/// log-probs), and to `|kiln − f32| ≤ 2·noise`. That kiln did round is checked too: some
/// log-prob leaves the 1e-5 that f32 is held to.
///
/// MoE models: where rounding turns over a near tie of the router's top-k (kiln's bf16 forward
/// picks another expert set for a token than its f32 forward), that token and the later ones
/// of its row see a different function, not rounding noise; they are held to the loss bound
/// only, and such flips must be rare (at most one token in ten).
pub fn check_bf16<B: Backend>(b: &B, case: &str) {
    let golden = Golden::load(case);
    let bytes = std::fs::read(fixture(case).join("autocast_bf16.safetensors")).expect("autocast fixture");
    let autocast = f32_tensors(&SafeTensors::deserialize(&bytes).expect("autocast safetensors"));
    let mut model = Model::load(b, &fixture(case).join("model")).expect("load model");
    let batch = Batch::causal_lm(&golden.sequences);
    let top_k = model.config.moe.as_ref().map_or(1, |m| m.top_k);
    let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, true, false);
    model.forward(b, &mut acts, &batch);
    let f32_routes = routes(b, &acts, top_k);
    model.set_matmul_precision(kiln_core::Precision::Bf16);
    let nll = model.nll(b, &mut acts, &batch);
    let bf16_routes = routes(b, &acts, top_k);

    // The first token of each row whose expert set changed in any layer.
    let tokens = batch.rows * batch.seq;
    let flipped: Vec<usize> =
        (0..tokens).filter(|&t| f32_routes.iter().zip(&bf16_routes).any(|(f, h)| f[t] != h[t])).collect();
    assert!(flipped.len() * 10 <= tokens, "{case}: bf16 changed the experts of {} of {tokens} tokens", flipped.len());
    let first_flip = |r: usize| flipped.iter().find(|&&t| t / batch.seq == r).map_or(batch.seq, |t| t % batch.seq);

    let (want_f32, want_bf16) = (golden.get("logprobs"), get(&autocast, "logprobs"));
    let positions: Vec<(usize, usize)> =
        (golden.sequences.iter().enumerate()).flat_map(|(r, s)| (0..s.len() - 1).map(move |t| (r, t))).collect();
    let at = |(r, t): (usize, usize)| r * (batch.seq - 1) + t;
    let noise = positions.iter().map(|&p| (want_bf16[at(p)] - want_f32[at(p)]).abs()).fold(0.0f32, f32::max);
    assert!(noise > 0.0, "{case}: the autocast fixture equals the f32 one");
    let mut rounded = false;
    for &(r, t) in positions.iter().filter(|&&(r, t)| t < first_flip(r)) {
        let (got, f32_value, bf16_value) = (-nll[r * batch.seq + t], want_f32[at((r, t))], want_bf16[at((r, t))]);
        rounded |= (got - f32_value).abs() > 1e-5;
        for (what, want) in [("f32", f32_value), ("autocast", bf16_value)] {
            let diff = (got - want).abs();
            assert!(
                diff <= 2.0 * noise,
                "{case} bf16 logprob[{r},{t}]: kiln {got}, transformers {what} {want}: |diff| {diff:.3e} > 2·{noise:.3e}"
            );
        }
    }
    assert!(rounded, "{case}: kiln's bf16 log-probs equal its f32 ones; were the products rounded?");

    let mut grads = model.grads(b);
    let loss = model.forward_backward(b, &mut acts, &batch, &mut grads);
    let want = get(&autocast, "loss")[0] as f64;
    assert!(
        (loss - want).abs() <= 2.0 * noise as f64,
        "{case} bf16 loss: kiln {loss}, autocast {want} (|diff| > 2·{noise:.3e})"
    );
}
