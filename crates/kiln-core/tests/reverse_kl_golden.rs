//! Distillation's full-vocabulary reverse KL (`Backend::reverse_kl_backward`) on the CPU
//! backend against torch autograd, written by `tools/golden/distill_loss.py`.

use kiln_core::{Backend, Cpu};
use safetensors::SafeTensors;

/// The backend's fused reverse KL against torch autograd.
#[test]
fn reverse_kl_matches_torch() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/distill/reverse_kl.safetensors"))
            .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let f64s = |n: &str| -> Vec<f64> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (student, teacher, want_grad) = (f32s("student"), f32s("teacher"), f64s("dstudent"));
    let vocab = 11;
    let tokens = student.len() / vocab;
    // The loss is the mean over tokens: each token's weight is 1 / tokens.
    let weights = vec![1.0 / tokens as f32; tokens];
    let (b, mut grad, mut kl) = (Cpu, student.clone(), vec![0.0; tokens]);
    b.reverse_kl_backward(&mut grad, &mut kl, &teacher, &weights, vocab);
    let loss: f64 = kl.iter().map(|&k| k as f64 / tokens as f64).sum();
    for (g, w) in grad.iter().zip(&want_grad) {
        assert!((*g as f64 - w).abs() < 1e-6, "dKL/dz: kiln {g}, torch {w}");
    }
    let want = f64s("loss")[0];
    assert!((loss - want).abs() < 1e-6, "KL: kiln {loss}, torch {want}");
}
