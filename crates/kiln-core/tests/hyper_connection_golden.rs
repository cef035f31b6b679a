//! DeepSeek-V4's hyper-connection mixing weights against transformers (`DeepseekV4HyperConnection`
//! and `DeepseekV4HyperHead`, `tools/golden/hyper_connection.py`): the weights and the
//! gradients of mixes, bias and scales, for 2 and 4 streams with 20 Sinkhorn iterations.

use kiln_core::{Backend, Cpu, HyperConnection};
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture tensor {name}"));
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "{what}[{i}]: kiln {g}, transformers {w}");
    }
}

#[test]
fn weights_and_gradients_agree_with_transformers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/hyper_connection/golden.safetensors");
    let bytes = std::fs::read(path).expect("tests/fixtures/hyper_connection (tools/golden/hyper_connection.py)");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let settings = st.tensor("settings").unwrap();
    let settings: Vec<f64> =
        settings.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    let b = Cpu;
    for streams in [2, 4] {
        for head in [false, true] {
            let key = |name: &str| format!("hc{streams}.{}{name}", if head { "head." } else { "" });
            let mixes = f32s(&st, &key("mixes"));
            let spec = HyperConnection {
                tokens: mixes.len() / if head { streams } else { (2 + streams) * streams },
                streams,
                iters: settings[0] as usize,
                eps: settings[1] as f32,
                head,
            };
            let (base, scale) = (f32s(&st, &key("base")), f32s(&st, &key("scale")));
            let mut out = vec![0.0; mixes.len()];
            b.hc_weights_forward(&mut out, &mixes, &base, &scale, spec);
            assert_close(&key("out"), &out, &f32s(&st, &key("out")), 1e-5);
            let (mut dmixes, mut dbase, mut dscale) =
                (vec![0.0; mixes.len()], vec![0.0; base.len()], vec![0.0; scale.len()]);
            let dout = f32s(&st, &key("dout"));
            b.hc_weights_backward(&mut dmixes, &mut dbase, &mut dscale, &dout, &mixes, &base, &scale, spec);
            assert_close(&key("dmixes"), &dmixes, &f32s(&st, &key("dmixes")), 1e-4);
            assert_close(&key("dbase"), &dbase, &f32s(&st, &key("dbase")), 1e-4);
            assert_close(&key("dscale"), &dscale, &f32s(&st, &key("dscale")), 1e-4);
        }
    }
}
