//! Block-quantized weights as DeepSeek ships them, dequantized to f32 on load:
//!
//! - fp8 E4M3 matrices with a scale per block (`<name>_scale_inv`, DeepSeek-V3's 128×128);
//! - fp4 E2M1 matrices packed two per byte (dtype I8, the low nibble first, so the stored last
//!   dimension is half the weight's), with a scale per 1×32 block (`<stem>.scale`,
//!   DeepSeek-V4's routed experts).
//!
//!   w[i, j] = q[i, j] · s[i / block_rows, j / block_cols]
//!
//! Scales are f32/bf16/f16, or UE8M0 exponents (F8_E8M0 or U8: s = 2^(byte − 127)). The block
//! is the config's `weight_block_size` when the scale grid has its shape (partial blocks at the
//! edges, as V3 ships), else what the grid divides the weight into exactly (transformers'
//! `Fp8Dequantize`, which V4's mixed fp8/fp4 checkpoints need).

use safetensors::Dtype;

/// An fp8 E4M3 ("fn": no infinities) byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits.
pub fn f8_e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = (((byte >> 3) & 0xf) as i32, (byte & 0x7) as f32);
    if exp == 0xf && man == 7.0 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// The values of an fp4 E2M1 nibble (1 sign, 2 exponent, 1 mantissa bit).
const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Packed fp4 bytes, each two values (low nibble first).
pub fn unpack_fp4(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().flat_map(|&b| [E2M1[(b & 0xf) as usize], E2M1[(b >> 4) as usize]]).collect()
}

/// Whether `dtype` holds packed fp4 (its stored last dimension is half the weight's).
pub fn is_packed_fp4(dtype: Dtype) -> bool {
    dtype == Dtype::I8
}

/// Whether a tensor of `dtype` needs a scale to mean anything.
pub fn is_quantized(dtype: Dtype) -> bool {
    dtype == Dtype::F8_E4M3 || is_packed_fp4(dtype)
}

/// The weight a scale tensor called `name` belongs to: `<w>_scale_inv` → `<w>`,
/// `<stem>.scale` → `<stem>.weight`.
pub fn scaled_weight(name: &str) -> Option<String> {
    name.strip_suffix("_scale_inv")
        .map(str::to_string)
        .or_else(|| name.strip_suffix(".scale").map(|stem| format!("{stem}.weight")))
}

/// UE8M0 scales (F8_E8M0 or U8 bytes): powers of two, 2^(byte − 127).
pub fn ue8m0(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| (b as f32 - 127.0).exp2()).collect()
}

/// The block one scale of a `[rows, cols]` weight covers, given its scale grid: the config's
/// `block` when the grid has its (edge-padded) shape, else the one the grid divides the weight
/// into exactly; `None` when neither fits.
pub fn block_of([rows, cols]: [usize; 2], grid: &[usize], block: [usize; 2]) -> Option<[usize; 2]> {
    let [sr, sc] = grid[..] else { return None };
    if [sr, sc] == [rows.div_ceil(block[0]), cols.div_ceil(block[1])] {
        return Some(block);
    }
    (sr > 0 && sc > 0 && rows.is_multiple_of(sr) && cols.is_multiple_of(sc)).then(|| [rows / sr, cols / sc])
}

/// `w[i, j] *= scale[i / br, j / bc]` over the row-major `[.., cols]` weight `w`.
pub fn apply_scales(w: &mut [f32], cols: usize, scale: &[f32], [br, bc]: [usize; 2]) {
    let grid_cols = cols.div_ceil(bc);
    for (i, row) in w.chunks_mut(cols).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v *= scale[(i / br) * grid_cols + j / bc];
        }
    }
}
