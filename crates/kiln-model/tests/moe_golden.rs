//! The DeepSeekMoE layer against transformers' DeepseekV3MoE: output, input gradient and
//! every parameter gradient (fixture by `tools/golden/moe_layer.py`).

use kiln_core::{Backend, Cpu, Precision, Routing};
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

#[test]
fn moe_layer_matches_transformers() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/moe/layer.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (tokens, hidden) = (12, 16);
    let shape = MoeShape {
        hidden,
        expert_ff: 8,
        experts: 8,
        shared_ff: 8,
        routing: Routing { tokens, experts: 8, top_k: 2, groups: 4, top_groups: 2, normalize: true, scale: 2.5 },
        precision: Precision::F32,
    };
    let b = Cpu;
    let up = |n: &str| b.upload(&t(n));
    let w = MoeWeights {
        router: up("router"),
        bias: Some(up("bias")),
        gate: up("gate"),
        up: up("up"),
        down: up("down"),
        shared_gate: Some(up("shared_gate")),
        shared_up: Some(up("shared_up")),
        shared_down: Some(up("shared_down")),
    };
    let zeros = |n: &str| b.zeros(t(n).len());
    let mut g = MoeWeights {
        router: zeros("router"),
        bias: Some(zeros("bias")),
        gate: zeros("gate"),
        up: zeros("up"),
        down: zeros("down"),
        shared_gate: Some(zeros("shared_gate")),
        shared_up: Some(zeros("shared_up")),
        shared_down: Some(zeros("shared_down")),
    };
    let x = up("x");
    let (mut out, mut dx) = (b.zeros(tokens * hidden), b.zeros(tokens * hidden));
    let mut acts = MoeActs::new(&b, &shape, tokens);
    let mut scratch = MoeGrads::new(&b, &shape, tokens);
    let w = w.map(&mut |t| t.as_slice());
    moe::forward(&b, &shape, &w, &x, Some(&mut out), &mut acts, None);
    assert_close("out", &b.read(&out), &t("out"));
    let mut g_views = g.map_mut(&mut |t| &mut t[..]);
    moe::backward(&b, &shape, &w, &x, &up("grad_out"), &mut dx, &mut g_views, &acts, &mut scratch, None);
    assert_close("dx", &b.read(&dx), &t("dx"));
    assert_close("grad router", &b.read(&g.router), &t("grad.router"));
    assert_close("grad gate", &b.read(&g.gate), &t("grad.gate"));
    assert_close("grad up", &b.read(&g.up), &t("grad.up"));
    assert_close("grad down", &b.read(&g.down), &t("grad.down"));
    assert_close("grad shared gate", &b.read(g.shared_gate.as_ref().unwrap()), &t("grad.shared_gate"));
    assert_close("grad shared up", &b.read(g.shared_up.as_ref().unwrap()), &t("grad.shared_up"));
    assert_close("grad shared down", &b.read(g.shared_down.as_ref().unwrap()), &t("grad.shared_down"));
    assert!(b.read(g.bias.as_deref().unwrap()).iter().all(|&v| v == 0.0), "the correction bias gets no gradient");
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
