//! Data parallel with whole gradients on every rank (ZeRO 0 and 1): the step's gradients
//! summed over the ranks in buckets whose all-reduce (ZeRO-1: reduce-scatter, each rank
//! receiving the bucket's values inside its shard) starts while backward still computes the
//! layers before them, as PyTorch DDP and Megatron-LM's distributed optimizer do.
//!
//! Backward completes the final norm's and the head's gradients first (`Reached::Head`), then
//! each layer's, last to first, and the embedding's at its end. A bucket is a run of at most
//! `BUCKET_VALUES` gradients of one space that one of those points completes: the tail of the
//! dense space (final norm, head, score), a layer's dense or routed-expert tensors, the
//! embedding. In the step's last backward (`arm`) each point starts its buckets: the values
//! are copied into a buffer the started all-reduce owns, and copied back once it is finished
//! (a reduce-scatter sends a copy of them and receives the rank's piece into a buffer of its
//! own, set into the shard's summed gradients once finished).
//! Starting more than `IN_FLIGHT_VALUES` values at once first finishes the oldest buckets, so
//! the copies (and MPI's copy of what it sends) stay within a few hundred MB.
//!
//! Under pipeline parallel a pass's backward is one per chunk (`chunks_next`), each reaching
//! the stage's points once: a point is complete at the pass's last chunk, and the schedules
//! (1F1B, GPipe, interleaved) still complete them in backward's order, a stage's later parts
//! before its earlier ones. The embedding's buckets start after the backward (`start_rest`),
//! where a tied head's copy has been summed with the first stage's.
//!
//! Every rank starts the buckets in the same order: what a rank's last backward did not
//! start (it had no micro-batch, or the embedding under pipeline parallel) `start_rest`
//! starts, before the step's other collectives. On MPI the all-reduces progress whenever
//! the rank tests them, at each point; a communicator that cannot start one (`Local`,
//! `Threads`) completes it as it starts.

use crate::data_parallel::{Landing, Space};
use anyhow::Result;
use kiln_core::Backend;
use kiln_dist::{InFlight, Owned};
use kiln_model::{FlatGrads, FlatLayout};
use std::collections::VecDeque;
use std::ops::Range;

/// The most values in one bucket (32 MiB of f32).
const BUCKET_VALUES: usize = 1 << 23;
/// The most values in buckets under way at once.
pub(crate) const IN_FLIGHT_VALUES: usize = 1 << 24;

/// Where backward has got to: the gradients it has completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reached {
    /// The final norm's, the LM head's and the score's (all of the dense space's tail).
    Head,
    /// Layer `l`'s.
    Layer(usize),
    /// The embedding's: backward has ended.
    Embedding,
}

impl Reached {
    /// Its place in backward's order, in a model of `layers` layers.
    fn order(self, layers: usize) -> usize {
        match self {
            Reached::Head => 0,
            Reached::Layer(l) => layers - l,
            Reached::Embedding => layers + 1,
        }
    }
}

/// Values of one space's gradients, summed in one collective.
struct Bucket {
    space: usize,
    range: Range<usize>,
    /// The place in backward's order of the point that completes them.
    order: usize,
}

/// The buckets of a run's replicated spaces, and those under way.
pub struct GradBuckets<B: Backend> {
    buckets: Vec<Bucket>,
    layers: usize,
    /// The chunks of the coming pass's backward (pipeline parallel; else 1).
    chunks: usize,
    /// How many chunks of the armed pass have reached each point, by its place in backward's
    /// order.
    seen: Vec<usize>,
    /// Buckets before this one have been started this step.
    next: usize,
    in_flight: VecDeque<(usize, InFlight<B::Slice>)>,
    free: Vec<Owned<B::Slice>>,
    /// The coming backward is the step's last.
    armed: bool,
}

impl<B: Backend> GradBuckets<B> {
    /// The buckets of the `spaces` summed over more than one rank or reduced into shards (none:
    /// `None`).
    pub fn new(flat: &FlatLayout, spaces: &[Space<B>]) -> Option<Self> {
        let layers = flat.ranges.layers.len();
        let [embed, tail] = flat.outer();
        let mut points = vec![(Reached::Head, tail)];
        for l in (0..layers).rev() {
            let (dense, experts) = flat.layer(l);
            points.push((Reached::Layer(l), dense));
            points.push((Reached::Layer(l), experts));
        }
        points.push((Reached::Embedding, embed));
        let mut buckets = Vec::new();
        for (point, range) in points.into_iter().filter(|(_, r)| !r.is_empty()) {
            let Some(space) = spaces.iter().position(|s| s.range.contains(&range.start)) else { continue };
            // A replicated space of one rank has its sums already; a sharded one still sets
            // its shard from a reduction of one rank.
            if !spaces[space].sharded() && spaces[space].comm.size() == 1 {
                continue;
            }
            for start in range.clone().step_by(BUCKET_VALUES) {
                let order = point.order(layers);
                buckets.push(Bucket { space, range: start..(start + BUCKET_VALUES).min(range.end), order });
            }
        }
        let (chunks, seen) = (1, vec![0; layers + 2]);
        let (next, in_flight, free, armed) = (0, VecDeque::new(), Vec::new(), false);
        (!buckets.is_empty()).then_some(Self { buckets, layers, chunks, seen, next, in_flight, free, armed })
    }

    /// The next pass is the step's last: its backward starts the buckets as it completes them.
    pub fn arm(&mut self) {
        self.armed = true;
        self.seen.fill(0);
    }

    /// The coming pass's backward runs in `chunks` chunks, each reaching every point once.
    pub fn chunks_next(&mut self, chunks: usize) {
        self.chunks = chunks;
    }

    /// Panics if gradients are about to be added to values whose sum has started this step.
    pub fn check_open(&self, point: Reached) {
        let order = point.order(self.layers);
        let started = self.buckets[..self.next].iter().any(|bucket| bucket.order == order);
        assert!(
            !started,
            "gradients at {point:?} added after their all-reduce started (a backward after the step's last)"
        );
    }

    /// A chunk's backward has reached `point`; at the pass's last chunk its gradients are
    /// complete (and those of every point before it): in an armed pass their buckets start,
    /// and every bucket under way is tested (progressed).
    pub fn reached(
        &mut self,
        b: &B,
        point: Reached,
        (whole, spaces): (&mut FlatGrads<B>, &mut [Space<B>]),
        what: &str,
    ) {
        if !self.armed {
            return;
        }
        let order = point.order(self.layers);
        self.seen[order] += 1;
        if self.seen[order] < self.chunks {
            return;
        }
        let through = self.buckets.iter().take_while(|bucket| bucket.order <= order).count();
        for bucket in &self.buckets[self.next..through] {
            // Pipeline parallel's schedules complete the points in backward's order too (a
            // stage's later parts first): a bucket never starts before its last chunk.
            assert_eq!(
                self.seen[bucket.order], self.chunks,
                "gradients through {point:?} summed before their last chunk's backward"
            );
        }
        self.start_through(b, through, (whole, spaces), what).unwrap_or_else(|e| panic!("gradient reduction: {e:#}"));
        self.in_flight.iter_mut().for_each(|(_, started)| {
            started.test();
        });
        if point == Reached::Embedding {
            self.armed = false;
        }
    }

    /// Starts every bucket this rank has not started this step.
    pub fn start_rest(&mut self, b: &B, grads: (&mut FlatGrads<B>, &mut [Space<B>]), what: &str) -> Result<()> {
        self.armed = false;
        self.start_through(b, self.buckets.len(), grads, what)
    }

    /// Finishes every bucket (all started): each one's sum in the gradients.
    pub fn finish(&mut self, b: &B, (whole, spaces): (&mut FlatGrads<B>, &mut [Space<B>]), what: &str) -> Result<()> {
        assert_eq!(self.next, self.buckets.len(), "the gradients' reduction finished before all of it started");
        while !self.in_flight.is_empty() {
            self.finish_oldest(b, (&mut *whole, &mut *spaces), what)?;
        }
        self.next = 0;
        Ok(())
    }

    /// Starts the buckets from `next` up to `through`, finishing the oldest under way first
    /// while the values under way would pass `IN_FLIGHT_VALUES`.
    fn start_through(
        &mut self,
        b: &B,
        through: usize,
        (whole, spaces): (&mut FlatGrads<B>, &mut [Space<B>]),
        what: &str,
    ) -> Result<()> {
        while self.next < through {
            let len = self.buckets[self.next].range.len();
            while !self.in_flight.is_empty() && self.values_in_flight() + len > IN_FLIGHT_VALUES {
                self.finish_oldest(b, (&mut *whole, &mut *spaces), what)?;
            }
            let (space, range) = (&spaces[self.buckets[self.next].space], self.buckets[self.next].range.clone());
            let values = b.slice(&whole.flat, range.clone());
            let started = match space.sharded() {
                true => {
                    let counts = space.counts_in_shards(&[range]);
                    let piece = pooled(&mut self.free, b, counts[space.comm.rank()]);
                    space.comm.start_reduce_scatter_v_sum(values, &counts, piece, what)?
                }
                false => {
                    let mut buf = pooled(&mut self.free, b, len);
                    b.copy(&mut buf, values);
                    space.comm.start_all_reduce_sum(buf, what)?
                }
            };
            self.in_flight.push_back((self.next, started));
            self.next += 1;
        }
        Ok(())
    }

    fn values_in_flight(&self) -> usize {
        self.in_flight.iter().map(|(i, _)| self.buckets[*i].range.len()).sum()
    }

    /// Waits for the oldest bucket under way and copies its sum into the gradients (ZeRO-1: the
    /// rank's piece into its shard's).
    fn finish_oldest(
        &mut self,
        b: &B,
        (whole, spaces): (&mut FlatGrads<B>, &mut [Space<B>]),
        what: &str,
    ) -> Result<()> {
        let (i, started) = self.in_flight.pop_front().expect("a bucket under way");
        let bucket = &self.buckets[i];
        let space = &mut spaces[bucket.space];
        let sum = space.comm.finish(started, what)?;
        match space.sharded() {
            true => space.land(b, &sum, std::slice::from_ref(&bucket.range), Landing::Set),
            false => b.copy(b.slice_mut(&mut whole.flat, bucket.range.clone()), &sum),
        }
        // Every step starts the same buckets in the same order, so the buffers the first step
        // allocated (of each length, as many as were under way at once) serve every later one.
        self.free.push(sum);
        Ok(())
    }
}

/// A buffer of `len` values from `free` (those of collectives an earlier step finished), or a
/// new one.
pub(crate) fn pooled<B: Backend>(free: &mut Vec<Owned<B::Slice>>, b: &B, len: usize) -> Owned<B::Slice> {
    match free.iter().position(|f| b.len(f) == len) {
        Some(i) => free.swap_remove(i),
        None => Box::new(b.zeros(len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Cpu;
    use kiln_dist::{Comm, Local, Threads};
    use kiln_model::{weights::layout, Config};
    use std::sync::Arc;
    use std::time::Duration;

    /// A three-layer Llama's layout (untied head).
    fn three_layers() -> FlatLayout {
        let config = Config::parse(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                "max_position_embeddings": 64}"#,
        )
        .unwrap();
        FlatLayout::new(&layout(&config))
    }

    /// On each of two ranks (`Threads`): the three-layer model's gradients filled with
    /// (rank + 1)·i, one space of them over the ranks (`sharded`: ZeRO-1), and its buckets,
    /// armed, handed to `check`.
    fn on_two_ranks(sharded: bool, check: impl Fn(GradBuckets<Cpu>, FlatGrads<Cpu>, [Space<Cpu>; 1]) + Sync) {
        let flat = three_layers();
        std::thread::scope(|s| {
            for comm in Threads::new(2, Duration::from_secs(10)) {
                let (flat, check) = (&flat, &check);
                s.spawn(move || {
                    let rank = comm.rank() as f32;
                    let spaces = [Space::<Cpu>::new(&Cpu, 0..flat.dense, Arc::new(comm), sharded, "dense".into())];
                    let mut whole = FlatGrads::new(&Cpu, &Arc::new(three_layers()));
                    whole.flat.iter_mut().enumerate().for_each(|(i, g)| *g = (rank + 1.0) * i as f32);
                    let mut buckets = GradBuckets::new(flat, &spaces).expect("a space over two ranks");
                    buckets.arm();
                    check(buckets, whole, spaces);
                });
            }
        });
    }

    const LAYER_POINTS: [Reached; 4] = [Reached::Head, Reached::Layer(2), Reached::Layer(1), Reached::Layer(0)];

    #[test]
    fn each_point_of_backward_starts_its_bucket_and_the_sums_land_in_the_gradients() {
        on_two_ranks(false, |mut buckets, mut whole, mut spaces| {
            for (started, point) in LAYER_POINTS.into_iter().enumerate() {
                buckets.reached(&Cpu, point, (&mut whole, &mut spaces), "test");
                assert_eq!(buckets.next, started + 1, "{point:?} starts its own bucket only");
                let open = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| buckets.check_open(point)));
                assert!(open.is_err(), "{point:?}: its gradients are being summed");
            }
            buckets.check_open(Reached::Embedding);
            buckets.reached(&Cpu, Reached::Embedding, (&mut whole, &mut spaces), "test");
            assert!(!buckets.armed, "the backward has ended");
            buckets.finish(&Cpu, (&mut whole, &mut spaces), "test").unwrap();
            for (i, g) in whole.flat.iter().enumerate() {
                assert_eq!(*g, 3.0 * i as f32, "value {i}: the sum of both ranks'");
            }
            // The next step's backward adds into every bucket again.
            LAYER_POINTS.into_iter().for_each(|point| buckets.check_open(point));
        });
    }

    #[test]
    fn under_pipeline_parallel_a_point_starts_its_bucket_at_the_pass_s_last_chunk() {
        on_two_ranks(false, |mut buckets, mut whole, mut spaces| {
            buckets.chunks_next(2);
            let points = [Reached::Head, Reached::Layer(2), Reached::Layer(1)];
            for point in points {
                buckets.reached(&Cpu, point, (&mut whole, &mut spaces), "test");
            }
            assert_eq!(buckets.next, 0, "the first chunk's backward completes nothing");
            points.into_iter().for_each(|point| buckets.check_open(point));
            buckets.reached(&Cpu, Reached::Head, (&mut whole, &mut spaces), "test");
            assert_eq!(buckets.next, 1, "the second chunk completes the head");
            // The second chunk completing layer 1 before layer 2 breaks backward's order.
            let early = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                buckets.reached(&Cpu, Reached::Layer(1), (&mut whole, &mut spaces), "test")
            }));
            assert!(early.is_err(), "layer 2's bucket would start before its last chunk");
        });
    }

    #[test]
    fn zero_1_buckets_set_each_ranks_piece_of_the_sums_into_its_shard() {
        on_two_ranks(true, |mut buckets, mut whole, mut spaces| {
            for point in LAYER_POINTS.into_iter().chain([Reached::Embedding]) {
                buckets.reached(&Cpu, point, (&mut whole, &mut spaces), "test");
            }
            buckets.finish(&Cpu, (&mut whole, &mut spaces), "test").unwrap();
            let (mine, shard) = (spaces[0].mine.clone(), spaces[0].summed_shard());
            assert_eq!(shard.len(), mine.len());
            for (g, i) in shard.iter().zip(mine) {
                assert_eq!(*g, 3.0 * i as f32, "value {i}: the sum of both ranks'");
            }
        });
    }

    #[test]
    fn a_backward_that_is_not_the_last_starts_nothing_and_one_rank_has_no_buckets() {
        let flat = three_layers();
        let alone = [Space::<Cpu>::new(&Cpu, 0..flat.dense, Arc::new(Local), false, "dense".into())];
        assert!(GradBuckets::new(&flat, &alone).is_none(), "one rank sums nothing");
        let ranks = Threads::new(2, Duration::from_secs(10));
        let mut spaces =
            [Space::<Cpu>::new(&Cpu, 0..flat.dense, Arc::new(ranks.into_iter().next().unwrap()), false, "d".into())];
        let mut buckets = GradBuckets::new(&flat, &spaces).unwrap();
        let mut whole = FlatGrads::new(&Cpu, &Arc::new(three_layers()));
        buckets.reached(&Cpu, Reached::Layer(2), (&mut whole, &mut spaces), "test");
        assert_eq!(buckets.next, 0, "not armed: the step's last backward is still to come");
    }
}
