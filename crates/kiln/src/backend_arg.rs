//! `--backend` and `--device`: which backend a computing command runs on.

use anyhow::{ensure, Context, Result};
use kiln_cuda::Cuda;

/// The backend asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// CUDA when this process finds a GPU (and runs alone), else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The backend chosen.
pub enum Chosen {
    Cpu,
    Cuda(Cuda),
}

/// The backend for `arg` on device `device` (default 0) in a job of `world_size` processes.
pub fn choose(arg: BackendArg, device: Option<usize>, world_size: usize) -> Result<Chosen> {
    let alone = world_size == 1;
    let open = || {
        let ordinal = device.unwrap_or(0);
        Cuda::new(ordinal).with_context(|| format!("--backend cuda: device {ordinal} (--backend cpu runs on the CPU)"))
    };
    Ok(match arg {
        BackendArg::Cpu => Chosen::Cpu,
        BackendArg::Cuda => {
            ensure!(
                alone,
                "--backend cuda runs one process for now: collectives between GPUs (NCCL) are not built yet; \
                 launch one process, or use --backend cpu under mpirun"
            );
            Chosen::Cuda(open()?)
        }
        BackendArg::Auto if alone && Cuda::device_count() > 0 => Chosen::Cuda(open()?),
        BackendArg::Auto => Chosen::Cpu,
    })
}

/// Runs `$body` with `$rt` a `kiln_train::Runtime` on the backend `$cli` chose (`$world`: the
/// job's host communicator).
macro_rules! on_backend {
    ($cli:expr, $world:expr, |$rt:ident| $body:expr) => {
        match $crate::backend_arg::choose($cli.backend, $cli.device, $world.size())? {
            $crate::backend_arg::Chosen::Cpu => {
                let $rt = kiln_train::Runtime { b: kiln_core::Cpu, world: $world };
                $body
            }
            $crate::backend_arg::Chosen::Cuda(cuda) => {
                let world: kiln_train::data_parallel::Ranks<kiln_cuda::Cuda> =
                    std::sync::Arc::new(kiln_cuda::OneDevice(cuda.clone()));
                let $rt = kiln_train::Runtime { b: cuda, world };
                $body
            }
        }
    };
}
pub(crate) use on_backend;
