//! Device memory as the `Backend` trait sees it.
//!
//! The trait hands out slices (`&Slice`, `&mut Slice`, ranges and splits of one buffer), so a
//! device backend needs a slice type whose references carry a device address. [`DeviceSlice`]
//! is a slice of zero-sized [`Word`]s: a reference's data pointer is the device address of the
//! first f32 value and its length the number of values. No host memory is ever read through
//! it (zero-sized values occupy no bytes), which is what makes such references sound for any
//! non-null address; ranges are built by address arithmetic in [`DeviceSlice::range`].

use cudarc::driver::{result, sys, CudaStream};
use std::ops::{Deref, DerefMut, Range};
use std::sync::Arc;

/// A zero-sized stand-in for one f32 value in device memory.
#[derive(Clone, Copy, Debug)]
pub struct Word;

/// f32 values in device memory: a whole [`DeviceBuf`] or a range of one.
#[repr(transparent)]
pub struct DeviceSlice([Word]);

impl DeviceSlice {
    /// # Safety
    /// `ptr` is a non-null device address of `len` f32 values that stay allocated for `'a`.
    unsafe fn from_raw<'a>(ptr: u64, len: usize) -> &'a Self {
        &*(std::ptr::slice_from_raw_parts(ptr as usize as *const Word, len) as *const Self)
    }

    /// # Safety
    /// As [`DeviceSlice::from_raw`], and no other live reference covers the range.
    unsafe fn from_raw_mut<'a>(ptr: u64, len: usize) -> &'a mut Self {
        &mut *(std::ptr::slice_from_raw_parts_mut(ptr as usize as *mut Word, len) as *mut Self)
    }

    /// The device address of the first value.
    pub fn ptr(&self) -> u64 {
        self.0.as_ptr() as usize as u64
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Values `range`.
    pub fn range(&self, range: Range<usize>) -> &Self {
        self.check(&range);
        // SAFETY: a sub-range of this slice's allocation, borrowed from it.
        unsafe { Self::from_raw(self.ptr() + 4 * range.start as u64, range.len()) }
    }

    pub fn range_mut(&mut self, range: Range<usize>) -> &mut Self {
        self.check(&range);
        // SAFETY: as in `range`, borrowed mutably from this slice.
        unsafe { Self::from_raw_mut(self.ptr() + 4 * range.start as u64, range.len()) }
    }

    /// `..mid` and `mid..`.
    pub fn split_at_mut(&mut self, mid: usize) -> (&mut Self, &mut Self) {
        self.check(&(0..mid));
        let (ptr, len) = (self.ptr(), self.len());
        // SAFETY: two disjoint ranges of this slice, borrowed mutably from it.
        unsafe { (Self::from_raw_mut(ptr, mid), Self::from_raw_mut(ptr + 4 * mid as u64, len - mid)) }
    }

    fn check(&self, range: &Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "device slice: range {range:?} outside {} values",
            self.len()
        );
    }
}

/// Raw stream-ordered device memory of `bytes` bytes, freed on drop.
pub(crate) struct Allocation {
    ptr: u64,
    stream: Arc<CudaStream>,
}

impl Allocation {
    pub(crate) fn new(stream: &Arc<CudaStream>, bytes: usize) -> Self {
        stream.context().bind_to_thread().expect("CUDA: binding the context");
        // At least one word, so that the address is never null.
        // SAFETY: allocation on our stream; freed on drop on the same stream.
        let ptr = unsafe { result::malloc_async(stream.cu_stream(), bytes.max(4)) }
            .unwrap_or_else(|e| panic!("CUDA: allocating {bytes} bytes: {e}"));
        Self { ptr, stream: stream.clone() }
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: allocated by `new` on this stream; later work on the stream is ordered after.
            let _ = unsafe { result::free_async(self.ptr as sys::CUdeviceptr, self.stream.cu_stream()) };
        }
    }
}

/// A buffer of f32 values in device memory.
pub struct DeviceBuf {
    memory: Allocation,
    len: usize,
}

impl DeviceBuf {
    pub(crate) fn new(stream: &Arc<CudaStream>, len: usize) -> Self {
        Self { memory: Allocation::new(stream, 4 * len), len }
    }
}

impl Deref for DeviceBuf {
    type Target = DeviceSlice;
    fn deref(&self) -> &DeviceSlice {
        // SAFETY: the allocation holds `len` values and lives as long as `self`.
        unsafe { DeviceSlice::from_raw(self.memory.ptr(), self.len) }
    }
}

impl DerefMut for DeviceBuf {
    fn deref_mut(&mut self) -> &mut DeviceSlice {
        // SAFETY: as in `deref`, borrowed mutably from `self`.
        unsafe { DeviceSlice::from_raw_mut(self.memory.ptr(), self.len) }
    }
}

/// i32 values in device memory: token ids, positions, segment ids, targets, expert indices.
pub struct DeviceIndex {
    memory: Allocation,
    len: usize,
}

impl DeviceIndex {
    pub(crate) fn new(stream: &Arc<CudaStream>, len: usize) -> Self {
        Self { memory: Allocation::new(stream, 4 * len), len }
    }

    pub fn ptr(&self) -> u64 {
        self.memory.ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
