//! Kahneman-Tversky optimisation (Ethayarajh et al. 2024) as TRL's KTOTrainer computes it, on
//! unpaired completions labelled desirable or not. Per micro-batch, with r_i = log π(y_i|x_i) −
//! log π_ref(y_i|x_i) and the KL reference point z estimated from mismatched pairs (x_i, y_{i−1})
//! (each micro-batch's completions rotated by one over its prompts), without gradient:
//!
//!   z = max(0, mean_i (log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)))
//!   desirable:   ℓ_i = λ_D (1 − σ(β (r_i − z)))      undesirable: ℓ_i = λ_U (1 − σ(β (z − r_i)))
//!   loss = mean_i ℓ_i, averaged over the step's micro-batches
//!   ∂ℓ_i/∂r_i = −λ_D β σ'(β (r_i − z))               ∂ℓ_i/∂r_i = λ_U β σ'(β (z − r_i))
//!
//! (`apo_zero_unpaired`: z = 0, and ℓ_i = σ(β r_i) for undesirable completions.) TRL also
//! averages z over the ranks at each accumulation step; here each micro-batch keeps its own, so
//! that a run takes the same steps on any number of ranks. The reference's log-probs, of the
//! completions and of the mismatched pairs, are cached like DPO's; the mismatched pairs go
//! through a forward of their own before each micro-batch's forward and backward.

use crate::config::{KtoLoss, KtoSection, RunConfig};
use crate::data::{check_bad_rows, encode_splits, encoder};
use crate::loader::{build_batch, pack_groups, DataOrder};
use crate::preference::{micro_batch_logps, prompt_completion, reference_logps, sequence_logps, Split};
use crate::schedule::Schedule;
use crate::session::{load_model, Resume, RunSummary, Runtime, Session, StepUpdate};
use crate::trainer::{train, Recipe, StepPlan, Tally};
use anyhow::{bail, Result};
use kiln_core::Backend;
use kiln_data::example::Encoder;
use kiln_data::packing::best_fit_decreasing;
use kiln_data::unpaired::{read_unpaired_rows, LabeledCompletion};
use kiln_model::{ActivationsPool, ChunkOrder};
use serde_json::{json, Value};
use std::path::PathBuf;

/// The loss of one micro-batch and what the metrics need of it.
#[derive(Clone, Debug, PartialEq)]
pub struct KtoLossOut {
    /// Mean over the micro-batch's completions.
    pub loss: f64,
    /// ∂loss/∂(log π of each completion).
    pub dlogps: Vec<f64>,
    /// β·r of each completion.
    pub rewards: Vec<f64>,
}

/// The KL reference point z of a micro-batch from its mismatched pairs' log-probs under the
/// policy and the reference.
pub fn kl_point(policy: &[f64], reference: &[f64]) -> f64 {
    let sum: f64 = policy.iter().zip(reference).map(|(p, r)| p - r).sum();
    (sum / policy.len().max(1) as f64).max(0.0)
}

/// The KTO loss of a micro-batch's completions (log-probs under the policy and the reference,
/// and labels) at the KL point `z`.
pub fn kto_loss(logps: &[f64], reference: &[f64], labels: &[bool], z: f64, k: &KtoSection) -> KtoLossOut {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let n = logps.len().max(1) as f64;
    let (mut loss, mut dlogps, mut rewards) = (0.0, Vec::new(), Vec::new());
    for ((&l, &r), &desirable) in logps.iter().zip(reference).zip(labels) {
        let ratio = l - r;
        // ℓ = w·(1 − σ(s·β·(ratio − z))) with s = ±1; ∂ℓ/∂ratio = −w·s·β·σ(u)(1 − σ(u)).
        let (weight, sign, z) = match (k.loss_type, desirable) {
            (KtoLoss::Kto, true) => (k.desirable_weight, 1.0, z),
            (KtoLoss::Kto, false) => (k.undesirable_weight, -1.0, z),
            (KtoLoss::ApoZeroUnpaired, true) => (k.desirable_weight, 1.0, 0.0),
            // σ(β·ratio) = 1 − σ(−β·ratio).
            (KtoLoss::ApoZeroUnpaired, false) => (k.undesirable_weight, -1.0, 0.0),
        };
        let u = sign * k.beta * (ratio - z);
        let s = sigmoid(u);
        loss += weight * (1.0 - s) / n;
        dlogps.push(-weight * sign * k.beta * s * (1.0 - s) / n);
        rewards.push(k.beta * ratio);
    }
    KtoLossOut { loss, dlogps, rewards }
}

/// Sums over a step's (or an evaluation's) micro-batches and completions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KtoStats {
    pub loss: f64,
    /// Mean KL reference point.
    pub kl: f64,
    pub chosen: f64,
    pub rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub micro_batches: f64,
}

impl Tally for KtoStats {
    fn sums(&mut self) -> Vec<&mut f64> {
        vec![
            &mut self.loss,
            &mut self.kl,
            &mut self.chosen,
            &mut self.rejected,
            &mut self.reward_chosen,
            &mut self.reward_rejected,
            &mut self.logps_chosen,
            &mut self.logps_rejected,
            &mut self.micro_batches,
        ]
    }
}

impl KtoStats {
    fn add(&mut self, out: &KtoLossOut, z: f64, logps: &[f64], labels: &[bool]) {
        (self.loss, self.kl, self.micro_batches) = (self.loss + out.loss, self.kl + z, self.micro_batches + 1.0);
        for ((&reward, &logp), &desirable) in out.rewards.iter().zip(logps).zip(labels) {
            let (count, r, l) = match desirable {
                true => (&mut self.chosen, &mut self.reward_chosen, &mut self.logps_chosen),
                false => (&mut self.rejected, &mut self.reward_rejected, &mut self.logps_rejected),
            };
            (*count, *r, *l) = (*count + 1.0, *r + reward, *l + logp);
        }
    }

    /// Sums to means: per micro-batch (loss, KL) and per completion of each label.
    fn mean(mut self) -> Self {
        let m = self.micro_batches.max(1.0);
        (self.loss, self.kl) = (self.loss / m, self.kl / m);
        let (c, r) = (self.chosen.max(1.0), self.rejected.max(1.0));
        (self.reward_chosen, self.logps_chosen) = (self.reward_chosen / c, self.logps_chosen / c);
        (self.reward_rejected, self.logps_rejected) = (self.reward_rejected / r, self.logps_rejected / r);
        self
    }

    pub fn margin(&self) -> f64 {
        self.reward_chosen - self.reward_rejected
    }
}

/// A split's completions and their mismatched pairs, packed alike: micro-batch j of `kl`
/// holds the mismatched pairs of micro-batch j of `matched`.
struct KtoSplit {
    matched: Split,
    kl: Split,
    labels: Vec<bool>,
}

impl KtoSplit {
    /// Packs the completions, in their order (as TRL batches them), into micro-batches of
    /// `rows × seq` tokens and builds each micro-batch's mismatched pairs: completion k−1 after
    /// prompt k (cut to `seq`).
    fn new(completions: Vec<LabeledCompletion>, rows: usize, seq: usize) -> Self {
        let examples: Vec<_> =
            completions.iter().map(|c| prompt_completion(&c.prompt, &c.completion, &c.location)).collect();
        let micro_batches = pack_groups(&examples, 1, rows, seq).expect("every completion fits max_seq_len");
        let (mut kl_examples, mut kl_batches) = (Vec::new(), Vec::new());
        for mb in &micro_batches {
            let members: Vec<usize> = mb.iter().flatten().copied().collect();
            let first = kl_examples.len();
            for (k, &i) in members.iter().enumerate() {
                let previous = &completions[members[(k + members.len() - 1) % members.len()]];
                let prompt = &completions[i].prompt;
                let room = seq.saturating_sub(prompt.len()).max(1);
                let completion = &previous.completion[..previous.completion.len().min(room)];
                kl_examples.push(prompt_completion(prompt, completion, &completions[i].location));
            }
            let lengths: Vec<usize> = kl_examples[first..].iter().map(|e| e.ids.len()).collect();
            let packed = best_fit_decreasing(&lengths, seq);
            kl_batches.push(packed.into_iter().map(|row| row.into_iter().map(|i| first + i).collect()).collect());
        }
        Self {
            labels: completions.iter().map(|c| c.label).collect(),
            matched: Split { examples, micro_batches, rows, reference: None, margins: Vec::new() },
            kl: Split { examples: kl_examples, micro_batches: kl_batches, rows, reference: None, margins: Vec::new() },
        }
    }

    /// The KL point of micro-batch `j` from its mismatched pairs' log-probs under the policy.
    fn kl_point(&self, j: usize, policy: &[f64], k: &KtoSection) -> f64 {
        if k.loss_type == KtoLoss::ApoZeroUnpaired {
            return 0.0;
        }
        let members: Vec<usize> = self.kl.micro_batches[j].iter().flatten().copied().collect();
        let reference = self.kl.reference.as_ref().expect("reference log-probs");
        kl_point(
            &members.iter().map(|&i| policy[i]).collect::<Vec<_>>(),
            &members.iter().map(|&i| reference[i]).collect::<Vec<_>>(),
        )
    }

    /// The loss of micro-batch `j` from its completions' log-probs (`logps[i]` for every
    /// completion `i` of it), with its members in layout order.
    fn micro_batch_loss(
        &self,
        j: usize,
        logps: impl Fn(usize) -> f64,
        z: f64,
        k: &KtoSection,
    ) -> (Vec<usize>, KtoLossOut) {
        let members: Vec<usize> = self.matched.micro_batches[j].iter().flatten().copied().collect();
        let reference = self.matched.reference.as_ref().expect("reference log-probs");
        let pick = |f: &dyn Fn(usize) -> f64| members.iter().map(|&i| f(i)).collect::<Vec<f64>>();
        let labels: Vec<bool> = members.iter().map(|&i| self.labels[i]).collect();
        let out = kto_loss(&pick(&logps), &pick(&|i| reference[i]), &labels, z, k);
        (members, out)
    }
}

/// The unpaired rows of one split, tokenized; bad rows reported.
pub fn encode_unpaired(
    files: &[PathBuf],
    encoder: &Encoder,
    max_bad_fraction: f64,
    split: &str,
) -> Result<Vec<LabeledCompletion>> {
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for f in files {
        for row in read_unpaired_rows(f)? {
            match row.and_then(|r| encoder.encode_unpaired(&r)) {
                Ok(c) => good.push(c),
                Err(e) => bad.push(e),
            }
        }
    }
    check_bad_rows(split, files, good.len(), &bad, max_bad_fraction)?;
    Ok(good)
}

struct Kto<B: Backend> {
    k: KtoSection,
    train: KtoSplit,
    eval: KtoSplit,
    order: DataOrder,
    pool: ActivationsPool<B>,
    /// Micro-batches in the step being taken, over all ranks, and the weight of its trainable
    /// tokens (MoE balance terms).
    step_micro_batches: usize,
    weight: f32,
}

impl<B: Backend> Recipe<B> for Kto<B> {
    type Micro = usize;
    type Tally = KtoStats;
    type Stats = KtoStats;

    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<usize>> {
        let (plan, step) = StepPlan::from_order(s, &self.order, &self.train.matched.examples);
        (self.step_micro_batches, self.weight) = (step.len(), plan.token_weight());
        Ok(plan)
    }

    /// The weights come from each sequence's log-prob: every forward first.
    fn chunk_order(&self) -> ChunkOrder {
        ChunkOrder::ForwardsFirst
    }

    fn forwards_per_micro_step(&self) -> usize {
        1
    }

    fn micro_step(&mut self, s: &mut Session<B>, &j: &usize, tally: &mut KtoStats) -> Result<f64> {
        let (b, split) = (&s.b, &self.train);
        let kl_batch = std::slice::from_ref(&split.kl.micro_batches[j]);
        let kl_logps = sequence_logps(b, &mut s.model, (&mut self.pool, split.kl.rows), &split.kl.examples, kl_batch);
        let z = split.kl_point(j, &kl_logps, &self.k);
        let mb = &split.matched.micro_batches[j];
        let acts = self.pool.get(b, split.matched.rows);
        let (examples, seq) = (&split.matched.examples, acts.seq);
        let batch = build_batch(examples, mb, acts.rows, seq, self.weight);
        let scale = 1.0 / self.step_micro_batches.max(1) as f64;
        let mut loss = 0.0;
        let mut weights_of = |nll: &[f32]| {
            let logps = micro_batch_logps(nll, &batch.targets, mb, examples, seq);
            let (members, out) = split.micro_batch_loss(j, |i| logps[&i].0, z, &self.k);
            let mut w = vec![0f32; nll.len()];
            for (&i, &d) in members.iter().zip(&out.dlogps) {
                let start = logps[&i].2;
                for t in (start..start + examples[i].ids.len()).filter(|&t| batch.targets[t] >= 0) {
                    w[t] = (-d * scale) as f32;
                }
            }
            let member_logps: Vec<f64> = members.iter().map(|i| logps[i].0).collect();
            let labels: Vec<bool> = members.iter().map(|&i| split.labels[i]).collect();
            tally.add(&out, z, &member_logps, &labels);
            loss = out.loss * scale;
            w
        };
        s.model.forward_backward_with(b, acts, &batch, &mut s.dp, &mut weights_of);
        Ok(loss)
    }

    fn stats(&self, tally: &KtoStats, _: &StepUpdate) -> KtoStats {
        tally.mean()
    }

    fn record(&self, stats: &KtoStats, prefix: &str) -> Value {
        json!({
            format!("{prefix}loss"): stats.loss,
            format!("{prefix}kl"): stats.kl,
            format!("{prefix}rewards/chosen"): stats.reward_chosen,
            format!("{prefix}rewards/rejected"): stats.reward_rejected,
            format!("{prefix}rewards/margins"): stats.margin(),
            format!("{prefix}logps/chosen"): stats.logps_chosen,
            format!("{prefix}logps/rejected"): stats.logps_rejected,
            format!("{prefix}count/chosen"): stats.chosen,
            format!("{prefix}count/rejected"): stats.rejected,
        })
    }

    fn message(&self, stats: &KtoStats) -> String {
        format!("loss {:.4} kl {:.3} margin {:.3}", stats.loss, stats.kl, stats.margin())
    }

    /// The loss and rewards over the eval split, every log-prob computed on one rank and
    /// shared by an exact all-reduce.
    fn evaluate(&mut self, s: &mut Session<B>) -> Result<Option<KtoStats>> {
        let split = &self.eval;
        if split.labels.is_empty() {
            return Ok(None);
        }
        let what = format!("eval log-probs at step {}", s.state.step);
        let logps = crate::preference::sequence_logps_on_ranks(s, None, &mut self.pool, &split.matched, &what)?;
        let kl_logps = crate::preference::sequence_logps_on_ranks(s, None, &mut self.pool, &split.kl, &what)?;
        let mut stats = KtoStats::default();
        for j in 0..split.matched.micro_batches.len() {
            let z = split.kl_point(j, &kl_logps, &self.k);
            let (members, out) = split.micro_batch_loss(j, |i| logps[i], z, &self.k);
            let labels: Vec<bool> = members.iter().map(|&i| split.labels[i]).collect();
            stats.add(&out, z, &members.iter().map(|&i| logps[i]).collect::<Vec<_>>(), &labels);
        }
        Ok(Some(stats.mean()))
    }
}

/// Runs KTO as configured by `config.kto`; `quiet` hides the progress bar.
pub fn run<B: Backend>(
    rt: Runtime<B>,
    config: &RunConfig,
    resume: Option<Resume>,
    quiet: bool,
) -> Result<RunSummary<KtoStats>> {
    let Some(k) = config.kto.clone() else { bail!("the run configuration has no [kto] section") };
    let (mut s, tokenizer, template) = Session::open_tokenized(rt, config, resume, &load_model)?;
    let encoder = encoder(config, &tokenizer, template.as_ref());
    let bad = config.data.max_bad_fraction;
    let (train_rows, eval_rows) = encode_splits(config, |files, split| encode_unpaired(files, &encoder, bad, split))?;
    let (rows, seq) = (config.rows(), config.data.max_seq_len);
    let (mut train_split, mut eval) = (KtoSplit::new(train_rows, rows, seq), KtoSplit::new(eval_rows, rows, seq));
    if train_split.matched.micro_batches.iter().any(|mb| mb.iter().map(Vec::len).sum::<usize>() < 2)
        && k.loss_type == KtoLoss::Kto
    {
        eprintln!("warning: a micro-batch holds one completion, so its KL reference point pairs it with itself; raise train.batch_tokens");
    }
    let t = &config.train;
    let mut pool = ActivationsPool::new(&s.model.config, seq, true, t.recompute);
    let splits = vec![&mut train_split.matched, &mut train_split.kl, &mut eval.matched, &mut eval.kl];
    reference_logps(&mut s, config, &mut pool, splits)?;
    let order =
        DataOrder::from_micro_batches(train_split.matched.micro_batches.clone(), s.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let mut recipe = Kto { k, train: train_split, eval, order, pool, step_micro_batches: 0, weight: 0.0 };
    train(&mut s, &mut recipe, &schedule, "kiln kto", quiet)
}
