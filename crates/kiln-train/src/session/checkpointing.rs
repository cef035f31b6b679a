//! Checkpoints of a run on one or several ranks: rank 0 writes the model and state and seals
//! the directory; with ZeRO every rank, and under expert parallel every rank of the first
//! expert group, adds its shard to the temporary directory first. Under tensor parallel the
//! first tensor group assembles the whole tensors (and replicated moments) for rank 0 to
//! write, so the checkpoint is the one a run without it writes.

use super::Session;
use crate::checkpoint::{self, SaveRequest};
use anyhow::Result;
use kiln_core::Backend;
use std::path::{Path, PathBuf};

impl<B: Backend> Session<B> {
    /// Writes a checkpoint of the current step: rank 0 writes the model and state; with ZeRO
    /// every rank, and under expert parallel every rank of the first expert group, adds its
    /// shard to the checkpoint's temporary directory before rank 0 seals it.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        // ZeRO-3: the ranks that write weights (rank 0; under expert parallel the first expert
        // group) gather the model whole for it, a layer at a time; the others take part.
        let expert_ranks = self.model.expert_parallel().map_or(1, |ep| ep.group.size());
        self.model.unshard(&self.b, self.data.rank() < expert_ranks);
        let written = self.write_checkpoint();
        self.model.reshard();
        written
    }

    fn write_checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.out_dir.join("checkpoints");
        let (comm, step) = (self.comm.clone(), self.state.step);
        let phase = |name: &str| format!("checkpoint at step {step}: {name}");
        let expert_ranks = self.model.expert_parallel().map_or(1, |ep| ep.group.size());
        let sharded = self.dp.sharded || expert_ranks > 1;
        // The ranks of the first tensor group (rank 0 alone without tensor parallel) assemble
        // what rank 0 writes.
        // Rank 0 alone keeps the whole tensors.
        let (b, writers, keep) = (&self.b, self.data.rank() == 0, comm.is_root());
        let joined = writers.then(|| self.model.joined(b, keep)).flatten();
        let moments = match writers && !self.dp.sharded {
            true => {
                let (m, v) = checkpoint::replicated_moments(b, &self.dp, &self.model.flat);
                self.model.join_blocks(b, m, keep).zip(self.model.join_blocks(b, v, keep))
            }
            false => None,
        };
        if !comm.is_root() {
            if sharded {
                comm.barrier(&phase("directory ready"))?;
                self.write_shard(&checkpoint::tmp_dir(&root, step), expert_ranks)?;
                comm.barrier(&phase("shards written"))?;
            }
            comm.barrier(&phase("sealed"))?;
            let dir = checkpoint::step_dir(&root, step);
            self.last_checkpoint = Some(dir.clone());
            return Ok(dir);
        }
        let extra = |tmp: &Path| -> Result<()> {
            if sharded {
                self.write_shard(tmp, expert_ranks)?;
                comm.barrier(&phase("directory ready"))?;
                comm.barrier(&phase("shards written"))?;
            }
            Ok(())
        };
        let dir = checkpoint::save(
            &self.b,
            &SaveRequest {
                root: &root,
                model: joined.as_ref().unwrap_or(&self.model),
                moments: moments.as_ref(),
                extra: &extra,
                state: &self.state,
                model_files: &self.model_files,
                keep_last: self.keep_last,
            },
        )?;
        if comm.size() > 1 {
            comm.barrier(&phase("sealed"))?;
        }
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// A rank adds its part of a checkpoint to `tmp`: its ZeRO moment shards, and under
    /// expert parallel, in the first expert group but rank 0 (whose part `checkpoint::save`
    /// writes), its routed experts.
    fn write_shard(&self, tmp: &Path, expert_ranks: usize) -> Result<()> {
        let (b, rank) = (&self.b, self.comm.rank());
        if self.dp.sharded {
            checkpoint::save_moment_shards(b, tmp, &self.dp)?;
        }
        if rank > 0 && rank < expert_ranks {
            let moments = (!self.dp.sharded).then(|| checkpoint::replicated_moments(b, &self.dp, &self.model.flat));
            checkpoint::save_expert_shard(b, tmp, &self.model, moments.as_ref(), rank, expert_ranks)?;
        }
        Ok(())
    }
}
