//! On-policy distillation: the student samples completions of the prompts, the teacher (any
//! model kiln loads, same tokenizer) scores the same tokens, and the student learns to match
//! the teacher where it actually goes. The loss, averaged over completion tokens, is the
//! per-token reverse KL over the full vocabulary (a backend op, `reverse_kl_backward`),
//!
//!   KL_t = Σ_v p(v) (log p(v) − log q(v)),   ∂KL_t/∂z_v = p(v) (log p(v) − log q(v) − KL_t)
//!
//! (p student, q teacher, z student logits), or, with `estimator = "sampled"`, its
//! sampled-token estimate: the surrogate Σ_t sg(log p(y_t) − log q(y_t)) · log p(y_t), whose
//! gradient is the score-function estimate of ∇KL. A step's completions go through both
//! models in chunks of `chunk_rows` rows, so neither model's vocabulary-wide logits are ever
//! held for the whole step.

use crate::config::{DistillSection, RunConfig};
use crate::data_parallel::{shard_ranks, DataParallel};
use crate::rollout::{completion_row, row_length, sample, step_prompts};
use crate::schedule::Schedule;
use crate::session::{load_model, Resume, RunSummary, Runtime, Session, StepUpdate};
use crate::trainer::{train, Recipe, StepPlan};
use anyhow::{bail, Result};
use kiln_core::Backend;
use kiln_data::prompts::{read_prompts, PromptRow};
use kiln_model::generator::FinishReason;
use kiln_model::sampler::SamplingParams;
use kiln_model::ModelShare;
use kiln_model::{ActivationsPool, Batch, ChunkOrder, Model};
use serde_json::{json, Value};
use std::sync::Arc;

/// Mean reverse KL (per completion token) of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DistillStats {
    pub reverse_kl: f64,
    pub completion_length: f64,
}

struct Distill<B: Backend> {
    d: DistillSection,
    teacher: Model<B>,
    prompts: Vec<PromptRow>,
    stop_ids: Vec<i32>,
    seq: usize,
    seed: u64,
    student_pool: ActivationsPool<B>,
    teacher_pool: ActivationsPool<B>,
    /// The step's completions on this rank, and the completions and tokens over all ranks.
    sequences: Vec<(Vec<i32>, usize)>,
    completions: usize,
    tokens: usize,
}

impl<B: Backend> Recipe<B> for Distill<B> {
    type Micro = usize;
    type Tally = ();
    type Stats = DistillStats;

    fn plan(&mut self, s: &mut Session<B>) -> Result<StepPlan<usize>> {
        let (d, step) = (&self.d, s.state.step);
        let prompts = step_prompts(&self.prompts, self.seed, step, d.prompts_per_step);
        // Data parallel: each rank samples its own share of the step's prompts.
        let mine = s.my_share(prompts.len());
        let params = SamplingParams {
            temperature: d.temperature,
            max_new_tokens: d.max_new_tokens,
            stop_ids: self.stop_ids.clone(),
            ..Default::default()
        };
        let outs = sample(&s.b, &mut s.model, &prompts[mine.clone()], 1, &params, (self.seed ^ step, mine.start));
        self.sequences = outs
            .iter()
            .map(|(p, g)| {
                let prompt = &prompts[mine.start + p].ids;
                completion_row(prompt, &g.tokens, g.finish == FinishReason::Stop, &self.stop_ids, self.seq)
            })
            .filter(|(ids, p)| ids.len() > *p)
            .collect();
        // The step's completions and tokens over all ranks: the loss is their mean.
        let tokens = self.sequences.iter().map(|(ids, p)| ids.len() - p).sum::<usize>();
        let mut counts = [tokens as f64, self.sequences.len() as f64];
        s.data.all_reduce_sum_f64(&mut counts, &format!("completion counts at step {}", step + 1))?;
        (self.tokens, self.completions) = (counts[0] as usize, counts[1] as usize);
        Ok(StepPlan {
            micro_batches: (0..self.sequences.len().div_ceil(d.chunk_rows.max(1))).collect(),
            trainable: self.tokens as u64,
            tokens: self.tokens as u64,
            describe: format!("step {step} prompts"),
        })
    }

    /// The sampled estimator's weights come from the student's log-probs: every forward first.
    fn chunk_order(&self) -> ChunkOrder {
        match self.d.estimator == "sampled" {
            true => ChunkOrder::ForwardsFirst,
            false => ChunkOrder::OneForwardOneBackward,
        }
    }

    fn micro_step(&mut self, s: &mut Session<B>, &k: &usize, _: &mut ()) -> Result<f64> {
        let rows = self.d.chunk_rows.max(1);
        let chunk = &self.sequences[k * rows..((k + 1) * rows).min(self.sequences.len())];
        let n = self.tokens.max(1) as f64;
        let seq = row_length(chunk, self.seq);
        let batch = Batch::completions(chunk, seq, (1.0 / n) as f32);
        let (b, acts) = (&s.b, self.student_pool.get_for(&s.b, chunk.len(), seq));
        let teacher_acts = self.teacher_pool.get_for(b, chunk.len(), seq);
        if self.d.estimator == "sampled" {
            let teacher_nll = self.teacher.nll(b, teacher_acts, &batch);
            let mut loss = 0.0;
            let mut weights_of = |nll: &[f32]| -> Vec<f32> {
                let mut w = vec![0f32; nll.len()];
                for i in (0..nll.len()).filter(|&i| batch.targets[i] >= 0) {
                    // log p − log q = nll_teacher − nll_student.
                    let k1 = (teacher_nll[i] - nll[i]) as f64;
                    loss += k1 / n;
                    w[i] = (-k1 / n) as f32;
                }
                w
            };
            s.model.forward_backward_with(b, acts, &batch, &mut s.dp, &mut weights_of);
            return Ok(loss);
        }
        self.teacher.forward(b, teacher_acts, &batch);
        Ok(s.model.forward_backward_kl(b, acts, &batch, &mut s.dp, &teacher_acts.logits))
    }

    fn idle_frozen_forwards(&mut self, b: &B) {
        self.teacher.idle_forward(b, ChunkOrder::ForwardsFirst);
    }

    fn stats(&self, _: &(), update: &StepUpdate) -> DistillStats {
        DistillStats { reverse_kl: update.loss, completion_length: self.tokens as f64 / self.completions.max(1) as f64 }
    }

    fn record(&self, stats: &DistillStats, _: &str) -> Value {
        json!({"loss": stats.reverse_kl, "reverse_kl": stats.reverse_kl, "completions/mean_length": stats.completion_length})
    }

    fn message(&self, stats: &DistillStats) -> String {
        format!("reverse KL {:.4}", stats.reverse_kl)
    }
}

/// Runs on-policy distillation as configured by `config.distill`.
pub fn run<B: Backend>(
    rt: Runtime<B>,
    config: &RunConfig,
    resume: Option<Resume>,
    quiet: bool,
) -> Result<RunSummary<DistillStats>> {
    let Some(d) = config.distill.clone() else { bail!("the run configuration has no [distill] section") };
    let (mut s, tokenizer, template) = Session::open_tokenized(rt, config, resume, &load_model)?;
    // The teacher is never written: it carries no multi-token-prediction layers. Under tensor
    // parallel it is cut over the same group, so its logits are the student's block of the
    // vocabulary; under ZeRO-3 its weights are sharded over the data-parallel ranks (all of
    // them: it is not expert-parallel) and gathered a layer at a time like the student's.
    let tensors = s.model.tensor_parallel().map(|tp| Arc::clone(&tp.group));
    let params = DataParallel::<B>::shards_weights(config.train.zero, &s.data).then(|| shard_ranks::<B>(&s.data, None));
    let sequence_parallel = s.model.config.sequence_parallel.is_some();
    let share = ModelShare { tensors, sequence_parallel, carries: false, params, ..ModelShare::whole() };
    let mut teacher = s.load_frozen(&d.teacher, share)?;
    teacher.prefetch_gathers(config.train.zero3_prefetch);
    teacher.label_gathers("distillation teacher's weights");
    let (theirs, ours) = (teacher.whole_config().vocab_size, s.model.whole_config().vocab_size);
    if theirs != ours {
        bail!(
            "{}: the teacher's vocab_size {theirs} differs from the student's {ours}; distillation needs the same tokenizer",
            d.teacher.display(),
        );
    }
    let prompts = read_prompts(&config.data.train, &tokenizer, template.as_ref())?;
    let t = &config.train;
    let schedule = Schedule::for_run(t, (prompts.len() / d.prompts_per_step) as u64);
    let seq = config.data.max_seq_len;
    let mut recipe = Distill {
        student_pool: ActivationsPool::new(&s.model.config, seq, true, t.recompute),
        teacher_pool: ActivationsPool::new(&teacher.config, seq, false, false),
        stop_ids: tokenizer.eos_id.map(|e| e as i32).into_iter().collect(),
        d,
        teacher,
        prompts,
        seq,
        seed: t.seed,
        sequences: Vec::new(),
        completions: 0,
        tokens: 0,
    };
    train(&mut s, &mut recipe, &schedule, "kiln distill", quiet)
}
