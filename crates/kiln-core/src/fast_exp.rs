//! A branch-free `exp` that the compiler vectorises (std's `f32::exp` is a libm call per
//! element). Cody–Waite range reduction `x = n·ln2 + r`, `|r| ≤ ln2/2`, then a degree-6
//! Taylor polynomial for `eʳ` (relative error below 2e-7) scaled by `2ⁿ` built in the
//! exponent bits. Inputs are clamped to the normal range, so `exp(-inf)` is ~1e-38, not 0:
//! callers that mask set those entries to zero themselves.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// `127 + 2²³`: for an integer `n` in [−126, 127], `n + BIAS` is exact and holds the biased
/// exponent `n + 127` in its low mantissa bits, so `2ⁿ` is built without an `as i32`
/// conversion (whose saturating semantics keep the compiler from vectorising the loop).
const BIAS: f32 = 8_388_735.0;

#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // 2ⁿ: the biased exponent shifted into place (the bits above it shift out).
    let scale = f32::from_bits((n + BIAS).to_bits() << 23);
    p * scale
}

/// `σ(x) = 1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_exp_to_a_few_ulps() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.001_7;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn exponent_bits_build_every_power_of_two_in_range() {
        for n in -126..=127 {
            let scale = f32::from_bits((n as f32 + BIAS).to_bits() << 23);
            assert_eq!(scale, 2f32.powi(n), "2^{n}");
        }
    }
}
