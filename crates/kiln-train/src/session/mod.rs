//! What every training recipe shares around its loss: the output directory and resume point,
//! the model and its update (`DataParallel`), MoE load balancing, checkpoints, metrics, the
//! progress bar and SIGINT/SIGTERM. `trainer::train` drives it step by step.
//!
//! Data parallel: every rank runs the same recipe on its share of each step's data with
//! token weights normalised over the whole step; `update` sums the gradients (and the loss and
//! expert loads) over the ranks before clipping, so every rank takes the same update and the
//! weights stay identical. Rank 0 alone shows progress, writes metrics, plots and checkpoints.
//! What only matters on several ranks is in `parallel`; checkpoints are in `checkpointing`.

mod checkpointing;
mod parallel;

use crate::checkpoint::{self, State};
use crate::config::{OptimizerKind, RunConfig, TrainSection};
use crate::data::{check_vocab, load_tokenizer};
use crate::data_parallel::{shard_ranks, DataParallel, Ranks};
use crate::metrics::{Metrics, PlotSpec};
use crate::schedule::Schedule;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::{AdamW as Hyper, Backend};
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_model::{Model, ModelShare, StageSplit};
use parallel::{expert_groups, layout_groups, LayoutGroups};
use serde_json::{json, Value};
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

/// What a run computes on: a backend, and the ranks of the job (one process: `Local`).
pub struct Runtime<B: Backend> {
    pub b: B,
    pub world: Ranks<B>,
}

/// Loads the model a run trains from a directory: only this rank's share of it (its routed
/// experts, its pipeline stage, its tensor blocks), reading no more than that.
pub type Loader<'a, B> = &'a dyn Fn(&B, &Path, ModelShare<B>) -> Result<Model<B>>;

/// The `Loader` of a causal LM.
pub fn load_model<B: Backend>(b: &B, dir: &Path, share: ModelShare<B>) -> Result<Model<B>> {
    Ok(Model::load_share(b, dir, share, None)?)
}

pub struct Session<B: Backend> {
    pub b: B,
    /// The ranks of the run.
    pub comm: Ranks<B>,
    /// The ranks that share out the data (each with a replica of the model, or under tensor
    /// parallel each with its group's blocks of it): `comm`, or under tensor parallel the ranks
    /// at the same place in every tensor group. Sums of losses and statistics run over these.
    pub data: Ranks<B>,
    pub model: Model<B>,
    /// Gradients, their reduction over the ranks and the optimizer: backward's `GradSink`.
    pub dp: DataParallel<B>,
    pub state: State,
    pub metrics: Metrics,
    pub bar: ProgressBar,
    pub out_dir: PathBuf,
    /// The directory the model was loaded from: the configured model, or the checkpoint
    /// resumed from (a checkpoint is a complete model directory).
    pub model_dir: PathBuf,
    pub resumed: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// What `finish` plots: the losses unless a recipe says otherwise.
    pub plot: PlotSpec,
    pub train: TrainSection,
    model_files: Vec<(String, Vec<u8>)>,
    keep_last: usize,
    save_every: u64,
    stop: Arc<AtomicBool>,
    /// When training (not start-up) began, when the current step began, and the tokens and
    /// seconds of training steps so far (eval and checkpoints excluded), for tokens/s.
    started: Instant,
    step_started: Instant,
    tokens_seen: u64,
    step_seconds: f64,
    non_finite_streak: u32,
    /// Seconds of the current step spent summing its gradients over the ranks after its
    /// passes (`start_reduce` and `update`'s reduction: what backward did not hide).
    grad_reduce_seconds: f64,
    /// Measured: the process's peak resident memory from its start to the model and optimizer
    /// state loaded, reported with the run's first step.
    load_peak_mb: Option<f64>,
}

/// How a recipe's run ended; `S` is its statistics (loss, accuracy, ...).
#[derive(Clone, Debug)]
pub struct RunSummary<S> {
    pub steps: u64,
    /// Of the last step.
    pub last: S,
    /// On the eval data: before training (when the run starts at step 0) and at the end.
    pub eval_before: Option<S>,
    pub eval: Option<S>,
    /// Tokens per second of training steps (start-up, eval and checkpoints excluded).
    pub tokens_per_s: f64,
    pub seconds: f64,
    pub checkpoint: PathBuf,
    pub plot: PathBuf,
    /// Stopped by SIGINT/SIGTERM before the last step (a checkpoint was saved).
    pub interrupted: bool,
}

/// The outcome of one optimizer step.
pub struct StepUpdate {
    pub lr: f32,
    pub grad_norm: f64,
    /// The update was skipped: the loss or the gradients were not finite.
    pub skipped: bool,
    /// The step's loss, summed over the ranks of a data-parallel run.
    pub loss: f64,
    /// `lr`, `grad_norm`, memory, the seconds of the gradients' reduction and of the optimizer,
    /// and, for MoE models, the experts' loads and balance loss.
    pub record: Value,
}

impl<B: Backend> Session<B> {
    /// A frozen model beside the trained one (a reference, a teacher), computing in the same
    /// precision; this rank's `share` of it.
    pub fn load_frozen(&self, dir: &Path, share: ModelShare<B>) -> Result<Model<B>> {
        let mut model = Model::load_share(&self.b, dir, share, None)?;
        model.set_matmul_precision(self.model.matmul_precision());
        Ok(model)
    }

    /// The reference model of a preference or RL run (the weights at `dir`, frozen), laid out
    /// as the trained model is: its share of the routed experts, its pipeline stage, its
    /// tensor blocks and (ZeRO-3) its shard of the weights, so the two run on the same
    /// activations and an idle pass of either gathers as a pass of the other does.
    pub fn load_reference(&self, dir: &Path) -> Result<Model<B>> {
        let share = ModelShare {
            experts: self.model.expert_parallel().cloned(),
            stages: self.model.pipeline().map(|pp| Arc::clone(&pp.group)),
            split: self
                .model
                .pipeline()
                .map_or(StageSplit::Even, |pp| StageSplit::Given(pp.stage_layers.iter().map(|r| r.len()).collect())),
            virtual_stages: self.model.pipeline().map_or(1, |pp| pp.parts()),
            tensors: self.model.tensor_parallel().map(|tp| Arc::clone(&tp.group)),
            sequence_parallel: self.model.config.sequence_parallel.is_some(),
            carries: false,
            params: self.dp.weight_shard_ranks(),
        };
        let mut reference = self.load_frozen(dir, share)?;
        reference.prefetch_gathers(self.train.zero3_prefetch);
        Ok(reference)
    }

    /// Opens the run's output directory, finds the checkpoint to resume from, loads the model
    /// (with `load`, from the configured directory or the checkpoint) and, on resume, the
    /// optimizer state, and starts listening for SIGINT/SIGTERM.
    pub fn open(rt: Runtime<B>, config: &RunConfig, resume: Option<Resume>, load: Loader<B>) -> Result<Self> {
        let Runtime { b, world: comm } = rt;
        let out_dir = config.output.dir.clone();
        std::fs::create_dir_all(&out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
        let ckpt_root = out_dir.join("checkpoints");
        if comm.is_root() {
            checkpoint::clean_partial(&ckpt_root);
        }
        let resume_dir = match resume {
            None => None,
            Some(Resume::From(dir)) => Some(dir),
            Some(Resume::Latest) => Some(
                checkpoint::list(&ckpt_root)
                    .pop()
                    .with_context(|| format!("--resume: no checkpoint under {}", ckpt_root.display()))?,
            ),
        };
        let model_dir = resume_dir.clone().unwrap_or_else(|| config.model.path.clone());
        let t = &config.train;
        if let Some(spec) = &t.layout {
            crate::layout::RunLayout::parse(spec)
                .and_then(|l| l.check_ranks(spec, comm.size()))
                .map_err(anyhow::Error::msg)?;
        }
        let LayoutGroups { tensor: tensor_group, pipeline, data } = layout_groups::<B>(&comm, t.tp, t.pp)?;
        // The expert groups are data-parallel ranks: under tensor parallel, the ranks at the
        // same place of every tensor group.
        let (expert_parallel, replicas) = match t.ep {
            1 => (None, None),
            ep => {
                let (group, replicas) = expert_groups(data.as_ref(), ep, &model_dir)?;
                (Some(group), Some(replicas))
            }
        };
        // The carried tensors are written by data rank 0 alone (`Session::write_part`).
        let carries = data.rank() == 0 && parallel::writes_whole_tensors::<B>(tensor_group.as_ref(), pipeline.as_ref());
        let split = t.pp_layers.split().map_err(anyhow::Error::msg)?;
        // ZeRO-3: each rank reads only its shard of the weights.
        let params =
            DataParallel::<B>::shards_weights(t.zero, &data).then(|| shard_ranks::<B>(&data, replicas.clone()));
        let share = ModelShare {
            experts: expert_parallel,
            stages: pipeline,
            split,
            virtual_stages: t.vpp,
            tensors: tensor_group,
            sequence_parallel: t.sequence_parallel,
            carries,
            params,
        };
        let mut model = load(&b, &model_dir, share).with_context(|| {
            format!("loading this rank's part of the model (`train.tp` = {}, `train.pp` = {})", t.tp, t.pp)
        })?;
        model.moe_aux_alpha = t.moe_aux_loss_alpha;
        model.prefetch_gathers(t.zero3_prefetch);
        model.set_matmul_precision(t.dtype.precision(&b));
        if comm.is_root() {
            eprintln!("{}", crate::config::describe_precision(&b, model.matmul_precision()));
        }
        let hyper =
            Hyper { lr: t.lr, beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay, step: 0 };
        let muon = (t.optimizer == OptimizerKind::Muon).then(|| t.muon.clone());
        let mut dp = DataParallel::new(&b, &model, (&data, replicas), t.zero, hyper, muon);
        dp.overlap_grad_reduce(t.overlap_grad_reduce);
        if model.pipeline().is_some() {
            // ZeRO-2's reductions, ZeRO-3's gathers and expert parallel's exchanges run per
            // chunk, collectives of the data-parallel peers: every pass then has the same
            // chunks, whatever its rows.
            let fixed = dp.reduces_in_backward() || dp.shards_weights || model.expert_parallel().is_some();
            let chunks = match (t.pp_chunks, fixed) {
                (0, true) => (2 * t.pp).min(config.rows()),
                (0, false) => 2 * t.pp,
                (chunks, _) => chunks,
            };
            model.set_pipeline_chunks(chunks, fixed);
            // A generation step's rows (every running sequence) are not a micro-batch's: they
            // are cut into the asked chunks, or twice `pp`, whatever `batch_tokens` holds.
            model.set_generation_chunks(match t.pp_chunks {
                0 => 2 * t.pp,
                chunks => chunks,
            });
        }
        if comm.is_root() {
            eprintln!("{}", dp.describe_optimizer());
        }
        let mut state = State {
            step: 0,
            adam_step: 0,
            tokens: 0,
            num_tokens: 0,
            source_dtype: checkpoint::dtype_name(model.dtype).into(),
            config: config.clone(),
        };
        if let Some(dir) = &resume_dir {
            state = checkpoint::load_moments(&b, dir, &model, &mut dp)?;
            let (saved, asked) = (state.config.train.optimizer, t.optimizer);
            if saved != asked {
                bail!(
                    "{}: the checkpoint holds {saved:?}'s optimizer state, but the run asks for {asked:?} \
                     (`train.optimizer`)",
                    dir.display()
                );
            }
            state.config = config.clone();
            if comm.is_root() {
                eprintln!("resuming from {} at step {}", dir.display(), state.step);
            }
        }
        let metrics = match comm.is_root() {
            true => Metrics::open(&out_dir, resume_dir.as_ref().map(|_| state.step), config.output.tensorboard)?,
            false => Metrics::disabled(),
        };
        let model_files = checkpoint::read_model_files(&model_dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // A second signal while the first is being handled ends the process at once.
            signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))?;
            signal_hook::flag::register(signal, Arc::clone(&stop))?;
        }
        Ok(Self {
            b,
            comm,
            data,
            model,
            dp,
            state,
            metrics,
            bar: ProgressBar::hidden(),
            out_dir,
            model_dir,
            resumed: resume_dir.is_some(),
            last_checkpoint: resume_dir,
            plot: PlotSpec::LOSS,
            train: t.clone(),
            model_files,
            keep_last: config.output.keep_last,
            save_every: config.output.save_every,
            stop,
            started: Instant::now(),
            step_started: Instant::now(),
            tokens_seen: 0,
            step_seconds: 0.0,
            non_finite_streak: 0,
            grad_reduce_seconds: 0.0,
            load_peak_mb: crate::resident::peak_mb(),
        })
    }

    /// `open`, with the model directory's tokenizer and chat template (checked against the model).
    pub fn open_tokenized(
        rt: Runtime<B>,
        config: &RunConfig,
        resume: Option<Resume>,
        load: Loader<B>,
    ) -> Result<(Self, Tokenizer, Option<ChatTemplate>)> {
        let s = Self::open(rt, config, resume, load)?;
        let (tokenizer, template) = load_tokenizer(s.model_dir())?;
        check_vocab(&s.model, &tokenizer, s.model_dir())?;
        Ok((s, tokenizer, template))
    }

    /// Starts the training clock, and shows a progress bar over `total_steps` unless `quiet`.
    pub fn start_progress(&mut self, total_steps: u64, quiet: bool) {
        self.started = Instant::now();
        if quiet || !self.comm.is_root() {
            return;
        }
        self.bar = ProgressBar::new(total_steps);
        self.bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                .expect("static template"),
        );
        self.bar.set_position(self.state.step);
    }

    /// Starts a step: zeroes the gradients, the step's clock and the count of its peak memory.
    pub fn begin_step(&mut self) {
        crate::resident::reset_peak();
        self.step_started = Instant::now();
        self.grad_reduce_seconds = 0.0;
        self.dp.zero_grads(&self.b);
        self.dp.what = format!("gradients at step {}", self.state.step + 1);
        self.model.label_gathers(&format!("weights at step {}", self.state.step + 1));
    }

    /// After the step's passes and before its other collectives: starts whatever of the
    /// gradients' reduction backward has not started (`DataParallel::start_reduce`), timed
    /// with the step's gradient reduction.
    pub fn start_reduce(&mut self) -> Result<()> {
        let started = Instant::now();
        self.dp.start_reduce(&self.b)?;
        self.grad_reduce_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Logs the step just updated: the recipe's `fields`, its `tokens` (real, not padding)
    /// with throughput and elapsed time, and the update's record go to metrics.jsonl;
    /// `message` and tokens/s to the progress bar. `trainable` tokens count into the state.
    pub fn log_step(
        &mut self,
        fields: Value,
        trainable: u64,
        tokens: u64,
        update: &StepUpdate,
        message: &str,
    ) -> Result<()> {
        self.state.tokens += trainable;
        self.state.num_tokens += tokens;
        let dt = self.step_started.elapsed().as_secs_f64();
        self.tokens_seen += tokens;
        self.step_seconds += dt;
        let mut record = with_step(self.state.step, fields);
        merge(
            &mut record,
            &json!({"tokens": tokens, "num_tokens": self.state.num_tokens, "tokens_per_s": tokens as f64 / dt,
                    "step_s": dt, "elapsed_s": self.started.elapsed().as_secs_f64()}),
        );
        merge(&mut record, &update.record);
        self.metrics.write(&record)?;
        self.bar.set_message(format!("{message} lr {:.2e} {:.0} tok/s", update.lr, tokens as f64 / dt));
        self.bar.inc(1);
        Ok(())
    }

    /// Tokens per second of training steps, and seconds since training began.
    pub fn throughput(&self) -> (f64, f64) {
        (self.tokens_seen as f64 / self.step_seconds.max(1e-9), self.started.elapsed().as_secs_f64())
    }

    /// Finishes the step whose gradients backward has left in `dp` and whose loss (this rank's
    /// share) is `loss`: sums both over the ranks, clips to `max_grad_norm`, applies AdamW at
    /// the scheduled rate (or skips the update, with a warning naming `rows()`, when the loss
    /// or gradients are not finite; three such steps in a row end the run), moves the MoE
    /// balancing biases, and counts the step.
    pub fn update(&mut self, loss: f64, schedule: &Schedule, rows: impl Fn() -> String) -> Result<StepUpdate> {
        let loss = self.reduce_scalars(loss)?;
        let b = &self.b;
        let reducing = Instant::now();
        self.dp.reduce(b)?;
        self.grad_reduce_seconds += reducing.elapsed().as_secs_f64();
        let updating = Instant::now();
        let norm = self.dp.norm(b)?;
        let lr = schedule.lr(self.state.step);
        self.state.step += 1;
        let skipped = !loss.is_finite() || !norm.is_finite();
        if skipped {
            self.non_finite_streak += 1;
            self.bar.println(format!(
                "warning: step {}: loss {loss}, grad norm {norm}: update skipped (rows {})",
                self.state.step,
                rows()
            ));
            if self.non_finite_streak >= 3 {
                bail!("step {}: non-finite loss or gradients 3 steps in a row (rows {})", self.state.step, rows());
            }
        } else {
            self.non_finite_streak = 0;
            let max = self.train.max_grad_norm as f64;
            let scale = if max > 0.0 && norm > max { (max / norm) as f32 } else { 1.0 };
            self.dp.what = format!("weights at step {}", self.state.step);
            self.dp.step(b, &mut self.model.params, lr, scale)?;
            self.state.adam_step = self.dp.hyper.step;
        }
        let optimizer_s = updating.elapsed().as_secs_f64();
        let rate = if skipped { 0.0 } else { self.train.router_bias_rate };
        let expert_load = self.model.update_router_bias(b, rate);
        let aux_loss = std::mem::take(&mut self.model.moe_aux_loss);
        let (expert_load, aux_loss) = self.over_stages(expert_load, aux_loss)?;
        // What this rank holds between steps: f32 weights whole (its share of the routed experts
        // under expert parallel) or (ZeRO-3) its shard with room for gathered layers, gradients
        // whole or (ZeRO-2/3) its shard, moments whole or (ZeRO-1/2/3) its shard.
        let mut record = json!({
            "learning_rate": lr, "grad_norm": norm, "weights_mb": (self.model.weights_len(b) * 4) as f64 / 1e6,
            "gradients_mb": self.dp.gradient_bytes() as f64 / 1e6,
            "optimizer_state_mb": self.dp.state_bytes() as f64 / 1e6,
            "grad_reduce_s": self.grad_reduce_seconds, "optimizer_s": optimizer_s,
        });
        if let Some(peak) = crate::resident::peak_mb() {
            // Measured: the process's peak resident memory over the step.
            record["peak_resident_mb"] = peak.into();
        }
        if let Some(peak) = self.load_peak_mb.take() {
            record["load_peak_resident_mb"] = peak.into();
        }
        add_expert_load(&mut record, &expert_load);
        if self.train.moe_aux_loss_alpha != 0.0 {
            record["moe_aux_loss"] = aux_loss.into();
        }
        Ok(StepUpdate { lr, grad_norm: norm, skipped, loss, record })
    }

    /// Whether the step just counted is due an evaluation: every `train.eval_every` steps,
    /// and the last.
    pub fn eval_due(&self, total_steps: u64) -> bool {
        let (step, every) = (self.state.step, self.train.eval_every);
        step == total_steps || (every > 0 && step.is_multiple_of(every))
    }

    /// Writes a checkpoint when one is due (every `output.save_every` steps, at the last step,
    /// and when SIGINT/SIGTERM asked the run to stop); returns whether the run must stop.
    pub fn checkpoint_if_due(&mut self, total_steps: u64) -> Result<bool> {
        let step = self.state.step;
        let last = step == total_steps;
        let interrupted = self.stop_agreed(step)? && !last;
        if last || interrupted || (self.save_every > 0 && step.is_multiple_of(self.save_every)) {
            self.checkpoint()?;
        }
        if interrupted {
            self.bar.println(format!("interrupted: checkpoint saved at step {step}; continue with --resume"));
        }
        Ok(interrupted)
    }

    /// Ends the run: clears the bar, draws the plot (`title`), and sums it up with the
    /// recipe's statistics; the newest checkpoint is written if the run has none.
    pub fn summary<S>(
        &mut self,
        title: &str,
        last: S,
        (eval_before, eval): (Option<S>, Option<S>),
        interrupted: bool,
    ) -> Result<RunSummary<S>> {
        let (tokens_per_s, seconds) = self.throughput();
        self.bar.finish_and_clear();
        let plot = self.out_path(self.plot.file);
        if self.comm.is_root() {
            crate::metrics::plot(&self.out_path("metrics.jsonl"), &plot, title, self.plot)?;
        }
        let checkpoint = match &self.last_checkpoint {
            Some(c) => c.clone(),
            None => self.checkpoint()?,
        };
        Ok(RunSummary {
            steps: self.state.step,
            last,
            eval_before,
            eval,
            tokens_per_s,
            seconds,
            checkpoint,
            plot,
            interrupted,
        })
    }

    /// Whether SIGINT or SIGTERM asked the run to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Replaces a model-directory file that checkpoints carry (a reward model's config.json).
    pub fn set_model_file(&mut self, name: &str, bytes: Vec<u8>) {
        self.model_files.retain(|(n, _)| n != name);
        self.model_files.push((name.to_string(), bytes));
    }

    pub fn out_path(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }
}

/// Adds each MoE layer's tokens per expert (`expert_load`, keyed by layer) and their mean
/// max/mean ratio over layers (`expert_load_imbalance`, 1 when perfectly even) to a record.
fn add_expert_load(record: &mut Value, loads: &[Vec<u64>]) {
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
    let by_layer: serde_json::Map<String, Value> = moe.iter().map(|(i, l)| (i.to_string(), json!(l))).collect();
    record["expert_load"] = by_layer.into();
    record["expert_load_imbalance"] = imbalance.into();
}

/// `record` with its `step`.
pub fn with_step(step: u64, mut record: Value) -> Value {
    merge(&mut record, &json!({"step": step}));
    record
}

/// Merges the fields of `extra` into `record`.
pub fn merge(record: &mut Value, extra: &Value) {
    if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
        r.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}
