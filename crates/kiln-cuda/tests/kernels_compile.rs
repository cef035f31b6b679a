//! Every kernel compiles with NVRTC, for the architectures kiln targets, and the program
//! defines every kernel the backend launches. Needs only NVRTC (no GPU): CI installs the
//! CUDA 13 NVRTC wheel and sets KILN_REQUIRE_NVRTC=1, so a kernel that does not compile
//! fails CI; elsewhere the test says why it skipped.

use kiln_cuda::{kernels, Library};

fn nvrtc_or_skip() -> bool {
    if Library::Nvrtc.present() {
        return true;
    }
    let why = Library::Nvrtc.require().unwrap_err();
    if std::env::var("KILN_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("KILN_REQUIRE_NVRTC=1 but {why}");
    }
    eprintln!("skipped: {why}");
    false
}

#[test]
fn kernels_compile_for_hopper_and_ampere() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_90", "sm_80"] {
        let cubin = kernels::compile(arch).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: a CUBIN is an ELF image");
        for name in kernels::NAMES {
            let symbol = [name.as_bytes(), b"\0"].concat();
            assert!(cubin.windows(symbol.len()).any(|w| w == symbol), "{arch}: kernel {name} missing from the CUBIN");
        }
    }
}

#[test]
fn a_broken_kernel_is_rejected_with_the_compiler_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let err = cudarc::nvrtc::compile_ptx("extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }")
        .expect_err("an undefined name must not compile");
    assert!(format!("{err:?}").contains("undefined_name"), "the log names the error: {err:?}");
}
