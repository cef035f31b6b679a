//! The DeepSeekMoE layer against transformers' DeepseekV3MoE and DeepseekV4SparseMoeBlock:
//! output, input gradient and every parameter gradient (fixtures by
//! `tools/golden/moe_layer.py` and `tools/golden/moe_layer_v4.py`).

use kiln_core::{Backend, Cpu, Precision, Routing, Scoring};
use kiln_model::layers::moe::{self, MoeActs, MoeGrads, MoeShape, MoeWeights};
use kiln_model::layers::moe_aux_loss::{seq_aux_loss, SeqAux};
use safetensors::SafeTensors;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * (w.abs() + 0.1 * scale), "{what}[{i}]: kiln {g}, transformers {w}");
    }
}

/// Runs the layer of fixture `file` with `shape` forward and backward and compares every
/// output and gradient; a fixture with `routes` is a hash layer (no correction bias).
fn check_layer(file: &str, shape: MoeShape) {
    let bytes = std::fs::read(format!("{}/../../tests/fixtures/moe/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let routes: Option<Vec<i32>> = st
        .tensor("routes")
        .ok()
        .map(|r| r.data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect());
    let (tokens, hidden) = (shape.routing.tokens, shape.hidden);
    let b = Cpu;
    let up = |n: &str| b.upload(&t(n));
    let w = MoeWeights {
        router: up("router"),
        bias: routes.is_none().then(|| up("bias")),
        gate: up("gate"),
        up: up("up"),
        down: up("down"),
        shared_gate: Some(up("shared_gate")),
        shared_up: Some(up("shared_up")),
        shared_down: Some(up("shared_down")),
    };
    let mut g = w.map(&mut |t| b.zeros(t.len()));
    let x = up("x");
    let (mut out, mut dx) = (b.zeros(tokens * hidden), b.zeros(tokens * hidden));
    let mut acts = MoeActs::new(&b, &shape, tokens);
    if let Some(routes) = &routes {
        acts.set_routes(&b, routes);
    }
    let mut scratch = MoeGrads::new(&b, &shape, tokens);
    let w = w.map(&mut |t| t.as_slice());
    moe::forward(&b, &shape, &w, &x, Some(&mut out), &mut acts, None);
    if let Some(routes) = &routes {
        assert_eq!(&acts.routes(&b), routes, "{file}: a hash layer keeps its table's experts");
    }
    assert_close(&format!("{file} out"), &b.read(&out), &t("out"));
    let mut g_views = g.map_mut(&mut |t| &mut t[..]);
    moe::backward(&b, &shape, &w, &x, &up("grad_out"), &mut dx, &mut g_views, &acts, &mut scratch, None, None);
    assert_close(&format!("{file} dx"), &b.read(&dx), &t("dx"));
    for (name, got) in [("router", &g.router), ("gate", &g.gate), ("up", &g.up), ("down", &g.down)] {
        assert_close(&format!("{file} grad {name}"), &b.read(got), &t(&format!("grad.{name}")));
    }
    for (name, got) in [("shared_gate", &g.shared_gate), ("shared_up", &g.shared_up), ("shared_down", &g.shared_down)] {
        assert_close(&format!("{file} grad {name}"), &b.read(got.as_ref().unwrap()), &t(&format!("grad.{name}")));
    }
    if let Some(bias) = &g.bias {
        assert!(b.read(bias).iter().all(|&v| v == 0.0), "the correction bias gets no gradient");
    }
}

#[test]
fn moe_layer_matches_transformers_v3() {
    let v3 = Routing {
        scoring: Scoring::Sigmoid,
        fixed: false,
        tokens: 12,
        experts: 8,
        top_k: 2,
        groups: 4,
        top_groups: 2,
        normalize: true,
        scale: 2.5,
    };
    let shape = MoeShape {
        hidden: 16,
        expert_ff: 8,
        experts: 8,
        shared_ff: 8,
        routing: v3,
        precision: Precision::F32,
        limit: f32::INFINITY,
    };
    check_layer("layer.safetensors", shape);
}

/// DeepSeek-V4's layers: √softplus scores without groups, weights always normalised, clamped
/// SwiGLU (limit 2: many gates and ups clamped), scored and hash-routed.
#[test]
fn moe_layer_matches_transformers_v4() {
    let routing = Routing {
        scoring: Scoring::SqrtSoftplus,
        fixed: false,
        tokens: 12,
        experts: 8,
        top_k: 3,
        groups: 1,
        top_groups: 1,
        normalize: true,
        scale: 1.5,
    };
    let shape =
        MoeShape { hidden: 16, expert_ff: 8, experts: 8, shared_ff: 8, routing, precision: Precision::F32, limit: 2.0 };
    check_layer("layer_v4_scored.safetensors", shape);
    check_layer("layer_v4_hash.safetensors", shape);
}

#[test]
fn sequence_balance_loss_matches_the_v3_formula() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/moe/aux_loss.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let i64s = |n: &str| -> Vec<i64> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let scores: Vec<f32> = f32s("logits").iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
    let indices: Vec<i32> = i64s("indices").iter().map(|&i| i as i32).collect();
    let (sequence, weights) = (i64s("sequence"), f32s("weights"));
    let aux = SeqAux { alpha: f32s("alpha")[0], sequence: &sequence, weights: &weights };
    let mut dlogits = vec![0.5f32; scores.len()];
    let loss = seq_aux_loss(&scores, &indices, 2, &aux, &mut dlogits);
    let want = f32s("loss")[0] as f64;
    assert!((loss - want).abs() < 1e-6 * want.abs(), "loss: kiln {loss}, torch {want}");
    let added: Vec<f32> = dlogits.iter().map(|d| d - 0.5).collect();
    for (i, (g, w)) in added.iter().zip(f32s("dlogits")).enumerate() {
        assert!((g - w).abs() < 1e-6 + 1e-5 * w.abs(), "dlogits[{i}]: kiln {g}, torch {w}");
    }
}
