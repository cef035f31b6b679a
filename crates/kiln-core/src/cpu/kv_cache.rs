//! A key/value cache's storage: f32 values, or bf16 values two to an f32 word
//! ([`Precision::words`]), read by decode attention as [`Stored`] values.

use crate::backend::Precision;
use crate::bf16;

/// A value as a cache stores it.
pub trait Stored: Copy + Send + Sync {
    /// Whether this is a bf16 (else an f32).
    const BF16: bool;
    /// Its exact f32 value.
    fn widen(self) -> f32;
}

impl Stored for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// A bf16's bits.
impl Stored for u16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16::widen(self)
    }
}

/// The bf16 values of a buffer of `Precision::Bf16` storage: value `2i` is the low half of
/// word `i` (a little-endian target's memory order).
pub fn as_bf16(words: &[f32]) -> &[u16] {
    const { assert!(cfg!(target_endian = "little"), "bf16 storage assumes little-endian words") };
    // SAFETY: u16 has weaker alignment than f32 and every bit pattern is a valid u16.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 2) }
}

fn as_bf16_mut(words: &mut [f32]) -> &mut [u16] {
    // SAFETY: as in `as_bf16`; the borrow of `words` is held by the result.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 2) }
}

/// `dst[rows[t], :] = src[t, :]` (rows of `dim` values in `storage`); negative rows skip `t`.
pub fn scatter_rows(dst: &mut [f32], src: &[f32], rows: &[i32], dim: usize, storage: Precision) {
    assert_eq!(src.len(), rows.len() * dim, "scatter_rows: {} values for {} rows of {dim}", src.len(), rows.len());
    match storage {
        Precision::F32 => scatter(dst, src, rows, dim, |x| x),
        Precision::Bf16 => {
            assert!(dim.is_multiple_of(2), "scatter_rows: bf16 rows of {dim} values do not fill whole words");
            scatter(as_bf16_mut(dst), src, rows, dim, bf16::round)
        }
    }
}

fn scatter<T>(dst: &mut [T], src: &[f32], rows: &[i32], dim: usize, store: impl Fn(f32) -> T) {
    let dst_rows = dst.len() / dim.max(1);
    for (t, &r) in rows.iter().enumerate().filter(|(_, &r)| r >= 0) {
        let r = r as usize;
        assert!(r < dst_rows, "scatter_rows: row {r} beyond {dst_rows}");
        for (d, &s) in dst[r * dim..(r + 1) * dim].iter_mut().zip(&src[t * dim..(t + 1) * dim]) {
            *d = store(s);
        }
    }
}
