//! Element-wise kernels: residual adds, scaling, reductions, bias and SwiGLU.

use crate::backend::ColumnCopy;
use crate::bf16;
use crate::fast_exp::sigmoid;
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise rayon's scheduling.
pub(crate) const CHUNK: usize = 1 << 14;

pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    });
}

pub fn scale(dst: &mut [f32], s: f32) {
    dst.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|d| *d *= s));
}

pub fn round_to_bf16(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|v| *v = bf16::widen(bf16::round(*v))));
}

/// PyTorch's `lerp(a, b, w)` in f32.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// See [`crate::Backend::muon_momentum`].
pub fn muon_momentum(update: &mut [f32], buf: &mut [f32], grad: &[f32], momentum: f64, nesterov: bool) {
    assert!(update.len() == buf.len() && buf.len() == grad.len(), "muon_momentum: lengths differ");
    let (rest, momentum) = ((1.0 - momentum) as f32, momentum as f32);
    update.par_chunks_mut(CHUNK).zip(buf.par_chunks_mut(CHUNK)).zip(grad.par_chunks(CHUNK)).for_each(|((u, m), g)| {
        for ((u, m), &g) in u.iter_mut().zip(m.iter_mut()).zip(g) {
            *m = lerp(*m, g, rest);
            *u = if nesterov { lerp(g, *m, momentum) } else { *m };
        }
    });
}

pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum()
}

/// `dst[r, dst_offset..][..cols] (+)= src[r, src_offset..][..cols]`.
pub fn copy_columns(dst: &mut [f32], src: &[f32], spec: ColumnCopy) {
    let ColumnCopy { rows, cols, src_stride, src_offset, dst_stride, dst_offset, accumulate } = spec;
    assert!(
        src_offset + cols <= src_stride && dst_offset + cols <= dst_stride,
        "copy_columns: {cols} columns at offsets {src_offset}/{dst_offset} exceed strides {src_stride}/{dst_stride}"
    );
    assert!(
        src.len() == rows * src_stride && dst.len() == rows * dst_stride,
        "copy_columns: buffers of {} and {} values for {rows} rows of {src_stride} and {dst_stride}",
        src.len(),
        dst.len()
    );
    let rows_per_task = (CHUNK / dst_stride.max(1)).max(1);
    dst.par_chunks_mut(rows_per_task * dst_stride).zip(src.par_chunks(rows_per_task * src_stride)).for_each(
        |(d, s)| {
            for (d, s) in d.chunks_mut(dst_stride).zip(s.chunks(src_stride)) {
                let (d, s) = (&mut d[dst_offset..dst_offset + cols], &s[src_offset..src_offset + cols]);
                if accumulate {
                    d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                } else {
                    d.copy_from_slice(s);
                }
            }
        },
    );
}

/// `x[r, :] *= w[r]`.
pub fn scale_rows(x: &mut [f32], w: &[f32]) {
    assert!(
        !w.is_empty() && x.len().is_multiple_of(w.len()),
        "scale_rows: {} values do not split into {} rows",
        x.len(),
        w.len()
    );
    let cols = x.len() / w.len();
    x.par_chunks_mut(cols.max(1)).zip(w.par_iter()).for_each(|(row, &w)| row.iter_mut().for_each(|v| *v *= w));
}

/// `out[r] = Σ_c a[r, c] · b[r, c]`.
pub fn row_dot(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(a.len() == b.len() && !out.is_empty() && a.len().is_multiple_of(out.len()), "row_dot: shape mismatch");
    let cols = a.len() / out.len();
    out.par_iter_mut()
        .zip(a.par_chunks(cols.max(1)).zip(b.par_chunks(cols.max(1))))
        .for_each(|(o, (a, b))| *o = a.iter().zip(b).map(|(x, y)| x * y).sum());
}

/// `y[r, :] += bias`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    assert_eq!(y.len() % bias.len(), 0, "add_bias: {} is not a multiple of {}", y.len(), bias.len());
    y.par_chunks_mut(bias.len()).for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
}

/// `dbias += Σ_r dy[r, :]`.
pub fn bias_backward(dbias: &mut [f32], dy: &[f32]) {
    assert_eq!(dy.len() % dbias.len(), 0, "bias_backward: {} is not a multiple of {}", dy.len(), dbias.len());
    for row in dy.chunks(dbias.len()) {
        dbias.iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
}

/// `x` held to `[lo, hi]` by comparisons the compiler turns into vector blends: `f32::clamp`
/// and `f32::min` keep NaN rules that stop the loops around them from vectorising (SwiGLU ran
/// 7x slower with them). Equal to `x.clamp(lo, hi)` for every number; NaN stays NaN.
#[inline(always)]
fn clamp(x: f32, lo: f32, hi: f32) -> f32 {
    if x > hi {
        hi
    } else if x < lo {
        lo
    } else {
        x
    }
}

// SwiGLU:  h = silu(g)·u,  silu(g) = g·σ(g), with g = min(gate, L), u = clamp(up, −L, L)
//   dh/du = silu(g)                        (0 where the clamp held up)
//   dh/dg = u·σ(g)·(1 + g·(1 − σ(g)))      (0 where the clamp held gate)
pub fn swiglu_forward(h: &mut [f32], gate: &[f32], up: &[f32], limit: f32) {
    assert!(h.len() == gate.len() && h.len() == up.len(), "swiglu_forward: length mismatch");
    h.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(h, (g, u))| {
        for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
            let (g, u) = (clamp(g, f32::NEG_INFINITY, limit), clamp(u, -limit, limit));
            *h = g * sigmoid(g) * u;
        }
    });
}

/// A clamp passes the gradient where it let the value through (bounds included, as autograd).
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32], limit: f32) {
    let n = dh.len();
    assert!(dgate.len() == n && dup.len() == n && gate.len() == n && up.len() == n, "swiglu_backward: length mismatch");
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dh.par_chunks(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))))
        .for_each(|((dg, du), (dh, (g, u)))| {
            for i in 0..dh.len() {
                let (gi, ui) = (clamp(g[i], f32::NEG_INFINITY, limit), clamp(u[i], -limit, limit));
                let s = sigmoid(gi);
                du[i] = if u[i].abs() <= limit { dh[i] * gi * s } else { 0.0 };
                dg[i] = if g[i] <= limit { dh[i] * ui * s * (1.0 + gi * (1.0 - s)) } else { 0.0 };
            }
        });
}
