//! Rotary position embedding, in place.
//!
//! Each pair `(a, b)` of a head is rotated by the angle θ of its frequency at the token's
//! position:  a' = a·cos θ − b·sin θ,  b' = b·cos θ + a·sin θ.
//! Backward is the inverse rotation (θ → −θ), since the map is orthogonal.
//! Pairs are `(i, i + rot/2)` (half-split, Llama) or `(2i, 2i + 1)` (interleaved, DeepSeek),
//! counted from the head's feature `offset`.

use crate::backend::Rope;
use rayon::prelude::*;

fn rotate(x: &mut [f32], table: &[f32], positions: &[i32], spec: Rope, sign: f32) {
    let Rope { x: heads, rot_dim, offset, interleaved } = spec;
    let row = heads.heads * heads.head_dim;
    let half = rot_dim / 2;
    assert!(
        offset + rot_dim <= heads.head_dim && rot_dim % 2 == 0,
        "rope: rot_dim {rot_dim} at offset {offset} invalid for head_dim {}",
        heads.head_dim
    );
    assert_eq!(x.len(), heads.tokens * row, "rope: tensor size mismatch");
    assert_eq!(positions.len(), heads.tokens, "rope: one position per token expected");
    let table_rows = table.len() / rot_dim;
    x.par_chunks_mut(row).zip(positions.par_iter()).for_each(|(x, &pos)| {
        let pos = pos as usize;
        assert!(pos < table_rows, "rope: position {pos} beyond the table's {table_rows} rows");
        let cos = &table[pos * rot_dim..pos * rot_dim + half];
        let sin = &table[pos * rot_dim + half..(pos + 1) * rot_dim];
        for head in x.chunks_mut(heads.head_dim) {
            let head = &mut head[offset..offset + rot_dim];
            for i in 0..half {
                let (ia, ib) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (a, b) = (head[ia], head[ib]);
                let (c, s) = (cos[i], sign * sin[i]);
                head[ia] = a * c - b * s;
                head[ib] = b * c + a * s;
            }
        }
    });
}

pub fn forward(x: &mut [f32], table: &[f32], positions: &[i32], spec: Rope) {
    rotate(x, table, positions, spec, 1.0);
}

pub fn backward(dx: &mut [f32], table: &[f32], positions: &[i32], spec: Rope) {
    rotate(dx, table, positions, spec, -1.0);
}
