//! Loading, saving and input errors of Hugging Face model directories; packed batches.

use kiln_core::{Backend, Cpu};
use kiln_model::{Activations, Batch, Config, Model, StorageDtype};
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case).join("model")
}

/// A fresh empty directory under the system temp dir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_config(from: &Path, to: &Path) {
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
}

#[test]
fn unknown_model_type_is_named() {
    let dir = scratch_dir("unknown-type");
    let text = std::fs::read_to_string(fixture("llama").join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), text.replace("\"llama\"", "\"gpt2\"")).unwrap();
    let err = Model::load(&Cpu, &dir).err().expect("gpt2 must be refused").to_string();
    assert!(err.contains("config.json") && err.contains("unsupported model_type `gpt2`"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch_dir("missing-tensor");
    copy_config(&fixture("mistral"), &dir);
    let bytes = std::fs::read(fixture("mistral").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    let err = Model::load(&Cpu, &dir).err().expect("a missing tensor must be refused").to_string();
    assert!(err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"), "{err}");
}

#[test]
fn missing_config_field_is_named() {
    let text = std::fs::read_to_string(fixture("llama").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    let err = Config::parse(&json.to_string()).unwrap_err();
    assert!(err.contains("hidden_size"), "{err}");
}

#[test]
fn legacy_rope_scaling_with_rope_type_key_matches_new_style() {
    let base = r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32"#;
    let legacy = Config::parse(&format!(
        r#"{base}, "rope_theta": 5000.0, "rope_scaling": {{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}}}}"#
    ))
    .unwrap();
    let modern = Config::parse(&format!(
        r#"{base}, "rope_parameters": {{"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0, "original_max_position_embeddings": 16}}}}"#
    ))
    .unwrap();
    assert_eq!(legacy, modern);
    assert_eq!(legacy.rope_theta, 5000.0);
    let err = Config::parse(&format!(r#"{base}, "rope_scaling": {{"type": "llama3", "factor": 8.0}}}}"#)).unwrap_err();
    assert!(err.contains("rope_parameters.low_freq_factor"), "{err}");
}

fn params(model: &Model<Cpu>) -> Vec<Vec<f32>> {
    model.tensors(&Cpu).iter().into_iter().cloned().collect()
}

#[test]
fn save_then_load_keeps_every_tensor() {
    // Sharded f32 in, single file out; bf16 in, bf16 out.
    for (case, dtype) in [("llama", StorageDtype::F32), ("qwen2", StorageDtype::BF16)] {
        let model = Model::load(&Cpu, &fixture(case)).unwrap();
        assert_eq!(model.dtype, dtype, "{case}: dtype detected from the checkpoint");
        let dir = scratch_dir(&format!("roundtrip-{case}"));
        copy_config(&fixture(case), &dir);
        model.save_weights(&Cpu, &dir).unwrap();
        let again = Model::load(&Cpu, &dir).unwrap();
        assert_eq!(again.dtype, dtype);
        assert!(params(&model) == params(&again), "{case}: tensors changed in a save/load round trip");
        let names: Vec<String> =
            safetensors::SafeTensors::deserialize(&std::fs::read(dir.join("model.safetensors")).unwrap())
                .unwrap()
                .names()
                .into_iter()
                .map(str::to_string)
                .collect();
        for spec in model.layout.iter() {
            assert!(names.contains(&spec.name), "{case}: saved file lacks {}", spec.name);
        }
    }
}

fn stored_tensors(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn deepseek_v3_saves_the_checkpoint_it_loaded() {
    // Per-expert tensors stacked on load and split on save, the f32 router kept f32, and the
    // multi-token-prediction layer (bf16, unused by kiln) carried through byte for byte.
    let model = Model::load(&Cpu, &fixture("deepseek_v3")).unwrap();
    assert_eq!(model.passthrough.len(), 5, "the MTP layer's tensors are kept");
    let dir = scratch_dir("deepseek-roundtrip");
    copy_config(&fixture("deepseek_v3"), &dir);
    model.save_weights(&Cpu, &dir).unwrap();
    let original = stored_tensors(&fixture("deepseek_v3").join("model.safetensors"));
    let saved = stored_tensors(&dir.join("model.safetensors"));
    assert_eq!(original.len(), saved.len(), "same tensors");
    for (a, b) in original.iter().zip(&saved) {
        assert!(a == b, "tensor {} changed in a load/save round trip", a.0);
    }
}

#[test]
fn fp8_block_quantized_weights_are_dequantized_like_torch() {
    let model = dequantized_like_torch("deepseek_v3_fp8", 10);
    assert_eq!(model.config.fp8_block, [16, 16]);
}

/// DeepSeek-V4's mix: routed experts in packed fp4 with UE8M0 scales per 1x32 block (`.scale`),
/// attention projections in fp8 with UE8M0 `weight_scale_inv`, against transformers'
/// `Fp8Dequantize`.
#[test]
fn fp4_experts_and_ue8m0_scaled_fp8_are_dequantized_like_transformers() {
    dequantized_like_torch("deepseek_v4_quantized", 60);
}

/// Loads `case`'s model and checks every tensor the golden has a `dequant.<name>` of, bit for
/// bit; at least `least` of them.
fn dequantized_like_torch(case: &str, least: usize) -> Model<Cpu> {
    let case = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case);
    let model = Model::load(&Cpu, &case.join("model")).unwrap();
    let bytes = std::fs::read(case.join("golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    let tensors = model.tensors(&Cpu);
    for (spec, p) in model.layout.iter().into_iter().zip(tensors.iter()) {
        let names = if spec.parts.is_empty() { vec![spec.name.clone()] } else { spec.parts.clone() };
        let mut want = Vec::new();
        for name in &names {
            if let Ok(t) = golden.tensor(&format!("dequant.{name}")) {
                want.extend(t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())));
                checked += 1;
            }
        }
        if !want.is_empty() {
            assert_eq!(Cpu.read(p), want, "{}: dequantized values differ from the reference's", spec.name);
        }
    }
    assert!(checked >= least, "only {checked} quantized tensors checked");
    model
}

/// A weight's scales may come before it (a shard read earlier) or after it: each quantized
/// tensor is dequantized as soon as both are in hand, with the same values either way.
#[test]
fn fp8_scales_in_an_earlier_shard_than_their_weights_dequantize_alike() {
    let src = fixture("deepseek_v3_fp8");
    let dir = scratch_dir("fp8-scales-first");
    copy_config(&src, &dir);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (scales, weights): (Vec<_>, Vec<_>) = st.tensors().into_iter().partition(|(n, _)| n.contains("scale"));
    assert!(scales.len() >= 10, "{} scale tensors", scales.len());
    let mut map = serde_json::Map::new();
    for (file, tensors) in [("model-00001-of-00002.safetensors", scales), ("model-00002-of-00002.safetensors", weights)]
    {
        for (name, _) in &tensors {
            map.insert(name.clone(), file.into());
        }
        safetensors::serialize_to_file(tensors, None, &dir.join(file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": { "total_size": bytes.len() }, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (sharded, whole) = (Model::load(&Cpu, &dir).unwrap(), Model::load(&Cpu, &src).unwrap());
    assert!(params(&sharded) == params(&whole), "scales read first dequantize otherwise");
}

#[test]
fn fp8_weight_without_scale_is_refused() {
    let err = load_without("deepseek_v3_fp8", "model.layers.0.self_attn.o_proj.weight_scale_inv");
    assert!(err.contains("model.layers.0.self_attn.o_proj.weight") && err.contains("_scale_inv"), "{err}");
}

#[test]
fn fp4_weight_without_scale_is_refused() {
    let err = load_without("deepseek_v4_quantized", "model.layers.1.ffn.experts.3.w2.scale");
    assert!(err.contains("model.layers.1.ffn.experts.3.w2.weight") && err.contains(".scale"), "{err}");
}

/// The error of loading fixture `case`'s model with the tensor `dropped` left out.
fn load_without(case: &str, dropped: &str) -> String {
    let dir = scratch_dir(&format!("{case}-without-{dropped}"));
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(case).join("model");
    copy_config(&src, &dir);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != dropped).collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    Model::load(&Cpu, &dir).err().expect("must be refused").to_string()
}

#[test]
fn f16_weights_load_within_f16_precision() {
    let mut model = Model::load(&Cpu, &fixture("mistral")).unwrap();
    let original = params(&model);
    model.dtype = StorageDtype::F16;
    let dir = scratch_dir("f16");
    copy_config(&fixture("mistral"), &dir);
    model.save_weights(&Cpu, &dir).unwrap();
    let again = Model::load(&Cpu, &dir).unwrap();
    assert_eq!(again.dtype, StorageDtype::F16);
    for (a, b) in original.iter().zip(params(&again)) {
        for (&x, y) in a.iter().zip(b) {
            // f16 keeps 11 significant bits: relative error at most 2^-11.
            assert!((x - y).abs() <= x.abs() * 4.9e-4 + 1e-7, "{x} became {y}");
        }
    }
}

#[test]
fn packed_sequences_do_not_see_each_other() {
    let b = Cpu;
    let mut model = Model::load(&b, &fixture("qwen3")).unwrap();
    let (a, c): (Vec<i32>, Vec<i32>) =
        ((0..7).map(|i| (i * 5 + 3) % 96).collect(), (0..5).map(|i| (i * 11 + 1) % 96).collect());
    let separate = Batch::causal_lm(&[a.clone(), c.clone()]);
    let mut packed = Batch::causal_lm(&[[a.clone(), c.clone()].concat()]);
    for t in a.len()..a.len() + c.len() {
        packed.positions[t] = (t - a.len()) as i32;
        packed.segments[t] = 1;
    }
    let v = model.config.vocab_size;
    let logits = |model: &mut Model<Cpu>, batch: &Batch| {
        let mut acts = Activations::new(&b, &model.config, batch.rows, batch.seq, false, false);
        model.forward(&b, &mut acts, batch);
        b.read(&acts.logits)
    };
    let (sep, pack) = (logits(&mut model, &separate), logits(&mut model, &packed));
    let seq = separate.seq;
    let pairs = (0..a.len()).map(|t| (t, t)).chain((0..c.len()).map(|t| (seq + t, a.len() + t)));
    for (s, p) in pairs {
        for j in 0..v {
            let (x, y) = (sep[s * v + j], pack[p * v + j]);
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "token {p}: packed {y} vs separate {x}");
        }
    }
}
