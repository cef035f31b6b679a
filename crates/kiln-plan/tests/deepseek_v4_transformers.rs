//! `kiln plan` reads DeepSeek-V4 configs in transformers' field names (`layer_types`,
//! `compress_rates`, `mlp_layer_types`) and counts exactly the parameters transformers'
//! `DeepseekV4ForCausalLM` builds for them: tiny models with every attention type, hash and
//! scored MoE layers, hc_mult 2 and 4, tied and untied heads (`tools/golden/deepseek_v4_plan.py`).

use kiln_plan::ModelShape;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/deepseek_v4_plan")
}

#[test]
fn parameter_counts_equal_transformers() {
    for case in ["hc2", "hc4_tied"] {
        let dir = fixtures().join(case);
        let shape = ModelShape::load(&dir.join("config.json")).unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let text = std::fs::read_to_string(dir.join("params.json")).unwrap();
        let want = serde_json::from_str::<serde_json::Value>(&text).unwrap()["total"].as_f64().unwrap();
        // transformers builds no MTP layers; the planner counts them apart (`mtp`).
        assert_eq!(shape.params.total(), want, "{case}: kiln plan {}, transformers {want}", shape.params.total());
    }
}

#[test]
fn an_unknown_layer_type_is_named() {
    let dir = fixtures().join("hc2");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["layer_types"][1] = "linear_attention".into();
    let err = ModelShape::parse(&config, "config.json").unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("layer_types") && err.contains("linear_attention"), "{err}");
}
