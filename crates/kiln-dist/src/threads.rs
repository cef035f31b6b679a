//! The ranks of one process, a thread each: every collective is a rendezvous in shared
//! memory where each rank leaves its part and reads everyone's. It runs the data-parallel,
//! ZeRO and expert-parallel logic under plain `cargo test`, with no launcher; sums are taken
//! in rank order. A rank that panics makes the others fail at their next collective instead
//! of waiting; one that never arrives makes them fail after the timeout, naming it.

use crate::{offsets, Comm};
use anyhow::{bail, ensure, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct Threads {
    hub: Arc<Hub>,
    rank: usize,
    /// Splits made of `hub` so far: every rank makes them in the same order, so the count
    /// tells the ranks of one split apart from another's.
    splits: AtomicUsize,
}

/// What a rank leaves for the others in one collective.
enum Part {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    /// Values in pieces for each rank, and the pieces' lengths (all-to-all).
    Pieces(Vec<f32>, Vec<usize>),
}

struct Hub {
    size: usize,
    timeout: Duration,
    round: Mutex<Round>,
    changed: Condvar,
    /// Sub-communicators by (split number, color).
    groups: Mutex<HashMap<(usize, usize), Arc<Hub>>>,
}

struct Round {
    /// Each rank's part of the collective under way.
    parts: Vec<Option<Arc<Part>>>,
    /// Ranks yet to read a complete round; the next one starts when none are left.
    readers: usize,
    /// A rank that panicked.
    failed: Option<usize>,
}

impl Hub {
    fn new(size: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            size,
            timeout,
            round: Mutex::new(Round { parts: vec![None; size], readers: 0, failed: None }),
            changed: Condvar::new(),
            groups: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Threads {
    /// `size` ranks, element r being rank r's communicator; a collective waits at most
    /// `timeout` for the other ranks.
    pub fn new(size: usize, timeout: Duration) -> Vec<Self> {
        let hub = Hub::new(size, timeout);
        (0..size).map(|rank| Self { hub: Arc::clone(&hub), rank, splits: AtomicUsize::new(0) }).collect()
    }

    /// Leaves `part` and returns every rank's, in rank order, once all have arrived.
    fn exchange(&self, part: Part, what: &str) -> Result<Vec<Arc<Part>>> {
        let hub = &self.hub;
        let deadline = Instant::now() + hub.timeout;
        let mut round = hub.lock();
        // The previous collective is complete when every rank has read it.
        while round.readers > 0 {
            round = self.wait(round, deadline, what)?;
        }
        round.parts[self.rank] = Some(Arc::new(part));
        if round.parts.iter().all(Option::is_some) {
            round.readers = hub.size;
            hub.changed.notify_all();
        }
        while round.readers == 0 {
            round = self.wait(round, deadline, what)?;
        }
        let parts = round.parts.iter().map(|p| Arc::clone(p.as_ref().expect("a complete round"))).collect();
        round.readers -= 1;
        if round.readers == 0 {
            round.parts.iter_mut().for_each(|p| *p = None);
            hub.changed.notify_all();
        }
        Ok(parts)
    }

    fn wait<'a>(&self, round: MutexGuard<'a, Round>, deadline: Instant, what: &str) -> Result<MutexGuard<'a, Round>> {
        let now = Instant::now();
        if let Some(r) = round.failed {
            bail!("rank {}: {what}: rank {r} failed", self.rank);
        }
        if now >= deadline {
            let missing: Vec<String> =
                round.parts.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(r, _)| r.to_string()).collect();
            bail!(
                "rank {}: {what} did not complete within {:.0} s; no part from rank {}",
                self.rank,
                self.hub.timeout.as_secs_f64(),
                missing.join(", ")
            );
        }
        Ok(self.hub.changed.wait_timeout(round, deadline - now).unwrap_or_else(|e| e.into_inner()).0)
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.hub.lock().failed = Some(self.rank);
            self.hub.changed.notify_all();
        }
    }
}

fn f32s<'a>(part: &'a Part, what: &str) -> Result<&'a [f32]> {
    match part {
        Part::F32(v) => Ok(v),
        _ => bail!("{what}: the ranks called different collectives"),
    }
}

/// Σ over ranks of `range` of every rank's values, in rank order.
fn sum_range(parts: &[Arc<Part>], range: std::ops::Range<usize>, out: &mut [f32], what: &str) -> Result<()> {
    out.fill(0.0);
    for part in parts {
        let values = f32s(part, what)?;
        ensure!(values.len() >= range.end, "{what}: ranks sent different lengths");
        out.iter_mut().zip(&values[range.clone()]).for_each(|(o, v)| *o += v);
    }
    Ok(())
}

impl Comm for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.hub.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()> {
        let parts = self.exchange(Part::F32(buf.to_vec()), what)?;
        sum_range(&parts, 0..buf.len(), buf, what)
    }

    fn reduce_scatter_v_sum(&self, buf: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(
            counts.len() == self.size() && counts.iter().sum::<usize>() == buf.len() && counts[self.rank] == out.len(),
            "reduce_scatter_v ({what}): counts {counts:?} do not fit {} values into {}",
            buf.len(),
            out.len()
        );
        let parts = self.exchange(Part::F32(buf.to_vec()), what)?;
        let start = offsets(counts)[self.rank];
        sum_range(&parts, start..start + out.len(), out, what)
    }

    fn all_gather_v(&self, chunk: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(
            counts.len() == self.size()
                && counts[self.rank] == chunk.len()
                && counts.iter().sum::<usize>() == out.len(),
            "all_gather_v ({what}): counts {counts:?} do not fit {} values into {}",
            chunk.len(),
            out.len()
        );
        let parts = self.exchange(Part::F32(chunk.to_vec()), what)?;
        for (part, (start, &count)) in parts.iter().zip(offsets(counts).into_iter().zip(counts)) {
            let values = f32s(part, what)?;
            ensure!(values.len() == count, "all_gather_v ({what}): a rank sent {} values, not {count}", values.len());
            out[start..start + count].copy_from_slice(values);
        }
        Ok(())
    }

    fn all_to_allv(&self, send: &[f32], sc: &[usize], recv: &mut [f32], rc: &[usize], what: &str) -> Result<()> {
        ensure!(sc.len() == self.size() && rc.len() == self.size(), "all_to_allv ({what}): one count per rank");
        ensure!(
            sc.iter().sum::<usize>() == send.len() && rc.iter().sum::<usize>() == recv.len(),
            "all_to_allv ({what}): counts do not add up to the buffers"
        );
        let parts = self.exchange(Part::Pieces(send.to_vec(), sc.to_vec()), what)?;
        for (part, (start, &count)) in parts.iter().zip(offsets(rc).into_iter().zip(rc)) {
            let Part::Pieces(values, counts) = part.as_ref() else {
                bail!("{what}: the ranks called different collectives")
            };
            let from = offsets(counts)[self.rank];
            ensure!(
                counts[self.rank] == count,
                "all_to_allv ({what}): expected {count} values, a rank sent {}",
                counts[self.rank]
            );
            recv[start..start + count].copy_from_slice(&values[from..from + count]);
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        let parts = self.exchange(Part::F64(buf.to_vec()), what)?;
        buf.fill(0.0);
        for part in &parts {
            let Part::F64(values) = part.as_ref() else { bail!("{what}: the ranks called different collectives") };
            ensure!(values.len() == buf.len(), "{what}: ranks sent different lengths");
            buf.iter_mut().zip(values).for_each(|(b, v)| *b += v);
        }
        Ok(())
    }

    fn all_gather_u64(&self, mine: &[u64], out: &mut [u64], what: &str) -> Result<()> {
        ensure!(
            mine.len() * self.size() == out.len(),
            "all_gather ({what}): {} x {} into {}",
            mine.len(),
            self.size(),
            out.len()
        );
        let parts = self.exchange(Part::U64(mine.to_vec()), what)?;
        for (part, out) in parts.iter().zip(out.chunks_mut(mine.len().max(1))) {
            let Part::U64(values) = part.as_ref() else { bail!("{what}: the ranks called different collectives") };
            ensure!(values.len() == out.len(), "{what}: ranks sent different lengths");
            out.copy_from_slice(values);
        }
        Ok(())
    }

    fn all_to_all_u64(&self, send: &[u64], recv: &mut [u64], what: &str) -> Result<()> {
        let size = self.size();
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(size),
            "all_to_all ({what}): {} values for {size} ranks",
            send.len()
        );
        let piece = send.len() / size;
        let parts = self.exchange(Part::U64(send.to_vec()), what)?;
        for (part, out) in parts.iter().zip(recv.chunks_mut(piece.max(1))) {
            let Part::U64(values) = part.as_ref() else { bail!("{what}: the ranks called different collectives") };
            ensure!(values.len() == send.len(), "{what}: ranks sent different lengths");
            out.copy_from_slice(&values[self.rank * piece..(self.rank + 1) * piece]);
        }
        Ok(())
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.exchange(Part::U64(Vec::new()), what).map(|_| ())
    }

    fn split(&self, color: usize, what: &str) -> Result<Arc<dyn Comm>> {
        let mut colors = vec![0u64; self.size()];
        self.all_gather_u64(&[color as u64], &mut colors, what)?;
        let members: Vec<usize> = (0..self.size()).filter(|&r| colors[r] == color as u64).collect();
        let number = self.splits.fetch_add(1, Ordering::SeqCst);
        let hub = {
            let mut groups = self.hub.groups.lock().unwrap_or_else(|e| e.into_inner());
            let timeout = self.hub.timeout;
            Arc::clone(groups.entry((number, color)).or_insert_with(|| Hub::new(members.len(), timeout)))
        };
        let rank = members.iter().position(|&r| r == self.rank).expect("a member of its own color");
        Ok(Arc::new(Self { hub, rank, splits: AtomicUsize::new(0) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of `size`, each on its own thread; returns their results.
    fn on_ranks<R: Send>(size: usize, f: impl Fn(&Threads) -> R + Sync) -> Vec<R> {
        let comms = Threads::new(size, Duration::from_secs(10));
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_agree_with_their_definitions() {
        let results = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let mut sum = vec![r, 10.0 * r];
            c.all_reduce_sum(&mut sum, "sum").unwrap();
            // Rank r receives piece r (lengths 1, 2, 1) of Σ over ranks.
            let buf: Vec<f32> = (0..4).map(|i| i as f32 + r).collect();
            let counts = [1, 2, 1];
            let mut mine = vec![0.0; counts[c.rank()]];
            c.reduce_scatter_v_sum(&buf, &counts, &mut mine, "scatter").unwrap();
            let mut gathered = vec![0.0; 4];
            c.all_gather_v(&mine, &counts, &mut gathered, "gather").unwrap();
            // Rank r sends r + 1 copies of its rank to every rank.
            let send = vec![r; 3 * (c.rank() + 1)];
            let mut recv = vec![0.0; 6];
            c.all_to_allv(&send, &[c.rank() + 1; 3], &mut recv, &[1, 2, 3], "a2a").unwrap();
            let mut counts = vec![0u64; 3];
            c.all_to_all_u64(
                &[c.rank() as u64 * 10, c.rank() as u64 * 10 + 1, c.rank() as u64 * 10 + 2],
                &mut counts,
                "n",
            )
            .unwrap();
            // Even and odd ranks apart.
            let group = c.split(c.rank() % 2, "split").unwrap();
            let mut g = vec![1.0];
            group.all_reduce_sum(&mut g, "group").unwrap();
            (sum, mine, gathered, recv, counts, group.rank(), g[0])
        });
        for (rank, (sum, mine, gathered, recv, counts, group_rank, group_size)) in results.into_iter().enumerate() {
            assert_eq!(sum, [3.0, 30.0]);
            let total: Vec<f32> = (0..4).map(|i| 3.0 * i as f32 + 3.0).collect();
            let start = [0, 1, 3][rank];
            assert_eq!(mine, &total[start..start + [1, 2, 1][rank]]);
            assert_eq!(gathered, total);
            assert_eq!(recv, [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            assert_eq!(counts, [rank as u64, 10 + rank as u64, 20 + rank as u64]);
            assert_eq!((group_rank, group_size), (rank / 2, if rank % 2 == 0 { 2.0 } else { 1.0 }));
        }
    }

    #[test]
    fn a_rank_that_never_arrives_is_named() {
        let comms = Threads::new(2, Duration::from_millis(200));
        let err = comms[0].barrier("step 3").unwrap_err().to_string();
        assert!(err.contains("step 3") && err.contains("rank 1"), "{err}");
    }
}
