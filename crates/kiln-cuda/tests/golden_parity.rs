//! Parity with transformers on CUDA device 0, in f32 and bf16 (skipped without one).
kiln_model::golden_tests!(optional kiln_cuda::test_device());
