//! `examples/*.toml` are the configuration's documentation: every key of every section appears
//! in the example that documents its section (set, commented out with its default or an
//! alternative, or as a table header such as `[[grpo.rewards]]`), and every example parses. The keys are those serde knows: a section refuses
//! an unknown key by listing the ones it accepts.

use kiln_train::config::{
    DataSection, DistillSection, DpoSection, GrpoSection, KtoSection, ModelSection, OutputSection, RewardSpec,
    RmSection, RunConfig, TrainSection,
};
use serde::de::DeserializeOwned;
use std::path::PathBuf;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The keys `T` accepts, from the error serde gives for a key it does not.
fn keys<T: DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
    let err = toml::from_str::<T>("not_a_key = 1").unwrap_err().to_string();
    let expected = err.split("expected ").nth(1).unwrap_or_else(|| panic!("no key list in {err:?}"));
    expected.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

#[test]
fn every_key_is_documented_in_its_example() {
    let sections: [(&str, Vec<String>); 10] = [
        ("sft.toml", keys::<ModelSection>()),
        ("sft.toml", keys::<DataSection>()),
        ("sft.toml", keys::<TrainSection>()),
        ("sft.toml", keys::<OutputSection>()),
        ("dpo.toml", keys::<DpoSection>()),
        ("rm.toml", keys::<RmSection>()),
        ("kto.toml", keys::<KtoSection>()),
        ("grpo.toml", keys::<GrpoSection>()),
        ("grpo.toml", keys::<RewardSpec>()),
        ("distill.toml", keys::<DistillSection>()),
    ];
    let mut missing = Vec::new();
    for (file, keys) in &sections {
        assert!(!keys.is_empty(), "{file}: {keys:?}");
        let text = std::fs::read_to_string(examples().join(file)).unwrap();
        let documented = |k: &str| regex::Regex::new(&format!(r"(^|[\s#(]){k}\s*=|\.{k}\]")).unwrap().is_match(&text);
        missing.extend(keys.iter().filter(|k| !documented(k)).map(|k| format!("{file}: {k}")));
    }
    assert!(missing.is_empty(), "keys no example documents: {missing:?}");
}

#[test]
fn every_example_parses() {
    for name in ["sft", "dpo", "rm", "kto", "grpo", "distill"] {
        let path = examples().join(format!("{name}.toml"));
        let config = RunConfig::load_resolved(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(config.train.lr > 0.0, "{name}");
    }
}
