//! DeepSeek-V4 configs and checkpoints as transformers writes them: the parameters kiln lays
//! out are transformers' (count and shapes), and a checkpoint comes back from a load and a save
//! with every tensor's name, dtype, shape and bytes unchanged (tools/golden/deepseek_v4_*.py).

use kiln_model::config::AttentionKind;
use kiln_model::config_v4::V4Attention;
use kiln_model::safetensors_io::{self, LoadSpec};
use kiln_model::{weights, Config, StorageDtype};
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
    let loaded =
        safetensors_io::load(&dir, &LoadSpec { layout: &layout, passthrough: &carried, fp8_block: [128, 128] })
            .unwrap();
    assert_eq!(loaded.dtype, StorageDtype::BF16);
    let mut carried: Vec<&str> = loaded.passthrough.iter().map(|t| t.name.as_str()).collect();
    carried.sort_unstable();
    assert_eq!(carried, ["model.layers.0.ffn.gate.tid2eid", "mtp.0.attn.wq_a.weight", "mtp.0.enorm.weight"]);

    let out = std::env::temp_dir().join(format!("kiln-test-{}-v4-round-trip.safetensors", std::process::id()));
    safetensors_io::save(&out, &layout, &loaded.tensors, loaded.dtype, &loaded.passthrough).unwrap();
    let (original, saved) = (std::fs::read(dir.join("model.safetensors")).unwrap(), std::fs::read(&out).unwrap());
    let _ = std::fs::remove_file(&out);
    let (original, saved) = (
        safetensors::SafeTensors::deserialize(&original).unwrap(),
        safetensors::SafeTensors::deserialize(&saved).unwrap(),
    );
    let mut names = original.names();
    names.sort_unstable();
    let mut saved_names = saved.names();
    saved_names.sort_unstable();
    assert_eq!(names, saved_names);
    for name in names {
        let (a, b) = (original.tensor(name).unwrap(), saved.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert!(a.data() == b.data(), "{name}: values changed");
    }
}
