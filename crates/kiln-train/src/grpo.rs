//! RL with verifiable rewards: GRPO and its variants (`grpo_loss`) on the generator.
//!
//! Every `num_iterations` steps a rollout takes `prompts_per_step` prompts, samples
//! `group_size` completions of each with the KV-cache generator, scores them with the
//! configured rewards (`rewards`) and turns the rewards into group-relative advantages; each
//! step is one optimizer update on the current rollout, in micro-batches of `micro_batch`
//! completions (the completions of one prompt on one row behind a single copy of it, where the
//! model allows: `CompletionRows`): a forward gives every completion token's log-prob, the clipped objective
//! (normalised over the whole step) sets each token's weight ∂L/∂nll_t = −∂L/∂logp_t, and the
//! backward runs with them. As in TRL, the sampling policy's log-probs (for the ratio) are the
//! current ones, detached, when each rollout trains one step, and otherwise are taken at
//! rollout time by `generator::training_logprobs`, the training forward itself, as are the
//! frozen reference's (β > 0). A run resumed between two steps of one rollout starts a new
//! rollout.

use crate::config::{GrpoSection, RunConfig};
use crate::grpo_loss::{advantages, group_is_flat, policy_loss, Completion, PolicyLoss, PolicyLossParams};
use crate::rewards::{build_rewards, Reward};
use crate::rollout::{completion_row, sample_and_score, step_prompts, Scored};
use crate::schedule::Schedule;
use crate::session::{load_model, merge, Resume, RunSummary, Runtime, Session, StepUpdate};
use crate::trainer::{train, Recipe, StepPlan, Tally};
use anyhow::{bail, Result};
use kiln_core::Backend;
use kiln_data::prompts::{read_prompts, PromptRow};
use kiln_data::Tokenizer;
use kiln_model::generator::{training_logprobs, FinishReason};
use kiln_model::sampler::SamplingParams;
use kiln_model::{ActivationsPool, ChunkOrder, CompletionRows, Model};
use serde_json::{json, Value};
use std::time::Instant;

/// Statistics of a step or an evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoStats {
    pub reward: f64,
    /// Fraction of completions with the full reward of the first reward function (accuracy
    /// for `exact_match`).
    pub solved: f64,
    pub completion_length: f64,
    /// Of a step: its loss, the KL to the reference and the clipped fractions, per token.
    pub loss: f64,
    pub kl: f64,
    pub clipped_low: f64,
    pub clipped_high: f64,
}

/// A step's policy statistics, summed over its completion tokens.
#[derive(Default)]
pub struct PolicyTally {
    kl: f64,
    clipped_low: f64,
    clipped_high: f64,
}

impl Tally for PolicyTally {
    fn sums(&mut self) -> Vec<&mut f64> {
        vec![&mut self.kl, &mut self.clipped_low, &mut self.clipped_high]
    }
}

impl PolicyTally {
    fn add(&mut self, out: &PolicyLoss, chunk: &[(Vec<i32>, usize)]) {
        let tokens = chunk.iter().map(|(ids, p)| ids.len() - p).sum::<usize>() as f64;
        self.kl += out.kl * tokens;
        self.clipped_low += out.clipped_low * tokens;
        self.clipped_high += out.clipped_high * tokens;
    }
}

/// Of each completion of a micro-batch, every completion token's log-prob (from
/// `training_logprobs`), when known.
type CompletionLogps<'a> = Option<&'a [Vec<f32>]>;

/// Each completion's token log-probs from the forward's nll on `rows`, and the token weights
/// ∂L/∂nll_t = −∂L/∂logp_t of the policy loss. Without `old` (the sampling policy's log-probs)
/// the ratios compare with the current ones.
fn token_weights(
    nll: &[f32],
    rows: &CompletionRows,
    advantages: &[f64],
    (old, reference): (CompletionLogps, CompletionLogps),
    params: &PolicyLossParams,
) -> (Vec<f32>, PolicyLoss) {
    let as_f64 =
        |v: &[Vec<f32>]| -> Vec<Vec<f64>> { v.iter().map(|r| r.iter().map(|&x| x as f64).collect()).collect() };
    let logp: Vec<Vec<f64>> = rows.per_completion(nll).map(|n| n.iter().map(|&x| -x as f64).collect()).collect();
    let old = old.map(as_f64);
    let reference = reference.map(as_f64);
    let batch: Vec<Completion> = (0..logp.len())
        .map(|r| Completion {
            logp: &logp[r],
            old_logp: old.as_ref().map_or(&logp[r], |o| &o[r]),
            ref_logp: reference.as_ref().map(|rf| rf[r].as_slice()),
            advantage: advantages[r],
        })
        .collect();
    let out = policy_loss(&batch, params);
    let dnll: Vec<Vec<f32>> = out.dlogp.iter().map(|d| d.iter().map(|&x| -x as f32).collect()).collect();
    (rows.scatter(&dnll), out)
}

/// A rollout batch ready for training, reused for `num_iterations` steps: each kept
/// completion (prompt + completion + stop token), in micro-batches of `micro_batch`.
struct Rollout {
    sequences: Vec<(Vec<i32>, usize)>,
    advantages: Vec<f64>,
    /// Completion tokens trained on in the step, and micro-batches, over all ranks.
    tokens: usize,
    micro_batches: usize,
    /// Per micro-batch: the sampling policy's log-probs (when a rollout trains more than one
    /// step) and the frozen reference's (β > 0).
    old: Option<Vec<Vec<Vec<f32>>>>,
    reference: Option<Vec<Vec<Vec<f32>>>>,
    /// Steps trained on it so far.
    updates: usize,
    stats: GrpoStats,
    /// The rollout's metrics (rewards, lengths, entropy, speed), logged with each step.
    metrics: Value,
    /// Where its prompts come from, for error messages.
    describe: String,
}

struct Grpo<B: Backend> {
    g: GrpoSection,
    rewards: Vec<Reward<B>>,
    tokenizer: Tokenizer,
    stop_ids: Vec<i32>,
    train: Vec<PromptRow>,
    eval: Vec<PromptRow>,
    seq: usize,
    /// Whether a group's completions train on one row behind one copy of their prompt
    /// (`CompletionRows`), as every model without sliding windows or V4's caches does.
    share_prompts: bool,
    seed: u64,
    /// The frozen reference for the KL term: the model the run started from.
    reference: Option<Model<B>>,
    pool: ActivationsPool<B>,
    rollout: Option<Rollout>,
}

impl<B: Backend> Grpo<B> {
    fn sampling(&self, greedy: bool) -> SamplingParams {
        let g = &self.g;
        SamplingParams {
            temperature: if greedy { 0.0 } else { g.temperature },
            top_k: g.top_k,
            top_p: g.top_p,
            min_p: 0.0,
            max_new_tokens: g.max_new_tokens,
            stop_ids: self.stop_ids.clone(),
            seed: 0,
        }
    }

    /// Samples `group_size` completions of each of this rank's prompts (the step's completions
    /// from `first` on), scores them, and lays out the ones to train on with their
    /// advantages; the metrics are the whole step's, summed over the ranks.
    fn rollout_batch(&self, s: &mut Session<B>, prompts: &[&PromptRow], seed: u64, first: usize) -> Result<Rollout> {
        let g = &self.g;
        let started = Instant::now();
        let Scored { outs, total, per } = sample_and_score(
            &s.b,
            &mut s.model,
            (prompts, g.group_size),
            (&self.sampling(false), (seed, first)),
            (&self.tokenizer, &self.rewards),
        )?;
        let rollout_s = started.elapsed().as_secs_f64();
        let adv = advantages(&total, g.group_size, g.scale_rewards);

        // Completions to train on: whole groups, unless dynamic sampling drops flat ones; a
        // completion that stopped trains on its stop token too.
        let flat =
            |i: usize| g.dynamic_sampling && group_is_flat(&total[i / g.group_size * g.group_size..][..g.group_size]);
        let keep: Vec<usize> = (0..outs.len()).filter(|&i| !flat(i)).collect();
        let sequences: Vec<(Vec<i32>, usize)> = keep
            .iter()
            .map(|&i| {
                let (p, o) = &outs[i];
                completion_row(&prompts[*p].ids, &o.tokens, o.finish == FinishReason::Stop, &self.stop_ids, self.seq)
            })
            .collect();
        // The step's sums over all ranks: completions, Σr, Σr², solved, generated tokens, Σ
        // entropy, kept completions, their tokens, micro-batches, and Σr, Σr² per reward function.
        let mut sums = vec![
            total.len() as f64,
            total.iter().sum(),
            total.iter().map(|r| r * r).sum(),
            per.first().map_or(0, |v| v.iter().filter(|&&x| x >= 1.0).count()) as f64,
            outs.iter().map(|(_, o)| o.tokens.len()).sum::<usize>() as f64,
            outs.iter().flat_map(|(_, o)| &o.entropies).map(|&h| h as f64).sum(),
            keep.len() as f64,
            sequences.iter().map(|(ids, p)| ids.len() - p).sum::<usize>() as f64,
            sequences.len().div_ceil(g.micro_batch) as f64,
        ];
        sums.extend(per.iter().flat_map(|v| [v.iter().sum::<f64>(), v.iter().map(|r| r * r).sum()]));
        s.data.all_reduce_sum_f64(&mut sums, "rollout statistics")?;
        let n = sums[0].max(1.0);
        let (mean, generated) = (sums[1] / n, sums[4]);
        let std = (sums[2] / n - mean * mean).max(0.0).sqrt();
        let solved = sums[3] / n;
        let mut metrics = json!({
            "reward": mean, "reward_std": std, "solved": solved, "entropy": sums[5] / generated.max(1.0),
            "completions/mean_length": generated / n, "trained_completions": sums[6],
            "rollout_tokens_per_s": generated / rollout_s.max(1e-9),
        });
        for (r, sum) in self.rewards.iter().zip(sums[9..].chunks(2)) {
            let (mean, square) = (sum[0] / n, sum[1] / n);
            let std = (square - mean * mean).max(0.0).sqrt();
            merge(
                &mut metrics,
                &json!({format!("rewards/{}/mean", r.name): mean, format!("rewards/{}/std", r.name): std}),
            );
        }
        Ok(Rollout {
            tokens: sums[7] as usize,
            micro_batches: sums[8] as usize,
            advantages: keep.iter().map(|&i| adv[i]).collect(),
            sequences,
            old: None,
            reference: None,
            updates: 0,
            stats: GrpoStats { reward: mean, solved, completion_length: generated / n, ..Default::default() },
            metrics,
            describe: prompts.iter().map(|p| p.location.as_str()).take(8).collect::<Vec<_>>().join(", "),
        })
    }

    /// The log-probs `training_logprobs` gives every micro-batch of `rollout` under `model`
    /// (the session's when `None`), with the idle forwards expert parallel needs.
    fn logprobs(
        s: &mut Session<B>,
        model: Option<&mut Model<B>>,
        pool: &mut ActivationsPool<B>,
        rollout: &Rollout,
        (micro_batch, max_seq, share_prompts): (usize, usize, bool),
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let chunks = rollout.sequences.chunks(micro_batch);
        let idle = s.idle_forwards_needed(chunks.len())?;
        let model = match model {
            Some(m) => m,
            None => &mut s.model,
        };
        let logps = chunks
            .map(|chunk| {
                let rows = CompletionRows::new(chunk, max_seq, share_prompts, 0.0);
                let acts = pool.get_for(&s.b, rows.batch.rows, rows.batch.seq);
                training_logprobs(&s.b, model, acts, &rows)
            })
            .collect();
        (0..idle).for_each(|_| model.idle_forward(&s.b, ChunkOrder::ForwardsFirst));
        Ok(logps)
    }
}

impl<B: Backend> Recipe<B> for Grpo<B> {
    type Micro = usize;
    type Tally = PolicyTally;
    type Stats = GrpoStats;

    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<usize>> {
        let g = &self.g;
        if self.rollout.as_ref().is_none_or(|r| r.updates == g.num_iterations) {
            let step = s.state.step;
            let prompts = step_prompts(&self.train, self.seed, step, g.prompts_per_step);
            // Data parallel: each rank samples its own share of the step's prompts.
            let mine = s.my_share(prompts.len());
            let first = mine.start * g.group_size;
            let mut rollout = self.rollout_batch(s, &prompts[mine], self.seed ^ step, first)?;
            let layout = (g.micro_batch, self.seq, self.share_prompts);
            if g.num_iterations > 1 {
                rollout.old = Some(Self::logprobs(s, None, &mut self.pool, &rollout, layout)?);
            }
            if let Some(reference) = &mut self.reference {
                rollout.reference = Some(Self::logprobs(s, Some(reference), &mut self.pool, &rollout, layout)?);
            }
            self.rollout = Some(rollout);
        }
        let r = self.rollout.as_mut().expect("sampled above");
        r.updates += 1;
        Ok(StepPlan {
            micro_batches: (0..r.sequences.len().div_ceil(g.micro_batch)).collect(),
            trainable: r.tokens as u64,
            tokens: r.tokens as u64,
            describe: r.describe.clone(),
        })
    }

    /// The weights come from each token's ratio to the rollout's log-prob: every forward first.
    fn chunk_order(&self) -> ChunkOrder {
        ChunkOrder::ForwardsFirst
    }

    fn micro_step(&mut self, s: &mut Session<B>, &k: &usize, tally: &mut PolicyTally) -> Result<f64> {
        let (g, r) = (&self.g, self.rollout.as_ref().expect("planned"));
        let params = PolicyLossParams {
            epsilon_low: g.epsilon,
            epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
            beta: g.beta,
            aggregation: g.loss_type,
            level: g.importance_sampling,
            max_completion_length: g.max_new_tokens,
            num_items: r.tokens,
            micro_batches: r.micro_batches,
        };
        let first = k * g.micro_batch;
        let chunk = &r.sequences[first..(first + g.micro_batch).min(r.sequences.len())];
        let rows = CompletionRows::new(chunk, self.seq, self.share_prompts, 1.0 / r.tokens.max(1) as f32);
        let advantages = &r.advantages[first..first + chunk.len()];
        let logps = (r.old.as_ref().map(|o| o[k].as_slice()), r.reference.as_ref().map(|rf| rf[k].as_slice()));
        let mut loss = 0.0;
        let mut weights_of = |nll: &[f32]| -> Vec<f32> {
            let (w, out) = token_weights(nll, &rows, advantages, logps, &params);
            tally.add(&out, chunk);
            loss = out.loss;
            w
        };
        let acts = self.pool.get_for(&s.b, rows.batch.rows, rows.batch.seq);
        s.model.forward_backward_with(&s.b, acts, &rows.batch, &mut s.dp, &mut weights_of);
        Ok(loss)
    }

    fn stats(&self, tally: &PolicyTally, update: &StepUpdate) -> GrpoStats {
        let r = self.rollout.as_ref().expect("planned");
        let n = r.tokens.max(1) as f64;
        GrpoStats {
            loss: update.loss,
            kl: tally.kl / n,
            clipped_low: tally.clipped_low / n,
            clipped_high: tally.clipped_high / n,
            ..r.stats
        }
    }

    fn record(&self, stats: &GrpoStats, prefix: &str) -> Value {
        if !prefix.is_empty() {
            return json!({format!("{prefix}reward"): stats.reward, format!("{prefix}solved"): stats.solved});
        }
        let r = self.rollout.as_ref().expect("planned");
        let mut fields = r.metrics.clone();
        merge(
            &mut fields,
            &json!({"loss": stats.loss, "kl": stats.kl, "clip_ratio/low_mean": stats.clipped_low,
                    "clip_ratio/high_mean": stats.clipped_high, "iteration": r.updates}),
        );
        fields
    }

    fn message(&self, stats: &GrpoStats) -> String {
        format!("reward {:.3} solved {:.3}", stats.reward, stats.solved)
    }

    /// Greedy completions of every eval prompt, scored; the prompts are shared out over the
    /// ranks and each prompt's numbers come from one rank, so summing them over the ranks is
    /// exact.
    fn evaluate(&mut self, s: &mut Session<B>) -> Result<Option<GrpoStats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let mine = s.my_share(self.eval.len());
        let refs: Vec<&PromptRow> = self.eval[mine.clone()].iter().collect();
        let sampling = (&self.sampling(true), (0, 0));
        let Scored { outs, total, per } =
            sample_and_score(&s.b, &mut s.model, (&refs, 1), sampling, (&self.tokenizer, &self.rewards))?;
        // Per prompt: reward, solved, completion length.
        let n = self.eval.len();
        let mut numbers = vec![0.0; 3 * n];
        for (k, (_, g)) in outs.iter().enumerate() {
            let i = mine.start + k;
            numbers[i] = total[k];
            numbers[n + i] = f64::from(u8::from(per.first().is_some_and(|v| v[k] >= 1.0)));
            numbers[2 * n + i] = g.tokens.len() as f64;
        }
        s.data.all_reduce_sum_f64(&mut numbers, "eval rollouts")?;
        let mean = |part: usize| numbers[part * n..(part + 1) * n].iter().sum::<f64>() / n.max(1) as f64;
        Ok(Some(GrpoStats { reward: mean(0), solved: mean(1), completion_length: mean(2), ..Default::default() }))
    }
}

/// Runs GRPO as configured by `config.grpo`; `quiet` hides the progress bar.
pub fn run<B: Backend>(
    rt: Runtime<B>,
    config: &RunConfig,
    resume: Option<Resume>,
    quiet: bool,
) -> Result<RunSummary<GrpoStats>> {
    let Some(g) = config.grpo.clone() else { bail!("the run configuration has no [grpo] section") };
    let rewards = build_rewards(&rt.b, &g.rewards)?;
    let (mut s, tokenizer, template) = Session::open_tokenized(rt, config, resume, &load_model)?;
    s.plot = crate::metrics::PlotSpec::REWARD;
    let reference = match g.beta != 0.0 {
        true => Some(s.load_reference(&config.model.path)?),
        false => None,
    };
    let train_prompts = read_prompts(&config.data.train, &tokenizer, template.as_ref())?;
    let eval = match config.data.eval.is_empty() {
        true => Vec::new(),
        false => read_prompts(&config.data.eval, &tokenizer, template.as_ref())?,
    };
    let t = &config.train;
    let schedule = Schedule::for_run(t, (train_prompts.len() / g.prompts_per_step) as u64);
    let seq = config.data.max_seq_len;
    let mut grpo = Grpo {
        stop_ids: tokenizer.eos_id.map(|e| e as i32).into_iter().collect(),
        pool: ActivationsPool::new(&s.model.config, seq, true, t.recompute),
        g,
        rewards,
        tokenizer,
        train: train_prompts,
        eval,
        seq,
        share_prompts: s.model.can_share_prompts(),
        seed: t.seed,
        reference,
        rollout: None,
    };
    train(&mut s, &mut grpo, &schedule, "kiln grpo", quiet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo_loss::{Aggregation, ImportanceLevel};
    use kiln_core::Cpu;
    use kiln_model::{Activations, Config};

    const TINY: &str = r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}"#;

    #[test]
    fn token_weights_give_the_gradient_of_the_policy_loss() {
        // The first two completions share their prompt: with prompts shared they take one row.
        let sequences = vec![(vec![1, 2, 3, 4, 5], 2), (vec![1, 2, 6, 7, 8, 9, 10], 2), (vec![11, 12, 13, 14], 3)];
        let advantages = [1.0, -0.7, 0.4];
        let cfg = Config::parse(TINY).unwrap();
        for share_prompts in [false, true] {
            let rows = CompletionRows::new(&sequences, 10, share_prompts, 0.0);
            let mut model = Model::random(&Cpu, cfg.clone(), 5);
            let mut acts = Activations::new(&Cpu, &cfg, rows.batch.rows, rows.batch.seq, true, false);
            // The sampling policy's log-probs: those of a slightly different model, so that
            // ratios differ from 1 and some clip; a frozen reference for the KL term: a third.
            let mut sampler = Model::random(&Cpu, cfg.clone(), 6);
            let old = training_logprobs(&Cpu, &mut sampler, &mut acts, &rows);
            let mut reference = Model::random(&Cpu, cfg.clone(), 7);
            let rf = training_logprobs(&Cpu, &mut reference, &mut acts, &rows);
            let logps = (Some(old.as_slice()), Some(rf.as_slice()));
            for (aggregation, level, beta) in
                [(Aggregation::Grpo, ImportanceLevel::Token, 0.0), (Aggregation::Dapo, ImportanceLevel::Sequence, 0.3)]
            {
                let params = PolicyLossParams {
                    epsilon_low: 0.2,
                    epsilon_high: 0.28,
                    beta,
                    aggregation,
                    level,
                    max_completion_length: 8,
                    num_items: 12,
                    micro_batches: 1,
                };
                let loss_at = |model: &mut Model<Cpu>, acts: &mut Activations<Cpu>| {
                    let nll = model.nll(&Cpu, acts, &rows.batch);
                    token_weights(&nll, &rows, &advantages, logps, &params).1.loss
                };
                let mut grads = model.grads(&Cpu);
                let mut weights_of = |nll: &[f32]| token_weights(nll, &rows, &advantages, logps, &params).0;
                model.forward_backward_with(&Cpu, &mut acts, &rows.batch, &mut grads, &mut weights_of);
                let h = 1e-2f32;
                for (tensor, i) in [(0usize, 33usize), (0, 170), (2, 7), (5, 30), (9, 11)] {
                    let at = model.flat.ranges.iter()[tensor].start + i;
                    model.params[at] += h;
                    let up = loss_at(&mut model, &mut acts);
                    model.params[at] -= 2.0 * h;
                    let down = loss_at(&mut model, &mut acts);
                    model.params[at] += h;
                    let numeric = (up - down) / (2.0 * h as f64);
                    let analytic = grads.flat[at] as f64;
                    assert!(
                        (analytic - numeric).abs() < 2e-4 + 0.03 * numeric.abs(),
                        "{aggregation:?}/{level:?}, prompts shared {share_prompts}: tensor {tensor}[{i}]: \
                         analytic {analytic}, numeric {numeric}"
                    );
                }
            }
        }
    }
}
