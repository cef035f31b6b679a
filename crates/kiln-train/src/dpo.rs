//! Preference optimisation: DPO and its variants (`preference_loss`), combined with weights.
//!
//! Each pair becomes two sequences, prompt + chosen and prompt + rejected, packed into the
//! same micro-batch, so one forward and one backward cover both. The policy's sequence
//! log-probs come from the forward's per-token nll; the loss of every pair then fixes each
//! token's weight, ∂loss/∂nll_t = −∂loss/∂logp(sequence), and the backward runs with those
//! weights (`Model::forward_backward_with`). The reference model's log-probs are computed
//! once before training and cached (`preference::reference_logps`); reference-free losses skip
//! it.

use crate::config::{DpoSection, RunConfig};
use crate::loader::{build_batch, DataOrder, PackedRow};
use crate::preference::{micro_batch_logps, preference_splits, reference_logps, sequence_logps_on_ranks, Split};
use crate::preference_loss::{pair_loss, LossKind, LossParams, PairLogps};
use crate::schedule::Schedule;
use crate::session::{load_model, Resume, RunSummary, Runtime, Session, StepUpdate};
use crate::trainer::{train, Recipe, StepPlan, Tally};
use anyhow::{bail, Result};
use kiln_core::Backend;
use kiln_model::{ActivationsPool, ChunkOrder};
use serde_json::{json, Value};

/// Means over pairs of the loss and the rewards of the first listed loss.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairStats {
    pub pairs: f64,
    pub loss: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// Fraction of pairs whose chosen reward is higher (TRL's `rewards/accuracies`; 0 while
    /// the policy equals the reference).
    pub accuracy: f64,
    /// Fraction of pairs where the policy itself gives the chosen answer the higher
    /// log-probability: a preference that means something for any model, trained or not.
    pub prefers_chosen: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl PairStats {
    pub fn margin(&self) -> f64 {
        self.reward_chosen - self.reward_rejected
    }

    fn add(&mut self, loss: f64, reward: (f64, f64), logps: (f64, f64)) {
        self.pairs += 1.0;
        self.loss += loss;
        self.reward_chosen += reward.0;
        self.reward_rejected += reward.1;
        self.accuracy += if reward.0 > reward.1 { 1.0 } else { 0.0 };
        self.prefers_chosen += if logps.0 > logps.1 { 1.0 } else { 0.0 };
        self.logps_chosen += logps.0;
        self.logps_rejected += logps.1;
    }

    /// Sums to means.
    pub fn mean(mut self) -> Self {
        let n = self.pairs.max(1.0);
        for v in [
            &mut self.loss,
            &mut self.reward_chosen,
            &mut self.reward_rejected,
            &mut self.accuracy,
            &mut self.prefers_chosen,
            &mut self.logps_chosen,
            &mut self.logps_rejected,
        ] {
            *v /= n;
        }
        self
    }

    pub fn record(&self, prefix: &str) -> Value {
        json!({
            format!("{prefix}loss"): self.loss,
            format!("{prefix}rewards/chosen"): self.reward_chosen,
            format!("{prefix}rewards/rejected"): self.reward_rejected,
            format!("{prefix}rewards/accuracies"): self.accuracy,
            format!("{prefix}prefers_chosen"): self.prefers_chosen,
            format!("{prefix}rewards/margins"): self.margin(),
            format!("{prefix}logps/chosen"): self.logps_chosen,
            format!("{prefix}logps/rejected"): self.logps_rejected,
        })
    }
}

impl Tally for PairStats {
    fn sums(&mut self) -> Vec<&mut f64> {
        vec![
            &mut self.pairs,
            &mut self.loss,
            &mut self.reward_chosen,
            &mut self.reward_rejected,
            &mut self.accuracy,
            &mut self.prefers_chosen,
            &mut self.logps_chosen,
            &mut self.logps_rejected,
        ]
    }
}

/// The configured losses, their weights and hyper-parameters.
struct Objective {
    losses: Vec<(LossKind, f64)>,
    params: LossParams,
}

impl Objective {
    fn new(d: &DpoSection) -> Self {
        let weight = |i: usize| d.loss_weights.get(i).copied().unwrap_or(1.0);
        Self {
            losses: d.loss.iter().enumerate().map(|(i, &k)| (k, weight(i))).collect(),
            params: LossParams { beta: d.beta, label_smoothing: d.label_smoothing, simpo_gamma: d.simpo_gamma },
        }
    }

    fn needs_reference(&self) -> bool {
        self.losses.iter().any(|(k, _)| k.needs_reference())
    }

    /// Weight of ORPO's SFT term (the mean nll of chosen completion tokens).
    fn orpo_nll_weight(&self) -> f64 {
        self.losses.iter().filter(|(k, _)| *k == LossKind::Orpo).map(|(_, w)| w).sum()
    }

    /// Σ_k w_k·ℓ_k of a pair, its gradient in the two summed log-probs, and the first loss's
    /// rewards.
    fn pair(&self, x: &PairLogps) -> (f64, f64, f64, (f64, f64)) {
        let (mut loss, mut dc, mut dr, mut rewards) = (0.0, 0.0, 0.0, None);
        for &(kind, w) in &self.losses {
            let l = pair_loss(kind, &self.params, x);
            loss += w * l.loss;
            dc += w * l.d_chosen;
            dr += w * l.d_rejected;
            rewards.get_or_insert((l.reward_chosen, l.reward_rejected));
        }
        (loss, dc, dr, rewards.unwrap_or_default())
    }
}

/// What token weights depend on beyond the micro-batch: pairs and chosen answer tokens in
/// the whole step (the loss is a mean over pairs; ORPO's SFT term a mean over tokens).
#[derive(Clone, Copy)]
struct StepShape {
    pairs: usize,
    chosen_tokens: usize,
    seq: usize,
}

/// The token weights of one micro-batch, from its per-token nll: each pair's loss, and
/// ∂L/∂nll_t = −∂L/∂logp(sequence) on every answer token (ORPO adds its SFT term on chosen
/// ones). Adds the pairs' losses and rewards to `stats`.
fn token_weights(
    nll: &[f32],
    targets: &[i32],
    mb: &[PackedRow],
    split: &Split,
    objective: &Objective,
    step: StepShape,
    stats: &mut PairStats,
) -> Vec<f32> {
    let logps = micro_batch_logps(nll, targets, mb, &split.examples, step.seq);
    let (pairs, chosen_tokens) = (step.pairs as f64, step.chosen_tokens.max(1) as f64);
    let orpo = objective.orpo_nll_weight();
    let mut w = vec![0f32; nll.len()];
    let mut set = |i: usize, value: f64| {
        let (_, _, start) = logps[&i];
        for t in (start..start + split.examples[i].ids.len()).filter(|&t| targets[t] >= 0) {
            w[t] = value as f32;
        }
    };
    let mut chosen: Vec<usize> = logps.keys().copied().filter(|i| i % 2 == 0).collect();
    chosen.sort_unstable();
    for i in chosen {
        let x = pair_logps(split, i / 2, logps[&i].0, logps[&(i + 1)].0);
        let (loss, dc, dr, rewards) = objective.pair(&x);
        // ORPO's SFT term, the mean nll of chosen tokens, enters as a per-pair share.
        let sft = orpo * -x.chosen / chosen_tokens * pairs;
        stats.add(loss + sft, rewards, (x.chosen, x.rejected));
        set(i, -dc / pairs + orpo / chosen_tokens);
        set(i + 1, -dr / pairs);
    }
    w
}

/// A pair's log-probs under the policy (`chosen`, `rejected`) and the reference.
fn pair_logps(split: &Split, k: usize, chosen: f64, rejected: f64) -> PairLogps {
    let (c, r) = (&split.examples[2 * k], &split.examples[2 * k + 1]);
    PairLogps {
        chosen,
        rejected,
        chosen_len: c.trainable_targets(),
        rejected_len: r.trainable_targets(),
        reference: split.reference.as_ref().map(|rf| (rf[2 * k], rf[2 * k + 1])),
    }
}

/// The mean loss and rewards over a split's pairs from every sequence's log-prob.
fn split_stats(split: &Split, objective: &Objective, logps: &[f64]) -> PairStats {
    let pairs = split.examples.len() / 2;
    let chosen_tokens: usize = (0..pairs).map(|k| split.examples[2 * k].trainable_targets()).sum();
    let mut stats = PairStats::default();
    for k in 0..pairs {
        let x = pair_logps(split, k, logps[2 * k], logps[2 * k + 1]);
        let (loss, _, _, rewards) = objective.pair(&x);
        // ORPO's SFT term as in training: the mean nll of chosen tokens, shared out per pair.
        let sft = objective.orpo_nll_weight() * -x.chosen / chosen_tokens.max(1) as f64 * pairs as f64;
        stats.add(loss + sft, rewards, (x.chosen, x.rejected));
    }
    stats.mean()
}

struct Dpo<B: Backend> {
    train: Split,
    eval: Split,
    order: DataOrder,
    objective: Objective,
    pool: ActivationsPool<B>,
    /// The step being taken.
    step: StepShape,
    weight: f32,
}

impl<B: Backend> Recipe<B> for Dpo<B> {
    type Micro = usize;
    type Tally = PairStats;
    type Stats = PairStats;

    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<usize>> {
        let examples = &self.train.examples;
        let (plan, step) = StepPlan::from_order(s, &self.order, examples);
        let sequences: Vec<usize> = step.iter().flat_map(|&i| self.order.micro_batches[i].concat()).collect();
        let chosen_tokens = sequences.iter().filter(|&&i| i % 2 == 0).map(|&i| examples[i].trainable_targets()).sum();
        self.step = StepShape { pairs: sequences.len() / 2, chosen_tokens, seq: self.step.seq };
        // Static weights (1 / trainable tokens of the step) only weight MoE balance terms.
        self.weight = plan.token_weight();
        Ok(plan)
    }

    /// The pair's weights come from both sequences' log-probs: every forward first.
    fn chunk_order(&self) -> ChunkOrder {
        ChunkOrder::ForwardsFirst
    }

    fn micro_step(&mut self, s: &mut Session<B>, &i: &usize, tally: &mut PairStats) -> Result<f64> {
        let mb = &self.order.micro_batches[i];
        let acts = self.pool.get(&s.b, self.train.rows);
        let batch = build_batch(&self.train.examples, mb, acts.rows, acts.seq, self.weight);
        let before = tally.loss;
        let (split, objective, step) = (&self.train, &self.objective, self.step);
        let mut weights_of = |nll: &[f32]| token_weights(nll, &batch.targets, mb, split, objective, step, tally);
        s.model.forward_backward_with(&s.b, acts, &batch, &mut s.dp, &mut weights_of);
        // This micro-batch's share of the step's mean loss.
        Ok((tally.loss - before) / self.step.pairs.max(1) as f64)
    }

    fn stats(&self, tally: &PairStats, _: &StepUpdate) -> PairStats {
        tally.mean()
    }

    fn record(&self, stats: &PairStats, prefix: &str) -> Value {
        stats.record(prefix)
    }

    fn message(&self, stats: &PairStats) -> String {
        format!("loss {:.4} reward accuracy {:.3} margin {:.3}", stats.loss, stats.accuracy, stats.margin())
    }

    fn evaluate(&mut self, s: &mut Session<B>) -> Result<Option<PairStats>> {
        if self.eval.examples.is_empty() {
            return Ok(None);
        }
        let what = format!("eval log-probs at step {}", s.state.step);
        let logps = sequence_logps_on_ranks(s, None, &mut self.pool, &self.eval, &what)?;
        Ok(Some(split_stats(&self.eval, &self.objective, &logps)))
    }
}

/// Runs preference optimisation as configured by `config.dpo`; `quiet` hides the progress bar.
pub fn run<B: Backend>(
    rt: Runtime<B>,
    config: &RunConfig,
    resume: Option<Resume>,
    quiet: bool,
) -> Result<RunSummary<PairStats>> {
    let Some(dpo) = &config.dpo else { bail!("the run configuration has no [dpo] section") };
    let objective = Objective::new(dpo);
    let (mut s, tokenizer, template) = Session::open_tokenized(rt, config, resume, &load_model)?;
    let (mut train_split, mut eval) = preference_splits(config, &tokenizer, template.as_ref())?;
    let t = &config.train;
    let seq = config.data.max_seq_len;
    let mut pool = ActivationsPool::new(&s.model.config, seq, true, t.recompute);
    if objective.needs_reference() {
        reference_logps(&mut s, config, &mut pool, vec![&mut train_split, &mut eval])?;
    }
    // Data parallel: `grad_accum` micro-batches per rank, each rank its own share of a step.
    let order = DataOrder::from_micro_batches(train_split.micro_batches.clone(), s.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let step = StepShape { pairs: 0, chosen_tokens: 0, seq };
    let mut recipe = Dpo { train: train_split, eval, order, objective, pool, step, weight: 0.0 };
    train(&mut s, &mut recipe, &schedule, "kiln dpo", quiet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preference::sequence_logps;
    use kiln_core::Cpu;
    use kiln_data::example::Example;
    use kiln_model::{Config, Model};

    const TINY: &str = r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}"#;

    fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> [Example; 2] {
        let ex = |answer: &[u32]| Example {
            ids: [prompt, answer].concat(),
            trainable: (0..prompt.len() + answer.len()).map(|t| t >= prompt.len()).collect(),
            location: String::new(),
        };
        [ex(chosen), ex(rejected)]
    }

    /// The objective's value over the whole split, from sequence log-probs alone.
    fn objective_value(model: &mut Model<Cpu>, pool: &mut ActivationsPool<Cpu>, split: &Split, o: &Objective) -> f64 {
        let logps = sequence_logps(&Cpu, model, (pool, split.rows), &split.examples, &split.micro_batches);
        let pairs = split.examples.len() / 2;
        let chosen_tokens: usize = (0..pairs).map(|k| split.examples[2 * k].trainable_targets()).sum();
        (0..pairs)
            .map(|k| {
                let x = pair_logps(split, k, logps[2 * k], logps[2 * k + 1]);
                o.pair(&x).0 / pairs as f64 + o.orpo_nll_weight() * -x.chosen / chosen_tokens as f64
            })
            .sum()
    }

    #[test]
    fn token_weights_give_the_gradient_of_the_preference_objective() {
        let examples: Vec<Example> = [
            pair(&[1, 2, 3], &[4, 5], &[6, 7, 8]),
            pair(&[9, 10], &[11, 12, 13, 14], &[15]),
            pair(&[16, 17, 18, 19], &[20, 21], &[22, 23]),
        ]
        .into_iter()
        .flatten()
        .collect();
        let (rows, seq) = (2, 12);
        for (losses, weights) in [
            (vec![LossKind::Sigmoid], vec![]),
            (vec![LossKind::Ipo], vec![]),
            (vec![LossKind::Hinge], vec![]),
            (vec![LossKind::Simpo], vec![]),
            (vec![LossKind::Sigmoid, LossKind::Orpo], vec![1.0, 0.5]),
        ] {
            let section = DpoSection {
                loss: losses.clone(),
                loss_weights: weights,
                beta: 0.5,
                label_smoothing: 0.1,
                simpo_gamma: 0.3,
            };
            let objective = Objective::new(&section);
            let mut split = Split::pairs((examples.clone(), Vec::new()), rows, seq, "test").unwrap();
            let cfg = Config::parse(TINY).unwrap();
            let mut pool = ActivationsPool::new(&cfg, seq, true, false);
            let mut reference = Model::random(&Cpu, cfg.clone(), 8);
            split.reference =
                Some(sequence_logps(&Cpu, &mut reference, (&mut pool, rows), &split.examples, &split.micro_batches));
            let mut model = Model::random(&Cpu, cfg, 7);

            let mut grads = model.grads(&Cpu);
            let chosen_tokens = (0..3).map(|k| split.examples[2 * k].trainable_targets()).sum();
            let step = StepShape { pairs: 3, chosen_tokens, seq };
            let mut stats = PairStats::default();
            for mb in &split.micro_batches {
                let batch = build_batch(&split.examples, mb, rows, seq, 0.0);
                let mut weights_of =
                    |nll: &[f32]| token_weights(nll, &batch.targets, mb, &split, &objective, step, &mut stats);
                model.forward_backward_with(&Cpu, pool.get(&Cpu, rows), &batch, &mut grads, &mut weights_of);
            }
            let value = objective_value(&mut model, &mut pool, &split, &objective);
            assert!((stats.mean().loss - value).abs() < 1e-5, "{losses:?}: step loss {} vs {value}", stats.mean().loss);

            let h = 1e-2f32;
            for (tensor, i) in [(0usize, 17usize), (0, 90), (2, 5), (5, 40), (9, 3)] {
                let at = model.flat.ranges.iter()[tensor].start + i;
                model.params[at] += h;
                let up = objective_value(&mut model, &mut pool, &split, &objective);
                model.params[at] -= 2.0 * h;
                let down = objective_value(&mut model, &mut pool, &split, &objective);
                model.params[at] += h;
                let numeric = (up - down) / (2.0 * h as f64);
                let analytic = grads.flat[at] as f64;
                assert!(
                    (analytic - numeric).abs() < 2e-4 + 0.02 * numeric.abs(),
                    "{losses:?} tensor {tensor}[{i}]: analytic {analytic}, numeric {numeric}"
                );
            }
        }
    }
}
