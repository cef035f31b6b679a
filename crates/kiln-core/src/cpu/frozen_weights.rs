//! Weights kept packed while they are frozen ([`crate::Backend::freeze_weights`]): a decode
//! step multiplies every weight by a few rows, and packing the weight (into bf16 panels, or
//! f32 ones) on each call costs as much as the product or more. A weight is packed on its first product after the
//! freeze and dropped when the last freeze ends.
//!
//! The freeze belongs to the thread that declared it: products called from that thread (a
//! generation loop) reuse packed weights, while other threads (another run, a test beside
//! this one, rayon's workers) keep packing theirs, so a freeze never reaches weights that
//! someone else is training.

use super::matmul::Strided;
use super::matmul_bf16::PackedB;
use super::matmul_f32_packed::PackedF32;
use crate::backend::Precision;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// How a product reads a weight: its address, `n`, `k`, B's strides and the precision.
type Key = (usize, usize, usize, isize, isize, bool);

/// A weight packed for one precision's kernel.
pub(super) enum Packed {
    Bf16(PackedB),
    F32(PackedF32),
}

#[derive(Default)]
struct Frozen {
    depth: usize,
    packed: BTreeMap<Key, Rc<Packed>>,
}

thread_local! {
    static FROZEN: RefCell<Frozen> = RefCell::default();
}

pub(super) fn freeze() {
    FROZEN.with(|f| f.borrow_mut().depth += 1);
}

pub(super) fn thaw() {
    FROZEN.with(|f| {
        let mut frozen = f.borrow_mut();
        frozen.depth = frozen.depth.checked_sub(1).expect("thaw_weights without freeze_weights");
        if frozen.depth == 0 {
            frozen.packed.clear();
        }
    });
}

/// The weight `B[k, n]` packed for products in `precision`, while this thread has weights
/// frozen (and, for f32, the CPU has the packed kernel); `None` otherwise.
///
/// # Safety
/// `b` must be valid for every element its strides reach.
pub(super) unsafe fn packed(precision: Precision, n: usize, k: usize, b: Strided<*const f32>) -> Option<Rc<Packed>> {
    if precision == Precision::F32 && !PackedF32::available() {
        return None;
    }
    let key = (b.ptr as usize, n, k, b.rs, b.cs, precision == Precision::Bf16);
    let found = FROZEN.with(|f| {
        let frozen = f.borrow();
        (frozen.depth > 0).then(|| frozen.packed.get(&key).cloned())
    })?;
    if found.is_some() {
        return found;
    }
    // Packed outside the borrow: packing runs on rayon, and this thread may run its tasks.
    let p = Rc::new(match precision {
        Precision::Bf16 => Packed::Bf16(PackedB::new(n, k, b)),
        Precision::F32 => Packed::F32(PackedF32::new(n, k, b)),
    });
    FROZEN.with(|f| f.borrow_mut().packed.insert(key, p.clone()));
    Some(p)
}
