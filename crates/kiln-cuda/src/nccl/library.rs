//! NCCL, opened at run time.
//!
//! PyTorch's and NVIDIA's wheels ship NCCL as `libnccl.so.2` only (no `libnccl.so`), a name
//! cudarc's loader does not try, so kiln opens the library itself and resolves the few
//! functions it calls (NCCL's C ABI has been stable across 2.x). A missing library, or one
//! older than [`MIN_VERSION`], is an error that says what was searched and where pip keeps it.

use anyhow::{bail, Context, Result};
use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// The file names tried, in order.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
/// NCCL 2.18 (`ncclGetLastError`, send/receive, non-blocking abort all present).
const MIN_VERSION: i32 = 21800;

/// `ncclComm_t`.
pub(crate) type RawComm = *mut c_void;
/// `ncclResult_t`.
type Status = c_int;
/// `cudaStream_t`.
type Stream = *mut c_void;

/// `ncclUniqueId`: what every rank passes to join one communicator.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub bytes: [u8; 128],
}

/// `ncclFloat32`.
pub(crate) const FLOAT32: c_int = 7;
/// `ncclSum`.
pub(crate) const SUM: c_int = 0;
/// `ncclInProgress`: an asynchronous operation (here: an abort) has not finished.
pub(crate) const IN_PROGRESS: Status = 7;

/// The NCCL functions kiln calls.
pub(crate) struct Functions {
    pub get_version: unsafe extern "C" fn(*mut c_int) -> Status,
    pub get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    pub comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> Status,
    pub comm_destroy: unsafe extern "C" fn(RawComm) -> Status,
    pub comm_abort: unsafe extern "C" fn(RawComm) -> Status,
    pub comm_get_async_error: unsafe extern "C" fn(RawComm, *mut Status) -> Status,
    pub get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    pub get_last_error: unsafe extern "C" fn(RawComm) -> *const c_char,
    pub all_reduce: unsafe extern "C" fn(u64, u64, usize, c_int, c_int, RawComm, Stream) -> Status,
    pub reduce: unsafe extern "C" fn(u64, u64, usize, c_int, c_int, c_int, RawComm, Stream) -> Status,
    pub reduce_scatter: unsafe extern "C" fn(u64, u64, usize, c_int, c_int, RawComm, Stream) -> Status,
    pub all_gather: unsafe extern "C" fn(u64, u64, usize, c_int, RawComm, Stream) -> Status,
    pub broadcast: unsafe extern "C" fn(u64, u64, usize, c_int, c_int, RawComm, Stream) -> Status,
    pub send: unsafe extern "C" fn(u64, usize, c_int, c_int, RawComm, Stream) -> Status,
    pub recv: unsafe extern "C" fn(u64, usize, c_int, c_int, RawComm, Stream) -> Status,
    pub group_start: unsafe extern "C" fn() -> Status,
    pub group_end: unsafe extern "C" fn() -> Status,
    /// `major * 10000 + minor * 100 + patch`.
    pub version: i32,
    _library: Library,
}

impl Functions {
    /// Ok, or an error naming `what`, NCCL's message for `status` and its last error.
    pub fn check(&self, status: Status, comm: RawComm, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns static strings (or null) for any status and communicator.
        let (message, last) = unsafe { (text((self.get_error_string)(status)), text((self.get_last_error)(comm))) };
        bail!(
            "NCCL: {what} failed: {message} (code {status}){}",
            if last.is_empty() { String::new() } else { format!(": {last}") }
        )
    }

    /// "2.28.9".
    pub fn version_string(&self) -> String {
        format!("{}.{}.{}", self.version / 10000, self.version / 100 % 100, self.version % 100)
    }
}

/// A C string NCCL returned, or "" for null.
unsafe fn text(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// NCCL's functions, loaded on first use.
pub(crate) fn nccl() -> Result<&'static Functions> {
    static LOADED: OnceLock<std::result::Result<Functions, String>> = OnceLock::new();
    LOADED.get_or_init(|| load().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Whether NCCL can be loaded (and is new enough).
pub fn nccl_present() -> bool {
    nccl().is_ok()
}

/// For tests: whether NCCL loads; without it, `false` after printing why, unless
/// `KILN_REQUIRE_NCCL=1`, which makes its absence a failure (as `test_device` for CUDA).
pub fn test_nccl() -> bool {
    match nccl() {
        Ok(_) => true,
        Err(why) if std::env::var("KILN_REQUIRE_NCCL").as_deref() == Ok("1") => {
            panic!("KILN_REQUIRE_NCCL=1 but {why:#}")
        }
        Err(why) => {
            eprintln!("NCCL tests skipped: {why:#}");
            false
        }
    }
}

/// The loaded NCCL's version, "2.28.9".
pub fn nccl_version() -> Result<String> {
    Ok(nccl()?.version_string())
}

fn load() -> Result<Functions> {
    // SAFETY: loading NCCL runs its (side-effect free) initialisers only.
    let library = NAMES.iter().find_map(|name| unsafe { Library::new(*name) }.ok());
    let Some(library) = library else {
        let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        bail!(
            "NCCL not found: tried {} in the system's library paths and LD_LIBRARY_PATH={path:?}; \
             pip's wheels (nvidia-nccl-cu13, installed with PyTorch) keep it in <site-packages>/nvidia/nccl/lib: \
             add that folder to LD_LIBRARY_PATH",
            NAMES.join(", ")
        );
    };
    // SAFETY: each symbol is looked up under NCCL's exported name and given its C signature
    // from nccl.h; the library outlives the pointers (it is stored beside them).
    unsafe {
        macro_rules! symbol {
            ($name:literal) => {
                *library.get(concat!($name, "\0").as_bytes()).with_context(|| format!("NCCL: no function {}", $name))?
            };
        }
        let mut functions = Functions {
            get_version: symbol!("ncclGetVersion"),
            get_unique_id: symbol!("ncclGetUniqueId"),
            comm_init_rank: symbol!("ncclCommInitRank"),
            comm_destroy: symbol!("ncclCommDestroy"),
            comm_abort: symbol!("ncclCommAbort"),
            comm_get_async_error: symbol!("ncclCommGetAsyncError"),
            get_error_string: symbol!("ncclGetErrorString"),
            get_last_error: symbol!("ncclGetLastError"),
            all_reduce: symbol!("ncclAllReduce"),
            reduce: symbol!("ncclReduce"),
            reduce_scatter: symbol!("ncclReduceScatter"),
            all_gather: symbol!("ncclAllGather"),
            broadcast: symbol!("ncclBroadcast"),
            send: symbol!("ncclSend"),
            recv: symbol!("ncclRecv"),
            group_start: symbol!("ncclGroupStart"),
            group_end: symbol!("ncclGroupEnd"),
            version: 0,
            _library: library,
        };
        let mut version = 0;
        functions.check((functions.get_version)(&mut version), std::ptr::null_mut(), "ncclGetVersion")?;
        functions.version = version;
        if version < MIN_VERSION {
            bail!("NCCL {} found, kiln needs 2.18 or newer", functions.version_string());
        }
        Ok(functions)
    }
}

/// A fresh id for a new communicator (made by one rank, sent to the others).
pub(crate) fn unique_id() -> Result<UniqueId> {
    let nccl = nccl()?;
    let mut id = UniqueId { bytes: [0; 128] };
    // SAFETY: `id` is a writable ncclUniqueId.
    nccl.check(unsafe { (nccl.get_unique_id)(&mut id) }, std::ptr::null_mut(), "ncclGetUniqueId")?;
    Ok(id)
}
