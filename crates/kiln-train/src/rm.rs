//! Reward modelling: the base transformer with a scalar head on the last token of a sequence,
//! trained on preference pairs with the Bradley-Terry loss (TRL's RewardTrainer):
//!
//!   r = w · h_last;   ℓ = −log σ(r_c − r_r − margin) + c·(r_c + r_r)²
//!   ∂ℓ/∂r_c = −σ(−(r_c − r_r − margin)) + 2c(r_c + r_r),  ∂ℓ/∂r_r = σ(…) + 2c(r_c + r_r)
//!
//! The gradient enters the transformer at each sequence's last hidden state, ∂ℓ/∂h_last =
//! ∂ℓ/∂r · w, and runs back through `Model::backward_hidden`. Checkpoints and exports are
//! Hugging Face `...ForSequenceClassification` directories with `num_labels = 1`.

use crate::config::{RmSection, RunConfig};
use crate::dpo::{preference_splits, Split};
use crate::loader::{build_batch, describe_rows, real_tokens, sequence_spans, trainable_targets, DataOrder, PackedRow};
use crate::schedule::Schedule;
use crate::session::{merge, with_step, Resume, RunSummary, Session};
use crate::sft::{check_vocab, load_tokenizer};
use anyhow::{Context, Result};
use kiln_core::{Backend, Cpu};
use kiln_data::example::Example;
use kiln_model::{Activations, GradSink, Model};
use serde_json::json;
use std::path::Path;

/// Means over pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RmStats {
    pub pairs: usize,
    pub loss: f64,
    /// Fraction of pairs whose chosen answer gets the higher reward.
    pub accuracy: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

impl RmStats {
    fn add(&mut self, loss: f64, rc: f64, rr: f64) {
        self.pairs += 1;
        self.loss += loss;
        self.accuracy += if rc > rr { 1.0 } else { 0.0 };
        self.reward_chosen += rc;
        self.reward_rejected += rr;
    }

    /// The sums of every rank of a data-parallel run.
    fn sum_over_ranks(self, comm: &dyn kiln_dist::Comm, what: &str) -> Result<Self> {
        let mut v = [self.pairs as f64, self.loss, self.accuracy, self.reward_chosen, self.reward_rejected];
        comm.all_reduce_sum_f64(&mut v, what)?;
        let [pairs, loss, accuracy, reward_chosen, reward_rejected] = v;
        Ok(Self { pairs: pairs.round() as usize, loss, accuracy, reward_chosen, reward_rejected })
    }

    fn mean(mut self) -> Self {
        let n = self.pairs.max(1) as f64;
        for v in [&mut self.loss, &mut self.accuracy, &mut self.reward_chosen, &mut self.reward_rejected] {
            *v /= n;
        }
        self
    }

    fn record(&self, prefix: &str) -> serde_json::Value {
        json!({
            format!("{prefix}loss"): self.loss,
            format!("{prefix}accuracy"): self.accuracy,
            format!("{prefix}rewards/chosen"): self.reward_chosen,
            format!("{prefix}rewards/rejected"): self.reward_rejected,
            format!("{prefix}rewards/margins"): self.reward_chosen - self.reward_rejected,
        })
    }
}

/// The Bradley-Terry loss of one pair and its derivatives in the two rewards.
pub fn bradley_terry(rc: f64, rr: f64, rm: &RmSection) -> (f64, f64, f64) {
    let z = rc - rr - rm.margin;
    // −log σ(z), stable on both sides.
    let loss = if z >= 0.0 { (-z).exp().ln_1p() } else { -z + z.exp().ln_1p() };
    let s = 1.0 / (1.0 + z.exp()); // σ(−z)
    let c = rm.center_rewards_coefficient;
    let center = c * (rc + rr).powi(2);
    let dc = 2.0 * c * (rc + rr);
    (loss + center, -s + dc, s + dc)
}

/// One sequence of a micro-batch after `forward_hidden`: its example, last token position,
/// final hidden state there, and reward.
struct Scored {
    example: usize,
    token: usize,
    hidden: Vec<f32>,
    reward: f64,
}

/// The micro-batch's sequences in layout order, scored, and the score head's weights.
fn rewards(
    b: &Cpu,
    model: &Model<Cpu>,
    acts: &Activations<Cpu>,
    mb: &[PackedRow],
    examples: &[Example],
) -> (Vec<Scored>, Vec<f32>) {
    let spans = sequence_spans(mb, examples, acts.seq);
    let last: Vec<usize> = spans.iter().map(|&(i, start)| start + examples[i].ids.len() - 1).collect();
    let hidden = model.hidden_at(b, acts, &last);
    let w = b.read(model.params.score.as_ref().expect("a reward model has a score head"));
    let scored = spans
        .iter()
        .zip(&last)
        .zip(hidden.chunks(w.len()))
        .map(|((&(example, _), &token), h)| Scored {
            example,
            token,
            hidden: h.to_vec(),
            reward: h.iter().zip(&w).map(|(x, w)| (x * w) as f64).sum(),
        })
        .collect();
    (scored, w)
}

/// Pair statistics of a split, its micro-batches shared out over the ranks: each example's
/// reward comes from one rank, so summing them over the ranks is exact.
fn evaluate(session: &mut Session, acts: &mut Activations<Cpu>, split: &Split, rm: &RmSection) -> Result<RmStats> {
    let (mine, idle) = session.forward_share(split.micro_batches.len())?;
    let (b, model) = (&session.b, &mut session.model);
    let mut reward = vec![0.0; split.examples.len()];
    for mb in &split.micro_batches[mine] {
        let batch = build_batch(&split.examples, mb, acts.rows, acts.seq, 1.0);
        model.forward_hidden(b, acts, &batch, false);
        for s in rewards(b, model, acts, mb, &split.examples).0 {
            reward[s.example] = s.reward;
        }
    }
    (0..idle).for_each(|_| model.serve_experts_forward(b));
    session.comm.all_reduce_sum_f64(&mut reward, &format!("eval rewards at step {}", session.state.step))?;
    let mut stats = RmStats::default();
    for k in 0..split.examples.len() / 2 {
        let (rc, rr) = (reward[2 * k], reward[2 * k + 1]);
        stats.add(bradley_terry(rc, rr, rm).0, rc, rr);
    }
    Ok(stats.mean())
}

/// `config.json` of the reward model made from a causal LM's: `...ForSequenceClassification`,
/// one label, and a pad token (transformers pools the last non-pad token).
fn reward_config(dir: &Path, pad: Option<u32>) -> Result<Vec<u8>> {
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let family = match c["architectures"].get(0).and_then(|a| a.as_str()) {
        Some(a) => a.split("For").next().unwrap_or(a).to_string(),
        None => match c["model_type"].as_str().unwrap_or("") {
            "deepseek_v3" => "DeepseekV3".into(),
            "qwen2" => "Qwen2".into(),
            "qwen3" => "Qwen3".into(),
            "mistral" => "Mistral".into(),
            _ => "Llama".into(),
        },
    };
    c["architectures"] = json!([format!("{family}ForSequenceClassification")]);
    c["num_labels"] = 1.into();
    c["id2label"] = json!({"0": "LABEL_0"});
    c["label2id"] = json!({"LABEL_0": 0});
    if c["pad_token_id"].is_null() {
        if let Some(pad) = pad {
            c["pad_token_id"] = pad.into();
        }
    }
    Ok((serde_json::to_string_pretty(&c)? + "\n").into_bytes())
}

/// Trains a reward model as configured; `quiet` hides the progress bar.
pub fn run(config: &RunConfig, resume: Option<Resume>, quiet: bool) -> Result<RunSummary<RmStats>> {
    let rm = config.rm.clone().unwrap_or_default();
    let t = &config.train;
    let mut session =
        Session::open_with(config, resume, |b, dir, ep| Ok(Model::load_as_reward_model(b, dir, t.seed, ep)?))?;
    let (tokenizer, template) = load_tokenizer(session.model_dir())?;
    check_vocab(&session.model, &tokenizer, session.model_dir())?;
    let pad = tokenizer.eos_id;
    let reward_config = reward_config(session.model_dir(), pad)?;
    session.set_model_file("config.json", reward_config);
    let (train, eval) = preference_splits(config, &tokenizer, template.as_ref())?;
    let (rows, seq) = (config.rows(), config.data.max_seq_len);

    let b = session.b;
    let d = session.model.config.hidden_size;
    let mut acts = Activations::new(&b, &session.model.config, rows, seq, true, t.recompute);
    // Data parallel: `grad_accum` micro-batches per rank, each rank its own share of a step.
    let comm = session.comm;
    let order = DataOrder::from_micro_batches(train.micro_batches.clone(), session.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let total_steps = schedule.total_steps;

    session.start_progress(total_steps, quiet);
    let (mut last, mut eval_before, mut eval_stats, mut interrupted) = (RmStats::default(), None, None, false);
    let has_eval = !eval.examples.is_empty();
    if session.state.step == 0 && has_eval {
        let s = evaluate(&mut session, &mut acts, &eval, &rm)?;
        session.metrics.write(&with_step(0, s.record("eval_")))?;
        eval_before = Some(s);
    }
    while session.state.step < total_steps {
        let micro_batches = order.step(session.state.step);
        let pairs = micro_batches.iter().map(|mb| mb.iter().map(Vec::len).sum::<usize>()).sum::<usize>() / 2;
        let count: usize = micro_batches.iter().map(|mb| trainable_targets(&train.examples, mb)).sum();
        let real_tokens: usize = micro_batches.iter().map(|mb| real_tokens(&train.examples, mb)).sum();
        session.begin_step();
        let mut stats = RmStats::default();
        let mine = session.my_share(micro_batches.len());
        let idle = session.idle_backwards_needed(mine.len())?;
        for mb in &micro_batches[mine] {
            let mut dscore = vec![0f32; d];
            let batch = build_batch(&train.examples, mb, rows, seq, 1.0 / count.max(1) as f32);
            session.model.forward_hidden(&b, &mut acts, &batch, true);
            let (scored, w) = rewards(&b, &session.model, &acts, mb, &train.examples);
            let at: std::collections::HashMap<usize, &Scored> = scored.iter().map(|s| (s.example, s)).collect();
            let mut dxf = vec![0f32; rows * seq * d];
            // Pairs in layout order, so that sums (and a resumed run) are deterministic.
            for chosen in scored.iter().filter(|s| s.example % 2 == 0) {
                let rejected = at[&(chosen.example + 1)];
                let (loss, drc, drr) = bradley_terry(chosen.reward, rejected.reward, &rm);
                stats.add(loss, chosen.reward, rejected.reward);
                for (s, dr) in [(chosen, drc / pairs as f64), (rejected, drr / pairs as f64)] {
                    let t = s.token;
                    dxf[t * d..(t + 1) * d].iter_mut().zip(&w).for_each(|(g, w)| *g = (dr * *w as f64) as f32);
                    dscore.iter_mut().zip(&s.hidden).for_each(|(g, x)| *g += (dr * *x as f64) as f32);
                }
            }
            let scratch = acts.grad.as_mut().expect("training activations");
            b.write(&mut scratch.dxn, &dxf);
            let g = session.grads.outer().score.as_mut().expect("score gradient");
            g.iter_mut().zip(&dscore).for_each(|(g, d)| *g += d);
            session.model.backward_hidden(&b, &mut acts, &batch, &mut session.grads);
        }
        session.idle_backwards(idle);
        // This rank's share of the step's mean loss; `update` sums the shares.
        let share = stats.loss / pairs.max(1) as f64;
        let stats = stats.sum_over_ranks(comm, &format!("pair statistics at step {}", session.state.step + 1))?.mean();
        let update = session.update(share, &schedule, || describe_rows(&train.examples, &micro_batches))?;
        last = stats;
        let mut fields = stats.record("");
        merge(&mut fields, &json!({"pairs": pairs}));
        session.log_step(
            fields,
            count as u64,
            real_tokens as u64,
            &update,
            &format!("loss {:.4} acc {:.2}", stats.loss, stats.accuracy),
        )?;

        let step = session.state.step;
        if has_eval && session.eval_due(total_steps) {
            let s = evaluate(&mut session, &mut acts, &eval, &rm)?;
            session.metrics.write(&with_step(step, s.record("eval_")))?;
            session.bar.println(format!("step {step}: eval loss {:.4}, accuracy {:.3}", s.loss, s.accuracy));
            eval_stats = Some(s);
        }
        interrupted = session.checkpoint_if_due(total_steps)?;
        if interrupted {
            break;
        }
    }
    session.summary("kiln rm", last, (eval_before, eval_stats), interrupted)
}
