//! `moe_route` against transformers' DeepseekV3TopkRouter (fixture by
//! `tools/golden/moe_router.py`): the chosen experts, their weights, and the logits' gradient.

use kiln_core::{Backend, Cpu, Routing};
use safetensors::{Dtype, SafeTensors};

#[test]
fn routes_like_transformers_deepseek_v3() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/moe/router.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        let v = st.tensor(n).unwrap();
        assert_eq!(v.dtype(), Dtype::F32, "{n}");
        v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let indices: Vec<usize> = st
        .tensor("indices")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
        .collect();
    let (logits, bias, grad_out, weights, dlogits) =
        (f32s("logits"), f32s("bias"), f32s("grad_out"), f32s("weights"), f32s("dlogits"));
    let (experts, k) = (bias.len(), 4);
    let tokens = logits.len() / experts;
    let spec = Routing {
        scoring: kiln_core::Scoring::Sigmoid,
        fixed: false,
        tokens,
        experts,
        top_k: k,
        groups: 4,
        top_groups: 2,
        normalize: true,
        scale: 2.5,
    };

    let b = Cpu;
    let (mut w, mut idx, mut scores) =
        (b.zeros(tokens * k), b.upload_index(&vec![0; tokens * k]), b.zeros(tokens * experts));
    b.moe_route_forward(&mut w, &mut idx, &mut scores, &b.upload(&logits), &b.upload(&bias), spec);
    let (ours_w, ours_idx) = (b.read(&w), b.read_index(&idx));

    // transformers returns the top-k unsorted: match experts, not positions.
    let mut dweights = vec![0.0f32; tokens * k];
    for t in 0..tokens {
        for j in 0..k {
            let e = ours_idx[t * k + j] as usize;
            let pos = (0..k)
                .find(|&p| indices[t * k + p] == e)
                .unwrap_or_else(|| panic!("token {t}: kiln chose expert {e}, transformers did not"));
            let (got, want) = (ours_w[t * k + j], weights[t * k + pos]);
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "token {t} expert {e}: weight {got} vs {want}");
            dweights[t * k + j] = grad_out[t * k + pos];
        }
    }
    let mut dz = b.zeros(tokens * experts);
    b.moe_route_backward(&mut dz, &b.upload(&dweights), &scores, &idx, spec);
    for (i, (&got, &want)) in b.read(&dz).iter().zip(&dlogits).enumerate() {
        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "dlogits[{i}]: kiln {got}, transformers {want}");
    }
}
