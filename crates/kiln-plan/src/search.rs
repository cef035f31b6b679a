//! Evaluating one layout, and searching all layouts of a cluster for the fastest that fit.

use crate::device::Cluster;
use crate::job::{Job, Layout, Recompute};
use crate::memory::{self, Memory};
use crate::time::{self, StepTime};
use anyhow::{bail, Result};
use serde::Serialize;

/// Share of HBM a plan may use; the rest is left to the runtime, communication buffers and
/// allocator fragmentation.
pub const USABLE_HBM: f64 = 0.9;

#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub layout: Layout,
    /// The layers of each pipeline stage (one entry without pipeline parallel).
    pub stage_layers: Vec<usize>,
    pub memory: Memory,
    pub time: StepTime,
    /// Memory a device may use.
    pub usable: f64,
    pub fits: bool,
    /// Why it does not fit (when it does not).
    pub reason: Option<String>,
}

impl Estimate {
    /// Device-hours per billion trained tokens.
    pub fn hours_per_billion_tokens(&self) -> f64 {
        1e9 / self.time.tokens_per_s / 3600.0
    }

    pub fn device_hours_per_trillion_tokens(&self) -> f64 {
        self.layout.devices() as f64 * 1e12 / self.time.tokens_per_s / 3600.0
    }
}

/// Memory and time of `job` on `layout`; an error when the layout cannot run the model on
/// the cluster at all (it does not divide the devices, the heads, the experts, ...).
pub fn evaluate(job: &Job, cluster: &Cluster, layout: &Layout) -> Result<Estimate> {
    layout.check(&job.model, layout.devices(), cluster.device.per_node)?;
    if layout.devices() > cluster.count {
        bail!("{layout}: needs {} devices, the cluster has {}", layout.devices(), cluster.count);
    }
    let usable = cluster.device.hbm_gb * crate::GB * USABLE_HBM;
    // Under interleaving stage s holds virtual stages s, s + pp, ..: its layers are theirs.
    let virtual_layers = job.stage_cut.counts(&job.model, layout.pp * layout.vpp)?;
    let stage_layers: Vec<usize> =
        (0..layout.pp).map(|s| virtual_layers.iter().skip(s).step_by(layout.pp).sum()).collect();
    let memory = memory::estimate(job, layout, &stage_layers, usable);
    let time = time::estimate(job, layout, &stage_layers, &cluster.device, &memory);
    let reason = if memory.peak > usable {
        Some(format!("needs {:.1} GB of the {:.1} GB usable per device", memory.peak / crate::GB, usable / crate::GB))
    } else if job.method.has_rollout() && memory.rollout_concurrency < 1.0 {
        Some("no room left for a single rollout sequence's KV cache".into())
    } else if job.global_batch_tokens < (layout.dp as f64) * job.micro_batch_tokens() {
        Some(format!(
            "the global batch ({} tokens) is smaller than one micro-batch per data-parallel rank",
            job.global_batch_tokens
        ))
    } else {
        None
    };
    Ok(Estimate { layout: *layout, stage_layers, memory, time, usable, fits: reason.is_none(), reason })
}

/// The most parts a pipeline stage is interleaved into in the search: each halves the bubble
/// again for twice the hand-overs and more activations in flight on the first stages, and
/// Megatron-LM's published runs stay within this.
const MOST_INTERLEAVED_PARTS: usize = 4;

/// Interleavings worth trying: none without a pipeline; with one, up to
/// `MOST_INTERLEAVED_PARTS` parts a stage while every part keeps a layer.
fn interleavings(pp: usize, layers: usize) -> std::ops::RangeInclusive<usize> {
    match pp {
        1 => 1..=1,
        _ => 1..=(layers / pp).clamp(1, MOST_INTERLEAVED_PARTS),
    }
}

fn divisors(n: usize) -> impl Iterator<Item = usize> {
    (1..=n).filter(move |d| n.is_multiple_of(*d))
}

/// Device counts worth trying: all of them, and whole nodes down to 90% of the cluster (a
/// count with few divisors, such as 1,000, often leaves the best layouts a few devices short).
fn device_counts(cluster: &Cluster) -> Vec<usize> {
    let per_node = cluster.device.per_node;
    let mut counts = vec![cluster.count];
    let floor = (cluster.count as f64 * 0.9).ceil() as usize;
    let mut n = cluster.count / per_node * per_node;
    while n >= floor.max(1) && n > 0 {
        if n != cluster.count {
            counts.push(n);
        }
        n -= per_node;
    }
    counts
}

/// The layouts that fit, fastest first (at most `top`); an error explaining why when none does.
pub fn search(job: &Job, cluster: &Cluster, top: usize) -> Result<Vec<Estimate>> {
    let m = &job.model;
    let per_node = cluster.device.per_node;
    let experts = m.moe.as_ref().map_or(1, |e| e.experts);
    let mut fits = Vec::new();
    let mut smallest: Option<Estimate> = None;
    for devices in device_counts(cluster) {
        for tp in divisors(per_node.min(8)).filter(|tp| m.heads.is_multiple_of(*tp) && devices.is_multiple_of(*tp)) {
            for pp in divisors(devices / tp).filter(|pp| *pp <= m.layers) {
                let dp = devices / (tp * pp);
                for (ep, vpp) in divisors(dp)
                    .filter(|ep| experts.is_multiple_of(*ep))
                    .flat_map(|ep| interleavings(pp, m.layers).map(move |vpp| (ep, vpp)))
                {
                    for zero in 0..=3 {
                        for recompute in Recompute::ALL {
                            let layout = Layout { dp, tp, pp, vpp, ep, zero, recompute, sequence_parallel: true };
                            let Ok(e) = evaluate(job, cluster, &layout) else { continue };
                            if e.fits {
                                fits.push(e);
                            } else if smallest.as_ref().is_none_or(|s| e.memory.peak < s.memory.peak) {
                                smallest = Some(e);
                            }
                        }
                    }
                }
            }
        }
    }
    if fits.is_empty() {
        let Some(s) = smallest else {
            bail!("no layout of {} x {} can hold {}", cluster.count, cluster.device.name, m.model_type);
        };
        bail!(
            "does not fit on {} x {}: the least memory any layout needs is {:.1} GB per device ({}), against {:.1} GB usable ({} GB HBM, {:.0}% usable)",
            cluster.count,
            cluster.device.name,
            s.memory.peak / crate::GB,
            s.layout,
            s.usable / crate::GB,
            cluster.device.hbm_gb,
            USABLE_HBM * 100.0
        );
    }
    fits.sort_by(|a, b| {
        b.time.tokens_per_s.total_cmp(&a.time.tokens_per_s).then(a.memory.peak.total_cmp(&b.memory.peak))
    });
    fits.truncate(top);
    Ok(fits)
}
