//! Checkpoints of a run on one or several ranks: rank 0 writes the model and state and seals
//! the directory; with ZeRO every rank, and under expert parallel every rank of the first
//! expert group, adds its shard to the temporary directory first. Under tensor and pipeline
//! parallel each writer's tensor group and pipeline assemble the whole tensors (and replicated
//! moments) for it to write, a tensor at a time, and under ZeRO-3 the data-parallel ranks
//! gather the weights a layer at a time as they are written, so the checkpoint is the one a
//! run without them writes and no rank holds the whole model to write it.

use super::Session;
use crate::checkpoint::{self, SaveRequest};
use crate::data_parallel::{DataParallel, Ranks};
use anyhow::Result;
use kiln_core::Backend;
use kiln_model::Model;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

impl<B: Backend> Session<B> {
    /// Writes a checkpoint of the current step: rank 0 writes the model and state; with ZeRO
    /// every rank, and under expert parallel every rank of the first expert group, adds its
    /// shard to the checkpoint's temporary directory before rank 0 seals it.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.out_dir.join("checkpoints");
        let (comm, step) = (self.comm.clone(), self.state.step);
        let phase = |name: &str| format!("checkpoint at step {step}: {name}");
        let together = comm.size() > 1;
        let Session { b, dp, data, model, state, model_files, keep_last, .. } = self;
        // ZeRO-3's gathers change what the model holds while its weights are written.
        let model = RefCell::new(model);
        // Every rank writes its part once rank 0 has made the directory; rank 0 seals it after.
        let write = |tmp: &Path| -> Result<()> {
            if together {
                comm.barrier(&phase("directory ready"))?;
            }
            write_part(b, dp, data, &mut model.borrow_mut(), tmp)?;
            if together {
                comm.barrier(&phase("parts written"))?;
            }
            Ok(())
        };
        let dir = match comm.is_root() {
            true => checkpoint::save(&SaveRequest {
                root: &root,
                write: &write,
                state,
                model_files,
                keep_last: *keep_last,
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
}

/// A rank's part of a checkpoint, into its temporary directory `tmp`: its ZeRO moment shards;
/// and on the data-parallel ranks that write weights (rank 0, under expert parallel the first
/// expert group) with their tensor groups and pipelines, the whole model's weights and
/// (without ZeRO) moments, a tensor at a time, written by the first rank of each. Under ZeRO-3
/// the other data-parallel ranks take part in the weights' gathers.
fn write_part<B: Backend>(
    b: &B,
    dp: &DataParallel<B>,
    data: &Ranks<B>,
    model: &mut Model<B>,
    tmp: &Path,
) -> Result<()> {
    if dp.sharded {
        checkpoint::save_moment_shards(b, tmp, dp)?;
    }
    let expert_ranks = model.expert_parallel().map_or(1, |ep| ep.group.size());
    let expert = data.rank();
    let writes = expert < expert_ranks;
    let keep = writes
        && super::parallel::writes_whole_tensors::<B>(
            model.tensor_parallel().map(|tp| &tp.group),
            model.pipeline().map(|pp| &pp.group),
        );
    let moments = (writes && !dp.sharded).then(|| checkpoint::replicated_moments(b, dp, &model.flat));
    checkpoint::write_model_part(b, tmp, model, moments.as_ref(), (writes, keep), (expert, expert_ranks))
}
