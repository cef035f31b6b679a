//! Weights kept rounded to bf16 while they are frozen ([`kiln_core::Backend::freeze_weights`]):
//! a decode step (or a frozen reference model's pass) multiplies every weight by few rows, and
//! rounding the f32 weight on each product moves more memory than the product itself. A
//! weight is rounded on its first bf16 product after the freeze and dropped (stream-ordered)
//! when the last freeze ends.
//!
//! As on the CPU, the freeze belongs to the thread that declared it, so it never reaches
//! weights that another thread (another rank of a threaded test, another run) is training.

use crate::memory::Allocation;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A weight as a product reads it: its device (the stream's address), address and length.
type Key = (usize, u64, usize);

#[derive(Default)]
struct Frozen {
    depth: usize,
    rounded: HashMap<Key, Rc<Allocation>>,
}

thread_local! {
    static FROZEN: RefCell<Frozen> = RefCell::default();
}

pub(crate) fn freeze() {
    FROZEN.with(|f| f.borrow_mut().depth += 1);
}

pub(crate) fn thaw() {
    FROZEN.with(|f| {
        let mut frozen = f.borrow_mut();
        frozen.depth = frozen.depth.checked_sub(1).expect("thaw_weights without freeze_weights");
        if frozen.depth == 0 {
            frozen.rounded.clear();
        }
    });
}

/// The weight at `key` in bf16: kept from an earlier product while this thread has weights
/// frozen, else made by `round` (and kept, when frozen).
pub(crate) fn rounded(key: Key, round: impl FnOnce() -> Allocation) -> Rc<Allocation> {
    FROZEN.with(|f| {
        let mut frozen = f.borrow_mut();
        if frozen.depth == 0 {
            return Rc::new(round());
        }
        Rc::clone(frozen.rounded.entry(key).or_insert_with(|| Rc::new(round())))
    })
}
