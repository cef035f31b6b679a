//! On-policy distillation: the student samples completions of the prompts, the teacher (any
//! model kiln loads, same tokenizer) scores the same tokens, and the student learns to match
//! the teacher where it actually goes. The loss, averaged over completion tokens, is the
//! per-token reverse KL over the full vocabulary,
//!
//!   KL_t = Σ_v p(v) (log p(v) − log q(v)),   ∂KL_t/∂z_v = p(v) (log p(v) − log q(v) − KL_t)
//!
//! (p student, q teacher, z student logits), or, with `estimator = "sampled"`, its
//! sampled-token estimate: the surrogate Σ_t sg(log p(y_t) − log q(y_t)) · log p(y_t), whose
//! gradient is the score-function estimate of ∇KL. A step's completions go through both
//! models in chunks of `chunk_rows` rows, so neither model's vocabulary-wide logits are ever
//! held for the whole step.

use crate::config::RunConfig;
use crate::grpo::{completion_row, read_prompts};
use crate::session::{Resume, RunSummary, Session};
use crate::sft::{check_vocab, load_tokenizer};
use anyhow::{bail, Result};
use kiln_core::rng::Rng;
use kiln_core::Backend;
use kiln_model::generator::{generate, FinishReason, Request};
use kiln_model::sampler::SamplingParams;
use kiln_model::{ActivationsPool, Batch, Model};
use serde_json::json;

/// Mean reverse KL (per completion token) of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DistillStats {
    pub reverse_kl: f64,
    pub completion_length: f64,
}

fn log_softmax(z: &[f32]) -> Vec<f64> {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    z.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p ‖ q) of one position from the two rows of logits, and ∂KL/∂(student logits).
pub fn reverse_kl(student: &[f32], teacher: &[f32]) -> (f64, Vec<f64>) {
    let (log_p, log_q) = (log_softmax(student), log_softmax(teacher));
    let kl: f64 = log_p.iter().zip(&log_q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
    let grad = log_p.iter().zip(&log_q).map(|(lp, lq)| lp.exp() * (lp - lq - kl)).collect();
    (kl, grad)
}

/// Runs on-policy distillation as configured by `config.distill`.
pub fn run(config: &RunConfig, resume: Option<Resume>, quiet: bool) -> Result<RunSummary<DistillStats>> {
    let Some(d) = config.distill.clone() else { bail!("the run configuration has no [distill] section") };
    let mut session = Session::open(config, resume)?;
    let b = session.b;
    let mut teacher = Model::load(&b, &d.teacher)?;
    if teacher.config.vocab_size != session.model.config.vocab_size {
        bail!(
            "{}: the teacher's vocab_size {} differs from the student's {}; distillation needs the same tokenizer",
            d.teacher.display(),
            teacher.config.vocab_size,
            session.model.config.vocab_size
        );
    }
    let (tokenizer, template) = load_tokenizer(session.model_dir())?;
    check_vocab(&session.model, &tokenizer, session.model_dir())?;
    let prompts = read_prompts(&config.data.train, &tokenizer, template.as_ref())?;
    let stop_ids: Vec<i32> = tokenizer.eos_id.map(|e| e as i32).into_iter().collect();
    let t = &config.train;
    let schedule = crate::schedule::Schedule::for_run(t, (prompts.len() / d.prompts_per_step) as u64);
    let total_steps = schedule.total_steps;
    let (seq, vocab) = (config.data.max_seq_len, session.model.config.vocab_size);

    let mut student_acts = ActivationsPool::new(&session.model.config, seq, true, t.recompute);
    let mut teacher_pool = ActivationsPool::new(&teacher.config, seq, false, false);

    session.start_progress(total_steps, quiet);
    let (mut last, mut interrupted) = (DistillStats::default(), false);
    while session.state.step < total_steps {
        let step = session.state.step;
        let mut rng = Rng::new(t.seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let requests: Vec<Request> = (0..d.prompts_per_step)
            .map(|i| Request {
                prompt: prompts[rng.below(prompts.len())].ids.clone(),
                params: SamplingParams {
                    temperature: d.temperature,
                    max_new_tokens: d.max_new_tokens,
                    stop_ids: stop_ids.clone(),
                    seed: (t.seed ^ step).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64,
                    ..Default::default()
                },
            })
            .collect();
        // Data parallel: each rank samples its own share of the step's prompts.
        let comm = session.comm;
        let requests = &requests[session.my_share(requests.len())];
        let outs = generate(&b, &mut session.model, requests, requests.len(), &mut |_, _| false);
        let sequences: Vec<(Vec<i32>, usize)> = requests
            .iter()
            .zip(&outs)
            .map(|(r, g)| completion_row(&r.prompt, &g.tokens, g.finish == FinishReason::Stop, &stop_ids, seq))
            .filter(|(ids, p)| ids.len() > *p)
            .collect();
        // The step's completions and tokens over all ranks: the loss is their mean.
        let mut counts = [sequences.iter().map(|(ids, p)| ids.len() - p).sum::<usize>() as f64, sequences.len() as f64];
        comm.all_reduce_sum_f64(&mut counts, &format!("completion counts at step {}", step + 1))?;
        let (tokens, completions) = (counts[0] as usize, counts[1] as usize);
        session.begin_step();
        let mut kl_sum = 0.0;
        let idle = session.idle_backwards_needed(sequences.len().div_ceil(d.chunk_rows.max(1)))?;
        for chunk in sequences.chunks(d.chunk_rows.max(1)) {
            let batch = Batch::completions(chunk, seq, 0.0);
            let acts = student_acts.get(&b, chunk.len());
            let teacher_acts = teacher_pool.get(&b, chunk.len());
            let positions: Vec<usize> = (0..batch.targets.len()).filter(|&i| batch.targets[i] >= 0).collect();
            let n = tokens.max(1) as f64;
            if d.estimator == "sampled" {
                let teacher_nll = teacher.nll(&b, teacher_acts, &batch);
                let mut weights_of = |nll: &[f32]| -> Vec<f32> {
                    let mut w = vec![0f32; nll.len()];
                    for &i in &positions {
                        // log p − log q = nll_teacher − nll_student.
                        let k1 = (teacher_nll[i] - nll[i]) as f64;
                        kl_sum += k1;
                        w[i] = (-k1 / n) as f32;
                    }
                    w
                };
                session.model.forward_backward_with(&b, acts, &batch, &mut session.grads, &mut weights_of);
            } else {
                teacher.forward(&b, teacher_acts, &batch);
                let teacher_logits = b.read(&teacher_acts.logits);
                let mut dlogits_of = |logits: &[f32]| -> (f64, Vec<f32>) {
                    let mut dz = vec![0f32; logits.len()];
                    let mut loss = 0.0;
                    for &i in &positions {
                        let row = i * vocab..(i + 1) * vocab;
                        let (kl, grad) = reverse_kl(&logits[row.clone()], &teacher_logits[row.clone()]);
                        loss += kl / n;
                        dz[row].iter_mut().zip(grad).for_each(|(g, v)| *g = (v / n) as f32);
                    }
                    kl_sum += loss * n;
                    (loss, dz)
                };
                session.model.forward_backward_logits(&b, acts, &batch, &mut session.grads, &mut dlogits_of);
            }
        }
        session.idle_backwards(idle);
        // This rank's share of the step's mean; `update` sums the shares.
        let update = session.update(kl_sum / tokens.max(1) as f64, &schedule, || format!("step {step} prompts"))?;
        let kl = update.loss;
        let stats = DistillStats { reverse_kl: kl, completion_length: tokens as f64 / completions.max(1) as f64 };
        last = stats;
        let fields = json!({"loss": kl, "reverse_kl": kl, "completion_length": stats.completion_length});
        session.log_step(fields, tokens as u64, tokens as u64, &update, &format!("reverse KL {kl:.4}"))?;
        interrupted = session.checkpoint_if_due(total_steps)?;
        if interrupted {
            break;
        }
    }
    session.summary("kiln distill", last, (None, None), interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn reverse_kl_matches_torch() {
        let bytes =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/distill/reverse_kl.safetensors"))
                .unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let f32s = |n: &str| -> Vec<f32> {
            st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let f64s = |n: &str| -> Vec<f64> {
            st.tensor(n).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let (student, teacher, want_grad) = (f32s("student"), f32s("teacher"), f64s("dstudent"));
        let vocab = 11;
        let tokens = student.len() / vocab;
        let mut loss = 0.0;
        for t in 0..tokens {
            let row = t * vocab..(t + 1) * vocab;
            let (kl, grad) = reverse_kl(&student[row.clone()], &teacher[row.clone()]);
            loss += kl / tokens as f64;
            for (g, w) in grad.iter().zip(&want_grad[row]) {
                let g = g / tokens as f64;
                assert!((g - w).abs() < 1e-6, "dKL/dz: kiln {g}, torch {w}");
            }
        }
        let want = f64s("loss")[0];
        assert!((loss - want).abs() < 1e-6, "KL: kiln {loss}, torch {want}");
    }
}
