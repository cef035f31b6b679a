//! DeepSeek-V4 against transformers' DeepseekV4ForCausalLM (fixtures by
//! `tools/golden/deepseek_v4.py`): logits, log-probs, the loss and every parameter's gradient,
//! with activations kept and recomputed.

use kiln_core::Cpu;

#[test]
fn deepseek_v4_sliding() {
    kiln_model::golden::check(&Cpu, "deepseek_v4_sliding");
}

#[test]
fn deepseek_v4_sliding_hc4() {
    kiln_model::golden::check(&Cpu, "deepseek_v4_sliding_hc4");
}

#[test]
fn deepseek_v4_compressed() {
    kiln_model::golden::check(&Cpu, "deepseek_v4");
}

#[test]
fn deepseek_v4_compressed_hc4() {
    kiln_model::golden::check(&Cpu, "deepseek_v4_hc4");
}
