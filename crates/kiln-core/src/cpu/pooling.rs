//! DeepSeek-V4's compressor pooling (see `backend::Pooling`).
//!
//! Forward per entry e and feature f over its present slots s:
//!   z_s = gate[t_s, o_s + f] + ape[s mod m, o_s + f],  p = softmax(z),  out = Σ_s p_s v_s
//! Backward, with do = dL/dout[e, f]:
//!   dv_s = p_s do,  dz_s = p_s (v_s − out) do   (into dkv, dgate at [t_s, o_s + f]; dz into dape)
//! A token's features feed one entry each (its window's, or with overlap also the next
//! window's through the other half), so the scatter into dkv and dgate never collides.

use crate::backend::Pooling;

fn check(kv: usize, gate: usize, ape: usize, slots: usize, out: usize, spec: &Pooling) {
    let c = spec.series();
    assert!(kv == gate && kv.is_multiple_of(c * spec.width), "pool: kv and gate must be [tokens, {c}·width]");
    assert_eq!(ape, spec.rate * c * spec.width, "pool: ape must be [rate, {c}·width]");
    assert_eq!(slots, spec.entries * c * spec.rate, "pool: slots must be [entries, {c}·rate]");
    assert_eq!(out, spec.entries * spec.width, "pool: out must be [entries, width]");
}

/// The present slots of entry `e`: (slot, token).
fn present(slots: &[i32], e: usize, per_entry: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let row = &slots[e * per_entry..(e + 1) * per_entry];
    row.iter().enumerate().filter(|(_, &t)| t >= 0).map(|(s, &t)| (s, t as usize))
}

/// Softmax weights of entry `e`, feature `f` (over its present slots, in slot order).
fn weights(kv_w: usize, gate: &[f32], ape: &[f32], slots: &[(usize, usize)], f: usize, spec: &Pooling) -> Vec<f32> {
    let z: Vec<f32> = slots
        .iter()
        .map(|&(s, t)| {
            let at = (s / spec.rate) * spec.width + f;
            gate[t * kv_w + at] + ape[(s % spec.rate) * kv_w + at]
        })
        .collect();
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|z| (z - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|e| e / sum).collect()
}

pub fn forward(out: &mut [f32], kv: &[f32], gate: &[f32], ape: &[f32], slots: &[i32], spec: Pooling) {
    check(kv.len(), gate.len(), ape.len(), slots.len(), out.len(), &spec);
    let (kv_w, per_entry) = (spec.series() * spec.width, spec.series() * spec.rate);
    for e in 0..spec.entries {
        let present: Vec<(usize, usize)> = present(slots, e, per_entry).collect();
        for f in 0..spec.width {
            let p = weights(kv_w, gate, ape, &present, f, &spec);
            out[e * spec.width + f] =
                present.iter().zip(&p).map(|(&(s, t), p)| p * kv[t * kv_w + (s / spec.rate) * spec.width + f]).sum();
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dkv: &mut [f32],
    dgate: &mut [f32],
    dape: &mut [f32],
    dout: &[f32],
    kv: &[f32],
    gate: &[f32],
    ape: &[f32],
    slots: &[i32],
    spec: Pooling,
) {
    check(kv.len(), gate.len(), ape.len(), slots.len(), dout.len(), &spec);
    assert!(dkv.len() == kv.len() && dgate.len() == gate.len() && dape.len() == ape.len(), "pool_backward: shapes");
    let (kv_w, per_entry) = (spec.series() * spec.width, spec.series() * spec.rate);
    dkv.fill(0.0);
    dgate.fill(0.0);
    for e in 0..spec.entries {
        let present: Vec<(usize, usize)> = present(slots, e, per_entry).collect();
        for f in 0..spec.width {
            let p = weights(kv_w, gate, ape, &present, f, &spec);
            let value = |s: usize, t: usize| kv[t * kv_w + (s / spec.rate) * spec.width + f];
            let out: f32 = present.iter().zip(&p).map(|(&(s, t), p)| p * value(s, t)).sum();
            let d = dout[e * spec.width + f];
            for (&(s, t), p) in present.iter().zip(&p) {
                let at = (s / spec.rate) * spec.width + f;
                let dz = p * (value(s, t) - out) * d;
                dkv[t * kv_w + at] = p * d;
                dgate[t * kv_w + at] = dz;
                dape[(s % spec.rate) * kv_w + at] += dz;
            }
        }
    }
}
