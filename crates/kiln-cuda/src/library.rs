//! Finding the CUDA libraries at run time.
//!
//! cudarc loads each library on first use and panics when it is missing; kiln asks first, so a
//! machine without CUDA gets an error that says what was searched and how to point at it.

use anyhow::{bail, Result};

/// A CUDA library kiln loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// The driver, `libcuda.so.1` (installed with the GPU driver).
    Driver,
    /// The run-time compiler for kiln's kernels, `libnvrtc.so.13`.
    Nvrtc,
    /// Matrix products, `libcublas.so.13`.
    Cublas,
}

impl Library {
    /// The name cudarc searches under.
    fn stem(self) -> &'static str {
        match self {
            Library::Driver => "cuda",
            Library::Nvrtc => "nvrtc",
            Library::Cublas => "cublas",
        }
    }

    /// Whether the library can be loaded.
    pub fn present(self) -> bool {
        // SAFETY: these only try to dlopen the candidate names.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
            }
        }
    }

    /// Ok when present, else an error naming the file names tried and the search path.
    pub fn require(self) -> Result<()> {
        if self.present() {
            return Ok(());
        }
        let candidates: Vec<String> = cudarc::get_lib_name_candidates(self.stem())
            .into_iter()
            .filter(|name| name.starts_with("lib") && name.contains(".so") && !name.contains("64"))
            .collect();
        let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        let hint = match self {
            Library::Driver => "the GPU driver installs it; is there an Nvidia GPU and driver on this machine?",
            Library::Nvrtc | Library::Cublas => {
                "pip's CUDA 13 wheels keep it in <site-packages>/nvidia/cu13/lib: add that folder to LD_LIBRARY_PATH"
            }
        };
        bail!(
            "CUDA library {} not found: tried {} in the system's library paths and LD_LIBRARY_PATH={path:?}; {hint}",
            self.stem(),
            candidates.join(", ")
        )
    }
}
