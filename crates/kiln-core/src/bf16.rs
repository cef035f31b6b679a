//! bfloat16: the top 16 bits of an f32 (sign, 8 exponent bits, 7 stored significand bits).
//!
//! Its unit roundoff is u = 2⁻⁸ (half the spacing 2⁻⁷ between 1 and the next bf16), so
//! rounding an f32 to bf16 moves it by at most |x|·2⁻⁸. Products of two bf16 values have
//! at most 16 significant bits and are exact in f32.

/// `x` rounded to the nearest bf16, ties to even (what `vcvtneps2bf16` and PyTorch do); a NaN
/// stays a (quiet) NaN, values beyond the largest bf16 round to infinity.
#[inline(always)]
pub fn round(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((bits >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// The f32 value of a bf16 (exact).
#[inline(always)]
pub fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_with_ties_to_even() {
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even significand (1).
        assert_eq!(widen(round(1.0 + 2f32.powi(-8))), 1.0);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶ (even).
        assert_eq!(widen(round(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(widen(round(1.0 + 2f32.powi(-8) + 2f32.powi(-20))), 1.0 + 2f32.powi(-7));
        assert_eq!(widen(round(-2.5)), -2.5);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::MAX)), f32::INFINITY);
        assert_eq!(widen(round(f32::NEG_INFINITY)), f32::NEG_INFINITY);
    }

    #[test]
    fn rounding_error_is_within_the_unit_roundoff() {
        let mut x = 1e-30f32;
        while x < 1e30 {
            for v in [x, -x * 1.37] {
                let err = (widen(round(v)) - v).abs();
                assert!(err <= v.abs() * 2f32.powi(-8), "{v}: error {err}");
            }
            x *= 1.0173;
        }
    }
}
