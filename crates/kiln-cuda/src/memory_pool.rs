//! The device's stream-ordered memory pool: kept (not returned to the driver at every
//! synchronisation, its default), so that allocations after the first steps are cheap, as
//! PyTorch's caching allocator does; and its high-water mark, the run's peak device memory.

use anyhow::Result;
use cudarc::driver::sys::{
    cuDeviceGetDefaultMemPool, cuMemPoolGetAttribute, cuMemPoolSetAttribute, CUdevice, CUmemPool_attribute,
    CUmemoryPool,
};
use std::ffi::c_void;

pub(crate) struct MemoryPool(CUmemoryPool);

// SAFETY: a pool handle is a driver object usable from any thread of the context.
unsafe impl Send for MemoryPool {}
unsafe impl Sync for MemoryPool {}

impl MemoryPool {
    /// Device `device`'s default pool, set to keep what it has reserved.
    pub(crate) fn keeping(device: CUdevice) -> Result<Self> {
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // SAFETY: out-pointers to locals of the types the driver writes.
        unsafe {
            cuDeviceGetDefaultMemPool(&mut pool, device).result()?;
            let mut keep = u64::MAX;
            let threshold = CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            cuMemPoolSetAttribute(pool, threshold, (&mut keep as *mut u64).cast::<c_void>()).result()?;
        }
        Ok(Self(pool))
    }

    /// The most bytes in use at once since the pool was made.
    pub(crate) fn peak_used(&self) -> u64 {
        let mut bytes = 0u64;
        let attr = CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: the attribute is a 64-bit count written into `bytes`.
        let status = unsafe { cuMemPoolGetAttribute(self.0, attr, (&mut bytes as *mut u64).cast::<c_void>()) };
        status.result().map_or(0, |()| bytes)
    }
}
