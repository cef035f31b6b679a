//! The bf16 micro-kernel on AMX (Advanced Matrix Extensions: Sapphire Rapids and later).
//!
//! `C[32×32] (+)= Σ_q A[32, q] · B[q, 32]` over `kc` k-pairs: C lives in four 16×16 f32
//! accumulator tiles (`tmm0..3`, its four quadrants); each step loads 16 k-pairs of A's two
//! row halves (`tmm4`, `tmm5`: 16 rows of 16 pairs) and of B's two column halves (`tmm6`,
//! `tmm7`: 16 pairs of 16 columns) and issues four `tdpbf16ps`, 16·16·32 products each. The
//! packed operands hold each tile whole (1 KiB, rows 64 bytes apart), step after step, so the
//! loads stream through memory.
//!
//! `tdpbf16ps` multiplies bf16 pairs exactly and sums in f32 with denormals flushed, but in an
//! order of its own (it is neither the even-then-odd nor the odd-then-even sequence of
//! `vdpbf16ps`): AMX results are held to the f32 summation bound, not to the portable
//! kernel's bits. Each row of C still depends only on its row of A and on B, in an order set
//! by k alone, so decode and training forwards agree on a machine that runs this kernel.
//!
//! Rust has no stable AMX intrinsics, so the instructions are written as inline assembly; Linux
//! hands out the tile registers' state only to a process that asks (`arch_prctl`), which
//! [`available`] does once.

use std::arch::asm;
use std::cell::Cell;
use std::sync::OnceLock;

/// Rows of C per micro-tile: two 16-row tiles.
pub(super) const MR: usize = 32;
/// k-pairs per step: a tile row is 64 bytes.
pub(super) const STEP: usize = 16;
/// k-pairs per pass over a C tile: a C tile is stored and loaded back once per pass, which
/// costs more on tiles than in vector registers, so passes are long (A's and B's 64 KiB
/// micro-panels stream from L2).
pub(super) const KC: usize = 512;

/// Whether this CPU has AMX-BF16, the OS saves its state, and this process may use it.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: cpuid and xgetbv only read processor state; arch_prctl changes no memory.
    *AVAILABLE.get_or_init(|| unsafe { detect() })
}

#[target_feature(enable = "xsave")]
unsafe fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    const OSXSAVE: u32 = 1 << 27;
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    /// XCR0's XTILECFG and XTILEDATA bits: the OS saves tile state across context switches.
    const XCR0_TILES: u64 = 3 << 17;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    if __cpuid(1).ecx & OSXSAVE == 0 || __cpuid_count(7, 0).edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE {
        return false;
    }
    _xgetbv(0) & XCR0_TILES == XCR0_TILES
        && libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
}

/// The `ldtilecfg` operand: palette 1, eight tiles of 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

thread_local! {
    /// Whether this thread's tiles are configured (the configuration is per thread).
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

unsafe fn configure() {
    if CONFIGURED.get() {
        return;
    }
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
    config.bytes_per_row[..8].fill(64);
    config.rows[..8].fill(16);
    asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    CONFIGURED.set(true);
}

/// The `32 × 32` tile at `c` (rows `ldc` apart) `(+)=` `kc` pairs: `a` and `b` hold, for
/// each step of 16 pairs, two whole tiles (1 KiB each, rows 64 bytes apart) of A's rows 0..16
/// and 16..32 and of B's columns 0..16 and 16..32.
///
/// # Safety
/// [`available`] must have returned true; `kc` must be a multiple of [`STEP`]; `a`, `b` and
/// `c` must hold what they are read and written for.
pub(super) unsafe fn kernel(kc: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, load: bool) {
    debug_assert!(kc.is_multiple_of(STEP));
    configure();
    const TILE: usize = 16 * STEP;
    let (rows, sc) = (64usize, ldc * 4);
    let quadrants = [c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16)];
    if load {
        asm!(
            "tileloadd tmm0, [{c0} + {sc}*1]",
            "tileloadd tmm1, [{c1} + {sc}*1]",
            "tileloadd tmm2, [{c2} + {sc}*1]",
            "tileloadd tmm3, [{c3} + {sc}*1]",
            c0 = in(reg) quadrants[0], c1 = in(reg) quadrants[1], c2 = in(reg) quadrants[2],
            c3 = in(reg) quadrants[3], sc = in(reg) sc, options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    for step in 0..kc / STEP {
        let (a, b) = (a.add(step * 2 * TILE), b.add(step * 2 * TILE));
        asm!(
            "tileloadd tmm4, [{a0} + {rows}*1]",
            "tileloadd tmm6, [{b0} + {rows}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {rows}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {rows}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a, a1 = in(reg) a.add(TILE), b0 = in(reg) b, b1 = in(reg) b.add(TILE),
            rows = in(reg) rows, options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {sc}*1], tmm0",
        "tilestored [{c1} + {sc}*1], tmm1",
        "tilestored [{c2} + {sc}*1], tmm2",
        "tilestored [{c3} + {sc}*1], tmm3",
        c0 = in(reg) quadrants[0], c1 = in(reg) quadrants[1], c2 = in(reg) quadrants[2],
        c3 = in(reg) quadrants[3], sc = in(reg) sc, options(nostack),
    );
}
