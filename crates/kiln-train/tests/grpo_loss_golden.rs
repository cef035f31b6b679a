//! GRPO advantages and every policy-loss variant with its gradient, against torch autograd on
//! TRL's formulas (`tools/golden/grpo_losses.py`), in one batch and over micro-batches of a
//! step as TRL normalises each loss type.

use kiln_train::grpo_loss::{
    advantages, policy_loss, Aggregation, Completion, ImportanceLevel, PolicyLossParams, ScaleRewards,
};
use safetensors::{Dtype, SafeTensors};

#[test]
fn grpo_losses_match_torch() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/grpo/losses.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |name: &str| -> Vec<f64> {
        let t = st.tensor(name).unwrap_or_else(|_| panic!("{name}"));
        match t.dtype() {
            Dtype::F64 => t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::I64 => t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            d => panic!("{name}: {d:?}"),
        }
    };
    let close = |what: &str, got: f64, want: f64| {
        assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{what}: kiln {got}, torch {want}");
    };
    let rewards = get("rewards");
    for (scale, name) in [(ScaleRewards::Group, "group"), (ScaleRewards::Batch, "batch"), (ScaleRewards::None, "none")]
    {
        for (i, (g, w)) in advantages(&rewards, 3, scale).iter().zip(get(&format!("adv.{name}"))).enumerate() {
            close(&format!("advantage {name}[{i}]"), *g, w);
        }
    }
    let adv = advantages(&rewards, 3, ScaleRewards::Group);
    let lengths: Vec<usize> = get("lengths").iter().map(|&l| l as usize).collect();
    let params = get("params");
    let t = params[2] as usize;
    let rows = |name: &str| -> Vec<Vec<f64>> {
        let flat = get(name);
        lengths.iter().enumerate().map(|(i, &l)| flat[i * t..i * t + l].to_vec()).collect()
    };
    let (logp, old, reference) = (rows("logp"), rows("old"), rows("ref"));
    for (aggregation, a) in [
        (Aggregation::Grpo, "grpo"),
        (Aggregation::Bnpo, "bnpo"),
        (Aggregation::DrGrpo, "dr_grpo"),
        (Aggregation::Dapo, "dapo"),
    ] {
        for (level, l) in [(ImportanceLevel::Token, "token"), (ImportanceLevel::Sequence, "sequence")] {
            for beta in [0.0, 0.04] {
                let completion = |i: usize| Completion {
                    logp: &logp[i],
                    old_logp: &old[i],
                    ref_logp: Some(&reference[i]),
                    advantage: adv[i],
                };
                // One batch of all six (dapo's token count set apart), then a step of two
                // micro-batches of 4 and 2 completions.
                let all_tokens = lengths.iter().sum();
                // Each case by where its micro-batches end.
                for (prefix, ends, num_items) in [("", &[6][..], params[3] as usize), ("micro.", &[4, 6], all_tokens)] {
                    let p = PolicyLossParams {
                        epsilon_low: params[0],
                        epsilon_high: params[1],
                        beta,
                        aggregation,
                        level,
                        max_completion_length: t,
                        num_items,
                        micro_batches: ends.len(),
                    };
                    let (mut loss, mut dlogp) = (0.0, Vec::new());
                    for (k, &end) in ends.iter().enumerate() {
                        let start = if k == 0 { 0 } else { ends[k - 1] };
                        let out = policy_loss(&(start..end).map(completion).collect::<Vec<_>>(), &p);
                        loss += out.loss;
                        dlogp.extend(out.dlogp);
                    }
                    let key = format!("{prefix}{a}.{l}.{beta:?}");
                    close(&format!("{key} loss"), loss, get(&format!("{key}.loss"))[0]);
                    let want = get(&format!("{key}.dlogp"));
                    for (i, d) in dlogp.iter().enumerate() {
                        for (j, &g) in d.iter().enumerate() {
                            close(&format!("{key} dlogp[{i}][{j}]"), g, want[i * t + j]);
                        }
                    }
                }
            }
        }
    }
}
