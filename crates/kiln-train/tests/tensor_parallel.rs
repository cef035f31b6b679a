//! Tensor parallel in one process (`kiln_dist::Threads`, a thread per rank), under plain
//! `cargo test`: groups of 2 and 4 ranks splitting every layer's heads and MLP width follow the
//! one-process curve, alone, with data parallel, ZeRO and recomputation, on the demo's Llama and
//! on a Qwen3 with q/k norms and attention biases (a row-parallel bias, and norms whose
//! gradients sum over the group); each rank holds its blocks of the layers; a tensor-parallel
//! checkpoint holds the whole model, the one a single process writes, and resumes on one
//! process and the reverse; every other recipe follows its curve; DeepSeek-V3's latent
//! attention and experts split alone and with expert parallel (tp2 x ep2, its checkpoints
//! sharded by expert rank and resumed elsewhere; SFT, DPO and GRPO); and what cannot be split
//! is refused with the reason.
//! `crates/kiln/tests/dp_mpi.rs` runs tensor parallel as processes under mpirun.

mod common;

use common::*;
use kiln_core::Cpu;
use std::path::Path;

/// A tiny random Qwen3 (8 heads over 4 key/value heads, per-head q/k norms, biases on q, k, v
/// and o) with the demo tokenizer, as a Hugging Face directory; returns its `model.path`
/// override.
fn qwen3_base(dir: &Path) -> String {
    let config = r#"{
        "model_type": "qwen3", "vocab_size": 99, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16,
        "attention_bias": true, "tie_word_embeddings": false, "eos_token_id": 2, "pad_token_id": 0,
        "max_position_embeddings": 256
    }"#;
    let config_parsed = kiln_model::Config::parse(config).unwrap();
    let random = kiln_model::Model::random(&Cpu, config_parsed.clone(), 1);
    // Non-zero biases and norms, so that a bias added on every rank or a norm gradient left
    // partial shows from the first step.
    let mut rng = kiln_core::rng::Rng::new(7);
    let mut tensors = random.tensors(&Cpu);
    for (spec, t) in random.layout.iter().into_iter().zip(tensors.iter_mut()) {
        if spec.shape.len() == 1 {
            let noise = rng.normal_vec(t.len(), 0.1);
            t.iter_mut().zip(noise).for_each(|(x, n)| *x += n);
        }
    }
    let model = kiln_model::Model::from_tensors(&Cpu, config_parsed, &tensors, kiln_model::StorageDtype::F32);
    write_base(dir, config, &model)
}

#[test]
fn tensor_parallel_follows_the_one_process_curve_and_checkpoints_the_whole_model() {
    let one = scratch("tp-1");
    sft(1, &one, &[]);
    let reference = series(&one, "loss");
    let held = |dir: &Path, key: &str| steps(dir)[0][key].as_f64().unwrap();
    let overlap: &[&str] = &["train.overlap_grad_reduce=true"];
    for (ranks, layout, extra) in [
        (2, "tp=2", &[][..]),
        (2, "tp=2,sp=off", &[]),
        (2, "tp=2,recompute=full", &[]),
        (4, "dp=2,tp=2", &[]),
        (4, "dp=2,tp=2,zero=1", &[]),
        (4, "dp=2,tp=2,zero=3", &[]),
        (4, "dp=2,tp=2,zero=0", overlap),
    ] {
        let dir = scratch(&format!("tp-{layout}"));
        sft_laid_out(ranks, &dir, layout, extra);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, layout);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, layout);
        assert_same_curve(&eval_losses(&one), &eval_losses(&dir), 1e-5, &format!("{layout}, eval"));
        // Each rank holds half of every layer's matrices and its block of the vocabulary (rank
        // 0 50 of the 99 tokens); only the norms, 0.1% of the model, are whole. With the
        // embedding whole rank 0 would hold 50.6%.
        let (whole, here) = (held(&one, "weights_mb"), held(&dir, "weights_mb"));
        if !layout.contains("zero=3") {
            assert!((here / whole - 0.5).abs() < 0.002, "{layout}: weights {here} MB of {whole}");
        }
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("{layout}: the final checkpoint"),
        );
    }
    // The tp=2 run's step-3 checkpoint resumes on one process, the one-process run's on tp=2
    // and on dp=2,tp=2 with ZeRO-3, and the dp=2,tp=2 ZeRO-1 one on its own layout, continuing
    // the curve.
    for (from, ranks, layout) in [
        ("tp-tp=2", 1, "dp=1"),
        ("tp-1", 2, "tp=2"),
        ("tp-1", 4, "dp=2,tp=2,zero=3"),
        ("tp-dp=2,tp=2,zero=1", 4, "dp=2,tp=2,zero=1"),
    ] {
        let dir = scratch(&format!("tp-resume-{from}-{layout}"));
        copy_dir(&scratch_keep(from), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let accum = format!("train.grad_accum={}", if layout.starts_with("dp=2") { 2 } else { 4 });
        let layout_key = format!("train.layout={layout:?}");
        run("sft", ranks, &dir, &["train.steps=6", "output.save_every=3", &accum, &layout_key], true);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &format!("{from} resumed as {layout}"));
    }
    // ZeRO's moment shards of a tensor group's blocks need that group: another tp is refused.
    let dir = scratch("tp-resume-zero-1-on-1");
    copy_dir(&scratch_keep("tp-dp=2,tp=2,zero=1"), &dir);
    std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
    let err = sft_error(1, &dir, &["train.steps=6"], true);
    assert!(err.contains("resume with the same `train.tp`"), "{err}");
}

#[test]
fn a_qwen3_with_biases_and_qk_norms_splits_over_two_and_four_ranks() {
    let base = scratch("tp-qwen3-base");
    let model = qwen3_base(&base);
    let one = scratch("tp-qwen3-1");
    sft(1, &one, &[&model]);
    for (ranks, layout) in [(2, "tp=2"), (4, "tp=4"), (4, "dp=2,tp=2,zero=2")] {
        let dir = scratch(&format!("tp-qwen3-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        assert_same_curve(&series(&one, "loss"), &series(&dir, "loss"), 1e-5, layout);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, layout);
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("qwen3 {layout}: the final checkpoint"),
        );
    }
    // Sequence parallel over 4 ranks of micro-batches of 15 rows of 125 tokens: 1875 tokens,
    // cut 469, 469, 469 and 468 (and the vocabulary of 99, 25, 25, 25 and 24).
    let odd: &[&str] = &[&model, "data.max_seq_len=125", "train.batch_tokens=1875"];
    let (one, four) = (scratch("tp-qwen3-odd-1"), scratch("tp-qwen3-odd-tp=4"));
    sft(1, &one, odd);
    sft_laid_out(4, &four, "tp=4,sp=on", odd);
    assert_same_curve(&series(&one, "loss"), &series(&four, "loss"), 1e-5, "tp=4 over 1875 tokens");
    assert_same_curve(&series(&one, "grad_norm"), &series(&four, "grad_norm"), 1e-5, "tp=4 over 1875 tokens");
}

#[test]
fn every_recipe_follows_its_curve_under_tensor_parallel() {
    // A teacher for distillation that differs from the student: the random Qwen3, whose
    // vocabulary is the demo's.
    let teacher = scratch("tp-teacher");
    qwen3_base(&teacher);
    let teacher = format!("distill.teacher={:?}", teacher.display().to_string());
    for (recipe, one) in [
        ("dpo", vec!["train.grad_accum=2"]),
        ("rm", vec!["train.grad_accum=2"]),
        ("kto", vec!["train.grad_accum=2"]),
        ("grpo", vec!["grpo.beta=0.04"]),
        ("distill", vec![teacher.as_str()]),
    ] {
        let one = [&["train.steps=4"], &one[..]].concat();
        let two = [&one[..], &["train.tp=2"]].concat();
        let (a, b) = (scratch(&format!("tp-{recipe}-1")), scratch(&format!("tp-{recipe}-2")));
        run(recipe, 1, &a, &one, false);
        run(recipe, 2, &b, &two, false);
        let what = format!("{recipe}, tp=2");
        assert!(series(&a, "grad_norm").iter().any(|g| *g > 0.0), "{what}: no gradient to compare");
        // GRPO's loss with its KL term is a small difference of larger terms (about 0.015 by
        // step 3): the group's sums in another order move it by about 1.6e-7, 1.1e-5 of it.
        let tolerance = if recipe == "grpo" { 2e-5 } else { 1e-5 };
        assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), tolerance, &what);
        assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, &what);
    }
}

#[test]
fn deepseek_v3_splits_its_latent_attention_and_experts_alone_and_with_expert_parallel() {
    let base = scratch("tp-v3-base");
    let model = deepseek_base(&base, 4);
    let one = scratch("tp-v3-1");
    sft(1, &one, &[&model]);
    let reference = series(&one, "loss");
    let held = |dir: &Path, key: &str| steps(dir)[0][key].as_f64().unwrap();
    for (ranks, layout) in [(2, "tp=2"), (4, "dp=2,tp=2,ep=2"), (4, "dp=2,tp=2,ep=2,zero=1"), (4, "dp=2,tp=2,zero=2")] {
        let dir = scratch(&format!("tp-v3-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        let what = format!("deepseek_v3, {layout}");
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &what);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
        // Each rank holds half of the attention and experts (a quarter of the routed ones
        // under ep 2), and the rest whole.
        let (whole, here) = (held(&one, "weights_mb"), held(&dir, "weights_mb"));
        let most = if layout.contains("ep=2") { 0.5 } else { 0.6 };
        assert!(here < most * whole && here > 0.2 * whole, "{what}: weights {here} MB of {whole}");
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("{what}: the final checkpoint"),
        );
    }
    // The tp2 x ep2 checkpoints (experts sharded by expert rank) resume on one process and on
    // tp=2 alone; ZeRO-1's on its own layout.
    for (from, ranks, layout) in [
        ("tp-v3-dp=2,tp=2,ep=2", 1, "dp=1"),
        ("tp-v3-dp=2,tp=2,ep=2", 2, "tp=2"),
        ("tp-v3-dp=2,tp=2,ep=2,zero=1", 4, "dp=2,tp=2,ep=2,zero=1"),
    ] {
        let dir = scratch(&format!("tp-v3-resume-{from}-{layout}"));
        copy_dir(&scratch_keep(from), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let accum = format!("train.grad_accum={}", if layout.starts_with("dp=2") { 2 } else { 4 });
        let layout_key = format!("train.layout={layout:?}");
        run("sft", ranks, &dir, &[&model, "train.steps=6", "output.save_every=3", &accum, &layout_key], true);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &format!("{from} resumed as {layout}"));
    }
    // DPO and GRPO (generation through the split latent cache and experts) on tp2 x ep2: a
    // step's two pair micro-batches, or its prompts, split over the two data-parallel ranks.
    let layout = "train.layout=\"dp=2,tp=2,ep=2\"";
    for (recipe, one, four) in [
        ("dpo", vec!["train.grad_accum=2"], vec!["train.grad_accum=1", layout]),
        ("grpo", vec!["grpo.beta=0.04"], vec!["grpo.beta=0.04", layout]),
    ] {
        let one = [&[model.as_str(), "train.steps=4"], &one[..]].concat();
        let four = [&[model.as_str(), "train.steps=4"], &four[..]].concat();
        let (a, b) = (scratch(&format!("tp-v3-{recipe}-1")), scratch(&format!("tp-v3-{recipe}-4")));
        run(recipe, 1, &a, &one, false);
        run(recipe, 4, &b, &four, false);
        let what = format!("deepseek_v3 {recipe}, dp=2,tp=2,ep=2");
        assert!(series(&a, "grad_norm").iter().any(|g| *g > 0.0), "{what}: no gradient to compare");
        assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), 1e-5, &what);
        assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, &what);
    }
}

#[test]
fn deepseek_v4_splits_its_heads_output_groups_and_experts_alone_and_with_expert_parallel() {
    // 3 heads in 3 output groups over 3 ranks: a head and its group each; the key/value head,
    // the compressor, the indexer and the hyper-connections whole.
    let base = scratch("tp-v4-base");
    let model = deepseek_v4_base(&base);
    let one = scratch("tp-v4-1");
    sft(1, &one, &[&model]);
    let layouts = [(3, "tp=3"), (3, "tp=3,sp=off,recompute=full"), (6, "dp=2,tp=3,ep=2,zero=1"), (6, "tp=3,pp=2")];
    for (ranks, layout) in layouts {
        let dir = scratch(&format!("tp-v4-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        assert_v4_follows(&one, &dir, &format!("deepseek_v4, {layout}"));
    }
    // GRPO: generation with the rank's heads over the whole sliding-window and compressed caches.
    assert_v4_grpo_follows(&model, 3, "tp=3", "tp-v4");
    // Two ranks cannot split 3 heads.
    let err = sft_error(2, &scratch("tp-v4-refuse"), &[&model, "train.tp=2", "train.grad_accum=2"], false);
    assert!(err.contains("tp = 2 does not divide the model's 3 attention heads"), "{err}");
}

#[test]
fn what_tensor_parallel_cannot_split_is_refused_with_the_reason() {
    let err = sft_error(4, &scratch("tp-refuse-heads"), &["train.tp=4", "train.grad_accum=1"], false);
    assert!(err.contains("tp = 4 does not divide the model's 6 attention heads"), "{err}");
    let err = sft_error(4, &scratch("tp-refuse-ranks"), &["train.tp=3"], false);
    assert!(err.contains("`train.tp` = 3 does not divide the 4 ranks"), "{err}");
}
