//! Reused buffers of MPI collectives: copies of the values a collective sends, and the pieces
//! a reduce-scatter receives (`Mpi::reduce_scatter_v_sum`). MPI reads a send buffer until its
//! collective completes, and the binding has no in-place all-reduce, so a rank sends a copy
//! of the buffer it sums into. A fresh allocation of gradient size costs its page faults on
//! every step (22–34 ms for 68 MB on a 2-core Xeon VM, against 4–6 ms to copy into memory
//! already touched), so buffers come from here and go back once their collective completes.

use std::sync::Mutex;

/// Buffers kept for reuse.
#[derive(Default)]
pub(crate) struct ReusedBuffers {
    free: Mutex<Vec<Vec<f32>>>,
}

/// At most this many buffers are kept.
const KEEP: usize = 4;

impl ReusedBuffers {
    /// A copy of `values`, in the smallest kept buffer that holds them and is at most twice
    /// their size (a large buffer is not spent on a small copy), else in a new one.
    pub fn copy_of(&self, values: &[f32]) -> Vec<f32> {
        let mut copy = self.empty(values.len());
        copy.extend_from_slice(values);
        copy
    }

    /// `n` zeros, in a buffer taken as `copy_of` takes its own.
    pub fn values(&self, n: usize) -> Vec<f32> {
        let mut values = self.empty(n);
        values.resize(n, 0.0);
        values
    }

    /// An empty buffer with room for `n` values: the smallest kept one that holds them and is
    /// at most twice their size, else a new one.
    fn empty(&self, n: usize) -> Vec<f32> {
        let mut free = self.free.lock().expect("reused buffers");
        let fits = |v: &Vec<f32>| v.capacity() >= n && v.capacity() <= 2 * n.max(1);
        let best = (0..free.len()).filter(|&i| fits(&free[i])).min_by_key(|&i| free[i].capacity());
        let mut buffer = best.map_or_else(|| Vec::with_capacity(n), |i| free.swap_remove(i));
        buffer.clear();
        buffer
    }

    /// Keeps `copy` for reuse, dropping the smallest kept buffer beyond `KEEP`.
    pub fn give_back(&self, copy: Vec<f32>) {
        let mut free = self.free.lock().expect("reused buffers");
        free.push(copy);
        if free.len() > KEEP {
            let smallest = (0..free.len()).min_by_key(|&i| free[i].capacity()).expect("kept buffers");
            free.swap_remove(smallest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_for_a_copy_it_fits() {
        let copies = ReusedBuffers::default();
        let first = copies.copy_of(&[1.0; 1000]);
        let at = first.as_ptr();
        copies.give_back(first);
        let again = copies.copy_of(&[2.0; 900]);
        assert_eq!(again.as_ptr(), at, "the kept buffer holds 900 values");
        assert_eq!(again, vec![2.0; 900]);
        copies.give_back(again);
        let small = copies.copy_of(&[3.0; 10]);
        assert_ne!(small.as_ptr(), at, "a buffer of 1000 is not spent on 10 values");
        assert_eq!(small, vec![3.0; 10]);
    }

    #[test]
    fn at_most_keep_buffers_stay_and_the_largest_are_kept() {
        let copies = ReusedBuffers::default();
        let sizes = [10, 50, 20, 40, 30, 60];
        let buffers: Vec<Vec<f32>> = sizes.iter().map(|&n| copies.copy_of(&vec![0.0; n])).collect();
        buffers.into_iter().for_each(|b| copies.give_back(b));
        let mut kept: Vec<usize> = copies.free.lock().unwrap().iter().map(|v| v.capacity()).collect();
        kept.sort();
        assert_eq!(kept.len(), KEEP);
        assert!(kept[0] >= 30, "the smallest went first: {kept:?}");
    }
}
