//! One GPU: its context and stream, the cuBLAS handle, and kiln's kernels compiled for it.

use crate::attention_tiling::Tiling;
use crate::kernels;
use crate::library::Library;
use crate::memory::{DeviceIndex, DeviceSlice};
use crate::memory_pool::MemoryPool;
use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::Arc;

/// Dynamic shared memory a block may take without opting in to more.
pub(crate) const MAX_SHARED_BYTES: usize = 48 * 1024;

/// The CUDA backend on one device. Cloning is cheap and shares the device.
#[derive(Clone)]
pub struct Cuda {
    pub(crate) inner: Arc<Device>,
}

pub(crate) struct Device {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pool: MemoryPool,
    kernels: HashMap<&'static str, CudaFunction>,
    description: String,
    bf16_tensor_cores: bool,
}

/// A kernel argument: device addresses, sizes (`long` in the kernels), `int`s and floats.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    Long(i64),
    Int(i32),
    Float(f32),
}

impl From<&DeviceSlice> for Arg {
    fn from(s: &DeviceSlice) -> Self {
        Arg::Ptr(s.ptr())
    }
}
impl From<&mut DeviceSlice> for Arg {
    fn from(s: &mut DeviceSlice) -> Self {
        Arg::Ptr(s.ptr())
    }
}
impl From<&DeviceIndex> for Arg {
    fn from(s: &DeviceIndex) -> Self {
        Arg::Ptr(s.ptr())
    }
}
impl From<&mut DeviceIndex> for Arg {
    fn from(s: &mut DeviceIndex) -> Self {
        Arg::Ptr(s.ptr())
    }
}
impl From<usize> for Arg {
    fn from(n: usize) -> Self {
        Arg::Long(n as i64)
    }
}
impl From<i32> for Arg {
    fn from(n: i32) -> Self {
        Arg::Int(n)
    }
}
impl From<bool> for Arg {
    fn from(b: bool) -> Self {
        Arg::Int(b.into())
    }
}
impl From<f32> for Arg {
    fn from(x: f32) -> Self {
        Arg::Float(x)
    }
}

/// The kernel arguments `[a, b, ...]` as [`Arg`]s.
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$($crate::device::Arg::from($a)),*] };
}
pub(crate) use args;

impl Cuda {
    /// The number of CUDA devices (0 when the driver is missing or finds none).
    pub fn device_count() -> usize {
        if !Library::Driver.present() {
            return 0;
        }
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }

    /// Device `ordinal`, with kiln's kernels compiled for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        Library::Driver.require()?;
        let count = CudaContext::device_count().context("CUDA: initialising the driver")?;
        if ordinal >= count.max(0) as usize {
            bail!("CUDA device {ordinal} asked for, but the driver sees {count} device(s)");
        }
        Library::Cublas.require()?;
        let ctx = CudaContext::new(ordinal).with_context(|| format!("CUDA: opening device {ordinal}"))?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let cubin = kernels::compile(&arch)?;
        let module = ctx
            .load_module(Ptx::from_binary(cubin))
            .with_context(|| format!("CUDA: loading kiln's kernels for {arch}"))?;
        let kernels = kernels::NAMES
            .iter()
            .map(|&name| Ok((name, module.load_function(name).with_context(|| format!("CUDA: kernel {name}"))?)))
            .collect::<Result<_>>()?;
        let pool = MemoryPool::keeping(ctx.cu_device())?;
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone()).context("cuBLAS: creating a handle")?;
        let memory = ctx.total_mem()? as f64 / (1u64 << 30) as f64;
        let description = format!("cuda:{ordinal} {} ({arch}, {memory:.1} GiB)", ctx.name()?);
        let bf16_tensor_cores = major >= 8;
        Ok(Self { inner: Arc::new(Device { stream, blas, pool, kernels, description, bf16_tensor_cores }) })
    }

    /// "cuda:0 NVIDIA H200 (sm_90, 139.8 GiB)".
    pub fn describe(&self) -> &str {
        &self.inner.description
    }

    /// The most device memory kiln's buffers held at once, in bytes.
    pub fn peak_memory(&self) -> u64 {
        self.inner.pool.peak_used()
    }

    /// Waits for all work queued on the device.
    pub fn synchronize(&self) {
        self.inner.stream.synchronize().unwrap_or_else(|e| panic!("CUDA: {e}"));
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn bind(&self) {
        self.inner.stream.context().bind_to_thread().unwrap_or_else(|e| panic!("CUDA: binding the context: {e}"));
    }

    /// Launches kernel `name` with `blocks` blocks of `threads` threads.
    pub(crate) fn launch(&self, name: &str, blocks: usize, threads: usize, args: &[Arg]) {
        self.launch_shared(name, blocks, threads, 0, args);
    }

    /// `launch` with `shared_bytes` of dynamic shared memory per block (at most 48 KiB, the
    /// limit without opting in).
    pub(crate) fn launch_shared(&self, name: &str, blocks: usize, threads: usize, shared_bytes: usize, args: &[Arg]) {
        assert!(shared_bytes <= MAX_SHARED_BYTES, "{name}: {shared_bytes} bytes of shared memory per block");
        if blocks == 0 {
            return;
        }
        let f = &self.inner.kernels[name];
        let mut launch = self.inner.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => launch.arg(p),
                Arg::Long(n) => launch.arg(n),
                Arg::Int(n) => launch.arg(n),
                Arg::Float(x) => launch.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared_bytes as u32,
        };
        // SAFETY: the arguments match the kernel's parameters (checked by the conformance suite);
        // every address is a live device allocation of the sizes passed.
        unsafe { launch.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: launching {name}: {e}"));
    }

    /// A grid-stride kernel over `n` elements.
    pub(crate) fn launch_elements(&self, name: &str, n: usize, args: &[Arg]) {
        const THREADS: usize = 256;
        self.launch(name, n.div_ceil(THREADS).min(1 << 16), THREADS, args);
    }

    /// One block per row.
    pub(crate) fn launch_rows(&self, name: &str, rows: usize, args: &[Arg]) {
        self.launch(name, rows, 256, args);
    }

    /// Whether the device multiplies bf16 on tensor cores (sm_80 and later), which
    /// attention_mma.cu's kernels need.
    pub(crate) fn bf16_tensor_cores(&self) -> bool {
        self.inner.bf16_tensor_cores
    }

    /// One of attention.cu's tiled kernels.
    pub(crate) fn launch_tiled(&self, name: &str, tiling: &Tiling, args: &[Arg]) {
        self.launch_shared(name, tiling.blocks, 32 * tiling.warps, tiling.shared_bytes, args);
    }

    /// One warp per item, four warps per block.
    pub(crate) fn launch_warps(&self, name: &str, warps: usize, args: &[Arg]) {
        self.launch(name, warps.div_ceil(4), 128, args);
    }
}

/// Device 0 for tests, created once per test process; `None` (after printing why) on a
/// machine without a usable GPU, unless `KILN_REQUIRE_CUDA=1`, which makes that a failure.
pub fn test_device() -> Option<Cuda> {
    static DEVICE: std::sync::OnceLock<Option<Cuda>> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match Cuda::new(0) {
            Ok(cuda) => Some(cuda),
            Err(why) if std::env::var("KILN_REQUIRE_CUDA").as_deref() == Ok("1") => {
                panic!("KILN_REQUIRE_CUDA=1 but no CUDA device: {why:#}")
            }
            Err(why) => {
                eprintln!("CUDA tests skipped: {why:#}");
                None
            }
        })
        .clone()
}
