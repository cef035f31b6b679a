//! DeepSeek-V3's aux-loss-free load balancing: on a model whose router sends most tokens to
//! two experts, the bias update `b_i += γ·sign(mean − load_i)` evens the load out.

use kiln_core::Cpu;
use kiln_model::weights::FfnWeights;
use kiln_model::{Activations, Batch, Config, Model};

const CONFIG: &str = r#"{
    "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": null, "kv_lora_rank": 8,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "routed_scaling_factor": 2.5
}"#;

/// max/mean tokens per expert: 1 when perfectly even.
fn imbalance(load: &[u64]) -> f64 {
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    *load.iter().max().unwrap() as f64 / mean
}

#[test]
fn router_bias_update_evens_out_a_skewed_load() {
    let b = Cpu;
    let config = Config::parse(CONFIG).unwrap();
    let mut model = Model::random(&b, config, 3);
    // Skew: every token's hidden state shares a direction c, and experts 0 and 1 (of two
    // different groups) have router rows along c, so they win for nearly every token.
    let d = model.config.hidden_size;
    let c: Vec<f32> = (0..d).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let mut params = model.flat.views_mut(&b, &mut model.params);
    for row in params.embed.chunks_mut(d) {
        row.iter_mut().zip(&c).for_each(|(x, c)| *x += 0.02 * c);
    }
    let FfnWeights::Moe(moe) = &mut params.layers[1].ffn else { panic!("layer 1 is MoE") };
    for expert in [0, 2] {
        moe.router[expert * d..(expert + 1) * d].iter_mut().zip(&c).for_each(|(w, c)| *w += 0.3 * c);
    }

    let mut rng = kiln_core::rng::Rng::new(9);
    let sequences: Vec<Vec<i32>> = (0..4).map(|_| (0..32).map(|_| rng.below(64) as i32).collect()).collect();
    let batch = Batch::causal_lm(&sequences);
    let mut acts = Activations::new(&b, &model.config, batch.rows, batch.seq, true, false);
    let mut grads = model.grads(&b);
    let mut history = Vec::new();
    for _ in 0..300 {
        model.forward_backward(&b, &mut acts, &batch, &mut grads);
        let loads = model.update_router_bias(&b, 0.003);
        assert!(loads[0].is_empty(), "layer 0 is dense");
        assert_eq!(loads[1].iter().sum::<u64>(), 4 * 32 * 2, "every token is routed to top_k experts");
        history.push(imbalance(&loads[1]));
    }
    let (first, last) = (history[0], history[history.len() - 10..].iter().sum::<f64>() / 10.0);
    assert!(first > 2.5, "the toy router should start skewed (max/mean load {first:.2})");
    assert!(last < 1.5, "load stays skewed after the bias updates: max/mean {first:.2} -> {last:.2}");
    let params = model.weights(&b);
    let FfnWeights::Moe(moe) = &params.layers[1].ffn else { unreachable!() };
    let bias = moe.bias.expect("a scored router's correction bias");
    assert!(bias[0] < 0.0 && bias[2] < 0.0, "the overloaded experts' biases fall: {bias:?}");
}

#[test]
fn balance_loss_gradient_reaches_the_router() {
    // The router gradient with α minus the one without, against central differences of the
    // balance loss alone.
    let b = Cpu;
    let mut model = Model::random(&b, Config::parse(CONFIG).unwrap(), 4);
    let mut rng = kiln_core::rng::Rng::new(2);
    let sequences: Vec<Vec<i32>> = (0..2).map(|_| (0..16).map(|_| rng.below(64) as i32).collect()).collect();
    let batch = Batch::causal_lm(&sequences);
    let mut acts = Activations::new(&b, &model.config, batch.rows, batch.seq, true, false);
    let mut run = |model: &mut Model<Cpu>, alpha: f32| {
        let mut grads = model.grads(&b);
        (model.moe_aux_alpha, model.moe_aux_loss) = (alpha, 0.0);
        model.forward_backward(&b, &mut acts, &batch, &mut grads);
        let views = grads.views(&b);
        let FfnWeights::Moe(g) = &views.layers[1].ffn else { panic!("layer 1 is MoE") };
        (model.moe_aux_loss, g.router.to_vec())
    };
    let (aux, with) = run(&mut model, 0.5);
    let (none, without) = run(&mut model, 0.0);
    assert!(aux > 0.0 && none == 0.0, "the balance loss is counted only with α: {aux}, {none}");
    let h = 1e-3;
    for i in [0, 37, 101, 200] {
        let set = |model: &mut Model<Cpu>, delta: f32| {
            let mut params = model.flat.views_mut(&b, &mut model.params);
            let FfnWeights::Moe(w) = &mut params.layers[1].ffn else { unreachable!() };
            w.router[i] += delta;
        };
        set(&mut model, h);
        let up = run(&mut model, 0.5).0;
        set(&mut model, -2.0 * h);
        let down = run(&mut model, 0.5).0;
        set(&mut model, h);
        let numeric = (up - down) / (2.0 * h as f64);
        let got = (with[i] - without[i]) as f64;
        assert!(numeric.abs() > 1e-4, "router[{i}]: the balance loss should depend on it");
        assert!((got - numeric).abs() < 1e-4 + 0.02 * numeric.abs(), "router[{i}]: analytic {got}, numeric {numeric}");
    }
}
