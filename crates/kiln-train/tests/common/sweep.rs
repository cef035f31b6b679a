//! Scratch directories are named after the test process (`kiln-dp-threads-<pid>-<name>`) and
//! left in place for inspection; the first one a later test process asks for sweeps those of
//! processes that have ended, so runs do not pile up in the temp dir (a ZeRO test's
//! checkpoints of a 126M-parameter model are 349 MB each).

use std::path::Path;
use std::sync::Mutex;

/// Removes the temp dir's entries named `<prefix><pid>-…` whose process has ended, once per
/// prefix in this process. Only where `/proc` says which processes live (Linux).
pub fn sweep_ended_runs(prefix: &str) {
    static SWEPT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
    if swept.iter().any(|p| p == prefix) || !Path::new("/proc/self").exists() {
        return;
    }
    swept.push(prefix.to_string());
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()?.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}
