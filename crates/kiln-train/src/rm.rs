//! Reward modelling: the base transformer with a scalar head on the last token of a sequence,
//! trained on preference pairs with the Bradley-Terry loss (TRL's RewardTrainer):
//!
//!   r = w · h_last;   ℓ = −log σ(r_c − r_r − margin) + c·(r_c + r_r)²
//!   ∂ℓ/∂r_c = −σ(−(r_c − r_r − margin)) + 2c(r_c + r_r),  ∂ℓ/∂r_r = σ(…) + 2c(r_c + r_r)
//!
//! with the pair's `margin` column where its row has one (as TRL reads it), else `[rm] margin`.
//! The gradient enters the transformer at each sequence's last hidden state, ∂ℓ/∂h_last =
//! ∂ℓ/∂r · w, and runs back through `Model::backward_hidden`. Checkpoints and exports are
//! Hugging Face `...ForSequenceClassification` directories with `num_labels = 1`.

use crate::config::{RmSection, RunConfig};
use crate::loader::{build_batch, sequence_spans, DataOrder, PackedRow};
use crate::preference::{preference_splits, Split};
use crate::schedule::Schedule;
use crate::session::{Resume, RunSummary, Runtime, Session, StepUpdate};
use crate::trainer::{train, Recipe, StepPlan, Tally};
use anyhow::Result;
use kiln_core::Backend;
use kiln_data::example::Example;
use kiln_model::score_head::reward_config_json;
use kiln_model::{Activations, ChunkOrder, Model};
use serde_json::{json, Value};
use std::path::Path;

/// Means over pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RmStats {
    pub pairs: f64,
    pub loss: f64,
    /// Fraction of pairs whose chosen answer gets the higher reward.
    pub accuracy: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

impl RmStats {
    fn add(&mut self, loss: f64, rc: f64, rr: f64) {
        self.pairs += 1.0;
        self.loss += loss;
        self.accuracy += if rc > rr { 1.0 } else { 0.0 };
        self.reward_chosen += rc;
        self.reward_rejected += rr;
    }

    fn mean(mut self) -> Self {
        let n = self.pairs.max(1.0);
        for v in [&mut self.loss, &mut self.accuracy, &mut self.reward_chosen, &mut self.reward_rejected] {
            *v /= n;
        }
        self
    }

    fn record(&self, prefix: &str) -> Value {
        json!({
            format!("{prefix}loss"): self.loss,
            format!("{prefix}accuracy"): self.accuracy,
            format!("{prefix}rewards/chosen"): self.reward_chosen,
            format!("{prefix}rewards/rejected"): self.reward_rejected,
            format!("{prefix}margin"): self.reward_chosen - self.reward_rejected,
            format!("{prefix}mean_reward"): (self.reward_chosen + self.reward_rejected) / 2.0,
        })
    }
}

impl Tally for RmStats {
    fn sums(&mut self) -> Vec<&mut f64> {
        vec![&mut self.pairs, &mut self.loss, &mut self.accuracy, &mut self.reward_chosen, &mut self.reward_rejected]
    }
}

/// The Bradley-Terry loss of one pair at `margin`, with centring coefficient `c`, and its
/// derivatives in the two rewards.
pub fn bradley_terry(rc: f64, rr: f64, margin: f64, c: f64) -> (f64, f64, f64) {
    let z = rc - rr - margin;
    // −log σ(z), stable on both sides.
    let loss = if z >= 0.0 { (-z).exp().ln_1p() } else { -z + z.exp().ln_1p() };
    let s = 1.0 / (1.0 + z.exp()); // σ(−z)
    let center = c * (rc + rr).powi(2);
    let dc = 2.0 * c * (rc + rr);
    (loss + center, -s + dc, s + dc)
}

/// Each sequence of a micro-batch in layout order, with the index of its last token, after
/// `forward_hidden`: its example, that token, and its reward.
fn rewards<B: Backend>(
    b: &B,
    model: &Model<B>,
    acts: &Activations<B>,
    mb: &[PackedRow],
    examples: &[Example],
) -> Vec<(usize, i32, f64)> {
    let spans = sequence_spans(mb, examples, acts.seq);
    let last: Vec<i32> = spans.iter().map(|&(i, start)| (start + examples[i].ids.len() - 1) as i32).collect();
    let scores = model.score_forward(b, acts, &last);
    spans.iter().zip(last).zip(scores).map(|((&(i, _), t), r)| (i, t, r as f64)).collect()
}

struct Rm<B: Backend> {
    train: Split,
    eval: Split,
    order: DataOrder,
    rm: RmSection,
    acts: Activations<B>,
    /// Pairs in the step being taken, and the weight of its trainable tokens (MoE balance terms).
    pairs: usize,
    weight: f32,
}

impl<B: Backend> Recipe<B> for Rm<B> {
    type Micro = usize;
    type Tally = RmStats;
    type Stats = RmStats;

    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<usize>> {
        let (plan, step) = StepPlan::from_order(s, &self.order, &self.train.examples);
        self.pairs = step.iter().map(|&i| self.order.micro_batches[i].concat().len()).sum::<usize>() / 2;
        self.weight = plan.token_weight();
        Ok(plan)
    }

    /// A reward model's pass runs the whole micro-batch through the stages in turn.
    fn chunk_order(&self) -> ChunkOrder {
        ChunkOrder::Unchunked
    }

    fn micro_step(&mut self, s: &mut Session<B>, &i: &usize, tally: &mut RmStats) -> Result<f64> {
        let (mb, examples, acts) = (&self.order.micro_batches[i], &self.train.examples, &mut self.acts);
        let batch = build_batch(examples, mb, acts.rows, acts.seq, self.weight);
        s.model.forward_hidden(&s.b, acts, &batch, true);
        let scored = rewards(&s.b, &s.model, acts, mb, examples);
        let at: std::collections::HashMap<usize, usize> = scored.iter().enumerate().map(|(k, s)| (s.0, k)).collect();
        let mut dscores = vec![0f32; scored.len()];
        let before = tally.loss;
        let pairs = self.pairs.max(1) as f64;
        // Pairs in layout order, so that sums (and a resumed run) are deterministic.
        for (k, &(example, _, reward)) in scored.iter().enumerate().filter(|(_, s)| s.0 % 2 == 0) {
            let rejected = at[&(example + 1)];
            let margin = self.train.margins[example / 2].unwrap_or(self.rm.margin);
            let (loss, drc, drr) =
                bradley_terry(reward, scored[rejected].2, margin, self.rm.center_rewards_coefficient);
            tally.add(loss, reward, scored[rejected].2);
            dscores[k] = (drc / pairs) as f32;
            dscores[rejected] = (drr / pairs) as f32;
        }
        let positions: Vec<i32> = scored.iter().map(|s| s.1).collect();
        s.model.score_backward(&s.b, acts, &batch, &positions, &dscores, &mut s.dp);
        // This micro-batch's share of the step's mean loss.
        Ok((tally.loss - before) / pairs)
    }

    fn stats(&self, tally: &RmStats, _: &StepUpdate) -> RmStats {
        tally.mean()
    }

    fn record(&self, stats: &RmStats, prefix: &str) -> Value {
        stats.record(prefix)
    }

    fn message(&self, stats: &RmStats) -> String {
        format!("loss {:.4} accuracy {:.3}", stats.loss, stats.accuracy)
    }

    /// Pair statistics of the eval split, its micro-batches shared out over the ranks: each
    /// example's reward comes from one rank, so summing them over the ranks is exact.
    fn evaluate(&mut self, s: &mut Session<B>) -> Result<Option<RmStats>> {
        let split = &self.eval;
        if split.examples.is_empty() {
            return Ok(None);
        }
        let (mine, idle) = s.forward_share(split.micro_batches.len())?;
        let mut reward = vec![0.0; split.examples.len()];
        for mb in &split.micro_batches[mine] {
            let batch = build_batch(&split.examples, mb, self.acts.rows, self.acts.seq, 1.0);
            s.model.forward_hidden(&s.b, &mut self.acts, &batch, false);
            for (example, _, r) in rewards(&s.b, &s.model, &self.acts, mb, &split.examples) {
                reward[example] = r;
            }
        }
        (0..idle).for_each(|_| s.model.idle_forward(&s.b, ChunkOrder::Unchunked));
        s.data.all_reduce_sum_f64(&mut reward, &format!("eval rewards at step {}", s.state.step))?;
        let mut stats = RmStats::default();
        for k in 0..split.examples.len() / 2 {
            let (rc, rr) = (reward[2 * k], reward[2 * k + 1]);
            let margin = split.margins[k].unwrap_or(self.rm.margin);
            stats.add(bradley_terry(rc, rr, margin, self.rm.center_rewards_coefficient).0, rc, rr);
        }
        Ok(Some(stats.mean()))
    }
}

/// Trains a reward model as configured; `quiet` hides the progress bar.
pub fn run<B: Backend>(
    rt: Runtime<B>,
    config: &RunConfig,
    resume: Option<Resume>,
    quiet: bool,
) -> Result<RunSummary<RmStats>> {
    let t = &config.train;
    let load = |b: &B, dir: &Path, share| Ok(Model::load_as_reward_model(b, dir, t.seed, share)?);
    let (mut s, tokenizer, template) = Session::open_tokenized(rt, config, resume, &load)?;
    let reward_config = reward_config_json(s.model_dir(), tokenizer.eos_id)?;
    s.set_model_file("config.json", reward_config);
    let (train_split, eval) = preference_splits(config, &tokenizer, template.as_ref())?;
    let acts = Activations::new(&s.b, &s.model.config, config.rows(), config.data.max_seq_len, true, t.recompute);
    // Data parallel: `grad_accum` micro-batches per rank, each rank its own share of a step.
    let order = DataOrder::from_micro_batches(train_split.micro_batches.clone(), s.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let rm = config.rm.clone().unwrap_or_default();
    let mut recipe = Rm { train: train_split, eval, order, rm, acts, pairs: 0, weight: 0.0 };
    train(&mut s, &mut recipe, &schedule, "kiln rm", quiet)
}
