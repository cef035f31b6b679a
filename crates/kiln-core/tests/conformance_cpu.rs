//! The CPU backend against the shared conformance suite.
kiln_core::conformance_tests!(kiln_core::Cpu);
