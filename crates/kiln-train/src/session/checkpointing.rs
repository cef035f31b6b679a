//! Checkpoints of a run on one or several ranks: rank 0 writes the model and state and seals
//! the directory; with ZeRO every rank, and under expert parallel every rank of the first
//! expert group, adds its shard to the temporary directory first. Under tensor and pipeline
//! parallel each writer's tensor group and pipeline assemble the whole tensors (and replicated
//! moments) for it to write, a tensor at a time, so the checkpoint is the one a run without
//! them writes and no rank holds the whole model to write it.

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
        let together = comm.size() > 1;
        // Every rank writes its part once rank 0 has made the directory; rank 0 seals it after.
        let write = |tmp: &Path| -> Result<()> {
            if together {
                comm.barrier(&phase("directory ready"))?;
            }
            self.write_part(tmp)?;
            if together {
                comm.barrier(&phase("parts written"))?;
            }
            Ok(())
        };
        let dir = match comm.is_root() {
            true => checkpoint::save(&SaveRequest {
                root: &root,
                write: &write,
                state: &self.state,
                model_files: &self.model_files,
                keep_last: self.keep_last,
            })?,
            false => {
                write(&checkpoint::tmp_dir(&root, step))?;
                checkpoint::step_dir(&root, step)
            }
        };
        if together {
            comm.barrier(&phase("sealed"))?;
        }
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// A rank's part of a checkpoint, into its temporary directory `tmp`: its ZeRO moment
    /// shards; and on the data-parallel ranks that write weights (rank 0, under expert parallel
    /// the first expert group) with their tensor groups and pipelines, the whole model's weights
    /// and (without ZeRO) moments, a tensor at a time, written by the first rank of each.
    fn write_part(&self, tmp: &Path) -> Result<()> {
        let b = &self.b;
        if self.dp.sharded {
            checkpoint::save_moment_shards(b, tmp, &self.dp)?;
        }
        let expert_ranks = self.model.expert_parallel().map_or(1, |ep| ep.group.size());
        let expert = self.data.rank();
        if expert >= expert_ranks {
            return Ok(());
        }
        let keep = super::parallel::writes_whole_tensors::<B>(
            self.model.tensor_parallel().map(|tp| &tp.group),
            self.model.pipeline().map(|pp| &pp.group),
        );
        let moments = (!self.dp.sharded).then(|| checkpoint::replicated_moments(b, &self.dp, &self.model.flat));
        checkpoint::write_model_part(b, tmp, &self.model, moments.as_ref(), keep, (expert, expert_ranks))
    }
}
