//! The session's side of running on several ranks: each rank's share of a step, the idle
//! passes that keep expert groups and ZeRO-2's reductions in step, summing gradients (over
//! all ranks, or each routed expert's over its replicas) and their norm, agreeing on a stop,
//! and the groups and ZeRO spaces expert parallel sets up.

use super::Session;
use crate::grads::Grads;
use crate::zero::{ShardedAdamW, Zero};
use anyhow::{bail, Result};
use kiln_core::{AdamW as Hyper, Backend, Cpu};
use kiln_dist::Comm;
use kiln_model::{Config, ExpertParallel, Model, Weights};
use std::path::Path;
use std::sync::Arc;

impl Session {
    /// Micro-batches in a step over all ranks: `grad_accum` on each.
    pub fn step_micro_batches(&self) -> usize {
        self.train.grad_accum * self.comm.size()
    }

    /// This rank's contiguous share of a step's `len` items (micro-batches, prompts): all of
    /// them in one process.
    pub fn my_share(&self, len: usize) -> std::ops::Range<usize> {
        kiln_dist::shard(len, self.comm.rank(), self.comm.size())
    }

    /// Under expert parallel every forward and backward is collective (expert exchanges), and
    /// under ZeRO-2 every backward (per-layer reductions), so a rank whose share of a step has
    /// fewer passes than another (an epoch's last step, a rollout split unevenly) runs idle
    /// ones after its own. This many backwards, for `mine` of its own; call it before the
    /// passes (it is a collective then).
    pub fn idle_backwards_needed(&self, mine: usize) -> Result<usize> {
        match self.model.expert_parallel().is_some() || matches!(self.grads, Grads::Sharded(_)) {
            true => self.idle_passes(mine),
            false => Ok(0),
        }
    }

    /// `idle_backwards_needed` for forward-only passes (reference log-probs): only expert
    /// parallel makes them collective.
    pub fn idle_forwards_needed(&self, mine: usize) -> Result<usize> {
        match self.model.expert_parallel().is_some() {
            true => self.idle_passes(mine),
            false => Ok(0),
        }
    }

    /// How many passes fewer than the busiest rank this rank has, with `mine` of its own.
    fn idle_passes(&self, mine: usize) -> Result<usize> {
        let mut counts = vec![0f32; self.comm.size()];
        let what = format!("pass counts at step {}", self.state.step + 1);
        self.comm.all_gather(&[mine as f32], &mut counts, &what)?;
        Ok(counts.iter().fold(0f32, |a, &c| a.max(c)) as usize - mine)
    }

    /// This rank's share of `len` forward-only passes (eval, reference log-probs), and how
    /// many idle ones it serves after them under expert parallel (`Model::serve_experts_forward`).
    pub fn forward_share(&self, len: usize) -> Result<(std::ops::Range<usize>, usize)> {
        let mine = self.my_share(len);
        Ok((mine.clone(), self.idle_forwards_needed(mine.len())?))
    }

    /// Runs `n` idle backwards (see `idle_backwards_needed`): this rank's experts serve the
    /// others' rows, or it joins ZeRO-2's reductions with nothing to add.
    pub fn idle_backwards(&mut self, n: usize) {
        for _ in 0..n {
            match &mut self.grads {
                Grads::Sharded(sharded) if self.model.expert_parallel().is_none() => sharded.idle_backward(),
                grads => self.model.serve_experts(&self.b, grads, self.train.recompute),
            }
        }
    }

    /// Data parallel: sums the step's loss and MoE expert loads over the ranks; returns the loss.
    pub(super) fn reduce_scalars(&mut self, loss: f64, what: &str) -> Result<f64> {
        if self.comm.size() == 1 {
            return Ok(loss);
        }
        let loads = &mut self.model.expert_load;
        let mut flat: Vec<f64> = loads.iter().flatten().map(|&l| l as f64).collect();
        flat.push(loss);
        self.comm.all_reduce_sum_f64(&mut flat, what)?;
        for (l, &x) in loads.iter_mut().flatten().zip(&flat) {
            *l = x.round() as u64;
        }
        Ok(flat[flat.len() - 1])
    }

    /// Replicated data parallel: sums every gradient over the ranks that hold its parameter,
    /// in one all-reduce per kind: all ranks for everything but the routed experts, which under
    /// expert parallel are summed over their replicas (one rank per expert group).
    pub(super) fn all_reduce_grads(&mut self, what: &str) -> Result<()> {
        let replicas: &dyn Comm = match &self.expert_replicas {
            Some(replicas) => replicas.as_ref(),
            None => self.comm,
        };
        for (comm, experts) in [(self.comm, false), (replicas, true)] {
            let mut grads: Vec<&mut Vec<f32>> = whole(&mut self.grads)
                .iter_mut()
                .into_iter()
                .zip(self.model.layout.iter())
                .filter(|(_, spec)| spec.is_routed_experts() == experts)
                .map(|(g, _)| g)
                .collect();
            if comm.size() == 1 || grads.is_empty() {
                continue;
            }
            let flat = &mut self.comm_buffer;
            flat.clear();
            grads.iter().for_each(|g| flat.extend_from_slice(g));
            comm.all_reduce_sum(flat, what)?;
            let mut at = 0;
            for g in grads.iter_mut() {
                let n = g.len();
                g.copy_from_slice(&flat[at..at + n]);
                at += n;
            }
        }
        Ok(())
    }

    /// The global norm of the summed gradients: under expert parallel each rank holds only
    /// its group's share of the routed experts' gradients, so their squares are summed over
    /// the expert group.
    pub(super) fn grad_norm(&self, what: &str) -> Result<f64> {
        let b = self.b;
        let [mut shared, mut experts] = [0.0f64; 2];
        let Grads::Whole(grads) = &self.grads else { unreachable!("whole gradients with a replicated optimizer") };
        for (g, spec) in grads.iter().into_iter().zip(self.model.layout.iter()) {
            *if spec.is_routed_experts() { &mut experts } else { &mut shared } += b.sum_squares(g);
        }
        if let Some(ep) = self.model.expert_parallel() {
            let mut squares = [experts];
            ep.group.all_reduce_sum_f64(&mut squares, what)?;
            experts = squares[0];
        }
        Ok((shared + experts).sqrt())
    }

    /// Whether any rank was asked to stop: every rank then stops after the same step (a
    /// signal reaches the ranks at slightly different moments).
    pub(super) fn stop_agreed(&self, step: u64) -> Result<bool> {
        let mut stop = [f64::from(u8::from(self.stop_requested()))];
        if self.comm.size() > 1 {
            self.comm.all_reduce_sum_f64(&mut stop, &format!("stop request after step {step}"))?;
        }
        Ok(stop[0] > 0.0)
    }
}

/// ZeRO's spaces: everything over all ranks, or under expert parallel everything but the
/// routed experts over all ranks and the experts over their replicas.
pub(super) fn zero_spaces(
    model: &Model<Cpu>,
    hyper: Hyper,
    comm: &dyn Comm,
    replicas: Option<&(dyn Comm + Send + Sync)>,
) -> Zero {
    let (layout, world) = (&model.layout, (comm.rank(), comm.size()));
    match (replicas, model.expert_parallel()) {
        (Some(replicas), Some(ep)) => {
            let dense = ShardedAdamW::over(layout, &|s| !s.is_routed_experts(), "adam_shard", hyper, world);
            let name = format!("adam_expert_shard-{}", ep.group.rank());
            let at = (replicas.rank(), replicas.size());
            let experts = ShardedAdamW::over(layout, &|s| s.is_routed_experts(), &name, hyper, at);
            Zero { dense, experts: Some(experts) }
        }
        _ => Zero { dense: ShardedAdamW::new(layout, hyper, world.0, world.1), experts: None },
    }
}

/// The whole gradients a replicated optimizer works with (ZeRO-2's chunks go with a sharded one).
pub(super) fn whole(grads: &mut Grads) -> &mut Weights<Vec<f32>> {
    match grads {
        Grads::Whole(w) => w,
        Grads::Sharded(_) => unreachable!("whole gradients with a replicated optimizer"),
    }
}

/// Splits the ranks into expert groups of `ep` consecutive ranks, each holding every routed
/// expert once, and the replica groups that hold the same experts (one rank from each expert
/// group); refuses what expert parallel cannot split.
pub(super) fn expert_groups(
    comm: &dyn Comm,
    ep: usize,
    model_dir: &Path,
) -> Result<(ExpertParallel, Arc<dyn Comm + Send + Sync>)> {
    let config = Config::load(model_dir)?;
    let Some(moe) = &config.moe else {
        bail!(
            "`train.ep` = {ep}: {} has no MoE layers to split (expert parallel is for deepseek_v3 models)",
            model_dir.display()
        );
    };
    if !moe.experts.is_multiple_of(ep) {
        bail!("`train.ep` = {ep} does not divide the {} routed experts of {}", moe.experts, model_dir.display());
    }
    if !comm.size().is_multiple_of(ep) {
        bail!("`train.ep` = {ep} does not divide the {} ranks of the run (mpirun -np)", comm.size());
    }
    let group = comm.split(comm.rank() / ep, "expert groups")?;
    let replicas = comm.split(comm.rank() % ep, "expert replicas")?;
    Ok((ExpertParallel { group }, replicas))
}
