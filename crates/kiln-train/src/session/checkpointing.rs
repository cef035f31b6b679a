//! Checkpoints of a run on one or several ranks: rank 0 writes the model and state and seals
//! the directory; with ZeRO every rank, and under expert parallel every rank of the first
//! expert group, adds its shard to the temporary directory first. Under tensor and pipeline
//! parallel each writer's tensor group and pipeline assemble the whole tensors (and replicated
//! moments) for it to write, so the checkpoint is the one a run without them writes.

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
        // The data-parallel ranks that write weights (rank 0; under expert parallel the first
        // expert group) assemble them with their tensor groups and pipelines; the first rank of
        // each keeps the whole tensors.
        let b = &self.b;
        let writers = self.data.rank() < expert_ranks;
        let first = |group: Option<&crate::data_parallel::Ranks<B>>| group.is_none_or(|g| g.rank() == 0);
        let keep = writers
            && first(self.model.tensor_parallel().map(|tp| &tp.group))
            && first(self.model.pipeline().map(|pp| &pp.group));
        let joined = writers.then(|| self.model.joined(b, keep)).flatten();
        let moments = match writers && !self.dp.sharded {
            true => {
                let (m, v) = checkpoint::replicated_moments(b, &self.dp, &self.model.flat);
                self.model.join_blocks(b, m, keep).zip(self.model.join_blocks(b, v, keep))
            }
            false => None,
        };
        let part = ExpertPart { keep, model: joined.as_ref().unwrap_or(&self.model), moments: moments.as_ref() };
        if !comm.is_root() {
            if sharded {
                comm.barrier(&phase("directory ready"))?;
                self.write_shard(&checkpoint::tmp_dir(&root, step), expert_ranks, &part)?;
                comm.barrier(&phase("shards written"))?;
            }
            comm.barrier(&phase("sealed"))?;
            let dir = checkpoint::step_dir(&root, step);
            self.last_checkpoint = Some(dir.clone());
            return Ok(dir);
        }
        let extra = |tmp: &Path| -> Result<()> {
            if sharded {
                self.write_shard(tmp, expert_ranks, &part)?;
                comm.barrier(&phase("directory ready"))?;
                comm.barrier(&phase("shards written"))?;
            }
            Ok(())
        };
        let dir = checkpoint::save(
            &self.b,
            &SaveRequest {
                root: &root,
                model: part.model,
                moments: part.moments,
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
    /// expert parallel, if it keeps the whole tensors of an expert rank of the first expert
    /// group but the first (whose part `checkpoint::save` writes), that rank's routed experts.
    fn write_shard(&self, tmp: &Path, expert_ranks: usize, part: &ExpertPart<B>) -> Result<()> {
        let b = &self.b;
        if self.dp.sharded {
            checkpoint::save_moment_shards(b, tmp, &self.dp)?;
        }
        let expert_rank = self.data.rank();
        if part.keep && expert_rank > 0 && expert_rank < expert_ranks {
            checkpoint::save_expert_shard(b, tmp, part.model, part.moments, expert_rank, expert_ranks)?;
        }
        Ok(())
    }
}

/// What a rank writes of the model: the whole tensors it keeps (`keep`), of its routed experts
/// under expert parallel, and their moments unless ZeRO shards them.
struct ExpertPart<'a, B: Backend> {
    keep: bool,
    model: &'a kiln_model::Model<B>,
    moments: Option<&'a checkpoint::Moments>,
}
