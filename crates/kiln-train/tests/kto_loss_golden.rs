//! The KTO loss of `kiln kto` against torch autograd of TRL's KTOTrainer formulas, written
//! by `tools/golden/kto_loss.py`.

use kiln_train::config::{KtoLoss, KtoSection};
use kiln_train::kto::{kl_point, kto_loss};
use safetensors::SafeTensors;

/// The loss, its gradient, the KL point and the rewards against torch autograd of TRL's
/// formulas (`tools/golden/kto_loss.py`).
#[test]
fn kto_loss_matches_torch() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/kto/losses.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f64s = |n: &str| -> Vec<f64> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let params = f64s("params");
    let mut checked_clamp = false;
    for case in 0..2 {
        let labels: Vec<bool> = st
            .tensor(&format!("{case}.labels"))
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) != 0)
            .collect();
        let get = |n: &str| f64s(&format!("{case}.{n}"));
        for (name, loss_type) in [("kto", KtoLoss::Kto), ("apo_zero_unpaired", KtoLoss::ApoZeroUnpaired)] {
            let k =
                KtoSection { loss_type, beta: params[0], desirable_weight: params[1], undesirable_weight: params[2] };
            let want = |n: &str| get(&format!("{name}.{n}"));
            let z = match loss_type {
                KtoLoss::Kto => kl_point(&get("kl_logps"), &get("kl_ref_logps")),
                KtoLoss::ApoZeroUnpaired => 0.0,
            };
            assert!((z - want("kl")[0]).abs() < 1e-9, "case {case} {name}: KL point {z} vs {}", want("kl")[0]);
            checked_clamp |= loss_type == KtoLoss::Kto && z == 0.0;
            // TRL orders a batch's losses desirable first; the mean does not depend on it.
            let out = kto_loss(&get("logps"), &get("ref_logps"), &labels, z, &k);
            assert!(
                (out.loss - want("loss")[0]).abs() < 1e-6,
                "case {case} {name}: loss {} vs {}",
                out.loss,
                want("loss")[0]
            );
            for (i, (g, w)) in out.dlogps.iter().zip(want("dlogps")).enumerate() {
                assert!((g - w).abs() < 1e-6, "case {case} {name}: dloss/dlogp[{i}] {g} vs {w}");
            }
            for (r, w) in out.rewards.iter().zip(want("rewards")) {
                assert!((r - w).abs() < 1e-9, "case {case} {name}: reward {r} vs {w}");
            }
        }
    }
    assert!(checked_clamp, "one case has a negative KL estimate, clamped to 0");
}
