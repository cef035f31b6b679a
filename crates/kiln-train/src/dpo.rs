//! Preference optimisation: DPO and its variants (`preference_loss`), combined with weights.
//!
//! Each pair becomes two sequences, prompt + chosen and prompt + rejected, packed into the
//! same micro-batch, so one forward and one backward cover both. The policy's sequence
//! log-probs come from the forward's per-token nll; the loss of every pair then fixes each
//! token's weight, ∂loss/∂nll_t = −∂loss/∂logp(sequence), and the backward runs with those
//! weights (`Model::forward_backward_with`). The reference model's log-probs are computed
//! once, before training, and cached in the output directory (`reference_logps.json`), so
//! no second model is in memory while training; reference-free losses skip it.

use crate::config::{DpoSection, RunConfig};
use crate::loader::{
    build_batch, describe_rows, pack_pairs, real_tokens, sequence_spans, trainable_targets, DataOrder, PackedRow,
};
use crate::preference_loss::{pair_loss, LossKind, LossParams, PairLogps};
use crate::schedule::Schedule;
use crate::session::{merge, with_step, Resume, RunSummary, Session};
use crate::sft::{check_bad_rows, check_vocab, load_tokenizer};
use anyhow::{bail, Context, Result};
use kiln_core::{Backend, Cpu};
use kiln_data::example::{Encoder, Example};
use kiln_data::preference::{read_preference_rows, PreferencePair};
use kiln_model::{Activations, Model};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Means over pairs of the loss and the rewards of the first listed loss.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairStats {
    pub pairs: usize,
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
    fn margin(&self) -> f64 {
        self.reward_chosen - self.reward_rejected
    }

    fn add(&mut self, loss: f64, reward: (f64, f64), logps: (f64, f64)) {
        self.pairs += 1;
        self.loss += loss;
        self.reward_chosen += reward.0;
        self.reward_rejected += reward.1;
        self.accuracy += if reward.0 > reward.1 { 1.0 } else { 0.0 };
        self.prefers_chosen += if logps.0 > logps.1 { 1.0 } else { 0.0 };
        self.logps_chosen += logps.0;
        self.logps_rejected += logps.1;
    }

    /// The sums of every rank of a data-parallel run.
    fn sum_over_ranks(self, comm: &dyn kiln_dist::Comm, what: &str) -> Result<Self> {
        let mut v = [
            self.pairs as f64,
            self.loss,
            self.reward_chosen,
            self.reward_rejected,
            self.accuracy,
            self.prefers_chosen,
            self.logps_chosen,
            self.logps_rejected,
        ];
        comm.all_reduce_sum_f64(&mut v, what)?;
        let [pairs, loss, reward_chosen, reward_rejected, accuracy, prefers_chosen, logps_chosen, logps_rejected] = v;
        Ok(Self {
            pairs: pairs.round() as usize,
            loss,
            reward_chosen,
            reward_rejected,
            accuracy,
            prefers_chosen,
            logps_chosen,
            logps_rejected,
        })
    }

    /// Sums to means.
    fn mean(mut self) -> Self {
        let n = self.pairs.max(1) as f64;
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

    fn record(&self, prefix: &str) -> serde_json::Value {
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

/// The pairs of one split as examples: `2k` prompt + chosen, `2k + 1` prompt + rejected,
/// trainable on the answers.
fn encode_pairs(files: &[PathBuf], encoder: &Encoder, max_bad_fraction: f64, split: &str) -> Result<Vec<Example>> {
    let (mut pairs, mut bad) = (Vec::new(), Vec::new());
    for f in files {
        for row in read_preference_rows(f)? {
            match row.and_then(|r| encoder.encode_pair(&r)) {
                Ok(p) => pairs.push(p),
                Err(e) => bad.push(e),
            }
        }
    }
    check_bad_rows(split, files, pairs.len(), &bad, max_bad_fraction)?;
    let example = |p: &PreferencePair, answer: &[u32]| Example {
        ids: [p.prompt.as_slice(), answer].concat(),
        trainable: (0..p.prompt.len() + answer.len()).map(|t| t >= p.prompt.len()).collect(),
        location: p.location.clone(),
    };
    Ok(pairs.iter().flat_map(|p| [example(p, &p.chosen), example(p, &p.rejected)]).collect())
}

/// The run's train and eval pairs, tokenized and packed (`Split`s; eval may be empty).
pub(crate) fn preference_splits(
    config: &RunConfig,
    tokenizer: &kiln_data::Tokenizer,
    template: Option<&kiln_data::ChatTemplate>,
) -> Result<(Split, Split)> {
    let d = &config.data;
    let encoder = Encoder { tokenizer, template, max_seq_len: d.max_seq_len, policy: d.length_policy };
    let (rows, seq) = (config.rows(), d.max_seq_len);
    let train = Split::new(encode_pairs(&d.train, &encoder, d.max_bad_fraction, "train")?, rows, seq, "train")?;
    let eval =
        if d.eval.is_empty() { Vec::new() } else { encode_pairs(&d.eval, &encoder, d.max_bad_fraction, "eval")? };
    Ok((train, Split::new(eval, rows, seq, "eval")?))
}

/// Summed log-prob and length of every example's trainable tokens in one micro-batch, from
/// the per-token nll of its `build_batch` layout.
fn micro_batch_logps(
    nll: &[f32],
    targets: &[i32],
    mb: &[PackedRow],
    examples: &[Example],
    seq: usize,
) -> HashMap<usize, (f64, usize, usize)> {
    sequence_spans(mb, examples, seq)
        .into_iter()
        .map(|(i, start)| {
            let span = start..start + examples[i].ids.len();
            let (mut logp, mut n) = (0.0, 0);
            for t in span.filter(|&t| targets[t] >= 0) {
                logp -= nll[t] as f64;
                n += 1;
            }
            (i, (logp, n, start))
        })
        .collect()
}

/// Summed completion log-probs of every example under `model` (no gradients).
fn sequence_logps<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    acts: &mut Activations<B>,
    examples: &[Example],
    micro_batches: &[Vec<PackedRow>],
) -> Vec<f64> {
    let mut out = vec![0.0; examples.len()];
    for mb in micro_batches {
        let batch = build_batch(examples, mb, acts.rows, acts.seq, 1.0);
        let nll = model.nll(b, acts, &batch);
        for (i, (logp, _, _)) in micro_batch_logps(&nll, &batch.targets, mb, examples, acts.seq) {
            out[i] = logp;
        }
    }
    out
}

/// `sequence_logps` of this rank's share of the micro-batches (`share`: its range, and the
/// idle passes it serves after them under expert parallel), summed over the ranks: each
/// example is computed by one rank, so the sum is exact and every rank gets every log-prob.
#[allow(clippy::too_many_arguments)]
fn sequence_logps_on_ranks(
    b: &Cpu,
    comm: &dyn kiln_dist::Comm,
    (mine, idle): (std::ops::Range<usize>, usize),
    model: &mut Model<Cpu>,
    acts: &mut Activations<Cpu>,
    examples: &[Example],
    micro_batches: &[Vec<PackedRow>],
    what: &str,
) -> Result<Vec<f64>> {
    let mut logps = sequence_logps(b, model, acts, examples, &micro_batches[mine]);
    (0..idle).for_each(|_| model.serve_experts_forward(b));
    comm.all_reduce_sum_f64(&mut logps, what)?;
    Ok(logps)
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
        let x = split.pair_logps(i / 2, logps[&i].0, logps[&(i + 1)].0);
        let (loss, dc, dr, rewards) = objective.pair(&x);
        // ORPO's SFT term, the mean nll of chosen tokens, enters as a per-pair share.
        let sft = orpo * -x.chosen / chosen_tokens * pairs;
        stats.add(loss + sft, rewards, (x.chosen, x.rejected));
        set(i, -dc / pairs + orpo / chosen_tokens);
        set(i + 1, -dr / pairs);
    }
    w
}

/// Losses and rewards of every pair of a split, with the policy's log-probs (the split's
/// micro-batches shared out over the ranks).
fn evaluate_pairs(
    session: &mut Session,
    acts: &mut Activations<Cpu>,
    split: &Split,
    objective: &Objective,
) -> Result<PairStats> {
    let share = session.forward_share(split.micro_batches.len())?;
    let what = format!("eval log-probs at step {}", session.state.step);
    let (b, comm) = (session.b, session.comm);
    let logps = sequence_logps_on_ranks(
        &b,
        comm,
        share,
        &mut session.model,
        acts,
        &split.examples,
        &split.micro_batches,
        &what,
    )?;
    let pairs = split.examples.len() / 2;
    let chosen_tokens: usize = (0..pairs).map(|k| split.examples[2 * k].trainable_targets()).sum();
    let mut stats = PairStats::default();
    for k in 0..pairs {
        let x = split.pair_logps(k, logps[2 * k], logps[2 * k + 1]);
        let (loss, _, _, rewards) = objective.pair(&x);
        // ORPO's SFT term as in training: the mean nll of chosen tokens, shared out per pair.
        let sft = objective.orpo_nll_weight() * -x.chosen / chosen_tokens.max(1) as f64 * pairs as f64;
        stats.add(loss + sft, rewards, (x.chosen, x.rejected));
    }
    Ok(stats.mean())
}

/// A split's examples, packing and reference log-probs.
pub(crate) struct Split {
    pub(crate) examples: Vec<Example>,
    pub(crate) micro_batches: Vec<Vec<PackedRow>>,
    reference: Option<Vec<f64>>,
}

impl Split {
    pub(crate) fn new(examples: Vec<Example>, rows: usize, seq: usize, name: &str) -> Result<Self> {
        let micro_batches = pack_pairs(&examples, rows, seq).with_context(|| {
            format!("{name} data: a pair does not fit one micro-batch of {rows} rows of {seq} tokens; raise train.batch_tokens")
        })?;
        Ok(Self { examples, micro_batches, reference: None })
    }

    fn pair_logps(&self, k: usize, chosen: f64, rejected: f64) -> PairLogps {
        let (c, r) = (&self.examples[2 * k], &self.examples[2 * k + 1]);
        PairLogps {
            chosen,
            rejected,
            chosen_len: c.trainable_targets(),
            rejected_len: r.trainable_targets(),
            reference: self.reference.as_ref().map(|rf| (rf[2 * k], rf[2 * k + 1])),
        }
    }
}

/// Reference log-probs as cached on disk, tied to the model and data they were computed on.
#[derive(Serialize, Deserialize)]
struct ReferenceCache {
    fingerprint: String,
    train: Vec<f64>,
    eval: Vec<f64>,
}

/// FNV-1a over the reference model's path and every example's tokens and mask.
fn fingerprint(model: &Path, splits: &[&Split]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &byte in bytes {
            h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(model.display().to_string().as_bytes());
    for split in splits {
        for e in &split.examples {
            e.ids.iter().for_each(|id| eat(&id.to_le_bytes()));
            eat(&e.trainable.iter().map(|&t| t as u8).collect::<Vec<_>>());
            eat(b"|");
        }
    }
    format!("{h:016x}")
}

/// Fills in the reference log-probs of both splits: from the cache when it matches, else
/// computed with `reference` (the starting model) and cached.
fn reference_logps(
    session: &mut Session,
    config: &RunConfig,
    acts: &mut Activations<kiln_core::Cpu>,
    train: &mut Split,
    eval: &mut Split,
) -> Result<()> {
    let path = session.out_path("reference_logps.json");
    let fp = fingerprint(&config.model.path, &[train, eval]);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(cache) = serde_json::from_str::<ReferenceCache>(&text) {
            if cache.fingerprint == fp {
                train.reference = Some(cache.train);
                eval.reference = Some(cache.eval);
                return Ok(());
            }
        }
    }
    let (b, comm) = (session.b, session.comm);
    let started = Instant::now();
    let shares = (session.forward_share(train.micro_batches.len())?, session.forward_share(eval.micro_batches.len())?);
    // The reference is the model the run started from, which a resumed run no longer holds.
    let mut fresh;
    let model = if session.resumed {
        fresh = Model::load_with(&b, &config.model.path, session.model.expert_parallel().cloned())?;
        &mut fresh
    } else {
        &mut session.model
    };
    let (train_mb, eval_mb) = (&train.micro_batches, &eval.micro_batches);
    let what = "reference log-probs";
    let train_ref = sequence_logps_on_ranks(&b, comm, shares.0, model, acts, &train.examples, train_mb, what)?;
    let eval_ref = sequence_logps_on_ranks(&b, comm, shares.1, model, acts, &eval.examples, eval_mb, what)?;
    let cache = ReferenceCache { fingerprint: fp, train: train_ref, eval: eval_ref };
    if session.comm.is_root() {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&cache)?)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    }
    eprintln!(
        "reference log-probs of {} sequences computed in {:.1} s, cached in {}",
        cache.train.len() + cache.eval.len(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    train.reference = Some(cache.train);
    eval.reference = Some(cache.eval);
    Ok(())
}

/// Runs preference optimisation as configured by `config.dpo`; `quiet` hides the progress bar.
pub fn run(config: &RunConfig, resume: Option<Resume>, quiet: bool) -> Result<RunSummary<PairStats>> {
    let Some(dpo) = &config.dpo else { bail!("the run configuration has no [dpo] section") };
    let objective = Objective::new(dpo);
    let mut session = Session::open(config, resume)?;
    let (tokenizer, template) = load_tokenizer(session.model_dir())?;
    check_vocab(&session.model, &tokenizer, session.model_dir())?;
    let (mut train, mut eval) = preference_splits(config, &tokenizer, template.as_ref())?;
    let (rows, seq) = (config.rows(), config.data.max_seq_len);

    let b = session.b;
    let t = &config.train;
    let mut acts = Activations::new(&b, &session.model.config, rows, seq, true, t.recompute);
    if objective.needs_reference() {
        reference_logps(&mut session, config, &mut acts, &mut train, &mut eval)?;
    }
    // Data parallel: `grad_accum` micro-batches per rank, each rank its own share of a step.
    let comm = session.comm;
    let order = DataOrder::from_micro_batches(train.micro_batches.clone(), session.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let total_steps = schedule.total_steps;

    session.start_progress(total_steps, quiet);
    let (mut last, mut eval_before, mut eval_stats, mut interrupted) = (PairStats::default(), None, None, false);
    let has_eval = !eval.examples.is_empty();
    if session.state.step == 0 && has_eval {
        let s = evaluate_pairs(&mut session, &mut acts, &eval, &objective)?;
        session.metrics.write(&with_step(0, s.record("eval_")))?;
        eval_before = Some(s);
    }
    while session.state.step < total_steps {
        let micro_batches = order.step(session.state.step);
        let pairs: usize = micro_batches.iter().map(|mb| mb.iter().map(Vec::len).sum::<usize>()).sum::<usize>() / 2;
        let chosen_tokens: usize = micro_batches
            .iter()
            .flat_map(|mb| mb.iter().flatten())
            .filter(|&&i| i % 2 == 0)
            .map(|&i| train.examples[i].trainable_targets())
            .sum();
        let count: usize = micro_batches.iter().map(|mb| trainable_targets(&train.examples, mb)).sum();
        let real_tokens: usize = micro_batches.iter().map(|mb| real_tokens(&train.examples, mb)).sum();
        session.begin_step();
        let mut stats = PairStats::default();
        let mine = session.my_share(micro_batches.len());
        let idle = session.idle_backwards_needed(mine.len())?;
        for mb in &micro_batches[mine] {
            // Static weights (1 / trainable tokens of the step) only weight MoE balance terms.
            let batch = build_batch(&train.examples, mb, rows, seq, 1.0 / count.max(1) as f32);
            let step = StepShape { pairs, chosen_tokens, seq };
            let mut weights_of =
                |nll: &[f32]| token_weights(nll, &batch.targets, mb, &train, &objective, step, &mut stats);
            session.model.forward_backward_with(&b, &mut acts, &batch, &mut session.grads, &mut weights_of);
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
            &format!("loss {:.4} acc {:.2} margin {:.3}", stats.loss, stats.accuracy, stats.margin()),
        )?;

        let step = session.state.step;
        if has_eval && session.eval_due(total_steps) {
            let s = evaluate_pairs(&mut session, &mut acts, &eval, &objective)?;
            session.metrics.write(&with_step(step, s.record("eval_")))?;
            session.bar.println(format!(
                "step {step}: eval loss {:.4}, reward accuracy {:.3}, margin {:.3}",
                s.loss,
                s.accuracy,
                s.margin()
            ));
            eval_stats = Some(s);
        }
        interrupted = session.checkpoint_if_due(total_steps)?;
        if interrupted {
            break;
        }
    }
    session.summary("kiln dpo", last, (eval_before, eval_stats), interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Cpu;
    use kiln_model::Config;

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
    fn objective_value(model: &mut Model<Cpu>, acts: &mut Activations<Cpu>, split: &Split, o: &Objective) -> f64 {
        let logps = sequence_logps(&Cpu, model, acts, &split.examples, &split.micro_batches);
        let pairs = split.examples.len() / 2;
        let chosen_tokens: usize = (0..pairs).map(|k| split.examples[2 * k].trainable_targets()).sum();
        (0..pairs)
            .map(|k| {
                let x = split.pair_logps(k, logps[2 * k], logps[2 * k + 1]);
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
            let mut split = Split::new(examples.clone(), rows, seq, "test").unwrap();
            let cfg = Config::parse(TINY).unwrap();
            let mut acts = Activations::new(&Cpu, &cfg, rows, seq, true, false);
            let mut reference = Model::random(&Cpu, cfg.clone(), 8);
            split.reference =
                Some(sequence_logps(&Cpu, &mut reference, &mut acts, &split.examples, &split.micro_batches));
            let mut model = Model::random(&Cpu, cfg, 7);

            let mut grads = model.zeros_like_params(&Cpu);
            let chosen_tokens = (0..3).map(|k| split.examples[2 * k].trainable_targets()).sum();
            let step = StepShape { pairs: 3, chosen_tokens, seq };
            let mut stats = PairStats::default();
            for mb in &split.micro_batches {
                let batch = build_batch(&split.examples, mb, rows, seq, 0.0);
                let mut weights_of =
                    |nll: &[f32]| token_weights(nll, &batch.targets, mb, &split, &objective, step, &mut stats);
                model.forward_backward_with(&Cpu, &mut acts, &batch, &mut grads, &mut weights_of);
            }
            let value = objective_value(&mut model, &mut acts, &split, &objective);
            assert!((stats.mean().loss - value).abs() < 1e-5, "{losses:?}: step loss {} vs {value}", stats.mean().loss);

            let h = 1e-2f32;
            for (tensor, i) in [(0usize, 17usize), (0, 90), (2, 5), (5, 40), (9, 3)] {
                let at = |delta: f32, model: &mut Model<Cpu>| {
                    model.params.iter_mut()[tensor][i] += delta;
                };
                at(h, &mut model);
                let up = objective_value(&mut model, &mut acts, &split, &objective);
                at(-2.0 * h, &mut model);
                let down = objective_value(&mut model, &mut acts, &split, &objective);
                at(h, &mut model);
                let numeric = (up - down) / (2.0 * h as f64);
                let analytic = grads.iter()[tensor][i] as f64;
                assert!(
                    (analytic - numeric).abs() < 2e-4 + 0.02 * numeric.abs(),
                    "{losses:?} tensor {tensor}[{i}]: analytic {analytic}, numeric {numeric}"
                );
            }
        }
    }
}
