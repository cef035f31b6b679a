//! The backend conformance suite on CUDA device 0 (skipped without one; see `test_device`).
kiln_core::conformance_tests!(optional kiln_cuda::test_device());
