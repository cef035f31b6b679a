//! Token embedding lookup and its scatter-add backward.

use rayon::prelude::*;

/// The table's row of token `id`; none for a negative id (a row another rank holds).
fn row(id: i32, rows: usize) -> Option<usize> {
    let r = usize::try_from(id).ok()?;
    assert!(r < rows, "embedding: token id {id} outside the table's {rows} rows");
    Some(r)
}

pub fn forward(out: &mut [f32], table: &[f32], ids: &[i32], dim: usize) {
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: output size mismatch");
    let rows = table.len() / dim;
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &id)| match row(id, rows) {
        Some(r) => o.copy_from_slice(&table[r * dim..(r + 1) * dim]),
        None => o.fill(0.0),
    });
}

pub fn backward(dtable: &mut [f32], dout: &[f32], ids: &[i32], dim: usize) {
    assert_eq!(dout.len(), ids.len() * dim, "embedding_backward: gradient size mismatch");
    let rows = dtable.len() / dim;
    // Serial: repeated ids make rows collide, and this is a tiny share of a step.
    for (g, &id) in dout.chunks(dim).zip(ids) {
        let Some(r) = row(id, rows) else { continue };
        dtable[r * dim..(r + 1) * dim].iter_mut().zip(g).for_each(|(d, g)| *d += g);
    }
}
