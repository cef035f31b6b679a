//! How the attention kernels split a causal attention over thread blocks: for attention.cu's
//! f32 kernels the block shapes, the tile of key (or query) rows staged in shared memory and
//! its size; for attention_mma.cu's bf16 tensor-core kernels, their fixed shapes' blocks and
//! shared memory.

use crate::device::MAX_SHARED_BYTES;
use kiln_core::{Attention, Precision};

/// attention_mma.cu's MMA_ROWS (query or key rows per block, 16 per warp), MMA_KEYS (the
/// forward's key tile), MMA_TILE (the backward's tiles) and MMA_MAX_DIM.
const MMA_ROWS: usize = 64;
const MMA_KEYS: usize = 64;
const MMA_TILE: usize = 32;
const MMA_MAX_DIM: usize = 128;
/// Threads of a block of attention_mma.cu (4 warps).
pub(crate) const MMA_THREADS: usize = 128;

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

/// A launch of one of attention_mma.cu's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MmaLaunch {
    pub blocks: usize,
    pub shared_bytes: usize,
}

impl MmaLaunch {
    /// Whether attention_mma.cu computes `spec`: bf16 products and head dimensions that are
    /// multiples of 16 up to 128 (the device must have bf16 tensor cores, sm_80 on).
    pub fn applies(spec: &Attention) -> bool {
        let fits = |d: usize| d.is_multiple_of(16) && d <= MMA_MAX_DIM;
        spec.precision == Precision::Bf16 && fits(spec.head_dim) && fits(spec.v_head_dim)
    }

    /// attention_forward_bf16: blocks over [batch, q_heads, row tiles]; a k tile and a
    /// transposed v tile of MMA_KEYS rows (bf16, rows padded by 8).
    pub fn forward(spec: &Attention) -> MmaLaunch {
        let (hd, vhd) = (spec.head_dim, spec.v_head_dim);
        let bf16s = MMA_KEYS * (hd + 8) + vhd * (MMA_KEYS + 8);
        MmaLaunch::checked(spec.batch * spec.q_heads * spec.seq.div_ceil(MMA_ROWS), 2 * bf16s)
    }

    /// attention_backward_dq_bf16: the forward's blocks; a k tile row-major and transposed and
    /// a v tile, of MMA_TILE rows.
    pub fn dq(spec: &Attention) -> MmaLaunch {
        let (hd, vhd) = (spec.head_dim, spec.v_head_dim);
        let bf16s = MMA_TILE * (hd + 8) + hd * (MMA_TILE + 8) + MMA_TILE * (vhd + 8);
        MmaLaunch::checked(spec.batch * spec.q_heads * spec.seq.div_ceil(MMA_ROWS), 2 * bf16s)
    }

    /// attention_backward_dkdv_bf16: blocks over [batch, kv_heads, key tiles]; the query
    /// tile's lse and D (f32), then q and do tiles of MMA_TILE rows, row-major and transposed.
    pub fn dkdv(spec: &Attention) -> MmaLaunch {
        let (hd, vhd) = (spec.head_dim, spec.v_head_dim);
        let bf16s = MMA_TILE * (hd + 8) + hd * (MMA_TILE + 8) + MMA_TILE * (vhd + 8) + vhd * (MMA_TILE + 8);
        MmaLaunch::checked(spec.batch * spec.kv_heads * spec.seq.div_ceil(MMA_ROWS), 4 * 2 * MMA_TILE + 2 * bf16s)
    }

    fn checked(blocks: usize, shared_bytes: usize) -> MmaLaunch {
        assert!(shared_bytes <= MAX_SHARED_BYTES, "attention_mma: {shared_bytes} bytes of shared memory");
        MmaLaunch { blocks, shared_bytes }
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
        let precision = Precision::F32;
        Attention { batch: 2, seq: 37, q_heads, kv_heads, head_dim, v_head_dim, scale: 1.0, window: None, precision }
    }

    #[test]
    fn tensor_cores_take_bf16_heads_in_multiples_of_16_up_to_128() {
        let bf16 = |hd, vhd| Attention { precision: Precision::Bf16, ..spec(16, 8, hd, vhd) };
        assert!(MmaLaunch::applies(&bf16(128, 128)) && MmaLaunch::applies(&bf16(64, 32)));
        assert!(!MmaLaunch::applies(&spec(16, 8, 128, 128)), "f32 stays on the f32 kernels");
        assert!(!MmaLaunch::applies(&bf16(192, 128)) && !MmaLaunch::applies(&bf16(72, 64)));
        let s = bf16(128, 128);
        for launch in [MmaLaunch::forward(&s), MmaLaunch::dq(&s), MmaLaunch::dkdv(&s)] {
            assert!(launch.shared_bytes <= MAX_SHARED_BYTES);
        }
        // 37 rows: one tile of 64 per (sequence, head).
        assert_eq!(MmaLaunch::forward(&s).blocks, 2 * 16);
        assert_eq!(MmaLaunch::dkdv(&s).blocks, 2 * 8);
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
