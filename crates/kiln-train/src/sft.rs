//! Supervised fine-tuning, as one straight loop: load the model and data, then for each
//! optimizer step run its micro-batches forward and backward, clip, update, log, evaluate
//! and checkpoint. Loss is the mean over the step's trainable tokens.

use crate::config::RunConfig;
use crate::loader::{build_batch, describe_rows, pack, real_tokens, trainable_targets, DataOrder, PackedRow};
use crate::schedule::Schedule;
pub use crate::session::Resume;
use crate::session::Session;
use anyhow::{bail, Result};
use kiln_core::{Backend, Cpu};
use kiln_data::example::{Encoder, Example, Tokenized};
use kiln_data::{rows, ChatTemplate, Tokenizer};
use kiln_model::{Activations, Model};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Summary {
    pub steps: u64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
    /// Tokens per second of training steps (start-up, eval and checkpoints excluded).
    pub tokens_per_s: f64,
    pub seconds: f64,
    pub checkpoint: PathBuf,
    pub plot: PathBuf,
    /// Stopped by SIGINT/SIGTERM before the last step (a checkpoint was saved).
    pub interrupted: bool,
}

/// Bounds the list of bad rows printed before a run.
const BAD_ROWS_SHOWN: usize = 10;

/// Tokenizes the files of one split, reporting bad rows; fails when too many are bad.
pub fn encode_split(files: &[PathBuf], encoder: &Encoder, max_bad_fraction: f64, split: &str) -> Result<Vec<Example>> {
    let mut rows = Vec::new();
    for f in files {
        rows.extend(rows::read_rows(f)?);
    }
    let Tokenized { examples, bad } = encoder.encode_all(rows);
    check_bad_rows(split, files, examples.len(), &bad, max_bad_fraction)?;
    Ok(examples)
}

/// Prints the first bad rows of a split, and fails when there are no good rows or more bad
/// ones than `max_bad_fraction` allows.
pub fn check_bad_rows(
    split: &str,
    files: &[PathBuf],
    good: usize,
    bad: &[kiln_data::Error],
    max_bad_fraction: f64,
) -> Result<()> {
    let total = good + bad.len();
    for e in bad.iter().take(BAD_ROWS_SHOWN) {
        eprintln!("warning: {split} row skipped: {e}");
    }
    if bad.len() > BAD_ROWS_SHOWN {
        eprintln!("warning: ... and {} more bad {split} rows", bad.len() - BAD_ROWS_SHOWN);
    }
    if total == 0 {
        bail!(
            "{split} data: no rows in {}",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let fraction = bad.len() as f64 / total as f64;
    if fraction > max_bad_fraction {
        bail!(
            "{split} data: {} of {total} rows are bad ({:.1}%, more than data.max_bad_fraction = {}); first: {}",
            bad.len(),
            100.0 * fraction,
            max_bad_fraction,
            bad[0]
        );
    }
    Ok(())
}

/// The run's train and eval examples, tokenized as the config says; bad rows reported.
pub fn encode_data(
    config: &RunConfig,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let encoder =
        Encoder { tokenizer, template, max_seq_len: config.data.max_seq_len, policy: config.data.length_policy };
    let train = encode_split(&config.data.train, &encoder, config.data.max_bad_fraction, "train")?;
    let eval = if config.data.eval.is_empty() {
        Vec::new()
    } else {
        encode_split(&config.data.eval, &encoder, config.data.max_bad_fraction, "eval")?
    };
    Ok((train, eval))
}

/// The tokenizer and chat template of a model directory.
pub fn load_tokenizer(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = Tokenizer::load(dir)?;
    let template = match &tokenizer.chat_template {
        Some(src) => Some(
            ChatTemplate::new(src, tokenizer.bos_token.clone(), tokenizer.eos_token.clone())
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer_config.json").display()))?,
        ),
        None => None,
    };
    Ok((tokenizer, template))
}

/// Mean loss over the trainable tokens of `micro_batches`.
pub fn evaluate<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    acts: &mut Activations<B>,
    examples: &[Example],
    micro_batches: &[Vec<PackedRow>],
) -> f64 {
    let sums: Vec<f64> = micro_batches.iter().map(|mb| micro_batch_nll(b, model, acts, examples, mb)).collect();
    sums.iter().sum::<f64>()
        / micro_batches.iter().map(|mb| trainable_targets(examples, mb)).sum::<usize>().max(1) as f64
}

/// Σ nll over the trainable tokens of one micro-batch.
fn micro_batch_nll<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    acts: &mut Activations<B>,
    examples: &[Example],
    mb: &[PackedRow],
) -> f64 {
    let batch = build_batch(examples, mb, acts.rows, acts.seq, 1.0);
    let nll = model.nll(b, acts, &batch);
    nll.iter().zip(&batch.weights).map(|(&l, &w)| l as f64 * w as f64).sum::<f64>()
}

/// `evaluate` with the micro-batches shared out over the ranks: each rank's per-micro-batch
/// sums are gathered by an exact all-reduce (one rank contributes each), so the result is the
/// one-process one.
fn evaluate_on_ranks(
    session: &mut Session,
    acts: &mut Activations<Cpu>,
    examples: &[Example],
    micro_batches: &[Vec<PackedRow>],
) -> Result<f64> {
    let (mine, idle) = session.forward_share(micro_batches.len())?;
    let mut sums = vec![0.0; micro_batches.len()];
    for i in mine {
        sums[i] = micro_batch_nll(&session.b, &mut session.model, acts, examples, &micro_batches[i]);
    }
    (0..idle).for_each(|_| session.model.serve_experts_forward(&session.b));
    session.comm.all_reduce_sum_f64(&mut sums, &format!("eval loss at step {}", session.state.step))?;
    let count = micro_batches.iter().map(|mb| trainable_targets(examples, mb)).sum::<usize>();
    Ok(sums.iter().sum::<f64>() / count.max(1) as f64)
}

/// Runs SFT as configured; `quiet` hides the progress bar.
pub fn run(config: &RunConfig, resume: Option<Resume>, quiet: bool) -> Result<Summary> {
    let mut session = Session::open(config, resume)?;
    let (tokenizer, template) = load_tokenizer(session.model_dir())?;
    check_vocab(&session.model, &tokenizer, session.model_dir())?;
    let (train, eval) = encode_data(config, &tokenizer, template.as_ref())?;

    let b = session.b;
    let (rows, seq) = (config.rows(), config.data.max_seq_len);
    let t = &config.train;
    // Data parallel: a step is `grad_accum` micro-batches per rank, each rank taking its own
    // contiguous share, so N ranks see what one rank sees with N times the accumulation.
    let order = DataOrder::new(&train, rows, seq, session.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let total_steps = schedule.total_steps;
    let eval_batches = pack(&eval, rows, seq, None);
    let mut acts = Activations::new(&b, &session.model.config, rows, seq, true, t.recompute);

    session.start_progress(total_steps, quiet);
    let (mut last_loss, mut eval_loss) = (f64::NAN, None);
    let mut interrupted = false;
    if session.state.step == 0 && !eval.is_empty() {
        let l = evaluate_on_ranks(&mut session, &mut acts, &eval, &eval_batches)?;
        session.metrics.write(&json!({"step": 0, "eval_loss": l}))?;
        eval_loss = Some(l);
    }
    while session.state.step < total_steps {
        let micro_batches = order.step(session.state.step);
        let count: usize = micro_batches.iter().map(|mb| trainable_targets(&train, mb)).sum();
        let real_tokens: usize = micro_batches.iter().map(|mb| real_tokens(&train, mb)).sum();
        let weight = 1.0 / count.max(1) as f32;
        session.begin_step();
        let mut loss = 0.0;
        let mine = session.my_share(micro_batches.len());
        let idle = session.idle_backwards_needed(mine.len())?;
        for mb in &micro_batches[mine] {
            let batch = build_batch(&train, mb, rows, seq, weight);
            loss += session.model.forward_backward(&b, &mut acts, &batch, &mut session.grads);
        }
        session.idle_backwards(idle);
        let update = session.update(loss, &schedule, || describe_rows(&train, &micro_batches))?;
        let loss = update.loss;
        last_loss = loss;
        let fields = json!({"loss": loss, "trainable_tokens": count});
        session.log_step(fields, count as u64, real_tokens as u64, &update, &format!("loss {loss:.4}"))?;

        let step = session.state.step;
        if !eval.is_empty() && session.eval_due(total_steps) {
            let l = evaluate_on_ranks(&mut session, &mut acts, &eval, &eval_batches)?;
            session.metrics.write(&json!({"step": step, "eval_loss": l}))?;
            session.bar.println(format!("step {step}: eval loss {l:.4}"));
            eval_loss = Some(l);
        }
        interrupted = session.checkpoint_if_due(total_steps)?;
        if interrupted {
            break;
        }
    }
    let (tokens_per_s, seconds) = session.throughput();
    let (checkpoint, plot) = session.finish("kiln sft")?;
    Ok(Summary {
        steps: session.state.step,
        last_loss,
        eval_loss,
        tokens_per_s,
        seconds,
        checkpoint,
        plot,
        interrupted,
    })
}

/// Refuses a tokenizer with ids beyond the model's embedding.
pub fn check_vocab<B: Backend>(model: &Model<B>, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    if tokenizer.vocab_size() > model.config.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens, the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    Ok(())
}
