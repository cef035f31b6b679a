//! This process's resident memory, as Linux counts it: the peak since the last reset, which a
//! step's record reports as the memory the step took (weights, gradients, optimizer state,
//! activations, buffers and the program itself). Elsewhere there is nothing to report.

/// Starts counting the peak anew from what is resident now.
pub fn reset_peak() {
    // Writing 5 to clear_refs resets the peak (VmHWM) of this process (Linux 4.0 and later).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident memory since the last `reset_peak` (or the start), in MB.
pub fn peak_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024.0 / 1e6)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_counts_what_was_touched_and_resets() {
        let Some(before) = super::peak_mb() else { return };
        super::reset_peak();
        let touched = vec![1u8; 64 << 20];
        let peak = super::peak_mb().unwrap();
        assert!(peak >= 64.0 && std::hint::black_box(&touched)[12345] == 1, "{before} then {peak} MB");
        drop(touched);
        super::reset_peak();
        assert!(super::peak_mb().unwrap() < peak - 32.0, "the reset keeps the freed 64 MB");
    }
}
