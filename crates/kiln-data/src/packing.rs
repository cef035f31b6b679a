//! Best-fit-decreasing packing of sequences into fixed-capacity rows.

use std::collections::BTreeMap;

/// Groups item indices into bins of at most `capacity` total length: longest first, each
/// into the fullest bin it still fits (best fit), a new bin when none fits. Items longer
/// than `capacity` are a caller error.
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // Remaining capacity -> bins with exactly that much room.
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i];
        assert!(len <= capacity, "item {i} of length {len} exceeds the bin capacity {capacity}");
        let slot = by_room.range_mut(len..).next().map(|(&room, bins)| (room, bins.pop().expect("non-empty")));
        let (bin, room) = match slot {
            Some((room, bin)) => {
                if by_room[&room].is_empty() {
                    by_room.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push(Vec::new());
                (bins.len() - 1, capacity)
            }
        };
        bins[bin].push(i);
        by_room.entry(room - len).or_default().push(bin);
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_tightly_and_keeps_every_item_once() {
        let lengths = [7, 5, 4, 3, 3, 2, 2, 1, 9, 10];
        let bins = best_fit_decreasing(&lengths, 10);
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 10);
        }
        // Total 46: five bins is optimal, and BFD finds it here.
        assert_eq!(bins.len(), 5);
    }

    #[test]
    fn best_fit_prefers_the_fullest_bin() {
        // 6 opens bin A (room 4), 5 opens bin B (room 5); 4 fits both and goes to A.
        let bins = best_fit_decreasing(&[6, 5, 4], 10);
        assert_eq!(bins, vec![vec![0, 2], vec![1]]);
    }
}
