//! Reduce-scatter as an exchange of pieces and a local sum, for MPI.
//!
//! Rank r's piece of a reduce-scatter over N ranks is Σₖ bufₖ[piece r], the pieces cut by
//! `counts`. Each rank sends piece r of its buffer to rank r (an all-to-all with counts) and
//! sums the N pieces it receives, laid out by sending rank:
//!
//! ```text
//! out[i] = ((pieces[0][i] + pieces[1][i]) + pieces[2][i]) + ... + pieces[N-1][i]
//! ```
//!
//! Each rank sends and receives (N − 1)/N of the buffer, as a ring reduce-scatter does. The
//! pieces arrive in a buffer as large as the buffer reduced, allocated for the call and freed
//! after it, as Open MPI's non-blocking reduce-scatter (`coll/libnbc`) allocates a full-size
//! temporary of its own: kept for reuse, the largest reductions' buffers would stay allocated
//! between steps, which ZeRO-3's memory cannot spare. Open MPI's reduce-scatter
//! (`MPI_Reduce_scatter`, `MPI_Ireduce_scatter`) took 85–118 ms for 21M floats on two ranks of
//! a 2-core Zen 4, against 32–35 ms for the exchange and the sum into reused buffers; in
//! `kiln bench train --zero 1` the step's reduce-scatter fell from 85–98 ms to 61–66 ms
//! (bench/README.md).

/// `out` ← the sum of `pieces`, `out.len()` values from each rank laid end to end, in rank
/// order.
pub(crate) fn sum_pieces(pieces: &[f32], out: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    out.copy_from_slice(&pieces[..n]);
    for piece in pieces[n..].chunks_exact(n) {
        out.iter_mut().zip(piece).for_each(|(o, p)| *o += p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_is_the_sum_of_every_ranks_piece_in_rank_order() {
        // Three ranks' pieces of two values; 1e8 + 1 − 1e8 in f32 is 0 in this order only.
        let pieces = [1e8, 1.0, 1.0, 2.0, -1e8, 3.0];
        let mut out = [7.0; 2];
        sum_pieces(&pieces, &mut out);
        assert_eq!(out, [0.0, 6.0]);
        let mut none: [f32; 0] = [];
        sum_pieces(&[], &mut none);
    }
}
