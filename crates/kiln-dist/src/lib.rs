//! Collectives across ranks. `Comm` is what training needs of them: sums, gathers and
//! scatters of a backend's f32 buffers (`T`: host slices for the CPU backend; a GPU backend's
//! device slices for NCCL), all-to-all with counts, sums of f64 statistics, integer counts,
//! and barriers, each with a label naming it in errors. `Local` is one process, `Threads` the
//! ranks of one process (tests of the parallel logic), `Mpi` (feature `mpi`) every process of
//! an `mpirun`/`srun` launch, each collective under a timeout.
//!
//! `init` picks the implementation from the launcher's environment; keep the returned guard
//! alive until the program ends (it finalises MPI).

#[cfg(feature = "mpi")]
mod exchanged_sum;
mod in_flight;
mod local;
#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "mpi")]
mod reused_buffers;
mod threads;

pub use in_flight::{Completion, InFlight, Owned};
pub use local::Local;
#[cfg(feature = "mpi")]
pub use mpi_comm::Mpi;
pub use threads::Threads;

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

/// Collective operations over the ranks of a job, on buffers of type `T` (`[f32]` in host
/// memory by default). Every rank calls the same collectives in the same order; `what` names
/// the call in errors ("gradients at step 12").
pub trait Comm<T: ?Sized + 'static = [f32]>: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;

    // ---- buffers --------------------------------------------------------------------------
    /// `buf` ← Σ over ranks of `buf`.
    fn all_reduce_sum(&self, buf: &mut T, what: &str) -> Result<()>;
    /// `out` ← Σ over ranks of this rank's piece of `buf`, the pieces being `counts[r]` long
    /// for rank r, in rank order (`out` holds `counts[rank]` values).
    fn reduce_scatter_v_sum(&self, buf: &T, counts: &[usize], out: &mut T, what: &str) -> Result<()>;
    /// `out` ← every rank's `chunk` (`counts[r]` values from rank r), in rank order.
    fn all_gather_v(&self, chunk: &T, counts: &[usize], out: &mut T, what: &str) -> Result<()>;
    /// `all_gather_v` started: `chunk` is read (or copied) before it returns, and `out` is
    /// owned until `finish` hands it back filled. In between the rank may compute, and call
    /// other collectives (every rank in the same order). This default completes it at once
    /// (`Local`, `Threads`; NCCL, whose stream orders it before the work queued after it);
    /// MPI returns as it starts.
    fn start_all_gather_v(&self, chunk: &T, counts: &[usize], mut out: Owned<T>, what: &str) -> Result<InFlight<T>> {
        self.all_gather_v(chunk, counts, &mut out, what)?;
        Ok(InFlight::done(out))
    }
    /// `all_reduce_sum` started on `buf`, which is owned until `finish` hands it back holding
    /// the sum; as `start_all_gather_v` otherwise (data-parallel gradients summed in buckets
    /// while backward computes the layers before them).
    fn start_all_reduce_sum(&self, mut buf: Owned<T>, what: &str) -> Result<InFlight<T>> {
        self.all_reduce_sum(&mut buf, what)?;
        Ok(InFlight::done(buf))
    }
    /// `reduce_scatter_v_sum` started: `buf` is read (or copied) before it returns, and `out`
    /// (`counts[rank]` values) is owned until `finish` hands it back holding this rank's piece
    /// of the sum; as `start_all_gather_v` otherwise (ZeRO's gradients reduced while backward
    /// computes the layers before them).
    fn start_reduce_scatter_v_sum(
        &self,
        buf: &T,
        counts: &[usize],
        mut out: Owned<T>,
        what: &str,
    ) -> Result<InFlight<T>> {
        self.reduce_scatter_v_sum(buf, counts, &mut out, what)?;
        Ok(InFlight::done(out))
    }
    /// Waits for a collective this communicator started; its output.
    fn finish(&self, mut started: InFlight<T>, _what: &str) -> Result<Owned<T>> {
        while !started.test() {
            std::thread::yield_now();
        }
        Ok(started.into_out())
    }
    /// Sends `send` in pieces of `send_counts[r]` values to rank r; receives `recv_counts[r]`
    /// values from rank r into `recv`, in rank order.
    fn all_to_allv(
        &self,
        send: &T,
        send_counts: &[usize],
        recv: &mut T,
        recv_counts: &[usize],
        what: &str,
    ) -> Result<()>;

    // ---- host values ----------------------------------------------------------------------
    /// `buf` ← Σ over ranks of `buf`, in f64 (statistics, losses, norms).
    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()>;
    /// `out` ← every rank's `mine` (all the same length), in rank order.
    fn all_gather_u64(&self, mine: &[u64], out: &mut [u64], what: &str) -> Result<()>;
    /// Sends `send` in `size` equal pieces, piece r to rank r; `recv` gets piece `rank` of
    /// every rank's `send`, in rank order (row counts of an expert exchange).
    fn all_to_all_u64(&self, send: &[u64], recv: &mut [u64], what: &str) -> Result<()>;
    fn barrier(&self, what: &str) -> Result<()>;
    /// The ranks that pass the same `color`, as a communicator of their own, ranked in the
    /// order of this one. Every rank calls it.
    fn split(&self, color: usize, what: &str) -> Result<Arc<dyn Comm<T>>>;

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// Keeps MPI initialised while alive.
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Whether a launcher started this process as one of several.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|n| n.parse::<usize>().map_or(true, |n| n > 1)))
}

/// This process's rank among those of the job on its node, as the launcher says (Open MPI,
/// Slurm, MPICH/Hydra); `None` when no launcher says.
pub fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The ranks of this job: MPI when launched by `mpirun`/`srun` (and built with feature
/// `mpi`), else one process. `timeout` bounds every collective.
pub fn init(timeout: Duration) -> Result<(Guard, Arc<dyn Comm>)> {
    #[cfg(feature = "mpi")]
    if launched_by_mpi() {
        let (universe, comm) = Mpi::init(timeout)?;
        return Ok((Guard { _universe: Some(universe) }, Arc::new(comm)));
    }
    #[cfg(not(feature = "mpi"))]
    if launched_by_mpi() {
        anyhow::bail!(
            "launched as one of several processes, but this kiln was built without MPI: build with `--features mpi` (Open MPI: apt install openmpi-bin libopenmpi-dev libclang-dev)"
        );
    }
    let _ = timeout;
    let guard = Guard {
        #[cfg(feature = "mpi")]
        _universe: None,
    };
    Ok((guard, Arc::new(Local)))
}

/// The contiguous range `[start, end)` of `0..len` that rank `rank` of `size` owns: the
/// first `len % size` ranks hold one more element.
pub fn shard(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// `shard` of the values `range` (of a larger whole), as a range of that whole.
pub fn shard_in(range: &std::ops::Range<usize>, rank: usize, size: usize) -> std::ops::Range<usize> {
    let local = shard(range.len(), rank, size);
    range.start + local.start..range.start + local.end
}

/// The lengths of `shard(len, r, size)` for every rank r.
pub fn shard_counts(len: usize, size: usize) -> Vec<usize> {
    (0..size).map(|r| shard(len, r, size).len()).collect()
}

/// Where each of the pieces `counts` starts when laid end to end.
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_range_once() {
        for (len, size) in [(10, 3), (3, 4), (0, 2), (1024, 4)] {
            let ranges: Vec<_> = (0..size).map(|r| shard(len, r, size)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[size - 1].end, len);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            let (min, max) = (ranges.iter().map(|r| r.len()).min(), ranges.iter().map(|r| r.len()).max());
            assert!(max.unwrap() - min.unwrap() <= 1);
            assert_eq!(shard_counts(len, size), ranges.iter().map(|r| r.len()).collect::<Vec<_>>());
            let offset = 7..7 + len;
            assert!((0..size).all(|r| shard_in(&offset, r, size) == (ranges[r].start + 7..ranges[r].end + 7)));
        }
    }

    #[test]
    fn one_process_collectives_are_identities() {
        let c = Local;
        let mut x = vec![1.0, 2.0];
        c.all_reduce_sum(&mut x, "x").unwrap();
        assert_eq!(x, [1.0, 2.0]);
        let mut out = vec![0.0; 2];
        c.all_gather_v(&x, &[2], &mut out, "x").unwrap();
        assert_eq!(out, x);
        c.reduce_scatter_v_sum(&x, &[2], &mut out, "x").unwrap();
        assert_eq!(out, x);
        let mut recv = vec![0.0; 2];
        c.all_to_allv(&x, &[2], &mut recv, &[2], "x").unwrap();
        assert_eq!(recv, x);
        assert!(c.all_gather_v(&x, &[2], &mut [0.0; 3], "x").is_err());
        let mut n = [0u64; 2];
        c.all_gather_u64(&[4, 5], &mut n, "n").unwrap();
        assert_eq!(n, [4, 5]);
    }
}
