//! Memory per device for a job on a layout: the fullest pipeline stage's share of the model
//! and its optimizer, the activations backward keeps, and for rollouts the KV cache. Every
//! stage is estimated (its layers, what it holds outside them, its micro-batches in flight) and
//! the one with the highest peak reported.

use crate::job::{Job, Layout, Method, Optimizer, Recompute, Storage};
use crate::model::ParamCounts;
use serde::Serialize;

/// One term of the memory estimate, in bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Term {
    pub name: &'static str,
    pub bytes: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    /// Parameters on the fullest device (before ZeRO sharding): outside and inside routed experts.
    pub params_non_expert: f64,
    pub params_expert: f64,
    pub terms: Vec<Term>,
    /// The larger of the training phase (everything but the KV cache) and the rollout phase
    /// (everything but activations and logits).
    pub peak: f64,
    /// Rollouts: sequences one model replica decodes at once (limited by memory).
    pub rollout_concurrency: f64,
}

impl Memory {
    pub fn term(&self, name: &str) -> f64 {
        self.terms.iter().find(|t| t.name == name).map_or(0.0, |t| t.bytes)
    }
}

/// What each term counts, for `--explain`.
pub const EXPLAIN: &[(&str, &str)] = &[
    ("storage", "--storage mixed (the default) as below; f32 (kiln's engine): weights and gradients in f32 (4 B/param each), the weights their own master copy (no master term), ZeRO-3 holding two gathered layers (one prefetched) plus the embedding and head"),
    ("weights", "bf16 weights (2 B/param) of the fullest pipeline stage (of the cut, by default kiln's even one, the first L mod P stages a layer more: the stage whose peak is highest; the first holds the embedding, the last the head, a tied one a copy of the embedding), split by tp (the embedding and head by vocabulary rows) but for the norms, MLA's down-projections and the routers (and by ep for routed experts); sharded over data parallel at ZeRO-3"),
    ("gradients", "bf16 gradients (2 B/param) of the same parameters; sharded over data parallel from ZeRO-2"),
    ("master weights", "f32 master copy (4 B/param); sharded from ZeRO-1"),
    ("optimizer states", "AdamW: f32 first and second moments (8 B/param); Muon: one f32 momentum (4 B/param) for hidden matrices, AdamW's 8 B for embeddings, head and vectors; sharded from ZeRO-1. Routed experts shard over dp/ep ranks (each expert's replicas), the rest over dp"),
    ("optimizer scratch", "Muon orthogonalises whole matrices: the largest one gathered in f32 with a work copy; ZeRO-3 gathers one layer's weights ahead (two layers in flight)"),
    ("activations", "what backward keeps per token per layer (by recomputation mode: none, selective = DeepSeek-V3's set, full = layer inputs plus one layer's working set), for the stage's layers, micro-batch tokens, and the micro-batches in flight on the stage under 1F1B (pp - s on stage s; interleaved, (2(pp - s - 1) + (vpp - 1)·pp + 1) / vpp); split by tp (with sequence parallel; sp=off keeps the residual stream's tensors whole on every rank of the group: 4 per layer without recomputation, 2 selective, the layer input under full; of DeepSeek-V4, its hyper-connected streams and norm outputs)"),
    ("logits", "the last stage's f32 logits of one micro-batch (tokens x vocab / tp) for the loss (none on the others)"),
    ("reference model", "grpo with a KL term: a frozen bf16 copy of the policy, placed like the weights; dpo needs none (kiln precomputes reference log-probs once)"),
    ("teacher model", "distill: the teacher's bf16 weights, placed like the student's"),
    ("kv cache", "rollouts: bf16 KV cache (MLA: its latent; DeepSeek-V4: compressed entries) of the sequences one replica decodes at once, for the stage's layers, split by tp; decoding runs in waves when a replica's share of the step does not fit"),
];

/// The parameters of pipeline stage `stage` of `pp`, which holds `layers` layers, the embedding
/// on the first stage, head and MTP layers on the last (a tied head as a copy of the embedding,
/// as Megatron-LM and kiln keep it): the non-expert ones, the routed experts, and of the
/// non-expert ones those outside the layers (embedding and head). kiln's engine (f32 storage)
/// carries MTP layers through untrained, outside its training state.
fn stage_params(job: &Job, (stage, pp): (usize, usize), layers: usize) -> (f64, f64, f64) {
    let m = &job.model;
    let p = &m.params;
    let no_mtp = ParamCounts::default();
    let mtp = if job.storage == Storage::F32 { &no_mtp } else { &m.mtp };
    if pp == 1 {
        let outer = p.embedding + p.lm_head;
        return (p.non_expert() + mtp.non_expert(), p.routed_experts + mtp.routed_experts, outer);
    }
    let per_layer_ne = (p.attention + p.dense_mlp + p.shared_experts + p.router + p.other) / m.layers as f64;
    let per_layer_ex = p.routed_experts / m.layers as f64;
    let (mut ne, mut ex, mut outer) = (layers as f64 * per_layer_ne, layers as f64 * per_layer_ex, 0.0);
    if stage == 0 {
        (ne, outer) = (ne + p.embedding, outer + p.embedding);
    }
    if stage + 1 == pp {
        let head = if p.lm_head > 0.0 { p.lm_head } else { p.embedding };
        (ne, ex, outer) = (ne + head + mtp.non_expert(), ex + mtp.routed_experts, outer + head);
    }
    (ne, ex, outer)
}

/// The optimizer's bytes per parameter beyond the master copy, over a stage's parameters.
fn optimizer_bytes(opt: Optimizer, p: &ParamCounts, ne: f64, ex: f64) -> (f64, f64) {
    match opt {
        Optimizer::AdamW => (8.0 * ne, 8.0 * ex),
        Optimizer::Muon => {
            // Embeddings, head and vectors keep AdamW; the share of them in `ne` follows the model's.
            let adamw = (p.embedding + p.lm_head + p.other) / p.non_expert().max(1.0);
            (ne * (8.0 * adamw + 4.0 * (1.0 - adamw)), 4.0 * ex)
        }
    }
}

/// One pipeline stage's memory but for the rollouts' KV cache.
struct StageMemory {
    params: (f64, f64),
    /// Every term but the KV cache.
    terms: Vec<Term>,
    /// Held between steps (and through rollouts).
    resident: f64,
    /// Held at the peak of a training step.
    train_phase: f64,
    /// KV cache per sequence a rollout decodes.
    per_sequence: f64,
}

/// The memory of the fullest device: the pipeline stage (of the cut's `stage_layers`, each
/// stage with its layers, the first the embedding and the most micro-batches in flight, the last the head
/// and logits) whose peak is highest.
pub fn estimate(job: &Job, layout: &Layout, stage_layers: &[usize], capacity: f64) -> Memory {
    let stages: Vec<StageMemory> =
        stage_layers.iter().enumerate().map(|(s, &layers)| stage_memory(job, layout, s, layers)).collect();
    // A replica decodes the same sequences on every stage: as many at once as the tightest
    // stage has room for, of its share of the step.
    let concurrency = match job.method.has_rollout() {
        true => {
            let share = (job.global_batch_tokens / job.seq / layout.dp as f64).ceil().max(1.0);
            let room = stages
                .iter()
                .map(|st| ((capacity - st.resident) / st.per_sequence).floor().max(0.0))
                .fold(f64::INFINITY, f64::min);
            share.min(room)
        }
        false => 0.0,
    };
    let peak = |st: &StageMemory| st.train_phase.max(st.resident + concurrency * st.per_sequence);
    let fullest = stages.into_iter().max_by(|a, b| peak(a).total_cmp(&peak(b))).expect("at least one stage");
    let mut terms = fullest.terms.clone();
    terms.push(Term { name: "kv cache", bytes: concurrency * fullest.per_sequence });
    Memory {
        params_non_expert: fullest.params.0,
        params_expert: fullest.params.1,
        terms,
        peak: peak(&fullest),
        rollout_concurrency: concurrency,
    }
}

/// Stage `stage`'s memory, holding `layers` layers.
fn stage_memory(job: &Job, layout: &Layout, stage: usize, layers: usize) -> StageMemory {
    let m = &job.model;
    let l = layout;
    let (stage_ne, stage_ex, stage_outer) = stage_params(job, (stage, l.pp), layers);
    // Tensor parallel splits the embedding and head over the vocabulary.
    let stage_layers = layers as f64;
    let whole = stage_layers * m.tp_whole;
    let ne = (stage_ne - whole) / l.tp as f64 + whole;
    let ex = stage_ex / (l.tp * l.ep) as f64;
    let (dp_ne, dp_ex) = (l.dp as f64, (l.dp / l.ep) as f64);
    let shard = |stage: u8, bytes_ne: f64, bytes_ex: f64| {
        if l.zero >= stage {
            bytes_ne / dp_ne + bytes_ex / dp_ex
        } else {
            bytes_ne + bytes_ex
        }
    };
    // Bytes per parameter of the weights and of the gradients, and of a master copy.
    let (unit, master_unit) = match job.storage {
        Storage::Mixed => (2.0, 4.0),
        Storage::F32 => (4.0, 0.0),
    };
    let weights = shard(3, unit * ne, unit * ex);
    let gradients = shard(2, unit * ne, unit * ex);
    let master = shard(1, master_unit * ne, master_unit * ex);
    let (opt_ne, opt_ex) = optimizer_bytes(job.optimizer, &m.params, ne, ex);
    let optimizer = shard(1, opt_ne, opt_ex);
    let muon_scratch = if job.optimizer == Optimizer::Muon { 2.0 * 4.0 * m.largest_matrix / l.tp as f64 } else { 0.0 };
    let per_layer = |values: f64| values / stage_layers.max(1.0);
    let zero3_scratch = match (l.zero >= 3, job.storage) {
        (false, _) => 0.0,
        (true, Storage::Mixed) => 2.0 * 2.0 * per_layer(ne + ex),
        (true, Storage::F32) => {
            let outer = stage_outer / l.tp as f64;
            4.0 * (2.0 * per_layer(ne - outer + ex) + outer)
        }
    };

    let tokens = job.micro_batch_tokens();
    let micro_batches = (job.global_batch_tokens / (l.dp as f64 * tokens)).ceil().max(1.0);
    // 1F1B: stage s runs pp - s forwards before its first backward. Interleaved (Megatron's
    // schedule): 2(pp - s - 1) + (vpp - 1)·pp forwards of a part (1/vpp of the stage) and the
    // steady state's one.
    let in_flight = match l.vpp {
        1 => ((l.pp - stage) as f64).min(micro_batches),
        v => ((2 * (l.pp - stage - 1) + (v - 1) * l.pp + 1) as f64).min(micro_batches * v as f64) / v as f64,
    };
    let tp = l.tp as f64;
    let activations = match l.recompute {
        Recompute::None => in_flight * tokens * stage_layers * m.saved_none / tp,
        Recompute::Selective => in_flight * tokens * stage_layers * m.saved_selective / tp,
        Recompute::Full => (in_flight * stage_layers * m.residual_bytes + m.saved_none) * tokens / tp,
    };
    // Without sequence parallel the residual-stream-sized tensors a layer keeps (its input,
    // the residual after attention and both norms' outputs; under selective recomputation
    // the norms' inputs; under full the input) are whole on every rank of the group.
    let stream = match l.recompute {
        Recompute::None => m.stream_saved.0,
        Recompute::Selective => m.stream_saved.1,
        Recompute::Full => m.residual_bytes,
    };
    let whole_stream = match l.sequence_parallel {
        true => 0.0,
        false => in_flight * tokens * stage_layers * stream * (1.0 - 1.0 / tp),
    };
    let activations = activations + whole_stream;
    let logits = if stage + 1 == l.pp { tokens * m.vocab * 4.0 / tp } else { 0.0 };
    let frozen = |total: &ParamCounts| {
        let share_ne = total.non_expert() / (m.params.non_expert() + m.mtp.non_expert()).max(1.0);
        let share_ex = total.routed_experts / (m.params.routed_experts + m.mtp.routed_experts).max(1.0);
        shard(3, 2.0 * ne * share_ne, 2.0 * ex * share_ex)
    };
    let reference = if job.method == Method::Grpo && job.reference { weights } else { 0.0 };
    let teacher = match (job.method, &job.teacher) {
        (Method::Distill, Some(t)) => frozen(&t.params),
        (Method::Distill, None) => weights,
        _ => 0.0,
    };
    let resident = weights + gradients + master + optimizer + muon_scratch.max(zero3_scratch) + reference + teacher;
    let terms = vec![
        Term { name: "weights", bytes: weights },
        Term { name: "gradients", bytes: gradients },
        Term { name: "master weights", bytes: master },
        Term { name: "optimizer states", bytes: optimizer },
        Term { name: "optimizer scratch", bytes: muon_scratch.max(zero3_scratch) },
        Term { name: "activations", bytes: activations },
        Term { name: "logits", bytes: logits },
        Term { name: "reference model", bytes: reference },
        Term { name: "teacher model", bytes: teacher },
    ];
    StageMemory {
        params: (ne, ex),
        terms,
        resident,
        train_phase: resident + activations + logits,
        per_sequence: job.seq * m.kv_bytes * stage_layers / tp,
    }
}
