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
//! blocking one exchanges the pieces in `rounds`, each a part of every piece, into a reused
//! buffer of at most 16 MiB. The started one receives them at once, in a buffer as large as
//! the values reduced, allocated for the call and freed after it, as Open MPI's non-blocking
//! reduce-scatter (`coll/libnbc`) allocates a full-size temporary of its own (its callers
//! keep at most 64 MiB under way): kept for reuse, the largest reductions' buffers would stay
//! allocated between steps, which ZeRO-3's memory cannot spare. Open MPI's reduce-scatter
//! (`MPI_Reduce_scatter`, `MPI_Ireduce_scatter`) took 85–118 ms for 21M floats on two ranks of
//! a 2-core Zen 4, against 32–35 ms for the exchange and the sum into reused buffers; in
//! `kiln bench train --zero 1` the step's reduce-scatter fell from 85–98 ms to 61–66 ms
//! (bench/README.md).

/// One round of a reduce-scatter's exchange (`rounds`).
pub(crate) struct Round {
    /// The offset into every piece.
    pub at: usize,
    /// How many values of each rank's piece it sends.
    pub sent: Vec<usize>,
    /// Where in the buffer reduced they start.
    pub from: Vec<usize>,
}

/// The rounds of a reduce-scatter's exchange of the pieces cut by `counts`, each sending
/// every rank at most `per_rank` values of its piece (every rank plans the same rounds).
pub(crate) fn rounds(counts: &[usize], per_rank: usize) -> impl Iterator<Item = Round> + '_ {
    let starts: Vec<usize> = counts.iter().scan(0, |next, &c| Some(std::mem::replace(next, *next + c))).collect();
    let longest = counts.iter().copied().max().unwrap_or(0);
    (0..longest).step_by(per_rank).map(move |at| Round {
        at,
        sent: counts.iter().map(|&c| c.saturating_sub(at).min(per_rank)).collect(),
        // A piece already sent whole sends nothing from its end.
        from: starts.iter().zip(counts).map(|(&s, &c)| s + at.min(c)).collect(),
    })
}

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

    #[test]
    fn rounds_of_the_exchange_sum_every_piece_whole() {
        // Three ranks' buffers cut into pieces of 5, 0 and 3 values, in rounds of 2 values.
        let counts = [5, 0, 3];
        let starts = [0, 5, 5];
        let bufs: Vec<Vec<f32>> = (0..3).map(|q| (0..8).map(|i| (10 * q + i) as f32).collect()).collect();
        for (r, (&count, &start)) in counts.iter().zip(&starts).enumerate() {
            let mut out = vec![f32::NAN; count];
            for Round { at, sent, from } in rounds(&counts, 2) {
                let mine = sent[r];
                assert!(mine <= 2, "a round sends at most 2 values of a piece");
                let received: Vec<f32> = bufs.iter().flat_map(|b| b[from[r]..from[r] + mine].to_vec()).collect();
                if mine > 0 {
                    sum_pieces(&received, &mut out[at..at + mine]);
                }
            }
            let whole: Vec<f32> = (0..count).map(|i| bufs.iter().map(|b| b[start + i]).sum()).collect();
            assert_eq!(out, whole, "rank {r}'s piece");
        }
        assert_eq!(rounds(&counts, 2).count(), 3, "the longest piece's rounds");
        assert_eq!(rounds(&[0, 0], 2).count(), 0);
    }
}
