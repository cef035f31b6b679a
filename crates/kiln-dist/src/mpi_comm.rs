//! Every process of an `mpirun`/`srun` launch, through Open MPI (the `mpi` crate).
//!
//! Each collective is started non-blocking and polled until it completes or `timeout`
//! passes. On a timeout a rank cannot cancel the collective, so it names what it was doing,
//! asks every other rank for a sign of life (point-to-point, for a couple of seconds), prints
//! the ranks that did not answer (dead, or hanging outside the collective) and aborts the
//! whole job: no rank is left waiting forever, and no checkpoint is being written (checkpoints
//! are written between collectives, atomically).
//!
//! A rank that dies is seen by the launcher, which sends the others SIGTERM and, a second
//! later, SIGKILL. A rank that gets SIGTERM while a collective has not completed for a moment
//! says which collective it was in and which ranks no longer answer, and keeps waiting: the
//! launcher ends it, or, when the signal was a stop request to every rank, the collective
//! completes and the run stops after its step as usual.

use crate::exchanged_sum::{rounds, sum_pieces, Round};
use crate::reused_buffers::ReusedBuffers;
use crate::{Comm, Completion, InFlight, Owned};
use anyhow::{ensure, Context, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::request::{Request, Scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

pub struct Mpi {
    world: SimpleCommunicator,
    /// Set by SIGTERM.
    terminated: Arc<AtomicBool>,
    /// Rank in the launch (`MPI_COMM_WORLD`) of each member, for messages.
    world_ranks: Vec<usize>,
    timeout: Duration,
    /// MPI runs funneled: only the thread that initialised it may call it.
    owner: ThreadId,
    /// Buffers of the collectives (copies of what they send, a reduce-scatter's pieces),
    /// reused (shared with the groups split off).
    reused_buffers: Arc<ReusedBuffers>,
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED and every method first checks that it
// runs on the thread that initialised it, so the communicator is never used concurrently.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

/// The most values a blocking reduce-scatter receives in one round (16 MiB of f32), so its
/// buffer stays small and is reused, where the pieces of a whole reduction would be as large
/// as the values reduced.
const ROUND_VALUES: usize = 1 << 22;

/// Tag of the sign-of-life messages sent after a timeout.
const ALIVE_TAG: i32 = 0x6b69;

impl Mpi {
    pub fn init(timeout: Duration) -> Result<(Universe, Self)> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .context("MPI initialisation failed (was MPI already initialised?)")?;
        let world = universe.world();
        let world_ranks = (0..world.size() as usize).collect();
        let terminated = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&terminated))
            .context("cannot watch for SIGTERM")?;
        let owner = std::thread::current().id();
        let reused_buffers = Arc::default();
        Ok((universe, Self { world, terminated, world_ranks, timeout, owner, reused_buffers }))
    }

    /// `all_to_allv` sending rank r `sc[r]` values from `send[from[r]..]`.
    fn all_to_allv_at(
        &self,
        send: &[f32],
        (sc, from): (&[usize], &[usize]),
        recv: &mut [f32],
        rc: &[usize],
        what: &str,
    ) -> Result<()> {
        self.check_thread();
        ensure!(
            sc.len() == self.size() && from.len() == self.size() && rc.len() == self.size(),
            "all_to_allv ({what}): one count per rank"
        );
        ensure!(
            sc.iter().zip(from).all(|(&c, &f)| f + c <= send.len()) && rc.iter().sum::<usize>() == recv.len(),
            "all_to_allv ({what}): counts do not fit the buffers"
        );
        let (send_counts, _) = counts_displs(sc);
        let send_displs = from.iter().map(|&f| f as Count).collect::<Vec<_>>();
        let (recv_counts, recv_displs) = counts_displs(rc);
        let send = Partition::new(send, send_counts, send_displs);
        let mut recv = PartitionMut::new(recv, recv_counts, recv_displs);
        mpi::request::scope(|scope| {
            let r = self.world.immediate_all_to_all_varcount_into(scope, &send, &mut recv);
            self.finish("all_to_allv", what, r);
        });
        Ok(())
    }

    fn check_thread(&self) {
        assert_eq!(
            std::thread::current().id(),
            self.owner,
            "MPI called from a thread other than the one that initialised it"
        );
    }

    /// Polls `request` until it completes (`finish_with`).
    fn finish<'a, D: ?Sized, S: Scope<'a>>(&self, op: &str, what: &str, request: Request<'a, D, S>) {
        let mut pending = Some(request);
        self.finish_with(op, what, || match pending.take().expect("a request not yet complete").test() {
            Ok(_) => true,
            Err(r) => {
                pending = Some(r);
                false
            }
        });
    }

    /// Polls `test` until it says the collective completed; past the timeout, reports and
    /// aborts the job. Under SIGTERM, a collective still waiting after a moment is reported
    /// (once) with the ranks that no longer answer.
    fn finish_with(&self, op: &str, what: &str, mut test: impl FnMut() -> bool) {
        let started = Instant::now();
        let mut signalled: Option<Instant> = None;
        while !test() {
            if started.elapsed() > self.timeout {
                self.give_up(op, what);
            }
            if signalled.is_none() && self.terminated.load(Ordering::Relaxed) {
                signalled = Some(Instant::now());
            }
            if signalled.is_some_and(|at| at.elapsed() > Duration::from_millis(200)) {
                let silent = self.silent_ranks(Duration::from_millis(300));
                eprintln!(
                    "error: rank {}: stopped by a signal during {op} ({what}), still waiting for rank {} (the launcher stops every rank when one exits)",
                    self.world_ranks[self.rank()],
                    list(&silent)
                );
                signalled = Some(Instant::now() + self.timeout);
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// The ranks (in the launch) that send no sign of life within `wait`: dead, or busy
    /// outside a collective. Every rank asking at about the same time hears the others.
    fn silent_ranks(&self, wait: Duration) -> Vec<usize> {
        let (me, size) = (self.world.rank(), self.world.size());
        // A dead rank never receives it, so the send may never complete: its buffer lives for
        // the rest of the process, and MPI is told to finish the request on its own.
        let token: &'static [i32] = Box::leak(Box::new([me]));
        let mut heard = vec![false; size as usize];
        heard[me as usize] = true;
        mpi::request::scope(|scope| {
            for r in (0..size).filter(|&r| r != me) {
                let send = self.world.process_at_rank(r).immediate_send_with_tag(scope, token, ALIVE_TAG);
                // SAFETY: the buffer is 'static; MPI_Request_free lets the send complete (or
                // not) without anyone waiting on it.
                unsafe {
                    let (mut raw, _, _) = send.into_raw();
                    mpi::ffi::MPI_Request_free(&mut raw);
                }
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline && !heard.iter().all(|&h| h) {
                if let Some((message, status)) = self.world.any_process().immediate_matched_probe_with_tag(ALIVE_TAG) {
                    let mut token = [0i32];
                    message.matched_receive_into(&mut token[..]);
                    heard[status.source_rank() as usize] = true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        heard.iter().enumerate().filter(|(_, &h)| !h).map(|(r, _)| self.world_ranks[r]).collect()
    }

    /// `buf` ← Σ over ranks of `send`, a copy of `buf` (the binding has no in-place form).
    fn all_reduce<T: Equivalence>(&self, send: &[T], buf: &mut [T], what: &str) -> Result<()> {
        self.check_thread();
        mpi::request::scope(|scope| {
            let r = self.world.immediate_all_reduce_into(scope, send, buf, SystemOperation::sum());
            self.finish("all_reduce", what, r);
        });
        Ok(())
    }

    /// On the owning thread, `counts` fit an all-gather of `chunk` values into `out` values.
    fn check_gather(&self, counts: &[usize], chunk: usize, out: usize, what: &str) -> Result<()> {
        self.check_thread();
        ensure!(
            counts.len() == self.size() && counts[self.rank()] == chunk && counts.iter().sum::<usize>() == out,
            "all_gather_v ({what}): counts {counts:?} do not fit {chunk} values into {out}"
        );
        Ok(())
    }

    /// On the owning thread, `counts` fit a reduce-scatter of `values` into `out` values.
    fn check_scatter(&self, counts: &[usize], values: usize, out: usize, what: &str) -> Result<()> {
        self.check_thread();
        ensure!(
            counts.len() == self.size() && counts.iter().sum::<usize>() == values && counts[self.rank()] == out,
            "reduce_scatter_v ({what}): counts {counts:?} do not fit {values} values into {out}"
        );
        Ok(())
    }

    /// After a timeout: which ranks answer at all, then abort every process.
    fn give_up(&self, op: &str, what: &str) -> ! {
        let silent = self.silent_ranks(Duration::from_secs(3));
        eprintln!(
            "error: rank {}: {op} ({what}) did not complete within {:.0} s; no answer from rank {} (dead or hanging); stopping all ranks",
            self.world_ranks[self.rank()],
            self.timeout.as_secs_f64(),
            list(&silent)
        );
        self.world.abort(3)
    }
}

/// A started collective (`MPI_Iallgatherv`, `MPI_Iallreduce`, `MPI_Ialltoallv`) with what it
/// reads until it completes.
struct StartedRequest {
    raw: mpi::ffi::MPI_Request,
    /// The values it sends: a copy, given back to `reused_buffers` (where it came from there)
    /// once complete.
    send: Vec<f32>,
    /// A gather's counts and displacements, or an all-to-all's send ones (empty for an
    /// all-reduce).
    counts: Vec<Count>,
    displs: Vec<Count>,
    reused_buffers: Option<Arc<ReusedBuffers>>,
    /// The thread that may call MPI (funneled).
    owner: ThreadId,
}

impl StartedRequest {
    /// A request not yet started, which will send `send` (a copy from `reused_buffers`, if given).
    fn new(
        mpi: &Mpi,
        (send, reused_buffers): (Vec<f32>, Option<Arc<ReusedBuffers>>),
        (counts, displs): (Vec<Count>, Vec<Count>),
    ) -> Box<Self> {
        // SAFETY: reads the null handle's value.
        let raw = unsafe { mpi::ffi::RSMPI_REQUEST_NULL };
        Box::new(Self { raw, send, counts, displs, reused_buffers, owner: mpi.owner })
    }

    fn complete(&self) -> bool {
        // SAFETY: reads the null handle's value.
        self.raw == unsafe { mpi::ffi::RSMPI_REQUEST_NULL }
    }
}

// SAFETY: the request is only tested on the thread that initialised MPI (checked), as
// MPI_THREAD_FUNNELED allows.
unsafe impl Send for StartedRequest {}

impl Completion for StartedRequest {
    fn test(&mut self) -> bool {
        assert_eq!(
            std::thread::current().id(),
            self.owner,
            "MPI called from a thread other than the one that initialised it"
        );
        let mut flag = 0;
        // SAFETY: a live request, or the null handle once complete (for which MPI_Test says
        // complete).
        unsafe { mpi::ffi::MPI_Test(&mut self.raw, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE) };
        if let (true, Some(copies)) = (flag != 0, &self.reused_buffers) {
            copies.give_back(std::mem::take(&mut self.send));
        }
        flag != 0
    }
}

impl Drop for StartedRequest {
    /// Dropped before it completed (a rank unwinding), it leaks what MPI may still read.
    fn drop(&mut self) {
        if !self.complete() {
            std::mem::forget(std::mem::take(&mut self.send));
            std::mem::forget(std::mem::take(&mut self.counts));
            std::mem::forget(std::mem::take(&mut self.displs));
        }
    }
}

/// A reduce-scatter started as an exchange of pieces (`exchanged_sum`): once they have all
/// arrived, their sum is written into the output the `InFlight` owns.
struct SumOnArrival {
    request: Box<StartedRequest>,
    /// Every rank's piece of this rank's values, and their counts and displacements.
    pieces: Vec<f32>,
    piece_counts: Vec<Count>,
    piece_displs: Vec<Count>,
    /// The output's values (boxed by the `InFlight`, so they stay where they are).
    into: *mut f32,
    len: usize,
}

// SAFETY: tested only on the thread that initialised MPI (`StartedRequest::test` checks);
// `into` points at values its `InFlight` owns and nothing else touches until it completes.
unsafe impl Send for SumOnArrival {}

impl Completion for SumOnArrival {
    fn test(&mut self) -> bool {
        if self.request.complete() {
            return true;
        }
        if !self.request.test() {
            return false;
        }
        // SAFETY: the output's `len` values, alive while its `InFlight` is, which is testing.
        let out = unsafe { std::slice::from_raw_parts_mut(self.into, self.len) };
        sum_pieces(&self.pieces, out);
        // Freed, not kept (see `exchanged_sum`).
        self.pieces = Vec::new();
        true
    }
}

impl Drop for SumOnArrival {
    /// Dropped before it completed (a rank unwinding), it leaks what MPI may still write.
    fn drop(&mut self) {
        if !self.request.complete() {
            std::mem::forget(std::mem::take(&mut self.pieces));
            std::mem::forget(std::mem::take(&mut self.piece_counts));
            std::mem::forget(std::mem::take(&mut self.piece_displs));
        }
    }
}

/// "1, 3", or "?" for none.
fn list(ranks: &[usize]) -> String {
    if ranks.is_empty() {
        return "?".into();
    }
    ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

fn counts_displs(c: &[usize]) -> (Vec<Count>, Vec<Count>) {
    let counts: Vec<Count> = c.iter().map(|&n| n as Count).collect();
    let displs = counts.iter().scan(0, |acc, &n| {
        let d = *acc;
        *acc += n;
        Some(d)
    });
    (counts.clone(), displs.collect())
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()> {
        let send = self.reused_buffers.copy_of(buf);
        self.all_reduce(&send, buf, what)?;
        self.reused_buffers.give_back(send);
        Ok(())
    }

    /// An exchange of the pieces and a local sum (`exchanged_sum`), faster than Open MPI's own
    /// reduce-scatter, in rounds of at most `ROUND_VALUES` values received (a round sends
    /// each rank the next part of its piece), into a reused buffer.
    fn reduce_scatter_v_sum(&self, buf: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        self.check_scatter(counts, buf.len(), out.len(), what)?;
        let size = self.size();
        let per_rank = (ROUND_VALUES / size).max(1);
        let mut pieces = self.reused_buffers.values(out.len().min(per_rank) * size);
        for Round { at, sent, from } in rounds(counts, per_rank) {
            let mine = sent[self.rank()];
            let received = &mut pieces[..mine * size];
            self.all_to_allv_at(buf, (&sent, &from), received, &vec![mine; size], what)?;
            if mine > 0 {
                // Past the end of this rank's piece, its rounds only send.
                sum_pieces(received, &mut out[at..at + mine]);
            }
        }
        self.reused_buffers.give_back(pieces);
        Ok(())
    }

    fn all_gather_v(&self, chunk: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        self.check_gather(counts, chunk.len(), out.len(), what)?;
        let (counts, displs) = counts_displs(counts);
        let mut out = PartitionMut::new(out, counts, displs);
        mpi::request::scope(|scope| {
            let r = self.world.immediate_all_gather_varcount_into(scope, chunk, &mut out);
            self.finish("all_gather_v", what, r);
        });
        Ok(())
    }

    fn start_all_gather_v(
        &self,
        chunk: &[f32],
        counts: &[usize],
        mut out: Owned<[f32]>,
        what: &str,
    ) -> Result<InFlight<[f32]>> {
        self.check_gather(counts, chunk.len(), out.len(), what)?;
        // A chunk is 1/N of a layer, copied afresh: kept copies of every size of chunk would
        // stay allocated between steps (ZeRO-3 counts its memory a layer at a time).
        let mut request = StartedRequest::new(self, (chunk.to_vec(), None), counts_displs(counts));
        // SAFETY: the request holds the chunk and counts MPI reads, and the `InFlight` the
        // output it writes (boxed: moving it does not move the values), until it completes;
        // dropped before then, both leak them. Datatype and communicator are live handles.
        unsafe {
            mpi::ffi::MPI_Iallgatherv(
                request.send.as_ptr().cast(),
                request.send.len() as Count,
                f32::equivalent_datatype().as_raw(),
                out.as_mut_ptr().cast(),
                request.counts.as_ptr(),
                request.displs.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                self.world.as_raw(),
                &mut request.raw,
            );
        }
        Ok(InFlight::pending("all_gather_v", request, out))
    }

    fn start_all_reduce_sum(&self, mut buf: Owned<[f32]>, what: &str) -> Result<InFlight<[f32]>> {
        self.check_thread();
        ensure!(buf.len() <= Count::MAX as usize, "all_reduce ({what}): {} values are more than MPI counts", buf.len());
        let send = (self.reused_buffers.copy_of(&buf), Some(Arc::clone(&self.reused_buffers)));
        let mut request = StartedRequest::new(self, send, (Vec::new(), Vec::new()));
        // SAFETY: the request holds the copy MPI sends, and the `InFlight` the buffer it sums
        // into (boxed: moving it does not move the values), until it completes; dropped before
        // then, both leak them. Datatype, operation and communicator are live handles.
        unsafe {
            mpi::ffi::MPI_Iallreduce(
                request.send.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len() as Count,
                f32::equivalent_datatype().as_raw(),
                SystemOperation::sum().as_raw(),
                self.world.as_raw(),
                &mut request.raw,
            );
        }
        Ok(InFlight::pending("all_reduce", request, buf))
    }

    fn start_reduce_scatter_v_sum(
        &self,
        buf: &[f32],
        counts: &[usize],
        mut out: Owned<[f32]>,
        what: &str,
    ) -> Result<InFlight<[f32]>> {
        self.check_scatter(counts, buf.len(), out.len(), what)?;
        let send = (self.reused_buffers.copy_of(buf), Some(Arc::clone(&self.reused_buffers)));
        let mut request = StartedRequest::new(self, send, counts_displs(counts));
        let mut pieces = vec![0.0; out.len() * self.size()];
        let (piece_counts, piece_displs) = counts_displs(&vec![out.len(); self.size()]);
        // SAFETY: the request holds the copy MPI sends and its counts, and `SumOnArrival` the
        // buffer the pieces arrive in and their counts, until it completes; dropped before
        // then, both leak them. Datatype and communicator are live handles.
        unsafe {
            mpi::ffi::MPI_Ialltoallv(
                request.send.as_ptr().cast(),
                request.counts.as_ptr(),
                request.displs.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                pieces.as_mut_ptr().cast(),
                piece_counts.as_ptr(),
                piece_displs.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                self.world.as_raw(),
                &mut request.raw,
            );
        }
        let (into, len) = (out.as_mut_ptr(), out.len());
        let summing = SumOnArrival { request, pieces, piece_counts, piece_displs, into, len };
        Ok(InFlight::pending("reduce_scatter_v", Box::new(summing), out))
    }

    fn finish(&self, mut started: InFlight<[f32]>, what: &str) -> Result<Owned<[f32]>> {
        self.check_thread();
        self.finish_with(started.op(), what, || started.test());
        Ok(started.into_out())
    }

    fn all_to_allv(&self, send: &[f32], sc: &[usize], recv: &mut [f32], rc: &[usize], what: &str) -> Result<()> {
        ensure!(sc.iter().sum::<usize>() == send.len(), "all_to_allv ({what}): counts do not add up to the buffers");
        let (_, from) = counts_displs(sc);
        let from: Vec<usize> = from.into_iter().map(|d| d as usize).collect();
        self.all_to_allv_at(send, (sc, &from), recv, rc, what)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        let send = buf.to_vec();
        self.all_reduce(&send, buf, what)
    }

    fn all_gather_u64(&self, mine: &[u64], out: &mut [u64], what: &str) -> Result<()> {
        self.check_thread();
        ensure!(
            mine.len() * self.size() == out.len(),
            "all_gather ({what}): {} x {} into {}",
            mine.len(),
            self.size(),
            out.len()
        );
        mpi::request::scope(|scope| {
            let r = self.world.immediate_all_gather_into(scope, mine, out);
            self.finish("all_gather", what, r);
        });
        Ok(())
    }

    fn all_to_all_u64(&self, send: &[u64], recv: &mut [u64], what: &str) -> Result<()> {
        self.check_thread();
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(self.size()),
            "all_to_all ({what}): {} values for {} ranks",
            send.len(),
            self.size()
        );
        mpi::request::scope(|scope| {
            let r = self.world.immediate_all_to_all_into(scope, send, recv);
            self.finish("all_to_all", what, r);
        });
        Ok(())
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.check_thread();
        self.finish("barrier", what, self.world.immediate_barrier());
        Ok(())
    }

    fn split(&self, color: usize, what: &str) -> Result<Arc<dyn Comm>> {
        self.check_thread();
        let group = self
            .world
            .split_by_color(Color::with_value(color as i32))
            .with_context(|| format!("split ({what}): no communicator for color {color}"))?;
        let mut world_ranks = vec![0usize; group.size() as usize];
        group.all_gather_into(&self.world_ranks[self.rank()], &mut world_ranks[..]);
        let terminated = Arc::clone(&self.terminated);
        let (timeout, owner, reused_buffers) = (self.timeout, self.owner, Arc::clone(&self.reused_buffers));
        Ok(Arc::new(Self { world: group, terminated, world_ranks, timeout, owner, reused_buffers }))
    }
}
