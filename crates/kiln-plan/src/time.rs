//! Step time for a job on a layout: matrix FLOPs at an assumed efficiency, the pipeline
//! bubble, communication over the links it crosses (a stated share hidden behind compute),
//! and for rollouts the decode time that HBM bandwidth allows.

use crate::device::Device;
use crate::job::{Job, Layout, Method, Recompute};
use crate::memory::Memory;
use crate::stages;
use serde::Serialize;

/// Seconds of one optimizer step, by part.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepTime {
    /// Forward and backward of the trained tokens (and a teacher's or reference's forward).
    pub compute: f64,
    /// Recomputation during backward.
    pub recompute: f64,
    /// 1F1B pipeline fill and drain: (pp − 1) of every m micro-batches idle (of every vpp·m
    /// with interleaved stages).
    pub bubble: f64,
    /// Communication by kind (data, tensor, pipeline, expert parallel), before overlap.
    pub comm: Vec<(&'static str, f64)>,
    /// The part of communication not hidden behind compute.
    pub exposed_comm: f64,
    /// Rollouts: prefill and decode of the step's completions.
    pub rollout: f64,
    pub step: f64,
    /// Trained tokens per second over the cluster.
    pub tokens_per_s: f64,
}

/// What each part counts, for `--explain`.
pub const EXPLAIN: &[(&str, &str)] = &[
    ("compute", "FLOPs of the step's tokens: 6 x matrix parameters active per token (embedding lookups excluded) plus attention scores and sums at the sequence length (causal: half the sequence on average; sliding windows and compressed attention as configured), over devices x peak bf16 x the assumed efficiency; under pipeline parallel times the cut's pace (the slowest stage's share of the layers' and head's matrix weights, times pp). dpo adds one reference forward per token (computed once, kiln caches it); grpo with a reference adds its forward; distill adds the teacher's forward"),
    ("recompute", "selective: the MLA/low-rank query up-projections' forward again; full: the whole forward again"),
    ("bubble", "1F1B pipeline: (pp - 1) / m of the compute, m = micro-batches per pipeline per step; (pp - 1) / (vpp m) with interleaved stages"),
    ("data parallel", "ring reduce-scatter of bf16 gradients and all-gather of updated weights, 2(g-1)/g x bytes (ZeRO-3: 3(g-1)/g, weights gathered for forward and backward); routed experts over their dp/ep replicas"),
    ("tensor parallel", "4 ring all-reduces of a micro-batch's activations per layer (2 forward, 2 backward; 6 with full recomputation; under sequence parallel each a reduce-scatter and an all-gather of the same bytes), always inside a node"),
    ("pipeline parallel", "each micro-batch's activations forward and their gradients back across each stage boundary (vpp times with interleaved stages), over the scale-out network"),
    ("expert parallel", "all-to-all dispatch and combine of each token's expert copies, forward and backward, per MoE layer; with node-limited routing (topk_group) at most that many copies leave the node. Inside a node when tp x ep fits one, else over the scale-out network"),
    ("exposed communication", "(1 - overlap) of all communication; the rest is assumed hidden behind compute (DualPipe-style schedules, bucketed gradient reduction)"),
    ("rollout", "grpo/distill: each model replica (tp x pp devices) prefills its share of the step's prompts at the training efficiency, then decodes the completions (seq x completion share) in waves of the sequences that fit its KV cache; a decode step reads the stage's weights (the experts the batch touches) and KV cache from HBM once per pipeline stage, or is bound by FLOPs, whichever is slower"),
];

/// Seconds to move `bytes` over a group of `g` ranks in a ring, `factor` passes of (g−1)/g.
fn ring(bytes: f64, g: usize, factor: f64, gb_s: f64) -> f64 {
    if g <= 1 {
        return 0.0;
    }
    factor * (g - 1) as f64 / g as f64 * bytes / (gb_s * 1e9)
}

pub fn estimate(job: &Job, layout: &Layout, stage_layers: &[usize], device: &Device, memory: &Memory) -> StepTime {
    let m = &job.model;
    let l = layout;
    let devices = l.devices() as f64;
    let peak = device.bf16_tflops * 1e12;
    let rate = devices * peak * job.efficiency;
    let tokens = job.global_batch_tokens;
    let seq = job.seq;

    let forward = m.forward_flops(seq);
    let extra_forward = match job.method {
        Method::Dpo => forward,
        Method::Grpo if job.reference => forward,
        Method::Distill => job.teacher.as_ref().map_or(forward, |t| t.forward_flops(seq)),
        _ => 0.0,
    };
    // A pipeline runs at its slowest stage's pace: the cut's uneven layers and the head on the
    // last stage make it wait on that stage.
    let pace = stages::pace(m, stage_layers);
    let compute = pace * tokens * (m.train_flops(seq) + extra_forward) / rate;
    let recompute = pace
        * tokens
        * match l.recompute {
            Recompute::None => 0.0,
            Recompute::Selective => 2.0 * m.up_projection * m.layers as f64,
            Recompute::Full => forward,
        }
        / rate;
    let mb_tokens = job.micro_batch_tokens();
    let micro_batches = (tokens / (l.dp as f64 * mb_tokens)).ceil().max(1.0);
    let bubble = (compute + recompute) * (l.pp - 1) as f64 / (micro_batches * l.vpp as f64);

    // Ranks are laid out tensor-parallel first, then data/expert parallel, then pipeline
    // stages: a group stays in a node while its span of devices fits one.
    let link = |span: usize| {
        if span <= device.per_node {
            device.intra_node_gb_s
        } else {
            device.scale_out_gb_s
        }
    };
    let passes = if l.zero >= 3 { 3.0 } else { 2.0 };
    let ep_groups = l.dp / l.ep;
    let data = ring(2.0 * memory.params_non_expert, l.dp, passes, link(l.tp * l.dp))
        + ring(2.0 * memory.params_expert, ep_groups, passes, link(l.tp * l.dp));
    let most_layers = stage_layers.iter().copied().max().unwrap_or(m.layers) as f64;
    let activation_bytes = mb_tokens * m.hidden * 2.0;
    let tp_reductions = if l.recompute == Recompute::Full { 6.0 } else { 4.0 };
    let tensor =
        tp_reductions * most_layers * micro_batches * ring(activation_bytes, l.tp, 2.0, device.intra_node_gb_s);
    let pipeline = if l.pp > 1 {
        2.0 * l.vpp as f64 * micro_batches * mb_tokens * m.residual_bytes / l.tp as f64 / (device.scale_out_gb_s * 1e9)
    } else {
        0.0
    };
    let expert = match &m.moe {
        Some(moe) if l.ep > 1 => {
            let span = l.tp * l.ep;
            let copies = match moe.max_groups {
                Some(g) if span > device.per_node => (moe.active.min(g)) as f64,
                _ => moe.active as f64,
            };
            let moe_layers = most_layers * moe.layers as f64 / m.layers as f64;
            let bytes = 4.0 * mb_tokens / l.tp as f64 * copies * m.hidden * 2.0 * (l.ep - 1) as f64 / l.ep as f64;
            moe_layers * micro_batches * bytes / (link(span) * 1e9)
        }
        _ => 0.0,
    };
    let comm = vec![
        ("data parallel", data),
        ("tensor parallel", tensor),
        ("pipeline parallel", pipeline),
        ("expert parallel", expert),
    ];
    let exposed_comm = (1.0 - job.overlap) * comm.iter().map(|(_, s)| s).sum::<f64>();
    let rollout = match job.method.has_rollout() {
        true => rollout_seconds(job, (l, most_layers), device, memory),
        false => 0.0,
    };
    let step = compute + recompute + bubble + exposed_comm + rollout;
    StepTime { compute, recompute, bubble, comm, exposed_comm, rollout, step, tokens_per_s: tokens / step }
}

/// Prefill and decode of one step's rollouts on one replica (all replicas run at once).
fn rollout_seconds(job: &Job, (l, stage_layers): (&Layout, f64), device: &Device, memory: &Memory) -> f64 {
    let m = &job.model;
    let replica = (l.tp * l.pp) as f64;
    let peak = device.bf16_tflops * 1e12 * job.efficiency;
    let sequences = (job.global_batch_tokens / job.seq / l.dp as f64).ceil().max(1.0);
    let completion = job.seq * job.completion_share;
    let prompt = job.seq - completion;
    let prefill = sequences * prompt * m.forward_flops(prompt) / (replica * peak);
    let batch = memory.rollout_concurrency.max(1.0);
    let waves = (sequences / batch).ceil();
    // Per decode step and device: the stage's weights (dense part, and the experts the batch
    // touches), and the KV cache of the batch at its mean context, read once per stage.
    let touched = match &m.moe {
        Some(moe) => 1.0 - (1.0 - moe.active as f64 / moe.experts as f64).powf(batch / l.pp as f64),
        None => 1.0,
    };
    let weight_bytes = 2.0 * (memory.params_non_expert + touched * memory.params_expert);
    let kv_bytes = batch * (prompt + completion / 2.0) * m.kv_bytes * stage_layers / l.tp as f64;
    let memory_bound = l.pp as f64 * (weight_bytes + kv_bytes) / (device.hbm_tb_s * 1e12);
    // A token at context c attends c keys: the causal average of a 2c-token sequence.
    let compute_bound = batch * m.forward_flops(2.0 * (prompt + completion / 2.0)) / (replica * peak);
    prefill + waves * completion * memory_bound.max(compute_bound)
}
