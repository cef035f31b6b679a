//! Checkpoints of a run on one or several ranks: rank 0 writes the model and state and seals
//! the directory; with ZeRO every rank, and under expert parallel every rank of the first
//! expert group, adds its shard to the temporary directory first.

use super::{Optimizer, Session};
use crate::checkpoint::{self, SaveRequest};
use anyhow::Result;
use std::path::{Path, PathBuf};

impl Session {
    /// Writes a checkpoint of the current step: rank 0 writes the model and state; with ZeRO
    /// every rank, and under expert parallel every rank of the first expert group, adds its
    /// shard to the checkpoint's temporary directory before rank 0 seals it.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.out_dir.join("checkpoints");
        let (comm, step) = (self.comm, self.state.step);
        let phase = |name: &str| format!("checkpoint at step {step}: {name}");
        let expert_ranks = self.model.expert_parallel().map_or(1, |ep| ep.group.size());
        let sharded = matches!(self.optimizer, Optimizer::Sharded(_)) || expert_ranks > 1;
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
                model: &self.model,
                optimizer: match &self.optimizer {
                    Optimizer::Replicated(adamw) => Some(adamw),
                    Optimizer::Sharded(_) => None,
                },
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
        let rank = self.comm.rank();
        let adamw = match &self.optimizer {
            Optimizer::Sharded(zero) => {
                zero.dense.save(tmp, rank, self.comm.size())?;
                if let (Some(space), Some(replicas)) = (&zero.experts, &self.expert_replicas) {
                    space.save(tmp, replicas.rank(), replicas.size())?;
                }
                None
            }
            Optimizer::Replicated(adamw) => Some(adamw),
        };
        if rank > 0 && rank < expert_ranks {
            checkpoint::save_expert_shard(&self.b, tmp, &self.model, adamw, rank, expert_ranks)?;
        }
        Ok(())
    }

    /// The newest checkpoint, writing one if the run has none.
    pub fn final_checkpoint(&mut self) -> Result<PathBuf> {
        match &self.last_checkpoint {
            Some(c) => Ok(c.clone()),
            None => self.checkpoint(),
        }
    }
}
