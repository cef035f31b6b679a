//! Parity with transformers on the CPU backend: every golden case of `kiln_model::golden`.

kiln_model::golden_tests!(kiln_core::Cpu);
