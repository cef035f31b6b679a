//! Supervised fine-tuning: the loss of a step is the mean, over its trainable tokens, of each
//! token's negative log-likelihood; TRL's `mean_token_accuracy` is the fraction of them whose
//! target the model ranks first.

use crate::config::RunConfig;
use crate::data::{encode_split, encode_splits, encoder};
use crate::loader::{build_batch, pack, trainable_targets, DataOrder, PackedRow};
use crate::schedule::Schedule;
use crate::session::{load_model, Resume, RunSummary, Runtime, Session, StepUpdate};
use crate::trainer::{train, Recipe, StepPlan, Tally};
use anyhow::Result;
use kiln_core::Backend;
use kiln_data::example::Example;
use kiln_model::{Activations, ChunkOrder, Model};
use serde_json::{json, Value};

/// The loss and token accuracy of a step, or on the eval data.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SftStats {
    pub loss: f64,
    pub mean_token_accuracy: f64,
}

/// Trainable tokens whose target the model ranks first.
#[derive(Default)]
pub struct Correct(f64);

impl Tally for Correct {
    fn sums(&mut self) -> Vec<&mut f64> {
        vec![&mut self.0]
    }
}

/// Mean loss over the trainable tokens of `micro_batches`.
pub fn evaluate<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    acts: &mut Activations<B>,
    examples: &[Example],
    micro_batches: &[Vec<PackedRow>],
) -> f64 {
    let sums: Vec<f64> = micro_batches.iter().map(|mb| micro_batch_nll(b, model, acts, examples, mb).0).collect();
    sums.iter().sum::<f64>()
        / micro_batches.iter().map(|mb| trainable_targets(examples, mb)).sum::<usize>().max(1) as f64
}

/// Σ nll over the trainable tokens of one micro-batch, and how many of them the model predicts.
fn micro_batch_nll<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    acts: &mut Activations<B>,
    examples: &[Example],
    mb: &[PackedRow],
) -> (f64, usize) {
    let batch = build_batch(examples, mb, acts.rows, acts.seq, 1.0);
    let nll = model.nll(b, acts, &batch);
    let loss = nll.iter().zip(&batch.weights).map(|(&l, &w)| l as f64 * w as f64).sum::<f64>();
    (loss, model.correct_tokens(b, acts))
}

struct Sft<B: Backend> {
    train: Vec<Example>,
    eval: Vec<Example>,
    order: DataOrder,
    eval_batches: Vec<Vec<PackedRow>>,
    acts: Activations<B>,
    /// The current step's trainable tokens, and each one's weight: 1 / their number.
    trainable: u64,
    weight: f32,
}

impl<B: Backend> Recipe<B> for Sft<B> {
    type Micro = usize;
    type Tally = Correct;
    type Stats = SftStats;

    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<usize>> {
        let (plan, _) = StepPlan::from_order(s, &self.order, &self.train);
        (self.trainable, self.weight) = (plan.trainable, plan.token_weight());
        Ok(plan)
    }

    fn micro_step(&mut self, s: &mut Session<B>, &i: &usize, correct: &mut Correct) -> Result<f64> {
        let acts = &mut self.acts;
        let batch = build_batch(&self.train, &self.order.micro_batches[i], acts.rows, acts.seq, self.weight);
        let loss = s.model.forward_backward(&s.b, acts, &batch, &mut s.dp);
        correct.0 += s.model.correct_tokens(&s.b, acts) as f64;
        Ok(loss)
    }

    fn stats(&self, correct: &Correct, update: &StepUpdate) -> SftStats {
        SftStats { loss: update.loss, mean_token_accuracy: correct.0 / self.trainable.max(1) as f64 }
    }

    fn record(&self, stats: &SftStats, prefix: &str) -> Value {
        json!({format!("{prefix}loss"): stats.loss, format!("{prefix}mean_token_accuracy"): stats.mean_token_accuracy})
    }

    fn message(&self, stats: &SftStats) -> String {
        format!("loss {:.4}", stats.loss)
    }

    /// The eval loss, the micro-batches shared out over the ranks: each rank's per-micro-batch
    /// sums are gathered by an exact all-reduce (one rank contributes each), so the result is
    /// the one-process one.
    fn evaluate(&mut self, s: &mut Session<B>) -> Result<Option<SftStats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let n = self.eval_batches.len();
        let (mine, idle) = s.forward_share(n)?;
        // Per micro-batch: Σ nll, then the tokens predicted.
        let mut sums = vec![0.0; 2 * n];
        for i in mine {
            let (loss, correct) =
                micro_batch_nll(&s.b, &mut s.model, &mut self.acts, &self.eval, &self.eval_batches[i]);
            (sums[i], sums[n + i]) = (loss, correct as f64);
        }
        (0..idle).for_each(|_| s.model.idle_forward(&s.b, ChunkOrder::ForwardsFirst));
        s.data.all_reduce_sum_f64(&mut sums, &format!("eval loss at step {}", s.state.step))?;
        let count = self.eval_batches.iter().map(|mb| trainable_targets(&self.eval, mb)).sum::<usize>().max(1) as f64;
        let (loss, correct) = (sums[..n].iter().sum::<f64>(), sums[n..].iter().sum::<f64>());
        Ok(Some(SftStats { loss: loss / count, mean_token_accuracy: correct / count }))
    }
}

/// Runs SFT as configured; `quiet` hides the progress bar.
pub fn run<B: Backend>(
    rt: Runtime<B>,
    config: &RunConfig,
    resume: Option<Resume>,
    quiet: bool,
) -> Result<RunSummary<SftStats>> {
    let (mut s, tokenizer, template) = Session::open_tokenized(rt, config, resume, &load_model)?;
    let encoder = encoder(config, &tokenizer, template.as_ref());
    let bad = config.data.max_bad_fraction;
    let (train_examples, eval) = encode_splits(config, |files, split| encode_split(files, &encoder, bad, split))?;
    let (rows, seq) = (config.rows(), config.data.max_seq_len);
    let t = &config.train;
    let order = DataOrder::new(&train_examples, rows, seq, s.step_micro_batches(), t.seed);
    let schedule = Schedule::for_run(t, order.steps_per_epoch());
    let mut sft = Sft {
        eval_batches: pack(&eval, rows, seq, None),
        acts: Activations::new(&s.b, &s.model.config, rows, seq, true, t.recompute),
        train: train_examples,
        eval,
        order,
        trainable: 0,
        weight: 0.0,
    };
    train(&mut s, &mut sft, &schedule, "kiln sft", quiet)
}
