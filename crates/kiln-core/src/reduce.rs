//! Reductions over a row written as 16 independent lanes, so that the compiler vectorises
//! them: a plain fold is a chain of dependent operations, one element per latency. Only
//! order-free reductions live here (the maximum); a sum in lanes changes its rounding.

/// The largest of `xs` (−∞ for none).
pub fn max(xs: &[f32]) -> f32 {
    let (chunks, tail) = xs.as_chunks::<16>();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for c in chunks {
        lanes = std::array::from_fn(|l| lanes[l].max(c[l]));
    }
    lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lanes_take_the_maximum_a_fold_takes() {
        let xs: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        assert_eq!(super::max(&xs), 50.0);
        assert_eq!(super::max(&[]), f32::NEG_INFINITY);
    }
}
