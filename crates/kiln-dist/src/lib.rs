//! Collectives across processes. `Comm` is what training needs of them: sums, gathers and
//! scatters of f32 buffers, broadcasts, all-to-all with counts, and barriers, each with a
//! label naming it in errors. `Local` is one process; `Mpi` (feature `mpi`) is every process
//! of an `mpirun`/`srun` launch, each collective under a timeout.
//!
//! `init` picks the implementation from the launcher's environment and installs it as the
//! process's `world()`; keep the returned guard alive until the program ends (it finalises
//! MPI).

mod local;
#[cfg(feature = "mpi")]
mod mpi_comm;

pub use local::Local;
#[cfg(feature = "mpi")]
pub use mpi_comm::Mpi;

use anyhow::Result;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Collective operations over the ranks of a job. Every rank calls the same collectives in
/// the same order; `what` names the call in errors ("gradients at step 12").
pub trait Comm {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `buf` ← Σ over ranks of `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()>;
    /// `out` ← the ranks' `chunk`s (all the same length) in rank order.
    fn all_gather(&self, chunk: &[f32], out: &mut [f32], what: &str) -> Result<()>;
    /// `out` ← Σ over ranks of this rank's `out.len()`-long chunk of `buf` (chunk r for rank r).
    fn reduce_scatter_sum(&self, buf: &[f32], out: &mut [f32], what: &str) -> Result<()>;
    /// `out` ← Σ over ranks of this rank's piece of `buf`, the pieces being `counts[r]` long
    /// for rank r, in rank order (`out.len() == counts[rank]`).
    fn reduce_scatter_v_sum(&self, buf: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()>;
    /// `buf` ← `root`'s `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize, what: &str) -> Result<()>;
    /// Sends `send[..]` in pieces of `send_counts[r]` to rank r; receives `recv_counts[r]`
    /// values from rank r into `recv`, in rank order.
    fn all_to_allv(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
        what: &str,
    ) -> Result<()>;
    fn barrier(&self, what: &str) -> Result<()>;
    /// The ranks that pass the same `color`, as a communicator of their own, ranked in the
    /// order of this one. Every rank calls it.
    fn split(&self, color: usize, what: &str) -> Result<Arc<dyn Comm + Send + Sync>>;

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// The communicator of this process, set by `init` (one process without it).
static WORLD: OnceLock<Box<dyn Comm + Send + Sync>> = OnceLock::new();

pub fn world() -> &'static dyn Comm {
    WORLD.get_or_init(|| Box::new(Local)).as_ref()
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

/// Sets up `world()`: MPI when launched by `mpirun`/`srun` (and built with feature `mpi`),
/// else one process. `timeout` bounds every collective.
pub fn init(timeout: Duration) -> Result<Guard> {
    #[cfg(feature = "mpi")]
    if launched_by_mpi() {
        let (universe, comm) = Mpi::init(timeout)?;
        let _ = WORLD.set(Box::new(comm));
        return Ok(Guard { _universe: Some(universe) });
    }
    #[cfg(not(feature = "mpi"))]
    if launched_by_mpi() {
        anyhow::bail!(
            "launched as one of several processes, but this kiln was built without MPI: build with `--features mpi` (Open MPI: apt install openmpi-bin libopenmpi-dev libclang-dev)"
        );
    }
    let _ = timeout;
    let _ = WORLD.set(Box::new(Local));
    Ok(Guard {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// The contiguous range `[start, end)` of `0..len` that rank `rank` of `size` owns: the
/// first `len % size` ranks hold one more element.
pub fn shard(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
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
        }
    }

    #[test]
    fn one_process_collectives_are_identities() {
        let c = Local;
        let mut x = vec![1.0, 2.0];
        c.all_reduce_sum(&mut x, "x").unwrap();
        assert_eq!(x, [1.0, 2.0]);
        let mut out = vec![0.0; 2];
        c.all_gather(&x, &mut out, "x").unwrap();
        assert_eq!(out, x);
        c.reduce_scatter_sum(&x, &mut out, "x").unwrap();
        assert_eq!(out, x);
        c.reduce_scatter_v_sum(&x, &[2], &mut out, "x").unwrap();
        assert_eq!(out, x);
        let mut recv = vec![0.0; 2];
        c.all_to_allv(&x, &[2], &mut recv, &[2], "x").unwrap();
        assert_eq!(recv, x);
        assert!(c.all_gather(&x, &mut [0.0; 3], "x").is_err());
    }
}
