//! RL with verifiable rewards: GRPO and its variants (`grpo_loss`) on the generator.
//!
//! Every `num_iterations` steps a rollout takes `prompts_per_step` prompts, samples
//! `group_size` completions of each with the KV-cache generator, scores them with the
//! configured rewards (`rewards`) and turns the rewards into group-relative advantages; each
//! step is one optimizer update on the current rollout, in micro-batches of `micro_batch`
//! completions: a forward gives every completion token's log-prob, the clipped objective
//! (normalised over the whole step) sets each token's weight ∂L/∂nll_t = −∂L/∂logp_t, and the
//! backward runs with them. The log-probs of the sampling policy (for the ratio) are those of
//! the rollout's first step, taken with the training forward on the training batch itself,
//! so rollout and training never disagree on them. A run resumed between two steps of one
//! rollout starts a new rollout.

use crate::config::{GrpoSection, RewardSpec, RunConfig};
use crate::grpo_loss::{advantages, group_is_flat, policy_loss, Completion, PolicyLossParams};
use crate::rewards::{Reward, RewardFn, Sample};
use crate::session::{merge, with_step, Resume, RunSummary, Session};
use crate::sft::{check_vocab, load_tokenizer};
use anyhow::{bail, Context, Result};
use kiln_core::rng::Rng;
use kiln_core::Cpu;
use kiln_data::rows::read_records;
use kiln_data::{ChatTemplate, Message, Tokenizer};
use kiln_model::generator::{generate, FinishReason, Generation, Request};
use kiln_model::sampler::SamplingParams;
use kiln_model::{ActivationsPool, Batch, Model};
use regex::Regex;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A prompt and its reference answer.
#[derive(Clone, Debug)]
pub struct PromptRow {
    pub ids: Vec<i32>,
    pub text: String,
    pub answer: Option<String>,
    pub location: String,
}

/// Statistics of a step or an evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoStats {
    pub reward: f64,
    /// Fraction of completions with the full reward of the first reward function (accuracy
    /// for `exact_match`).
    pub solved: f64,
    pub completion_length: f64,
}

/// Reads prompt rows: `{"prompt": "..."}` or `{"messages": [...]}` (rendered with the
/// generation prompt), with an optional `"answer"`.
pub fn read_prompts(
    files: &[std::path::PathBuf],
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PromptRow>> {
    let mut out = Vec::new();
    for f in files {
        for record in read_records(f)? {
            let (location, value) = record?;
            let answer = match value.get("answer") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => Some(v.to_string()),
            };
            let text = match (value.get("messages"), value.get("prompt")) {
                (Some(m), _) => {
                    let messages: Vec<Message> = serde_json::from_value(m.clone()).with_context(|| {
                        format!("{location}: field `messages`: expected [{{\"role\", \"content\"}}, ..]")
                    })?;
                    let template = template
                        .with_context(|| format!("{location}: a chat prompt needs the model's chat_template"))?;
                    template.render(&messages, true).map_err(|e| anyhow::anyhow!("{location}: {e}"))?
                }
                (None, Some(Value::String(p))) => p.clone(),
                _ => bail!("{location}: field `prompt` (a string) or `messages` is missing"),
            };
            let special = value.get("messages").is_none();
            let ids = tokenizer.encode(&text, special).map_err(|e| anyhow::anyhow!("{location}: {e}"))?;
            out.push(PromptRow { ids: ids.into_iter().map(|t| t as i32).collect(), text, answer, location });
        }
    }
    if out.is_empty() {
        bail!("no prompts in {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    Ok(out)
}

/// The configured reward functions.
pub fn build_rewards(specs: &[RewardSpec]) -> Result<Vec<Reward>> {
    specs
        .iter()
        .map(|s| {
            let regex = |p: &Option<String>| -> Result<Option<Regex>> {
                p.as_ref()
                    .map(|p| Regex::new(p).with_context(|| format!("reward `{}`: bad pattern", s.name())))
                    .transpose()
            };
            let function = match s.kind.as_str() {
                "exact_match" => RewardFn::ExactMatch { pattern: regex(&s.pattern)? },
                "format" => RewardFn::Format {
                    pattern: regex(&s.pattern)?
                        .with_context(|| format!("reward `{}`: `pattern` is required", s.name()))?,
                },
                "length" => RewardFn::Length { max_chars: s.max_chars.unwrap_or(200) },
                "command" => RewardFn::Command {
                    program: s
                        .command
                        .first()
                        .cloned()
                        .with_context(|| format!("reward `{}`: `command` is empty", s.name()))?,
                    args: s.command[1..].to_vec(),
                    timeout: Duration::from_secs_f64(s.timeout_s),
                },
                "http" => RewardFn::Http {
                    url: s.url.clone().with_context(|| format!("reward `{}`: `url` is required", s.name()))?,
                    timeout: Duration::from_secs_f64(s.timeout_s),
                },
                "model" => {
                    let path = s.path.as_ref().with_context(|| format!("reward `{}`: `path` is required", s.name()))?;
                    RewardFn::RewardModel(Box::new(std::sync::Mutex::new(crate::rewards::ScoringModel::load(path)?)))
                }
                other => bail!("reward `{other}`: unknown type (exact_match, format, length, command, http, model)"),
            };
            Ok(Reward { name: s.name(), weight: s.weight, function })
        })
        .collect()
}

/// What sampling and scoring a batch of prompts needs.
struct RolloutContext<'a> {
    g: &'a GrpoSection,
    rewards: &'a [Reward],
    tokenizer: &'a Tokenizer,
    stop_ids: &'a [i32],
    /// Training rows' length.
    seq: usize,
    comm: &'a dyn kiln_dist::Comm,
}

/// Samples `group` completions (or one greedy completion when `greedy`) of each prompt, each
/// with the index of its prompt; `first` is the step-wide index of the first completion (its
/// seed's offset, so a completion's draw does not depend on which rank samples it).
fn rollout(
    model: &mut Model<Cpu>,
    prompts: &[&PromptRow],
    g: &GrpoSection,
    stop_ids: &[i32],
    seed: u64,
    greedy: bool,
    first: usize,
) -> Vec<(usize, Generation)> {
    let group = if greedy { 1 } else { g.group_size };
    let requests: Vec<Request> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, group))
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.ids.clone(),
            params: SamplingParams {
                temperature: if greedy { 0.0 } else { g.temperature },
                top_k: g.top_k,
                top_p: g.top_p,
                min_p: 0.0,
                max_new_tokens: g.max_new_tokens,
                stop_ids: stop_ids.to_vec(),
                seed: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (first + i) as u64,
            },
        })
        .collect();
    let out = generate(&Cpu, model, &requests, requests.len(), &mut |_, _| false);
    out.into_iter().enumerate().map(|(i, g)| (i / group, g)).collect()
}

/// Each completion's text, with the index of its prompt.
fn decode_all(tokenizer: &Tokenizer, outs: &[(usize, Generation)]) -> Vec<(usize, String)> {
    outs.iter().map(|(p, g)| (*p, tokenizer.decode(&g.tokens.iter().map(|&x| x as u32).collect::<Vec<_>>()))).collect()
}

/// Rewards of completions (texts) of the given prompts: total and per function.
fn score(rewards: &[Reward], prompts: &[&PromptRow], texts: &[(usize, String)]) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let samples: Vec<Sample> = texts
        .iter()
        .map(|(p, c)| Sample { prompt: &prompts[*p].text, completion: c, answer: prompts[*p].answer.as_deref() })
        .collect();
    let per: Vec<Vec<f64>> = rewards.iter().map(|r| r.score(&samples)).collect::<Result<_>>()?;
    let total = (0..samples.len()).map(|i| rewards.iter().zip(&per).map(|(r, v)| r.weight * v[i]).sum()).collect();
    Ok((total, per))
}

/// Greedy completions of every eval prompt, scored; the prompts are shared out over the ranks
/// and each prompt's numbers come from one rank, so summing them over the ranks is exact.
fn evaluate(model: &mut Model<Cpu>, prompts: &[PromptRow], cx: &RolloutContext) -> Result<GrpoStats> {
    let mine = kiln_dist::shard(prompts.len(), cx.comm.rank(), cx.comm.size());
    let refs: Vec<&PromptRow> = prompts[mine.clone()].iter().collect();
    let outs = rollout(model, &refs, cx.g, cx.stop_ids, 0, true, 0);
    let (total, per) = score(cx.rewards, &refs, &decode_all(cx.tokenizer, &outs))?;
    // Per prompt: reward, solved, completion length.
    let n = prompts.len();
    let mut numbers = vec![0.0; 3 * n];
    for (k, (_, g)) in outs.iter().enumerate() {
        let i = mine.start + k;
        numbers[i] = total[k];
        numbers[n + i] = f64::from(u8::from(per.first().is_some_and(|v| v[k] >= 1.0)));
        numbers[2 * n + i] = g.tokens.len() as f64;
    }
    cx.comm.all_reduce_sum_f64(&mut numbers, "eval rollouts")?;
    let mean = |part: usize| numbers[part * n..(part + 1) * n].iter().sum::<f64>() / n.max(1) as f64;
    Ok(GrpoStats { reward: mean(0), solved: mean(1), completion_length: mean(2) })
}

/// Each completion's token log-probs from the forward's nll (`sequences`: one row each, ids
/// and prompt length), and the token weights ∂L/∂nll_t = −∂L/∂logp_t of the policy loss.
/// `old` is filled with these log-probs on the first call (the sampling policy's, taken with
/// the training forward) and kept for later iterations.
fn token_weights(
    nll: &[f32],
    sequences: &[(Vec<i32>, usize)],
    advantages: &[f64],
    old: &mut Option<Vec<Vec<f64>>>,
    reference: Option<&[Vec<f64>]>,
    params: &PolicyLossParams,
    seq: usize,
) -> (Vec<f32>, crate::grpo_loss::PolicyLoss) {
    let completion = |(ids, p): &(Vec<i32>, usize)| *p - 1..ids.len() - 1;
    let logp = completion_logps(nll, sequences, seq);
    let old = old.get_or_insert_with(|| logp.clone());
    let batch: Vec<Completion> = (0..sequences.len())
        .map(|r| Completion {
            logp: &logp[r],
            old_logp: &old[r],
            ref_logp: reference.map(|rf| rf[r].as_slice()),
            advantage: advantages[r],
        })
        .collect();
    let out = policy_loss(&batch, params);
    let mut w = vec![0f32; nll.len()];
    for (r, (s, d)) in sequences.iter().zip(&out.dlogp).enumerate() {
        for (j, t) in completion(s).enumerate() {
            w[r * seq + t] = -d[j] as f32;
        }
    }
    (w, out)
}

/// A sampled completion as a training row: prompt + completion (+ the stop token when it
/// stopped on one), cut to `seq`, with the prompt's length.
pub(crate) fn completion_row(
    prompt: &[i32],
    tokens: &[i32],
    stopped: bool,
    stop_ids: &[i32],
    seq: usize,
) -> (Vec<i32>, usize) {
    let mut ids = [prompt, tokens].concat();
    if stopped {
        ids.extend(stop_ids);
    }
    ids.truncate(seq);
    (ids, prompt.len())
}

/// Every completion token's log-prob, from a forward's nll over one row per completion.
fn completion_logps(nll: &[f32], sequences: &[(Vec<i32>, usize)], seq: usize) -> Vec<Vec<f64>> {
    sequences
        .iter()
        .enumerate()
        .map(|(r, (ids, p))| (*p - 1..ids.len() - 1).map(|t| -nll[r * seq + t] as f64).collect())
        .collect()
}

/// A rollout batch ready for training, reused for `num_iterations` steps: one row per kept
/// completion (prompt + completion + stop token), in micro-batches of `micro_batch` rows.
struct Rollout {
    sequences: Vec<(Vec<i32>, usize)>,
    advantages: Vec<f64>,
    /// Completions and completion tokens trained on in the step, over all ranks.
    completions: usize,
    tokens: usize,
    /// The sampling policy's log-probs per micro-batch, taken by the first step's forward.
    old: Vec<Option<Vec<Vec<f64>>>>,
    /// The frozen reference's log-probs per micro-batch (β > 0).
    reference: Option<Vec<Vec<Vec<f64>>>>,
    /// Steps trained on it so far.
    updates: usize,
    stats: GrpoStats,
    /// The rollout's metrics (rewards, lengths, entropy, speed), logged with each step.
    metrics: Value,
    /// Where its prompts come from, for error messages.
    describe: String,
}

impl Rollout {
    fn micro_batches(&self, size: usize) -> std::slice::Chunks<'_, (Vec<i32>, usize)> {
        self.sequences.chunks(size)
    }
}

/// Sums of a step's micro-batch losses and metrics (metrics weighted by tokens).
#[derive(Default)]
struct UpdateTotals {
    loss: f64,
    kl: f64,
    clipped_low: f64,
    clipped_high: f64,
}

impl UpdateTotals {
    fn add(&mut self, out: &crate::grpo_loss::PolicyLoss, chunk: &[(Vec<i32>, usize)]) {
        let tokens = chunk.iter().map(|(ids, p)| ids.len() - p).sum::<usize>() as f64;
        self.loss += out.loss;
        self.kl += out.kl * tokens;
        self.clipped_low += out.clipped_low * tokens;
        self.clipped_high += out.clipped_high * tokens;
    }
}

/// Samples `group_size` completions of each of this rank's prompts (the step's completions
/// from `first` on), scores them, and lays out the ones to train on (rows of `seq` tokens)
/// with their advantages; the metrics are the whole step's, summed over the ranks.
fn rollout_batch(
    model: &mut Model<Cpu>,
    prompts: &[&PromptRow],
    cx: &RolloutContext,
    seed: u64,
    first: usize,
) -> Result<Rollout> {
    let (g, stop_ids) = (cx.g, cx.stop_ids);
    let started = Instant::now();
    let outs = rollout(model, prompts, g, stop_ids, seed, false, first);
    let rollout_s = started.elapsed().as_secs_f64();
    let (total, per) = score(cx.rewards, prompts, &decode_all(cx.tokenizer, &outs))?;
    let adv = advantages(&total, g.group_size, g.scale_rewards);

    // Completions to train on: whole groups, unless dynamic sampling drops flat ones; a
    // completion that stopped trains on its stop token too.
    let keep: Vec<usize> = (0..outs.len())
        .filter(|&i| !(g.dynamic_sampling && group_is_flat(&total[i / g.group_size * g.group_size..][..g.group_size])))
        .collect();
    let sequences: Vec<(Vec<i32>, usize)> = keep
        .iter()
        .map(|&i| {
            let (p, o) = &outs[i];
            completion_row(&prompts[*p].ids, &o.tokens, o.finish == FinishReason::Stop, stop_ids, cx.seq)
        })
        .collect();
    // The step's sums over all ranks: completions, Σr, Σr², solved, generated tokens, Σ
    // entropy, kept completions, their tokens, and Σr per reward function.
    let mut sums = vec![
        total.len() as f64,
        total.iter().sum(),
        total.iter().map(|r| r * r).sum(),
        per.first().map_or(0, |v| v.iter().filter(|&&x| x >= 1.0).count()) as f64,
        outs.iter().map(|(_, o)| o.tokens.len()).sum::<usize>() as f64,
        outs.iter().flat_map(|(_, o)| &o.entropies).map(|&h| h as f64).sum(),
        keep.len() as f64,
        sequences.iter().map(|(ids, p)| ids.len() - p).sum::<usize>() as f64,
    ];
    sums.extend(per.iter().map(|v| v.iter().sum::<f64>()));
    cx.comm.all_reduce_sum_f64(&mut sums, "rollout statistics")?;
    let n = sums[0].max(1.0);
    let (mean, generated) = (sums[1] / n, sums[4]);
    let std = (sums[2] / n - mean * mean).max(0.0).sqrt();
    let solved = sums[3] / n;
    let mut metrics = json!({
        "reward": mean, "reward_std": std, "solved": solved, "entropy": sums[5] / generated.max(1.0),
        "completion_length": generated / n, "trained_completions": sums[6],
        "rollout_tokens_per_s": generated / rollout_s.max(1e-9),
    });
    for (r, sum) in cx.rewards.iter().zip(&sums[8..]) {
        merge(&mut metrics, &json!({format!("reward/{}", r.name): sum / n}));
    }
    let micro_batches = sequences.len().div_ceil(g.micro_batch);
    Ok(Rollout {
        completions: sums[6] as usize,
        tokens: sums[7] as usize,
        advantages: keep.iter().map(|&i| adv[i]).collect(),
        sequences,
        old: vec![None; micro_batches],
        reference: None,
        updates: 0,
        stats: GrpoStats { reward: mean, solved, completion_length: generated / n },
        metrics,
        describe: prompts.iter().map(|p| p.location.as_str()).take(8).collect::<Vec<_>>().join(", "),
    })
}

/// Runs GRPO as configured by `config.grpo`; `quiet` hides the progress bar.
pub fn run(config: &RunConfig, resume: Option<Resume>, quiet: bool) -> Result<RunSummary<GrpoStats>> {
    let Some(g) = config.grpo.clone() else { bail!("the run configuration has no [grpo] section") };
    let rewards = build_rewards(&g.rewards)?;
    let mut session = Session::open(config, resume)?;
    session.plot = crate::metrics::PlotSpec::REWARD;
    // The frozen reference for the KL term: the model the run started from.
    let ep = session.model.expert_parallel().cloned();
    let mut reference = if g.beta != 0.0 { Some(Model::load_with(&session.b, &config.model.path, ep)?) } else { None };
    let (tokenizer, template) = load_tokenizer(session.model_dir())?;
    check_vocab(&session.model, &tokenizer, session.model_dir())?;
    let train = read_prompts(&config.data.train, &tokenizer, template.as_ref())?;
    let eval = if config.data.eval.is_empty() {
        Vec::new()
    } else {
        read_prompts(&config.data.eval, &tokenizer, template.as_ref())?
    };
    let stop_ids: Vec<i32> = tokenizer.eos_id.map(|e| e as i32).into_iter().collect();
    let t = &config.train;
    let schedule = crate::schedule::Schedule::for_run(t, (train.len() / g.prompts_per_step) as u64);
    let total_steps = schedule.total_steps;
    let seq = config.data.max_seq_len;
    let mut train_acts = ActivationsPool::new(&session.model.config, seq, true, t.recompute);
    let mut ref_acts = reference.as_ref().map(|r| ActivationsPool::new(&r.config, seq, false, false));

    let comm = session.comm;
    let cx = RolloutContext { g: &g, rewards: &rewards, tokenizer: &tokenizer, stop_ids: &stop_ids, seq, comm };
    session.start_progress(total_steps, quiet);
    let (mut last, mut eval_before, mut eval_stats, mut interrupted) = (GrpoStats::default(), None, None, false);
    if session.state.step == 0 && !eval.is_empty() {
        let s = evaluate(&mut session.model, &eval, &cx)?;
        session.metrics.write(&with_step(0, json!({"eval_reward": s.reward, "eval_solved": s.solved})))?;
        eval_before = Some(s);
    }
    let mut rollout: Option<Rollout> = None;
    while session.state.step < total_steps {
        if rollout.as_ref().is_none_or(|r| r.updates == g.num_iterations) {
            let step = session.state.step;
            // Prompts of this rollout: a pure function of seed and step, like the SFT data order.
            let mut rng = Rng::new(t.seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
            let prompts: Vec<&PromptRow> = (0..g.prompts_per_step).map(|_| &train[rng.below(train.len())]).collect();
            // Data parallel: each rank samples its own share of the step's prompts.
            let mine = session.my_share(prompts.len());
            let first = mine.start * g.group_size;
            let sampled = rollout_batch(&mut session.model, &prompts[mine], &cx, t.seed ^ step, first)?;
            let idle = match reference {
                Some(_) => session.idle_forwards_needed(sampled.sequences.len().div_ceil(g.micro_batch))?,
                None => 0,
            };
            let reference = reference.as_mut().zip(ref_acts.as_mut()).map(|(r, pool)| {
                let logps = sampled
                    .micro_batches(g.micro_batch)
                    .map(|chunk| {
                        let batch = Batch::completions(chunk, seq, 0.0);
                        completion_logps(&r.nll(&session.b, pool.get(&session.b, chunk.len()), &batch), chunk, seq)
                    })
                    .collect();
                (0..idle).for_each(|_| r.serve_experts_forward(&session.b));
                logps
            });
            rollout = Some(Rollout { reference, ..sampled });
        }
        let r = rollout.as_mut().expect("sampled above");
        session.begin_step();
        let params = PolicyLossParams {
            epsilon_low: g.epsilon,
            epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
            beta: g.beta,
            aggregation: g.loss_type,
            level: g.importance_sampling,
            max_completion_length: g.max_new_tokens,
            num_items: r.tokens,
            completions: r.completions,
            tokens: r.tokens,
        };
        let mut totals = UpdateTotals::default();
        let idle = session.idle_backwards_needed(r.sequences.len().div_ceil(g.micro_batch))?;
        for (k, chunk) in r.sequences.chunks(g.micro_batch).enumerate() {
            let first = k * g.micro_batch;
            let batch = Batch::completions(chunk, seq, 1.0 / r.tokens.max(1) as f32);
            let acts = train_acts.get(&session.b, chunk.len());
            let advantages = &r.advantages[first..first + chunk.len()];
            let reference = r.reference.as_ref().map(|rf| rf[k].as_slice());
            let old = &mut r.old[k];
            let mut weights_of = |nll: &[f32]| -> Vec<f32> {
                let (w, out) = token_weights(nll, chunk, advantages, old, reference, &params, seq);
                totals.add(&out, chunk);
                w
            };
            session.model.forward_backward_with(&session.b, acts, &batch, &mut session.grads, &mut weights_of);
        }
        session.idle_backwards(idle);
        r.updates += 1;
        let mut token_sums = [totals.kl, totals.clipped_low, totals.clipped_high];
        comm.all_reduce_sum_f64(&mut token_sums, &format!("policy statistics at step {}", session.state.step + 1))?;
        let update = session.update(totals.loss, &schedule, || r.describe.clone())?;
        last = r.stats;
        let n = r.tokens.max(1) as f64;
        let mut fields = r.metrics.clone();
        merge(
            &mut fields,
            &json!({"loss": update.loss, "kl": token_sums[0] / n, "clipped_low": token_sums[1] / n,
                    "clipped_high": token_sums[2] / n, "iteration": r.updates}),
        );
        let message = format!("reward {:.3}", r.stats.reward);
        session.log_step(fields, r.tokens as u64, r.tokens as u64, &update, &message)?;

        let step = session.state.step;
        if !eval.is_empty() && session.eval_due(total_steps) {
            let s = evaluate(&mut session.model, &eval, &cx)?;
            session.metrics.write(&with_step(step, json!({"eval_reward": s.reward, "eval_solved": s.solved})))?;
            session.bar.println(format!("step {step}: eval reward {:.3}, solved {:.3}", s.reward, s.solved));
            eval_stats = Some(s);
        }
        interrupted = session.checkpoint_if_due(total_steps)?;
        if interrupted {
            break;
        }
    }
    session.summary("kiln grpo", last, (eval_before, eval_stats), interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo_loss::{Aggregation, ImportanceLevel};
    use kiln_model::{Activations, Config};

    const TINY: &str = r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}"#;

    #[test]
    fn token_weights_give_the_gradient_of_the_policy_loss() {
        let seq = 10;
        let sequences = vec![(vec![1, 2, 3, 4, 5], 2), (vec![1, 2, 6, 7, 8, 9, 10], 2), (vec![11, 12, 13, 14], 3)];
        let advantages = [1.0, -0.7, 0.4];
        let batch = Batch::completions(&sequences, seq, 0.0);
        let cfg = Config::parse(TINY).unwrap();
        let mut model = Model::random(&Cpu, cfg.clone(), 5);
        let mut acts = Activations::new(&Cpu, &cfg, sequences.len(), seq, true, false);
        // The sampling policy's log-probs: those of a slightly different model, so that ratios
        // differ from 1 and some clip.
        let mut sampler = Model::random(&Cpu, cfg, 6);
        let old_nll = sampler.nll(&Cpu, &mut acts, &batch);
        let mut old = None;
        token_weights(
            &old_nll,
            &sequences,
            &advantages,
            &mut old,
            None,
            &PolicyLossParams {
                epsilon_low: 0.2,
                epsilon_high: 0.28,
                beta: 0.0,
                aggregation: Aggregation::Grpo,
                level: ImportanceLevel::Token,
                max_completion_length: 8,
                num_items: 12,
                completions: 3,
                tokens: 9,
            },
            seq,
        );
        // A frozen reference for the KL term: a third model.
        let mut reference = Model::random(&Cpu, Config::parse(TINY).unwrap(), 7);
        let ref_logp = completion_logps(&reference.nll(&Cpu, &mut acts, &batch), &sequences, seq);
        let rf = Some(ref_logp.as_slice());
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
                completions: 3,
                tokens: 9,
            };
            let loss_at = |model: &mut Model<Cpu>, acts: &mut Activations<Cpu>| {
                let nll = model.nll(&Cpu, acts, &batch);
                token_weights(&nll, &sequences, &advantages, &mut old.clone(), rf, &params, seq).1.loss
            };
            let mut grads = model.zeros_like_params(&Cpu);
            let mut weights_of =
                |nll: &[f32]| token_weights(nll, &sequences, &advantages, &mut old.clone(), rf, &params, seq).0;
            model.forward_backward_with(&Cpu, &mut acts, &batch, &mut grads, &mut weights_of);
            let h = 1e-2f32;
            for (tensor, i) in [(0usize, 33usize), (0, 170), (2, 7), (5, 30), (9, 11)] {
                model.params.iter_mut()[tensor][i] += h;
                let up = loss_at(&mut model, &mut acts);
                model.params.iter_mut()[tensor][i] -= 2.0 * h;
                let down = loss_at(&mut model, &mut acts);
                model.params.iter_mut()[tensor][i] += h;
                let numeric = (up - down) / (2.0 * h as f64);
                let analytic = grads.iter()[tensor][i] as f64;
                assert!(
                    (analytic - numeric).abs() < 2e-4 + 0.03 * numeric.abs(),
                    "{aggregation:?}/{level:?} tensor {tensor}[{i}]: analytic {analytic}, numeric {numeric}"
                );
            }
        }
    }
}
