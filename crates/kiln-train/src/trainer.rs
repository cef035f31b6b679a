//! The step protocol every recipe shares, in one place: the evaluation before training, then
//! per optimizer step this rank's share of the step, its micro-batches forward and backward,
//! idle passes for a rank with fewer than the others, the update, metrics and progress, the
//! evaluation cadence, checkpoints and SIGINT/SIGTERM, and the summary at the end. A recipe
//! supplies its step's micro-batches, the loss of one, and its statistics.

use crate::loader::{describe_rows, real_tokens, trainable_targets, DataOrder};
use crate::schedule::Schedule;
use crate::session::{merge, with_step, RunSummary, Session, StepUpdate};
use anyhow::Result;
use kiln_core::Backend;
use kiln_data::example::Example;
use kiln_model::ChunkOrder;
use serde_json::Value;

/// Sums a recipe keeps over a step's micro-batches, added up over the ranks.
pub trait Tally: Default {
    /// The sums, in an order every rank shares.
    fn sums(&mut self) -> Vec<&mut f64>;
}

/// A recipe with nothing to add up beyond the loss, which the session sums.
impl Tally for () {
    fn sums(&mut self) -> Vec<&mut f64> {
        Vec::new()
    }
}

/// This rank's work in one step.
pub struct StepPlan<M> {
    pub micro_batches: Vec<M>,
    /// Tokens trained on and tokens processed (not padding) in the whole step, over all ranks.
    pub trainable: u64,
    pub tokens: u64,
    /// Where the step's rows come from, for warnings.
    pub describe: String,
}

impl<M> StepPlan<M> {
    /// Each trainable token's share of a loss averaged over the step's trainable tokens.
    pub fn token_weight(&self) -> f32 {
        1.0 / self.trainable.max(1) as f32
    }
}

impl StepPlan<usize> {
    /// The plan of a recipe whose micro-batches are `order`'s packed rows of `examples`: this
    /// rank's share of the coming step's micro-batches (indices into `order.micro_batches`),
    /// and, second, all of the step's.
    pub fn from_order<B: Backend>(s: &Session<B>, order: &DataOrder, examples: &[Example]) -> (Self, Vec<usize>) {
        // Data parallel: a step is `grad_accum` micro-batches per rank, each rank taking its
        // own contiguous share, so N ranks see what one rank sees with N times the accumulation.
        let step = order.step(s.state.step);
        let micro_batches = || step.iter().map(|&i| &order.micro_batches[i]);
        let plan = Self {
            trainable: micro_batches().map(|mb| trainable_targets(examples, mb)).sum::<usize>() as u64,
            tokens: micro_batches().map(|mb| real_tokens(examples, mb)).sum::<usize>() as u64,
            describe: describe_rows(examples, micro_batches()),
            micro_batches: step[s.my_share(step.len())].to_vec(),
        };
        (plan, step)
    }
}

/// A training recipe as the step protocol sees it.
pub trait Recipe<B: Backend> {
    /// One micro-batch: what one forward and backward covers.
    type Micro;
    /// What `micro_step` adds up over a step.
    type Tally: Tally;
    /// A step's, or an evaluation's, statistics.
    type Stats: Clone + Default;

    /// The step's work (the session's `state.step` is the 0-based step about to be taken).
    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<Self::Micro>>;
    /// Forward-only passes each micro-step runs before its backward (collective under expert
    /// parallel, so idle ranks mirror them).
    fn forwards_per_micro_step(&self) -> usize {
        0
    }
    /// The forwards of the recipe's own frozen models (a distillation teacher) that a micro-step
    /// runs before the trained model's, run idle (`Model::idle_forward`) by an idle pass: under
    /// ZeRO-3 they gather the frozen model's shards, which is collective.
    fn idle_frozen_forwards(&mut self, _: &B) {}
    /// The order of a training pass's chunks under pipeline parallel, which idle passes
    /// mirror: 1F1B unless the loss's token weights are chosen after the forwards.
    fn chunk_order(&self) -> ChunkOrder {
        ChunkOrder::OneForwardOneBackward
    }
    /// Forward and backward of one micro-batch, gradients into `s.dp`; adds into `tally` and
    /// returns this micro-batch's share of the step's loss.
    fn micro_step(&mut self, s: &mut Session<B>, micro: &Self::Micro, tally: &mut Self::Tally) -> Result<f64>;
    /// The step's statistics from its tally (summed over the ranks) and update.
    fn stats(&self, tally: &Self::Tally, update: &StepUpdate) -> Self::Stats;
    /// The metrics fields of `stats`, each key prefixed (`eval_` for evaluations).
    fn record(&self, stats: &Self::Stats, prefix: &str) -> Value;
    /// A short line of `stats` for the progress bar and evaluation messages.
    fn message(&self, stats: &Self::Stats) -> String;
    /// Statistics on the eval data, when there is any.
    fn evaluate(&mut self, _: &mut Session<B>) -> Result<Option<Self::Stats>> {
        Ok(None)
    }
}

/// Trains `recipe` to `schedule.total_steps` (from wherever the session resumed), as every
/// recipe does; `title` heads the plot.
pub fn train<B: Backend, R: Recipe<B>>(
    s: &mut Session<B>,
    recipe: &mut R,
    schedule: &Schedule,
    title: &str,
    quiet: bool,
) -> Result<RunSummary<R::Stats>> {
    let total = schedule.total_steps;
    s.start_progress(total, quiet);
    let (mut last, mut eval_before, mut eval, mut interrupted) = (R::Stats::default(), None, None, false);
    if s.state.step == 0 {
        if let Some(stats) = recipe.evaluate(s)? {
            s.metrics.write(&with_step(0, recipe.record(&stats, "eval_")))?;
            eval_before = Some(stats);
        }
    }
    while s.state.step < total {
        let plan = recipe.plan(s)?;
        s.begin_step();
        let idle = s.idle_backwards_needed(plan.micro_batches.len())?;
        let mut tally = R::Tally::default();
        let mut loss = 0.0;
        let passes = plan.micro_batches.len();
        for (i, micro) in plan.micro_batches.iter().enumerate() {
            if i + 1 == passes && idle == 0 {
                s.dp.last_backward_next();
            }
            loss += recipe.micro_step(s, micro, &mut tally)?;
        }
        let (forwards, order) = (recipe.forwards_per_micro_step(), recipe.chunk_order());
        s.idle_passes_run(idle, forwards, order, &mut |b| recipe.idle_frozen_forwards(b));
        s.start_reduce()?;
        sum_over_ranks(s, &mut tally)?;
        let update = s.update(loss, schedule, || plan.describe.clone())?;
        let stats = recipe.stats(&tally, &update);
        let mut fields = recipe.record(&stats, "");
        merge(&mut fields, &serde_json::json!({"trainable_tokens": plan.trainable}));
        s.log_step(fields, plan.trainable, plan.tokens, &update, &recipe.message(&stats))?;
        last = stats;

        let step = s.state.step;
        if s.eval_due(total) {
            if let Some(stats) = recipe.evaluate(s)? {
                s.metrics.write(&with_step(step, recipe.record(&stats, "eval_")))?;
                s.bar.println(format!("step {step}: eval {}", recipe.message(&stats)));
                eval = Some(stats);
            }
        }
        interrupted = s.checkpoint_if_due(total)?;
        if interrupted {
            break;
        }
    }
    s.summary(title, last, (eval_before, eval), interrupted)
}

/// Adds up `tally` over the ranks.
fn sum_over_ranks<B: Backend>(s: &Session<B>, tally: &mut impl Tally) -> Result<()> {
    if s.data.size() == 1 {
        return Ok(());
    }
    let mut sums = tally.sums();
    let mut values: Vec<f64> = sums.iter().map(|v| **v).collect();
    s.data.all_reduce_sum_f64(&mut values, &format!("step statistics at step {}", s.state.step + 1))?;
    sums.iter_mut().zip(values).for_each(|(v, x)| **v = x);
    Ok(())
}
