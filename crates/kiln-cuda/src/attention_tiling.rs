//! How attention.cu's tiled kernels split a causal attention over thread blocks: the block
//! shapes, the tile of key (or query) rows staged in shared memory, and its size.

use crate::device::MAX_SHARED_BYTES;
use kiln_core::Attention;

/// Warps per block at most.
const MAX_WARPS: usize = 8;

/// One kernel's launch: `blocks` of `warps` warps, `positions` × `heads` rows per block, tiles
/// of `tile` rows in `shared_bytes` of shared memory (the kernel's `positions, heads, tile`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiling {
    pub blocks: usize,
    pub warps: usize,
    pub positions: usize,
    pub heads: usize,
    pub tile: usize,
    pub shared_bytes: usize,
}

impl Tiling {
    /// attention_forward (`per_warp_v`: false) and attention_backward_dq (true, which keeps each
    /// warp's do row too): a block holds query rows of one kv head's group, `heads` (the largest
    /// divisor of the group up to 8) by `positions` (8 / heads), one warp each.
    pub fn query_rows(spec: &Attention, per_warp_v: bool) -> Tiling {
        let group = spec.q_heads / spec.kv_heads;
        let heads = (1..=MAX_WARPS.min(group)).rev().find(|h| group.is_multiple_of(*h)).unwrap_or(1);
        let positions = MAX_WARPS / heads;
        let warps = positions * heads;
        let (hd, vhd) = (spec.head_dim, spec.v_head_dim);
        let per_warp = warps * (hd + if per_warp_v { vhd } else { 0 });
        let tile = largest_tile(|tile| tile * (hd + 1) + tile * (vhd + 1) + per_warp);
        let blocks = spec.batch * spec.kv_heads * (group / heads) * spec.seq.div_ceil(positions);
        Tiling { blocks, warps, positions, heads, tile: tile.0, shared_bytes: tile.1 }
    }

    /// attention_backward_dkdv: a block holds 8 consecutive keys of one kv head, one warp each.
    pub fn key_rows(spec: &Attention) -> Tiling {
        let (hd, vhd) = (spec.head_dim, spec.v_head_dim);
        let positions = MAX_WARPS;
        let tile = largest_tile(|tile| tile * (hd + 1) + tile * (vhd + 1) + 2 * tile + positions * (hd + vhd));
        let blocks = spec.batch * spec.kv_heads * spec.seq.div_ceil(positions);
        Tiling { blocks, warps: positions, positions, heads: 1, tile: tile.0, shared_bytes: tile.1 }
    }
}

/// The largest tile of 32, 16 or 8 rows whose shared memory (`floats(tile)` floats) fits, and
/// its bytes. Head dimensions up to 256 fit at 8.
fn largest_tile(floats: impl Fn(usize) -> usize) -> (usize, usize) {
    [32, 16, 8]
        .into_iter()
        .map(|tile| (tile, 4 * floats(tile)))
        .find(|&(_, bytes)| bytes <= MAX_SHARED_BYTES)
        .expect("attention: head dimensions above 256 do not fit shared memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(q_heads: usize, kv_heads: usize, head_dim: usize, v_head_dim: usize) -> Attention {
        Attention { batch: 2, seq: 37, q_heads, kv_heads, head_dim, v_head_dim, scale: 1.0, window: None }
    }

    #[test]
    fn blocks_cover_every_query_row_once() {
        for (q_heads, kv_heads) in [(4, 4), (8, 4), (12, 4), (16, 1), (6, 2), (14, 2)] {
            let s = spec(q_heads, kv_heads, 64, 64);
            let t = Tiling::query_rows(&s, false);
            let group = q_heads / kv_heads;
            assert!(group.is_multiple_of(t.heads) && t.warps <= MAX_WARPS && t.warps == t.positions * t.heads);
            assert!(t.blocks * t.warps >= s.batch * s.seq * q_heads, "{q_heads}/{kv_heads}: rows left out");
            // Only the last position tile of each sequence has idle warps.
            let idle = t.blocks * t.warps - s.batch * s.seq * q_heads;
            let per_sequence_tail = (s.seq.div_ceil(t.positions) * t.positions - s.seq) * q_heads;
            assert_eq!(idle, s.batch * per_sequence_tail, "{q_heads}/{kv_heads}");
        }
    }

    #[test]
    fn tiles_shrink_to_fit_shared_memory() {
        // Llama-like heads take full 32-row tiles; MLA's 192/128 and 256-wide heads shrink.
        assert_eq!(Tiling::query_rows(&spec(16, 8, 128, 128), true).tile, 32);
        assert_eq!(Tiling::key_rows(&spec(16, 8, 128, 128)).tile, 32);
        assert_eq!(Tiling::query_rows(&spec(16, 16, 192, 128), false).tile, 32);
        assert_eq!(Tiling::key_rows(&spec(16, 16, 192, 128)).tile, 16);
        assert_eq!(Tiling::key_rows(&spec(8, 1, 256, 256)).tile, 8);
        for s in [spec(16, 8, 128, 128), spec(16, 16, 192, 128), spec(8, 1, 256, 256), spec(2, 1, 8, 8)] {
            for t in [Tiling::query_rows(&s, false), Tiling::query_rows(&s, true), Tiling::key_rows(&s)] {
                assert!(t.shared_bytes <= MAX_SHARED_BYTES && t.shared_bytes > 0, "{s:?}: {t:?}");
            }
        }
    }
}
