//! ZeRO-2 and 3 with `train.overlap_grad_reduce`: the reduce-scatter of a layer's gradients
//! starts as backward hands the layer over (and of the embedding's, final norm's and head's as
//! a backward ends) and is finished later, while backward computes the layers before it and,
//! with several micro-batches, the next micro-batch's forward; as DeepSpeed's ZeRO-2
//! `overlap_comm` does. The blocking path waits for each one where it starts.
//!
//! A started reduction reads (MPI: copies) its values as it starts, so backward's scratch is
//! free for the next layer at once; it owns the buffer that receives the rank's piece until it
//! is finished. Finished oldest first, each piece is added into the shard's summed gradients
//! in the order the blocking path adds it, so the sums are the same bit for bit. At most
//! `IN_FLIGHT_VALUES` values are under way (the oldest is finished before more start), and
//! every reduction under way is tested (progressed) each time another starts. A communicator
//! that cannot start one (`Local`, `Threads`, NCCL) completes it as it starts.

use crate::data_parallel::{Landing, Space};
use crate::grad_buckets::{pooled, IN_FLIGHT_VALUES};
use anyhow::Result;
use kiln_core::Backend;
use kiln_dist::{InFlight, Owned};
use std::collections::VecDeque;
use std::ops::Range;

/// One reduction under way.
struct Started<B: Backend> {
    /// Which space's gradients, and their flat segments laid end to end.
    space: usize,
    segments: Vec<Range<usize>>,
    /// How many values it sums.
    values: usize,
    collective: InFlight<B::Slice>,
}

/// The gradient reductions a rank has started and not yet finished, oldest first.
pub struct StartedReductions<B: Backend> {
    in_flight: VecDeque<Started<B>>,
    /// Buffers of finished reductions: every step reduces pieces of the same lengths.
    free: Vec<Owned<B::Slice>>,
}

impl<B: Backend> Default for StartedReductions<B> {
    fn default() -> Self {
        Self { in_flight: VecDeque::new(), free: Vec::new() }
    }
}

impl<B: Backend> StartedReductions<B> {
    /// Starts summing `data`, the gradients of the flat `segments` of `spaces[space]` laid end
    /// to end, over the space's ranks, each to receive the values inside its shard.
    pub fn start(
        &mut self,
        b: &B,
        (spaces, space): (&mut [Space<B>], usize),
        data: &B::Slice,
        segments: &[Range<usize>],
        what: &str,
    ) -> Result<()> {
        let values = b.len(data);
        while !self.in_flight.is_empty() && self.values_in_flight() + values > IN_FLIGHT_VALUES {
            self.finish_oldest(b, spaces, what)?;
        }
        let ranks = &spaces[space];
        let counts = ranks.counts_in_shards(segments);
        let piece = pooled(&mut self.free, b, counts[ranks.comm.rank()]);
        let collective = ranks.comm.start_reduce_scatter_v_sum(data, &counts, piece, what)?;
        self.in_flight.push_back(Started { space, segments: segments.to_vec(), values, collective });
        self.in_flight.iter_mut().for_each(|started| {
            started.collective.test();
        });
        Ok(())
    }

    /// Finishes every reduction under way: all of them in the shards' summed gradients.
    pub fn finish(&mut self, b: &B, spaces: &mut [Space<B>], what: &str) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.finish_oldest(b, spaces, what)?;
        }
        Ok(())
    }

    fn values_in_flight(&self) -> usize {
        self.in_flight.iter().map(|started| started.values).sum()
    }

    /// Waits for the oldest reduction under way and adds its piece into the shard's gradients.
    fn finish_oldest(&mut self, b: &B, spaces: &mut [Space<B>], what: &str) -> Result<()> {
        let started = self.in_flight.pop_front().expect("a reduction under way");
        let space = &mut spaces[started.space];
        let piece = space.comm.finish(started.collective, what)?;
        space.land(b, &piece, &started.segments, Landing::Add);
        self.free.push(piece);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Cpu;
    use kiln_dist::{Comm, Threads};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn pieces_of_every_started_reduction_add_into_the_shards() {
        let ranks = Threads::new(2, Duration::from_secs(10));
        std::thread::scope(|s| {
            for comm in ranks {
                s.spawn(move || {
                    let rank = comm.rank() as f32;
                    // Values 0..10 sharded 0..5 and 5..10; two backwards each reduce two
                    // segments that straddle the cut, laid end to end.
                    let mut spaces = [Space::<Cpu>::new(&Cpu, 0..10, Arc::new(comm), true, "dense".into())];
                    let segments = [2..4, 4..8];
                    let data: Vec<f32> =
                        segments.iter().flat_map(|r| r.clone()).map(|i| (rank + 1.0) * i as f32).collect();
                    let mut reductions = StartedReductions::default();
                    for _ in 0..2 {
                        reductions.start(&Cpu, (&mut spaces, 0), &data, &segments, "test").unwrap();
                    }
                    reductions.finish(&Cpu, &mut spaces, "test").unwrap();
                    let (mine, shard) = (spaces[0].mine.clone(), spaces[0].summed_shard());
                    for (g, i) in shard.iter().zip(mine) {
                        let want = if (2..8).contains(&i) { 2.0 * 3.0 * i as f32 } else { 0.0 };
                        assert_eq!(*g, want, "value {i}: both ranks' sums of both backwards");
                    }
                    assert!(reductions.in_flight.is_empty());
                });
            }
        });
    }
}
