//! Supervised fine-tuning, as one straight loop: load the model and data, then for each
//! optimizer step run its micro-batches forward and backward, clip, update, log, evaluate
//! and checkpoint. Loss is the mean over the step's trainable tokens.

use crate::checkpoint::{self, SaveRequest, State};
use crate::config::RunConfig;
use crate::loader::{build_batch, pack, trainable_targets, DataOrder, PackedRow};
use crate::metrics::{plot_losses, Metrics};
use crate::optim::{zero_grads, AdamW};
use crate::schedule::Schedule;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::{AdamW as Hyper, Backend, Cpu};
use kiln_data::example::{Encoder, Example, Tokenized};
use kiln_data::{rows, ChatTemplate, Tokenizer};
use kiln_model::{Activations, Model};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where to pick a run up from.
#[derive(Clone, Debug)]
pub enum Resume {
    /// The newest checkpoint under the run's output directory.
    Latest,
    /// A given checkpoint directory.
    From(PathBuf),
}

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
    let total = examples.len() + bad.len();
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
    Ok(examples)
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
    let (mut sum, mut count) = (0.0f64, 0usize);
    for mb in micro_batches {
        let batch = build_batch(examples, mb, acts.rows, acts.seq, 1.0);
        let nll = model.nll(b, acts, &batch);
        sum += nll.iter().zip(&batch.weights).map(|(&l, &w)| l as f64 * w as f64).sum::<f64>();
        count += trainable_targets(examples, mb);
    }
    sum / count.max(1) as f64
}

/// Runs SFT as configured; `quiet` hides the progress bar.
pub fn run(config: &RunConfig, resume: Option<Resume>, quiet: bool) -> Result<Summary> {
    let b = Cpu;
    let out_dir = &config.output.dir;
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let ckpt_root = out_dir.join("checkpoints");
    checkpoint::clean_partial(&ckpt_root);
    let resume_dir = match resume {
        None => None,
        Some(Resume::From(dir)) => Some(dir),
        Some(Resume::Latest) => Some(
            checkpoint::list(&ckpt_root)
                .pop()
                .with_context(|| format!("--resume: no checkpoint under {}", ckpt_root.display()))?,
        ),
    };
    // A checkpoint is a complete model directory: resume loads from it directly.
    let model_dir = resume_dir.clone().unwrap_or_else(|| config.model.path.clone());
    let mut model = Model::load(&b, &model_dir)?;
    let (tokenizer, template) = load_tokenizer(&model_dir)?;
    if tokenizer.vocab_size() > model.config.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens, the model's vocab_size is {}",
            model_dir.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    let (train, eval) = encode_data(config, &tokenizer, template.as_ref())?;

    let (rows, seq) = (config.rows(), config.data.max_seq_len);
    let t = &config.train;
    let order = DataOrder::new(&train, rows, seq, t.grad_accum, t.seed);
    let total_steps = t.steps.unwrap_or_else(|| t.epochs.unwrap_or(1) * order.steps_per_epoch());
    let eval_batches = pack(&eval, rows, seq, None);
    let schedule = Schedule { lr: t.lr, min_lr: t.min_lr, warmup_steps: t.warmup_steps, total_steps };
    let mut acts = Activations::new(&b, &model.config, rows, seq, true, t.recompute);
    model.moe_aux_alpha = t.moe_aux_loss_alpha;
    let mut grads = model.zeros_like_params(&b);
    let mut optimizer = AdamW::new(&b, &model.layout, t.lr, t.weight_decay);
    optimizer.hyper = Hyper { beta1: t.beta1, beta2: t.beta2, eps: t.eps, ..optimizer.hyper };

    let mut state = State {
        step: 0,
        adam_step: 0,
        tokens: 0,
        source_dtype: checkpoint::dtype_name(model.dtype).into(),
        config: config.clone(),
    };
    if let Some(dir) = &resume_dir {
        state = checkpoint::load_optimizer(&b, dir, &model.layout, &mut optimizer)?;
        state.config = config.clone();
        eprintln!("resuming from {} at step {}", dir.display(), state.step);
    }
    let source_dir = model_dir.clone();
    let mut metrics = Metrics::open(out_dir, resume_dir.as_ref().map(|_| state.step))?;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled ends the process at once.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }

    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total_steps) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
            .expect("static template"),
    );
    bar.set_position(state.step);
    let started = Instant::now();
    let (mut processed_tokens, mut last_loss, mut eval_loss, mut non_finite_streak) = (0u64, f64::NAN, None, 0);
    // Time spent in training steps only (not eval, checkpoints or start-up), for tokens/s.
    let mut step_seconds = 0.0;
    let mut last_checkpoint = resume_dir.clone();
    let mut interrupted = false;
    let save = |state: &State, model: &Model<Cpu>, optimizer: &AdamW<Cpu>| {
        checkpoint::save(
            &b,
            &SaveRequest {
                root: &ckpt_root,
                model,
                optimizer,
                state,
                source_dir: &source_dir,
                keep_last: config.output.keep_last,
            },
        )
    };

    if state.step == 0 && !eval.is_empty() {
        let l = evaluate(&b, &mut model, &mut acts, &eval, &eval_batches);
        metrics.write(&json!({"step": 0, "eval_loss": l}))?;
        eval_loss = Some(l);
    }
    while state.step < total_steps {
        let step_started = Instant::now();
        let micro_batches = order.step(state.step);
        let count: usize = micro_batches.iter().map(|mb| trainable_targets(&train, mb)).sum();
        let weight = 1.0 / count.max(1) as f32;
        zero_grads(&b, &mut grads);
        let mut loss = 0.0;
        let mut real_tokens = 0u64;
        for mb in &micro_batches {
            let batch = build_batch(&train, mb, rows, seq, weight);
            real_tokens += batch.segments.iter().filter(|&&s| s >= 0).count() as u64;
            loss += model.forward_backward(&b, &mut acts, &batch, &mut grads);
        }
        let norm = grads.iter().into_iter().map(|g| b.sum_squares(g)).sum::<f64>().sqrt();
        state.step += 1;
        let lr = schedule.lr(state.step);
        if !loss.is_finite() || !norm.is_finite() {
            non_finite_streak += 1;
            let rows: Vec<&str> = micro_batches
                .iter()
                .flat_map(|mb| mb.iter().flatten())
                .map(|&i| train[i].location.as_str())
                .take(8)
                .collect();
            bar.println(format!(
                "warning: step {}: loss {loss}, grad norm {norm}: update skipped (rows {})",
                state.step,
                rows.join(", ")
            ));
            if non_finite_streak >= 3 {
                bail!("step {}: non-finite loss or gradients 3 steps in a row (rows {})", state.step, rows.join(", "));
            }
        } else {
            non_finite_streak = 0;
            if t.max_grad_norm > 0.0 && norm > t.max_grad_norm as f64 {
                let scale = (t.max_grad_norm as f64 / norm) as f32;
                grads.iter_mut().into_iter().for_each(|g| b.scale(g, scale));
            }
            optimizer.hyper.lr = lr;
            optimizer.step(&b, &mut model.params, &grads);
            state.adam_step = optimizer.hyper.step;
        }
        let skipped = non_finite_streak > 0;
        let expert_load = model.update_router_bias(&b, if skipped { 0.0 } else { t.router_bias_rate });
        state.tokens += count as u64;
        processed_tokens += real_tokens;
        last_loss = loss;
        let dt = step_started.elapsed().as_secs_f64();
        step_seconds += dt;
        let mut record = json!({
            "step": state.step, "loss": loss, "lr": lr, "grad_norm": norm, "trainable_tokens": count,
            "tokens": real_tokens, "tokens_per_s": real_tokens as f64 / dt, "elapsed_s": started.elapsed().as_secs_f64(),
        });
        add_expert_load(&mut record, &expert_load);
        let aux_loss = std::mem::take(&mut model.moe_aux_loss);
        if t.moe_aux_loss_alpha != 0.0 {
            record["moe_aux_loss"] = aux_loss.into();
        }
        metrics.write(&record)?;
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {:.0} tok/s", real_tokens as f64 / dt));
        bar.inc(1);

        let last = state.step == total_steps;
        if !eval.is_empty() && (last || (t.eval_every > 0 && state.step.is_multiple_of(t.eval_every))) {
            let l = evaluate(&b, &mut model, &mut acts, &eval, &eval_batches);
            metrics.write(&json!({"step": state.step, "eval_loss": l}))?;
            bar.println(format!("step {}: eval loss {l:.4}", state.step));
            eval_loss = Some(l);
        }
        interrupted = stop.load(Ordering::SeqCst) && !last;
        let every = config.output.save_every;
        if last || interrupted || (every > 0 && state.step.is_multiple_of(every)) {
            last_checkpoint = Some(save(&state, &model, &optimizer)?);
        }
        if interrupted {
            bar.println(format!("interrupted: checkpoint saved at step {}; continue with --resume", state.step));
            break;
        }
    }
    bar.finish_and_clear();
    let plot = out_dir.join("loss.png");
    plot_losses(&out_dir.join("metrics.jsonl"), &plot, "kiln sft")?;
    let seconds = started.elapsed().as_secs_f64();
    let checkpoint = match last_checkpoint {
        Some(c) => c,
        None => save(&state, &model, &optimizer)?,
    };
    Ok(Summary {
        steps: state.step,
        last_loss,
        eval_loss,
        tokens_per_s: processed_tokens as f64 / step_seconds.max(1e-9),
        seconds,
        checkpoint,
        plot,
        interrupted,
    })
}

/// Adds each MoE layer's tokens per expert (`expert_load`, keyed by layer) and their mean
/// max/mean ratio over layers (`expert_load_imbalance`, 1 when perfectly even) to a record.
fn add_expert_load(record: &mut serde_json::Value, loads: &[Vec<u64>]) {
    let moe: Vec<(usize, &Vec<u64>)> = loads.iter().enumerate().filter(|(_, l)| !l.is_empty()).collect();
    if moe.is_empty() {
        return;
    }
    let ratio = |l: &Vec<u64>| {
        let mean = l.iter().sum::<u64>() as f64 / l.len() as f64;
        if mean > 0.0 {
            *l.iter().max().unwrap_or(&0) as f64 / mean
        } else {
            1.0
        }
    };
    let imbalance = moe.iter().map(|(_, l)| ratio(l)).sum::<f64>() / moe.len() as f64;
    let by_layer: serde_json::Map<String, serde_json::Value> =
        moe.iter().map(|(i, l)| (i.to_string(), json!(l))).collect();
    record["expert_load"] = by_layer.into();
    record["expert_load_imbalance"] = imbalance.into();
}
