//! The session's side of running on several ranks: each rank's share of a step, the idle
//! passes that keep expert groups and ZeRO-2's reductions in step, summing the loss and
//! expert loads, agreeing on a stop, and the groups expert and tensor parallel set up.

use super::Session;
use crate::data_parallel::Ranks;
use anyhow::{bail, Result};
use kiln_core::Backend;
use kiln_dist::Comm;
use kiln_model::{ChunkOrder, Config, ExpertParallel};
use std::path::Path;
use std::sync::Arc;

impl<B: Backend> Session<B> {
    /// Micro-batches in a step over all ranks: `grad_accum` on each.
    pub fn step_micro_batches(&self) -> usize {
        self.train.grad_accum * self.data.size()
    }

    /// This rank's contiguous share of a step's `len` items (micro-batches, prompts): all of
    /// them in one process.
    pub fn my_share(&self, len: usize) -> std::ops::Range<usize> {
        kiln_dist::shard(len, self.data.rank(), self.data.size())
    }

    /// Under expert parallel every forward and backward is collective (expert exchanges), and
    /// under ZeRO-2/3 every backward (per-layer reductions), so a rank whose share of a step has
    /// fewer passes than another (an epoch's last step, a rollout split unevenly) runs idle
    /// ones after its own. This many, for `mine` of its own; call it before the passes (it is
    /// a collective then).
    pub fn idle_backwards_needed(&self, mine: usize) -> Result<usize> {
        match self.model.expert_parallel().is_some() || self.dp.reduces_in_backward() {
            true => self.idle_passes(mine),
            false => Ok(0),
        }
    }

    /// `idle_backwards_needed` for forward-only passes (eval, reference log-probs): expert
    /// parallel and ZeRO-3 (its gathers) make them collective.
    pub fn idle_forwards_needed(&self, mine: usize) -> Result<usize> {
        match self.model.expert_parallel().is_some() || self.model.params_sharded() {
            true => self.idle_passes(mine),
            false => Ok(0),
        }
    }

    /// How many passes fewer than the busiest rank this rank has, with `mine` of its own.
    fn idle_passes(&self, mine: usize) -> Result<usize> {
        let mut counts = vec![0u64; self.data.size()];
        let what = format!("pass counts at step {}", self.state.step + 1);
        self.data.all_gather_u64(&[mine as u64], &mut counts, &what)?;
        Ok(counts.into_iter().max().unwrap_or(0) as usize - mine)
    }

    /// This rank's share of `len` forward-only passes (eval, reference log-probs), and how
    /// many idle ones it runs after them (`Model::idle_forward`).
    pub fn forward_share(&self, len: usize) -> Result<(std::ops::Range<usize>, usize)> {
        let mine = self.my_share(len);
        Ok((mine.clone(), self.idle_forwards_needed(mine.len())?))
    }

    /// Runs `n` idle passes (see `idle_backwards_needed`), each with the recipe's `frozen`
    /// models' idle forwards and `forwards` forward-only passes before its own, its chunks in
    /// `order` (under pipeline parallel): this rank's
    /// experts serve the others' rows, it gathers ZeRO-3's weights, and it joins ZeRO-2/3's
    /// reductions with nothing to add. The last is the step's last backward.
    pub fn idle_passes_run(&mut self, n: usize, forwards: usize, order: ChunkOrder, frozen: &mut dyn FnMut(&B)) {
        let b = &self.b;
        for i in 0..n {
            frozen(b);
            (0..forwards).for_each(|_| self.model.idle_forward(b, ChunkOrder::ForwardsFirst));
            if i + 1 == n {
                self.dp.last_backward_next();
            }
            self.model.idle_pass(b, &mut self.dp, self.train.recompute, order);
        }
    }

    /// Data parallel: sums the step's loss, MoE expert loads and balance loss over the ranks;
    /// returns the loss.
    pub(super) fn reduce_scalars(&mut self, loss: f64) -> Result<f64> {
        if self.data.size() == 1 {
            return Ok(loss);
        }
        let loads = &mut self.model.expert_load;
        let mut flat: Vec<f64> = loads.iter().flatten().map(|&l| l as f64).collect();
        flat.extend([self.model.moe_aux_loss, loss]);
        self.data.all_reduce_sum_f64(&mut flat, &format!("loss at step {}", self.state.step + 1))?;
        for (l, &x) in loads.iter_mut().flatten().zip(&flat) {
            *l = x.round() as u64;
        }
        self.model.moe_aux_loss = flat[flat.len() - 2];
        Ok(flat[flat.len() - 1])
    }

    /// Under pipeline parallel, a step's expert loads (`loads`, of this stage's layers) and
    /// balance loss (`aux`, of its layers) over every stage's layers, for the metrics; as they
    /// are otherwise.
    pub(super) fn over_stages(&self, loads: Vec<Vec<u64>>, aux: f64) -> Result<(Vec<Vec<u64>>, f64)> {
        let Some(pp) = self.model.pipeline() else { return Ok((loads, aux)) };
        let whole = &pp.whole;
        let experts = whole.moe.as_ref().map_or(0, |m| m.experts);
        let counts: Vec<usize> =
            (0..whole.num_layers).map(|l| if whole.is_moe_layer(l) { experts } else { 0 }).collect();
        let mut flat = vec![0.0; counts.iter().sum::<usize>() + 1];
        // Each of this stage's layers (with interleaved stages, several runs) at its place.
        let offsets: Vec<usize> = counts.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        for (l, layer) in loads.iter().enumerate() {
            let at = offsets[self.model.config.whole_layer(l)];
            for (slot, &load) in flat[at..].iter_mut().zip(layer) {
                *slot = load as f64;
            }
        }
        flat[counts.iter().sum::<usize>()] = aux;
        pp.group.all_reduce_sum_f64(&mut flat, &format!("expert loads at step {}", self.state.step))?;
        let mut at = 0;
        let loads = counts
            .iter()
            .map(|&n| {
                at += n;
                flat[at - n..at].iter().map(|&x| x.round() as u64).collect()
            })
            .collect();
        Ok((loads, flat[at]))
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

/// The expert group of `ep` consecutive ranks of `comm` (the data-parallel ranks) this rank
/// belongs to, each group holding every routed expert once, and the replicas that hold the same
/// experts as this rank (one rank from each expert group); refuses what expert parallel cannot
/// split.
pub(super) fn expert_groups<B: Backend>(
    comm: &dyn Comm<B::Slice>,
    ep: usize,
    model_dir: &Path,
) -> Result<(ExpertParallel<B>, Ranks<B>)> {
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
        bail!(
            "`train.ep` = {ep} does not divide the {} data-parallel ranks of the run (mpirun -np over `train.tp`)",
            comm.size()
        );
    }
    let group = comm.split(comm.rank() / ep, "expert groups")?;
    let replicas = comm.split(comm.rank() % ep, "expert replicas")?;
    Ok((ExpertParallel { group }, replicas))
}

/// Whether a rank in `tensor` and `pipeline` (either may be absent) is the one of them that
/// writes the whole model's tensors, assembled from the groups: the first of both.
pub(super) fn writes_whole_tensors<B: Backend>(tensor: Option<&Ranks<B>>, pipeline: Option<&Ranks<B>>) -> bool {
    [tensor, pipeline].into_iter().flatten().all(|g| g.rank() == 0)
}

/// The groups of a run's layout, of the ranks `comm` laid out as `[pp][dp][tp]` (tensor
/// parallel fastest, pipeline stages slowest, as Megatron-LM lays them out).
pub(super) struct LayoutGroups<B: Backend> {
    /// The `tp` consecutive ranks that split every layer's heads and MLP width (tp > 1).
    pub tensor: Option<Ranks<B>>,
    /// The `pp` ranks, one per stage, that run one pipeline (pp > 1).
    pub pipeline: Option<Ranks<B>>,
    /// The ranks at the same place in every tensor group and pipeline: they share out the data
    /// (`Session::data`).
    pub data: Ranks<B>,
}

/// The groups of tensor parallel `tp` and pipeline parallel `pp` over the ranks of `comm`;
/// refuses a `tp·pp` that does not divide the ranks.
pub(super) fn layout_groups<B: Backend>(comm: &Ranks<B>, tp: usize, pp: usize) -> Result<LayoutGroups<B>> {
    let (rank, ranks) = (comm.rank(), comm.size());
    if !ranks.is_multiple_of(tp * pp) {
        let sizes = match (tp, pp) {
            (tp, 1) => format!("`train.tp` = {tp}"),
            (1, pp) => format!("`train.pp` = {pp}"),
            (tp, pp) => format!("`train.tp` · `train.pp` = {tp}·{pp}"),
        };
        bail!("{sizes} does not divide the {ranks} ranks of the run (mpirun -np)");
    }
    if tp * pp == 1 {
        return Ok(LayoutGroups { tensor: None, pipeline: None, data: Arc::clone(comm) });
    }
    let stage_ranks = ranks / pp;
    let tensor = comm.split(rank / tp, "tensor groups")?;
    let pipeline = comm.split(rank % stage_ranks, "pipelines")?;
    let data = comm.split((rank / stage_ranks) * tp + rank % tp, "data-parallel ranks")?;
    Ok(LayoutGroups { tensor: (tp > 1).then_some(tensor), pipeline: (pp > 1).then_some(pipeline), data })
}
