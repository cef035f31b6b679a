//! `--backend` and `--device`: which backend a computing command runs on.

use anyhow::{ensure, Context, Result};
use kiln_cuda::{Cuda, NcclComm, OneDevice};
use kiln_dist::Comm;
use kiln_train::data_parallel::Ranks;
use std::sync::Arc;
use std::time::Duration;

/// The backend asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// CUDA when this process finds a GPU (and, launched as several processes, NCCL), else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The backend chosen.
pub enum Chosen {
    Cpu,
    /// The device, and the job's ranks on device buffers: NCCL when there are several.
    Cuda(Cuda, Ranks<Cuda>),
}

/// The backend for `arg` in the job of `world` (its host communicator; `timeout` bounds each
/// collective). One process runs on device `device` (default 0); several take one GPU each,
/// `device` plus their rank on the node.
pub fn choose(arg: BackendArg, device: Option<usize>, world: &Arc<dyn Comm>, timeout: Duration) -> Result<Chosen> {
    let alone = world.size() == 1;
    let cuda = match arg {
        BackendArg::Cpu => false,
        BackendArg::Cuda => true,
        BackendArg::Auto => Cuda::device_count() > 0 && (alone || kiln_cuda::nccl_present()),
    };
    if !cuda {
        return Ok(Chosen::Cpu);
    }
    let local_rank = if alone { 0 } else { kiln_dist::local_rank().unwrap_or(0) };
    let ordinal = device.unwrap_or(0) + local_rank;
    let cuda = Cuda::new(ordinal).with_context(|| {
        let who = if alone { String::new() } else { format!("rank {} (rank {local_rank} on its node) ", world.rank()) };
        format!("--backend cuda: {who}takes device {ordinal} (one process per GPU; --backend cpu runs on the CPU)")
    })?;
    let ranks: Ranks<Cuda> = if alone {
        Arc::new(OneDevice(cuda.clone()))
    } else {
        ensure!(
            kiln_cuda::nccl_present(),
            "--backend cuda with {} processes needs NCCL: {:#}",
            world.size(),
            kiln_cuda::nccl_version().unwrap_err()
        );
        Arc::new(NcclComm::new(cuda.clone(), Arc::clone(world), timeout)?)
    };
    Ok(Chosen::Cuda(cuda, ranks))
}

/// Runs `$body` with `$rt` a `kiln_train::Runtime` on the backend `$cli` chose (`$world`: the
/// job's host communicator).
macro_rules! on_backend {
    ($cli:expr, $world:expr, |$rt:ident| $body:expr) => {
        match $crate::backend_arg::choose(
            $cli.backend,
            $cli.device,
            &$world,
            std::time::Duration::from_secs_f64($cli.comm_timeout),
        )? {
            $crate::backend_arg::Chosen::Cpu => {
                let $rt = kiln_train::Runtime { b: kiln_core::Cpu, world: $world };
                $body
            }
            $crate::backend_arg::Chosen::Cuda(cuda, world) => {
                let $rt = kiln_train::Runtime { b: cuda, world };
                $body
            }
        }
    };
}
pub(crate) use on_backend;
