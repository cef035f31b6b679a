//! `Comm` on device buffers through NCCL: one process per GPU, launched by mpirun or srun.
//!
//! The buffer collectives run on the device's stream, in order with the kernels around them;
//! the host collectives (f64 statistics, counts, barriers) and the exchange of NCCL's unique id
//! go through the host communicator the launch already has (MPI). Each NCCL call is waited for
//! under the same timeout as the MPI path: polling its completion and NCCL's asynchronous error.
//! On an error or a timeout the NCCL communicator is aborted (which frees its kernels), and on
//! a timeout this rank then meets the others at a host barrier: when a rank died, the MPI
//! timeout names the ranks that no longer answer and stops the job; when every rank arrives,
//! the error says the GPUs' network failed, not a rank.
//!
//! Counts that differ between ranks (ZeRO shards, expert exchanges) become grouped NCCL calls:
//! one reduce or broadcast per rank's piece, or point-to-point sends and receives.

use super::library::{nccl, unique_id, Functions, RawComm, UniqueId, FLOAT32, IN_PROGRESS, SUM};
use crate::device::Cuda;
use crate::memory::DeviceSlice;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{result, sys};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How waiting for a collective ended, when not in an error.
enum Waited {
    Done,
    TimedOut,
}

/// Bytes per value: the buffers are f32.
const VALUE: u64 = 4;

pub struct NcclComm {
    device: Cuda,
    host: Arc<dyn Comm>,
    /// `None` once aborted after a failure.
    raw: Mutex<Option<RawComm>>,
    timeout: Duration,
}

// SAFETY: the NCCL communicator is only used under the mutex, so never by two threads at once.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// The ranks of `host`, each on its `device`, joined into one NCCL communicator: rank 0
    /// makes the unique id and every rank receives it over `host`.
    pub fn new(device: Cuda, host: Arc<dyn Comm>, timeout: Duration) -> Result<Self> {
        let nccl = nccl()?;
        let id = share_unique_id(host.as_ref())?;
        let (rank, size) = (host.rank(), host.size());
        device.bind();
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: `raw` receives the communicator; every rank passes the same id and size.
        let status = unsafe { (nccl.comm_init_rank)(&mut raw, size as i32, id, rank as i32) };
        nccl.check(status, raw, &format!("joining {size} ranks as rank {rank} on {}", device.describe()))?;
        Ok(Self { device, host, raw: Mutex::new(Some(raw)), timeout })
    }

    /// Enqueues NCCL calls with `enqueue` (given the functions, the communicator and the
    /// stream), then waits for them under the timeout.
    fn run(
        &self,
        op: &str,
        what: &str,
        enqueue: impl FnOnce(&Functions, RawComm, *mut c_void) -> Result<()>,
    ) -> Result<()> {
        let nccl = nccl()?;
        let mut guard = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        let raw = guard
            .ok_or_else(|| anyhow!("NCCL: {op} ({what}): the communicator was aborted after an earlier failure"))?;
        self.device.bind();
        let stream = self.device.stream().cu_stream() as *mut c_void;
        let outcome = enqueue(nccl, raw, stream).and_then(|()| self.wait(nccl, raw, op, what));
        if matches!(outcome, Ok(Waited::Done)) {
            return Ok(());
        }
        // SAFETY: `raw` is a live communicator, forgotten right after the abort.
        unsafe { (nccl.comm_abort)(raw) };
        *guard = None;
        outcome?;
        self.host.barrier(&format!("after NCCL {op} ({what}) timed out"))?;
        bail!(
            "rank {}: NCCL {op} ({what}) did not complete within {:.0} s, yet every rank is alive \
             (they all reached the host barrier): the GPUs' network failed or hangs; NCCL_DEBUG=INFO says more",
            self.host.rank(),
            self.timeout.as_secs_f64()
        )
    }

    /// Waits until the stream has run the calls just enqueued, NCCL reports an error, or the
    /// timeout passes (the caller aborts the communicator on anything but `Done`).
    fn wait(&self, nccl: &Functions, raw: RawComm, op: &str, what: &str) -> Result<Waited> {
        let rank = self.host.rank();
        let event = self
            .device
            .stream()
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .with_context(|| format!("CUDA: recording the end of {op} ({what})"))?;
        let started = Instant::now();
        loop {
            // SAFETY: the event is live until dropped at the end of this function.
            match unsafe { result::event::query(event.cu_event()) } {
                Ok(()) => return Ok(Waited::Done),
                Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => {}
                Err(e) => bail!("rank {rank}: CUDA error during {op} ({what}): {e}"),
            }
            let mut status = 0;
            // SAFETY: `raw` is a live communicator; `status` receives its asynchronous error.
            nccl.check(unsafe { (nccl.comm_get_async_error)(raw, &mut status) }, raw, "ncclCommGetAsyncError")?;
            if status != 0 && status != IN_PROGRESS {
                nccl.check(status, raw, &format!("rank {rank}: {op} ({what})"))?;
            }
            if started.elapsed() > self.timeout {
                return Ok(Waited::TimedOut);
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let raw = self.raw.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(raw), Ok(nccl)) = (raw, nccl()) {
            self.device.synchronize();
            // SAFETY: no call on `raw` is pending (the stream is idle) and it is not used again.
            unsafe { (nccl.comm_destroy)(raw) };
        }
    }
}

/// Rank 0's fresh unique id, on every rank of `host` (sent as 16 u64s in an all-gather).
pub(crate) fn share_unique_id(host: &dyn Comm) -> Result<UniqueId> {
    const WORDS: usize = 16;
    let mine = if host.is_root() { unique_id()?.bytes } else { [0; 128] };
    let mine: Vec<u64> = mine.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let mut all = vec![0u64; WORDS * host.size()];
    host.all_gather_u64(&mine, &mut all, "NCCL unique id")?;
    let mut id = UniqueId { bytes: [0; 128] };
    for (dst, word) in id.bytes.chunks_mut(8).zip(&all[..WORDS]) {
        dst.copy_from_slice(&word.to_le_bytes());
    }
    Ok(id)
}

/// `(offset, count)` of each rank's piece when pieces of `counts` values lie end to end.
pub(crate) fn pieces(counts: &[usize]) -> Vec<(usize, usize)> {
    let mut end = 0;
    counts
        .iter()
        .map(|&c| {
            end += c;
            (end - c, c)
        })
        .collect()
}

/// Whether every rank's piece is the same size (one NCCL collective does it).
fn equal(counts: &[usize]) -> bool {
    counts.windows(2).all(|w| w[0] == w[1])
}

/// The address of value `offset` of `s`.
fn at(s: &DeviceSlice, offset: usize) -> u64 {
    s.ptr() + VALUE * offset as u64
}

/// Runs `calls` between ncclGroupStart and ncclGroupEnd (ending the group even when a call fails).
fn grouped(nccl: &Functions, raw: RawComm, calls: impl FnOnce() -> Result<()>) -> Result<()> {
    // SAFETY: group calls take no arguments; every start is matched by an end below.
    nccl.check(unsafe { (nccl.group_start)() }, raw, "ncclGroupStart")?;
    let inner = calls();
    nccl.check(unsafe { (nccl.group_end)() }, raw, "ncclGroupEnd")?;
    inner
}

// SAFETY (every NCCL call below): the addresses are device buffers of the lengths passed,
// checked against the counts first; the stream is the device's; the buffers outlive the call
// because `run` waits for it to complete.
impl Comm<DeviceSlice> for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn size(&self) -> usize {
        self.host.size()
    }

    fn all_reduce_sum(&self, buf: &mut DeviceSlice, what: &str) -> Result<()> {
        self.run("all_reduce", what, |nccl, raw, stream| {
            let status = unsafe { (nccl.all_reduce)(buf.ptr(), buf.ptr(), buf.len(), FLOAT32, SUM, raw, stream) };
            nccl.check(status, raw, "ncclAllReduce")
        })
    }

    fn reduce_scatter_v_sum(
        &self,
        buf: &DeviceSlice,
        counts: &[usize],
        out: &mut DeviceSlice,
        what: &str,
    ) -> Result<()> {
        ensure!(
            counts.len() == self.size()
                && counts.iter().sum::<usize>() == buf.len()
                && counts[self.rank()] == out.len(),
            "reduce_scatter_v ({what}): counts {counts:?} do not fit {} values into {}",
            buf.len(),
            out.len()
        );
        self.run("reduce_scatter_v", what, |nccl, raw, stream| {
            if equal(counts) {
                let status =
                    unsafe { (nccl.reduce_scatter)(buf.ptr(), out.ptr(), out.len(), FLOAT32, SUM, raw, stream) };
                return nccl.check(status, raw, "ncclReduceScatter");
            }
            grouped(nccl, raw, || {
                for (root, (offset, count)) in pieces(counts).into_iter().enumerate().filter(|(_, (_, c))| *c > 0) {
                    let status = unsafe {
                        (nccl.reduce)(at(buf, offset), out.ptr(), count, FLOAT32, SUM, root as i32, raw, stream)
                    };
                    nccl.check(status, raw, "ncclReduce")?;
                }
                Ok(())
            })
        })
    }

    fn all_gather_v(&self, chunk: &DeviceSlice, counts: &[usize], out: &mut DeviceSlice, what: &str) -> Result<()> {
        ensure!(
            counts.len() == self.size()
                && counts[self.rank()] == chunk.len()
                && counts.iter().sum::<usize>() == out.len(),
            "all_gather_v ({what}): counts {counts:?} do not fit {} values into {}",
            chunk.len(),
            out.len()
        );
        self.run("all_gather_v", what, |nccl, raw, stream| {
            if equal(counts) {
                let status = unsafe { (nccl.all_gather)(chunk.ptr(), out.ptr(), chunk.len(), FLOAT32, raw, stream) };
                return nccl.check(status, raw, "ncclAllGather");
            }
            grouped(nccl, raw, || {
                for (root, (offset, count)) in pieces(counts).into_iter().enumerate().filter(|(_, (_, c))| *c > 0) {
                    let status = unsafe {
                        (nccl.broadcast)(chunk.ptr(), at(out, offset), count, FLOAT32, root as i32, raw, stream)
                    };
                    nccl.check(status, raw, "ncclBroadcast")?;
                }
                Ok(())
            })
        })
    }

    fn all_to_allv(
        &self,
        send: &DeviceSlice,
        sc: &[usize],
        recv: &mut DeviceSlice,
        rc: &[usize],
        what: &str,
    ) -> Result<()> {
        let (rank, size) = (self.rank(), self.size());
        ensure!(sc.len() == size && rc.len() == size, "all_to_allv ({what}): one count per rank");
        ensure!(
            sc.iter().sum::<usize>() == send.len() && rc.iter().sum::<usize>() == recv.len(),
            "all_to_allv ({what}): counts do not add up to the buffers"
        );
        ensure!(sc[rank] == rc[rank], "all_to_allv ({what}): {} values to itself, {} expected", sc[rank], rc[rank]);
        let (sends, recvs) = (pieces(sc), pieces(rc));
        // This rank's own piece is a copy on the stream, in order with the exchange.
        let ((s, n), (r, _)) = (sends[rank], recvs[rank]);
        self.device.copy(recv.range_mut(r..r + n), send.range(s..s + n));
        self.run("all_to_allv", what, |nccl, raw, stream| {
            grouped(nccl, raw, || {
                for peer in (0..size).filter(|&p| p != rank) {
                    let ((s, n), (r, m)) = (sends[peer], recvs[peer]);
                    if n > 0 {
                        let status = unsafe { (nccl.send)(at(send, s), n, FLOAT32, peer as i32, raw, stream) };
                        nccl.check(status, raw, "ncclSend")?;
                    }
                    if m > 0 {
                        let status = unsafe { (nccl.recv)(at(recv, r), m, FLOAT32, peer as i32, raw, stream) };
                        nccl.check(status, raw, "ncclRecv")?;
                    }
                }
                Ok(())
            })
        })
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        self.host.all_reduce_sum_f64(buf, what)
    }

    fn all_gather_u64(&self, mine: &[u64], out: &mut [u64], what: &str) -> Result<()> {
        self.host.all_gather_u64(mine, out, what)
    }

    fn all_to_all_u64(&self, send: &[u64], recv: &mut [u64], what: &str) -> Result<()> {
        self.host.all_to_all_u64(send, recv, what)
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.host.barrier(what)
    }

    fn split(&self, color: usize, what: &str) -> Result<Arc<dyn Comm<DeviceSlice>>> {
        let group = self.host.split(color, what)?;
        let comm = Self::new(self.device.clone(), group, self.timeout).with_context(|| format!("split ({what})"))?;
        Ok(Arc::new(comm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_receives_rank_zeros_unique_id() {
        if !crate::nccl::test_nccl() {
            return;
        }
        let comms = kiln_dist::Threads::new(3, Duration::from_secs(30));
        let ids: Vec<[u8; 128]> = std::thread::scope(|s| {
            let handles: Vec<_> = comms.iter().map(|c| s.spawn(move || share_unique_id(c).unwrap().bytes)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids[0].iter().any(|&b| b != 0), "NCCL made an all-zero id");
        assert!(ids.iter().all(|id| id == &ids[0]), "ranks hold different ids");
        // A second communicator gets a fresh id.
        assert_ne!(unique_id().unwrap().bytes, ids[0]);
    }

    #[test]
    fn pieces_lie_end_to_end() {
        assert_eq!(pieces(&[3, 0, 2]), [(0, 3), (3, 0), (3, 2)]);
        assert!(equal(&[4, 4]) && equal(&[1]) && !equal(&[4, 3]));
    }
}
