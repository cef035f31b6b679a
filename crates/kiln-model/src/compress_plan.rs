//! Where a batch's compressed entries (DeepSeek-V4's CSA and HCA layers) come from and which
//! queries may see them, worked out on the host once per batch and compression rate.
//!
//! Each sequence (a row's run of one segment) is cut into windows of `rate` tokens from its
//! start; window w becomes entry w of the sequence, at position w·rate, and is complete once
//! its last token is, so query i of the sequence sees entries w < (i + 1) / rate (transformers'
//! causal threshold). Entries are numbered across the batch, sequence after sequence. With
//! overlapping windows (CSA) entry w also pools window w − 1's tokens (none for w = 0).

use crate::batch::Batch;
use kiln_core::{Backend, Pooling};

pub struct CompressPlan<B: Backend> {
    pub rate: usize,
    pub overlap: bool,
    pub entries: usize,
    /// `[entries, c·rate]`: each slot's token, −1 where absent.
    pub slots: B::Index,
    /// `[entries]`: each entry's position (its window's first, within the sequence).
    pub positions: B::Index,
    /// `[tokens, 2]`: each query's first visible entry and their count.
    pub visible: B::Index,
    /// `[tokens, most_visible]`: each query's visible entries, −1 after them (what HCA attends).
    pub all_visible: B::Index,
    pub most_visible: usize,
}

impl<B: Backend> CompressPlan<B> {
    pub fn new(b: &B, batch: &Batch, rate: usize, overlap: bool) -> Self {
        let c = if overlap { 2 } else { 1 };
        let (mut slots, mut positions) = (Vec::new(), Vec::new());
        let mut visible = vec![0i32; 2 * batch.tokens()];
        for row in 0..batch.rows {
            let at = |i: usize| row * batch.seq + i;
            let mut start = 0;
            while start < batch.seq {
                let segment = batch.segments[at(start)];
                let len = (start..batch.seq).take_while(|&i| batch.segments[at(i)] == segment).count();
                if segment >= 0 {
                    let first = positions.len();
                    for w in 0..len / rate {
                        let window = |w: usize| (0..rate).map(move |i| at(start + w * rate + i) as i32);
                        if overlap {
                            match w {
                                0 => slots.extend(std::iter::repeat_n(-1, rate)),
                                _ => slots.extend(window(w - 1)),
                            }
                        }
                        slots.extend(window(w));
                        positions.push((w * rate) as i32);
                    }
                    for i in 0..len {
                        visible[2 * at(start + i)] = first as i32;
                        visible[2 * at(start + i) + 1] = ((i + 1) / rate) as i32;
                    }
                }
                start += len;
            }
        }
        let entries = positions.len();
        debug_assert_eq!(slots.len(), entries * c * rate);
        let (all_visible, most_visible) = every_visible(&visible);
        Self {
            rate,
            overlap,
            entries,
            slots: b.upload_index(&slots),
            positions: b.upload_index(&positions),
            visible: b.upload_index(&visible),
            all_visible: b.upload_index(&all_visible),
            most_visible,
        }
    }

    /// The pooling of these windows into `width`-feature entries.
    pub fn pooling(&self, width: usize) -> Pooling {
        Pooling { entries: self.entries, rate: self.rate, width, overlap: self.overlap }
    }
}

/// From each query's visible entries (`[tokens, 2]`: first and count), all of them listed
/// (`[tokens, most]`, −1 after each query's), and `most` (at least 1).
pub(crate) fn every_visible(visible: &[i32]) -> (Vec<i32>, usize) {
    let most = visible.chunks(2).map(|v| v[1] as usize).max().unwrap_or(0).max(1);
    let all =
        (visible.chunks(2)).flat_map(|v| (0..most as i32).map(move |j| if j < v[1] { v[0] + j } else { -1 })).collect();
    (all, most)
}
