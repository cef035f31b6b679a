//! DeepSeek-V4 configs and checkpoints as transformers writes them: the parameters kiln lays
//! out are transformers' (count and shapes), and a checkpoint comes back from a load and a save
//! with every tensor's name, dtype, shape and bytes unchanged (tools/golden/deepseek_v4_*.py).

use kiln_core::Cpu;
use kiln_model::config::AttentionKind;
use kiln_model::config_v4::V4Attention;
use kiln_model::safetensors_io::{self, LoadSpec};
use kiln_model::{weights, Config, Model, ModelShare, StorageDtype};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn parameters_are_transformers_for_both_plan_configs() {
    for case in ["hc2", "hc4_tied"] {
        let dir = fixtures().join("deepseek_v4_plan").join(case);
        let config = Config::load(&dir).unwrap();
        let params: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
        // transformers counts nn.Parameters (the correction biases are buffers) and stacks each
        // layer's experts; kiln's are compared expert by expert.
        let layout = weights::layout(&config);
        let mut kiln: Vec<usize> = layout
            .iter()
            .into_iter()
            .filter(|s| !s.name.ends_with("ffn.gate.bias"))
            .flat_map(|s| if s.parts.is_empty() { vec![s.numel()] } else { vec![s.numel() / s.shape[0]; s.shape[0]] })
            .collect();
        let mut reference: Vec<usize> = params["by_tensor"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(name, n)| {
                let n = n.as_u64().unwrap() as usize;
                let experts = config.moe.as_ref().unwrap().experts;
                // `experts.gate_up_proj` is gate and up of every expert; `down_proj` every down.
                if name.ends_with("experts.gate_up_proj") {
                    vec![n / (2 * experts); 2 * experts]
                } else if name.ends_with("experts.down_proj") {
                    vec![n / experts; experts]
                } else {
                    vec![n]
                }
            })
            .collect();
        kiln.sort_unstable();
        reference.sort_unstable();
        assert_eq!(kiln.iter().sum::<usize>(), params["total"].as_u64().unwrap() as usize, "{case}: total");
        assert_eq!(kiln, reference, "{case}: tensor sizes");
    }
}

#[test]
fn config_reads_transformers_fields() {
    let config = Config::load(&fixtures().join("deepseek_v4_checkpoint")).unwrap();
    let AttentionKind::V4(v4) = &config.attention else { panic!("not read as deepseek_v4") };
    assert_eq!(v4.layers, [V4Attention::Sliding, V4Attention::Sparse { rate: 4 }, V4Attention::Heavy { rate: 8 }]);
    assert_eq!(v4.hash_layers, [true, false, false]);
    assert_eq!((v4.hc.streams, v4.hc.sinkhorn_iters), (2, 20));
    assert_eq!((config.head_dim, config.rot_dim, config.num_kv_heads), (16, 4, 1));
    assert_eq!((config.rope_theta, v4.compress_rope_theta), (10_000.0, 160_000.0));
    assert_eq!(config.layer_windows, [Some(8); 3]);
    assert_eq!(config.intermediate_size, 16, "the shared expert's width");
}

#[test]
fn legacy_fields_resolve_as_transformers_does() {
    let text = std::fs::read_to_string(fixtures().join("deepseek_v4_checkpoint/config.json")).unwrap();
    let mut o: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    for key in ["layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"] {
        o.remove(key);
    }
    o.insert("compress_ratios".into(), serde_json::json!([0, 4, 128]));
    o.insert("compress_rate_hca".into(), 8.into());
    o.insert("num_hash_layers".into(), 1.into());
    o.insert("qk_rope_head_dim".into(), 4.into());
    let legacy = Config::parse(&serde_json::Value::from(o.clone()).to_string()).unwrap();
    let modern = Config::load(&fixtures().join("deepseek_v4_checkpoint")).unwrap();
    assert_eq!(legacy.attention, modern.attention);
    assert_eq!((legacy.rot_dim, legacy.rope_theta), (modern.rot_dim, modern.rope_theta));

    o.insert("compress_ratios".into(), serde_json::json!([0, 4, 7]));
    let err = Config::parse(&serde_json::Value::from(o.clone()).to_string()).unwrap_err();
    assert!(err.contains("compress_ratios") && err.contains('7'), "{err}");
    o.insert("num_key_value_heads".into(), 2.into());
    assert!(Config::parse(&serde_json::Value::from(o.clone()).to_string())
        .unwrap_err()
        .contains("num_key_value_heads"));
}

#[test]
fn checkpoint_round_trips_names_dtypes_and_bytes() {
    let dir = fixtures().join("deepseek_v4_checkpoint");
    let config = Config::load(&dir).unwrap();
    let layout = weights::layout(&config);
    let carried = |name: &str| config.is_carried_tensor(name);
    let spec = LoadSpec { passthrough: &carried, ..LoadSpec::plain(&layout) };
    let loaded = safetensors_io::load(&dir, &spec).unwrap();
    assert_eq!(loaded.dtype, StorageDtype::BF16);
    let mut carried: Vec<&str> = loaded.passthrough.iter().map(|t| t.name.as_str()).collect();
    carried.sort_unstable();
    assert_eq!(carried, ["model.layers.0.ffn.gate.tid2eid", "mtp.0.attn.wq_a.weight", "mtp.0.enorm.weight"]);

    let out = std::env::temp_dir().join(format!("kiln-test-{}-v4-round-trip.safetensors", std::process::id()));
    safetensors_io::save(&out, &layout, &loaded.tensors, loaded.dtype, &loaded.passthrough).unwrap();
    assert_same_tensors(&dir.join("model.safetensors"), &out);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn a_rank_that_writes_no_checkpoint_reads_of_the_carried_tensors_only_the_hash_tables() {
    let dir = fixtures().join("deepseek_v4_checkpoint");
    let carried = |carries| {
        let share = ModelShare { carries, ..ModelShare::whole() };
        // The load fails without the hash layer's table.
        let model = Model::load_share(&Cpu, &dir, share, None).unwrap();
        let mut names: Vec<String> = model.passthrough.iter().map(|t| t.name.clone()).collect();
        names.sort_unstable();
        names
    };
    let writer = ["model.layers.0.ffn.gate.tid2eid", "mtp.0.attn.wq_a.weight", "mtp.0.enorm.weight"];
    assert_eq!(carried(true), writer);
    assert_eq!(carried(false), ["model.layers.0.ffn.gate.tid2eid"], "the multi-token-prediction layer is read");
}

/// The safetensors files `original` and `saved` hold the same tensors: names, dtypes, shapes
/// and bytes.
fn assert_same_tensors(original: &std::path::Path, saved: &std::path::Path) {
    let (original, saved) = (std::fs::read(original).unwrap(), std::fs::read(saved).unwrap());
    let (original, saved) = (
        safetensors::SafeTensors::deserialize(&original).unwrap(),
        safetensors::SafeTensors::deserialize(&saved).unwrap(),
    );
    let (mut names, mut saved_names) = (original.names(), saved.names());
    names.sort_unstable();
    saved_names.sort_unstable();
    assert_eq!(names, saved_names);
    for name in names {
        let (a, b) = (original.tensor(name).unwrap(), saved.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert!(a.data() == b.data(), "{name}: values changed");
    }
}

/// DeepSeek's published name of a tensor transformers saves as `name` (the reverse of
/// transformers' `deepseek_v4` conversion mapping: `^embed.weight`, `^hc_head_fn`, …, and no
/// `model.` prefix).
fn published(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => "embed.weight".into(),
        "model.norm.weight" => "norm.weight".into(),
        "model.hc_head.hc_fn" | "model.hc_head.hc_base" | "model.hc_head.hc_scale" => {
            name.replace("model.hc_head.hc_", "hc_head_")
        }
        _ => name.strip_prefix("model.").unwrap_or(name).into(),
    }
}

/// A checkpoint under DeepSeek's published names loads as the same checkpoint under
/// transformers' names does, and saves back under its own names with every tensor's dtype,
/// shape and bytes unchanged (the int64 hash table and MTP tensors included).
#[test]
fn published_names_load_like_transformers_names_and_save_back_unchanged() {
    use kiln_core::{Backend, Cpu};
    let src = fixtures().join("deepseek_v4_checkpoint");
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-v4-published", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(name, view)| (published(&name), view)).collect();
    assert!(renamed.iter().any(|(n, _)| n == "layers.0.ffn.gate.tid2eid"));
    safetensors::serialize_to_file(renamed, None, &dir.join("model.safetensors")).unwrap();

    let (theirs, ours) = (kiln_model::Model::load(&Cpu, &src).unwrap(), kiln_model::Model::load(&Cpu, &dir).unwrap());
    assert_eq!(Cpu.read(&theirs.params), Cpu.read(&ours.params), "the same parameters");
    assert!(ours.layout.embed.name == "embed.weight", "the layout keeps the published names");

    let out = dir.join("saved");
    std::fs::create_dir_all(&out).unwrap();
    ours.save_weights(&Cpu, &out).unwrap();
    assert_same_tensors(&dir.join("model.safetensors"), &out.join("model.safetensors"));
    let _ = std::fs::remove_dir_all(&dir);
}
