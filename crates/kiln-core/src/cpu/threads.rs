//! Worker threads for the CPU backend.
//!
//! Denormal floats (below ~1.2e-38) take a slow microcode path on x86, tens of times slower
//! per operation. Training produces them as soon as a model grows confident: tiny softmax
//! probabilities times a small loss weight, optimizer moments of unused embedding rows
//! decaying towards zero. A run that slowed 2.7x at step 200 of the demo's pretraining was
//! this. Every kiln thread therefore flushes denormals to zero (FTZ, DAZ on x86; FZ on Arm),
//! as GPUs do by default; values this small carry no information in f32 training.

/// Builds rayon's global pool with `threads` workers (all cores when `None`), each flushing
/// denormals to zero, and does the same for the calling thread. Call once, at start-up.
pub fn init(threads: Option<usize>) -> Result<(), rayon::ThreadPoolBuildError> {
    flush_denormals_to_zero();
    let mut builder = rayon::ThreadPoolBuilder::new().start_handler(|_| flush_denormals_to_zero());
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    builder.build_global()
}

/// Sets the current thread's floating-point unit to flush denormal results and inputs to zero.
pub fn flush_denormals_to_zero() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes only this thread's MXCSR; bits 15 (FTZ) and 6 (DAZ).
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= 0x8040;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets FPCR.FZ (bit 24) of this thread only.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn denormals_flush_to_zero_on_this_thread() {
        std::thread::spawn(|| {
            let tiny = std::hint::black_box(1e-30f32);
            assert!(tiny * 1e-10 > 0.0, "without the flag the product is a denormal");
            super::flush_denormals_to_zero();
            assert_eq!(std::hint::black_box(tiny) * 1e-10, 0.0);
        })
        .join()
        .unwrap();
    }
}
