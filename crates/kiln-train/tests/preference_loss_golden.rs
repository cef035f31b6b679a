//! Every preference loss and its gradient against torch autograd on the formulas of the papers
//! as TRL implements them (`tools/golden/preference_losses.py`).

use kiln_train::preference_loss::{pair_loss, LossKind, LossParams, PairLogps};
use safetensors::{Dtype, SafeTensors};

#[test]
fn preference_losses_match_torch() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/preference/losses.safetensors"))
            .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |name: &str| -> Vec<f64> {
        let t = st.tensor(name).unwrap();
        match t.dtype() {
            Dtype::F64 => t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::I64 => t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            d => panic!("{name}: {d:?}"),
        }
    };
    let params = get("params");
    let p = LossParams { beta: params[0], label_smoothing: params[1], simpo_gamma: params[2] };
    let (c, r, lc, lr, rc, rr) = (
        get("chosen"),
        get("rejected"),
        get("chosen_len"),
        get("rejected_len"),
        get("ref_chosen"),
        get("ref_rejected"),
    );
    let close = |what: &str, got: f64, want: f64| {
        assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{what}: kiln {got}, torch {want}");
    };
    for (kind, name) in [
        (LossKind::Sigmoid, "sigmoid"),
        (LossKind::Hinge, "hinge"),
        (LossKind::Ipo, "ipo"),
        (LossKind::Simpo, "simpo"),
        (LossKind::Orpo, "orpo"),
    ] {
        let (loss, dc, dr) =
            (get(&format!("{name}.loss")), get(&format!("{name}.d_chosen")), get(&format!("{name}.d_rejected")));
        for i in 0..c.len() {
            let x = PairLogps {
                chosen: c[i],
                rejected: r[i],
                chosen_len: lc[i] as usize,
                rejected_len: lr[i] as usize,
                reference: Some((rc[i], rr[i])),
            };
            let got = pair_loss(kind, &p, &x);
            close(&format!("{name}[{i}] loss"), got.loss, loss[i]);
            close(&format!("{name}[{i}] d/d chosen"), got.d_chosen, dc[i]);
            close(&format!("{name}[{i}] d/d rejected"), got.d_rejected, dr[i]);
        }
    }
}

#[test]
fn bradley_terry_matches_torch() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/preference/losses.safetensors"))
            .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |name: &str| -> Vec<f64> {
        st.tensor(name).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let p = get("bt.params");
    let (rc, rr) = (get("bt.reward_chosen"), get("bt.reward_rejected"));
    let (loss, dc, dr) = (get("bt.loss"), get("bt.d_chosen"), get("bt.d_rejected"));
    for i in 0..rc.len() {
        let (l, gc, gr) = kiln_train::rm::bradley_terry(rc[i], rr[i], p[0], p[1]);
        for (what, got, want) in [("loss", l, loss[i]), ("d/d chosen", gc, dc[i]), ("d/d rejected", gr, dr[i])] {
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "bt[{i}] {what}: kiln {got}, torch {want}");
        }
    }
}
