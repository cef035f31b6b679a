//! Token embedding lookup and its scatter-add backward.

use rayon::prelude::*;

fn row(id: i32, rows: usize) -> usize {
    assert!(id >= 0 && (id as usize) < rows, "embedding: token id {id} outside the table's {rows} rows");
    id as usize
}

pub fn forward(out: &mut [f32], table: &[f32], ids: &[i32], dim: usize) {
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: output size mismatch");
    let rows = table.len() / dim;
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &id)| {
        let r = row(id, rows);
        o.copy_from_slice(&table[r * dim..(r + 1) * dim]);
    });
}

pub fn backward(dtable: &mut [f32], dout: &[f32], ids: &[i32], dim: usize) {
    assert_eq!(dout.len(), ids.len() * dim, "embedding_backward: gradient size mismatch");
    let rows = dtable.len() / dim;
    // Serial: repeated ids make rows collide, and this is a tiny share of a step.
    for (g, &id) in dout.chunks(dim).zip(ids) {
        let r = row(id, rows);
        dtable[r * dim..(r + 1) * dim].iter_mut().zip(g).for_each(|(d, g)| *d += g);
    }
}
