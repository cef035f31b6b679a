//! Verifiable rewards for RL: rules applied to a completion (and the row's reference answer),
//! and external programs for anything else (code sandboxes, reward models, judges).
//!
//! - `exact_match`: the completion's final answer — the last `\boxed{...}`, or the last match
//!   of a configured regex (its first group if it has one) — equals the reference answer:
//!   numerically when both read as numbers (`0.5`, `1/2`, `1,000`), else as trimmed text. 1 or 0.
//! - `format`: 1 if the whole completion matches a regex (e.g. `<think>.*</think>.*`), else 0.
//! - `length`: −(completion characters beyond `max_chars`) / `max_chars`, 0 within it.
//! - `command`: a program that reads one JSON object per completion on stdin (`{"prompt",
//!   "completion", "answer"}` and the prompt row's other columns, as TRL passes a dataset's
//!   columns to reward functions) and writes one number per line on stdout; a crash, a wrong
//!   line count or a run past `timeout_s` is an error naming the reward.
//! - `http`: a POST of `{"samples": [..]}` (JSON; each sample as `command` receives it) to a
//!   URL, answered with `{"rewards": [..]}`, one number per sample; a refused connection, an error
//!   status, a malformed answer or no answer within `timeout_s` is an error naming the reward.
//! - `model`: a reward model trained by `kiln rm`, scoring prompt + completion (its own
//!   tokenizer) at the last token.

use crate::config::RewardSpec;
use anyhow::{bail, Context, Result};
use kiln_core::Backend;
use kiln_model::Model;
use regex::Regex;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One completion to score.
pub struct Sample<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// The row's reference answer, for `exact_match`.
    pub answer: Option<&'a str>,
    /// The row's other columns, which reward programs and endpoints receive too.
    pub columns: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

pub enum RewardFn<B: Backend> {
    ExactMatch { pattern: Option<Regex> },
    Format { pattern: Regex },
    Length { max_chars: usize },
    External(External),
    RewardModel(Box<Mutex<ScoringModel<B>>>),
}

/// A reward computed outside this process, by a program or an HTTP endpoint. Scoring waits on
/// it, so a rollout scores each group with it as soon as the group has finished, while other
/// sequences still decode.
#[derive(Clone)]
pub enum External {
    Command { program: String, args: Vec<String>, timeout: Duration },
    Http { url: String, timeout: Duration },
}

impl External {
    /// The reward of every sample, as the reward `name`.
    pub fn score(&self, name: &str, samples: &[Sample]) -> Result<Vec<f64>> {
        match self {
            External::Command { program, args, timeout } => run_command(name, program, args, *timeout, samples),
            External::Http { url, timeout } => post_samples(name, url, *timeout, samples),
        }
    }
}

/// A reward model and its tokenizer.
pub struct ScoringModel<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: kiln_data::Tokenizer,
}

impl<B: Backend> ScoringModel<B> {
    /// Loads a `kiln rm` model directory (a `...ForSequenceClassification` with one label).
    pub fn load(b: &B, dir: &std::path::Path) -> Result<Self> {
        let model = Model::load(b, dir)?;
        if model.config.num_labels != Some(1) {
            bail!("{}: not a reward model (a ...ForSequenceClassification with num_labels = 1)", dir.display());
        }
        Ok(Self { model, tokenizer: kiln_data::Tokenizer::load(dir)? })
    }

    /// The reward of each text, read at its last token.
    pub fn rewards(&mut self, b: &B, texts: &[String]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<i32>> = texts
            .iter()
            .map(|t| {
                Ok(self.tokenizer.encode(t, false).map_err(anyhow::Error::msg)?.into_iter().map(|x| x as i32).collect())
            })
            .collect::<Result<_>>()?;
        let batch = kiln_model::Batch::causal_lm(&seqs);
        let mut acts = kiln_model::Activations::new(b, &self.model.config, batch.rows, batch.seq, false, false);
        self.model.forward_hidden(b, &mut acts, &batch, false);
        let last: Vec<i32> =
            seqs.iter().enumerate().map(|(r, s)| (r * batch.seq + s.len().max(1) - 1) as i32).collect();
        Ok(self.model.score_forward(b, &acts, &last).into_iter().map(f64::from).collect())
    }
}

/// A named reward function and its weight in the total reward.
pub struct Reward<B: Backend> {
    pub name: String,
    pub weight: f64,
    pub function: RewardFn<B>,
}

/// The configured reward functions (`model` rewards load on `b`).
pub fn build_rewards<B: Backend>(b: &B, specs: &[RewardSpec]) -> Result<Vec<Reward<B>>> {
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
                "command" => RewardFn::External(External::Command {
                    program: s
                        .command
                        .first()
                        .cloned()
                        .with_context(|| format!("reward `{}`: `command` is empty", s.name()))?,
                    args: s.command[1..].to_vec(),
                    timeout: Duration::from_secs_f64(s.timeout_s),
                }),
                "http" => RewardFn::External(External::Http {
                    url: s.url.clone().with_context(|| format!("reward `{}`: `url` is required", s.name()))?,
                    timeout: Duration::from_secs_f64(s.timeout_s),
                }),
                "model" => {
                    let path = s.path.as_ref().with_context(|| format!("reward `{}`: `path` is required", s.name()))?;
                    RewardFn::RewardModel(Box::new(Mutex::new(ScoringModel::load(b, path)?)))
                }
                other => bail!("reward `{other}`: unknown type (exact_match, format, length, command, http, model)"),
            };
            Ok(Reward { name: s.name(), weight: s.weight, function })
        })
        .collect()
}

/// The contents of the last `\boxed{...}`, braces balanced.
fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// A number written as an integer, decimal (thousands commas allowed) or fraction `a/b`.
fn number(text: &str) -> Option<f64> {
    let t = text.trim().trim_end_matches('.').replace(',', "");
    let t = t.strip_prefix('$').unwrap_or(&t);
    if let Some((a, b)) = t.split_once('/') {
        let (a, b) = (a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?);
        return (b != 0.0).then(|| a / b);
    }
    t.parse::<f64>().ok()
}

/// The completion's final answer under `pattern`, or its last `\boxed{}`.
pub fn final_answer<'a>(completion: &'a str, pattern: Option<&Regex>) -> Option<&'a str> {
    match pattern {
        None => last_boxed(completion),
        Some(re) => {
            let caps = re.captures_iter(completion).last()?;
            Some(caps.get(1).or_else(|| caps.get(0))?.as_str())
        }
    }
}

/// Whether two answers agree: as numbers when both are, else as trimmed text.
pub fn answers_match(got: &str, want: &str) -> bool {
    match (number(got), number(want)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
        _ => got.trim() == want.trim(),
    }
}

impl<B: Backend> Reward<B> {
    /// The reward of every sample (a reward model scores on `b`).
    pub fn score(&self, b: &B, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(match &self.function {
            RewardFn::ExactMatch { pattern } => samples
                .iter()
                .map(|s| {
                    let got = final_answer(s.completion, pattern.as_ref());
                    match (got, s.answer) {
                        (Some(g), Some(w)) if answers_match(g, w) => 1.0,
                        _ => 0.0,
                    }
                })
                .collect(),
            RewardFn::Format { pattern } => {
                samples.iter().map(|s| if pattern.is_match(s.completion) { 1.0 } else { 0.0 }).collect()
            }
            RewardFn::Length { max_chars } => samples
                .iter()
                .map(|s| {
                    let over = s.completion.chars().count().saturating_sub(*max_chars);
                    -(over as f64) / (*max_chars).max(1) as f64
                })
                .collect(),
            RewardFn::External(external) => external.score(&self.name, samples)?,
            RewardFn::RewardModel(m) => {
                let texts: Vec<String> = samples.iter().map(|s| format!("{}{}", s.prompt, s.completion)).collect();
                m.lock()
                    .expect("reward model lock")
                    .rewards(b, &texts)
                    .with_context(|| format!("reward `{}`", self.name))?
            }
        })
    }
}

/// A sample as the external rewards (`command`, `http`) receive it.
fn sample_json(s: &Sample) -> serde_json::Value {
    let mut sample = s.columns.cloned().unwrap_or_default();
    sample.insert("prompt".into(), s.prompt.into());
    sample.insert("completion".into(), s.completion.into());
    sample.insert("answer".into(), s.answer.into());
    sample.into()
}

/// Posts the samples to a reward endpoint (see the module docs for the protocol).
fn post_samples(name: &str, url: &str, timeout: Duration, samples: &[Sample]) -> Result<Vec<f64>> {
    let what = || format!("reward `{name}`: POST {url}");
    let body = serde_json::json!({"samples": samples.iter().map(sample_json).collect::<Vec<_>>()}).to_string();
    let config = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
    let agent = ureq::Agent::new_with_config(config);
    let mut response = agent.post(url).header("content-type", "application/json").send(&body).map_err(|e| match e {
        ureq::Error::Timeout(_) => {
            anyhow::anyhow!("{}: no answer within {:.1} s on {} samples", what(), timeout.as_secs_f64(), samples.len())
        }
        e => anyhow::anyhow!("{}: {e}", what()),
    })?;
    let status = response.status();
    let text = response.body_mut().read_to_string().with_context(|| format!("{}: cannot read the answer", what()))?;
    if !status.is_success() {
        bail!("{}: status {status}: {}", what(), text.chars().take(300).collect::<String>());
    }
    let answer: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: the answer is not JSON", what()))?;
    let rewards: Vec<f64> = answer["rewards"]
        .as_array()
        .with_context(|| format!("{}: the answer has no `rewards` array", what()))?
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_f64().with_context(|| format!("{}: rewards[{i}] = {v} is not a number", what())))
        .collect::<Result<_>>()?;
    if rewards.len() != samples.len() {
        bail!("{}: answered {} rewards for {} samples", what(), rewards.len(), samples.len());
    }
    Ok(rewards)
}

/// Runs a reward program over the samples (see the module docs for the protocol).
fn run_command(name: &str, program: &str, args: &[String], timeout: Duration, samples: &[Sample]) -> Result<Vec<f64>> {
    let what = || format!("reward `{name}`: command `{program}`");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{}: cannot start", what()))?;
    let input: String = samples.iter().map(|s| sample_json(s).to_string() + "\n").collect();
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Written from a thread so a program that stops reading cannot block us past the timeout.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{}: timed out after {:.1} s on {} samples", what(), timeout.as_secs_f64(), samples.len());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let tail: String =
            err.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        bail!("{}: exited with {status}: {tail}", what());
    }
    let rewards: Vec<f64> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            l.trim().parse::<f64>().with_context(|| format!("{}: output line {}: `{l}` is not a number", what(), i + 1))
        })
        .collect::<Result<_>>()?;
    if rewards.len() != samples.len() {
        bail!("{}: wrote {} rewards for {} samples", what(), rewards.len(), samples.len());
    }
    Ok(rewards)
}
