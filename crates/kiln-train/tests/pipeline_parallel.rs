//! Pipeline parallel in one process (`kiln_dist::Threads`, a thread per rank), under plain
//! `cargo test`: the demo's Llama (tied embedding: a copy on the first and the last stage) cut
//! into 2 and 4 stages, each micro-batch's 16 rows in chunks on the 1F1B schedule, follows the
//! one-process curve, alone, with data and tensor parallel, ZeRO 0-3 (whose per-chunk
//! collectives keep the data-parallel peers, idle ones too, in step; with their reductions
//! started during backward), recomputation and bf16 mixed precision; each
//! rank holds its stage; a pipeline checkpoint holds the whole model, the one a single process
//! writes, and resumes on other layouts; a Qwen3 with an untied head (stages of unequal length,
//! chunks of unequal rows padded) and every other recipe follow their curves, as does a
//! DeepSeek-V4 on 2 and 3 stages (its padded chunks' routes in no expert's load); and what
//! cannot be cut is refused with the reason. `pipeline_schedule`'s unit test checks the
//! schedules.

mod common;

use common::*;
use kiln_core::Cpu;
use std::path::Path;

/// A tiny random Qwen3 with an untied head, per-head q/k norms and attention biases, and the
/// demo tokenizer; returns its `model.path` override.
fn qwen3_base(dir: &Path) -> String {
    let config = r#"{
        "model_type": "qwen3", "vocab_size": 99, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "attention_bias": true, "tie_word_embeddings": false, "eos_token_id": 2, "pad_token_id": 0,
        "max_position_embeddings": 256
    }"#;
    let model = kiln_model::Model::random(&Cpu, kiln_model::Config::parse(config).unwrap(), 3);
    write_base(dir, config, &model)
}

#[test]
fn pipeline_parallel_follows_the_one_process_curve_and_checkpoints_the_whole_model() {
    let one = scratch("pp-1");
    sft(1, &one, &[]);
    let reference = series(&one, "loss");
    let held = |dir: &Path, key: &str| steps(dir)[0][key].as_f64().unwrap();
    for (ranks, layout) in [
        (2, "pp=2"),
        (4, "pp=4"),
        (2, "pp=2,recompute=full"),
        (4, "dp=2,pp=2,zero=1"),
        (4, "dp=2,pp=2,zero=1,overlap"),
        (4, "dp=2,pp=2,zero=2"),
        (4, "dp=2,pp=2,zero=2,overlap"),
        (4, "dp=2,pp=2,zero=3"),
        (4, "tp=2,pp=2"),
        (8, "dp=2,tp=2,pp=2"),
    ] {
        let dir = scratch(&format!("pp-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[]);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, layout);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, layout);
        assert_same_curve(&eval_losses(&one), &eval_losses(&dir), 1e-5, &format!("{layout}, eval"));
        // Rank 0 holds the first stage's layers and the embedding, not the whole model.
        let (whole, here) = (held(&one, "weights_mb"), held(&dir, "weights_mb"));
        if !layout.contains("zero=3") {
            assert!(here < 0.8 * whole, "{layout}: weights {here} MB of {whole}");
        }
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("{layout}: the final checkpoint"),
        );
    }
    // The pp=2 run's step-3 checkpoint resumes on one process and on tp=2, the one-process
    // run's on pp=4 and dp=2,pp=2 with ZeRO-3, and the dp=2,pp=2 ZeRO-1 one on its own layout,
    // continuing the curve.
    for (from, ranks, layout) in [
        ("pp-pp=2", 1, "dp=1"),
        ("pp-pp=2", 2, "tp=2"),
        ("pp-1", 4, "pp=4"),
        ("pp-1", 4, "dp=2,pp=2,zero=3"),
        ("pp-dp=2,pp=2,zero=1", 4, "dp=2,pp=2,zero=1"),
    ] {
        let dir = scratch(&format!("pp-resume-{from}-{layout}"));
        copy_dir(&scratch_keep(from), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let accum = format!("train.grad_accum={}", if layout.starts_with("dp=2") { 2 } else { 4 });
        let layout_key = format!("train.layout={layout:?}");
        run("sft", ranks, &dir, &["train.steps=6", "output.save_every=3", &accum, &layout_key], true);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &format!("{from} resumed as {layout}"));
    }
    // ZeRO's moment shards of a stage need that stage: another layout is refused.
    let dir = scratch("pp-resume-zero-1-on-1");
    copy_dir(&scratch_keep("pp-dp=2,pp=2,zero=1"), &dir);
    std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
    let err = sft_error(1, &dir, &["train.steps=6"], true);
    assert!(err.contains("resume with the same `train.tp` and `train.pp`"), "{err}");
}

/// bf16 mixed precision (bf16 weights and products, f32 masters) composes with pipeline and
/// tensor parallel as with data parallel: the one-process curve within bf16's rounding.
#[test]
fn bf16_follows_the_one_process_curve_within_its_rounding_on_stages_and_tensor_ranks() {
    let bf16 = "train.dtype=\"bf16\"";
    let one = scratch("pp-bf16-1");
    sft(1, &one, &[bf16]);
    for (ranks, layout) in [(2, "pp=2"), (4, "tp=2,pp=2")] {
        let dir = scratch(&format!("pp-bf16-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[bf16]);
        let (a, b) = (series(&one, "loss"), series(&dir, "loss"));
        // Stages cut the rows, not the sums: step 1 is one process's to f32 noise, and later
        // steps stay within 2⁻¹² (a sixteenth of bf16's unit roundoff), as data parallel's do.
        // The tensor group sums its row-parallel products in another order, which moves
        // activations by f32 ulps before the next product rounds them to bf16, turning over a
        // few roundings in every forward: step 1 1.3e-5 relative, steps 2-6 at most 3e-4
        // (measured), where bf16 itself departs from the f32 curve by 1.2e-2 at step 3 and 0.11
        // at step 6. Held to 1e-3: a layout that trained in f32 would fail, as would a lost
        // chunk, stage or sum.
        let tolerance = if layout.contains("tp=") { 1e-3 } else { 2f64.powi(-12) };
        if !layout.contains("tp=") {
            assert_same_curve(&a[..1], &b[..1], 1e-6, &format!("bf16, {layout}, first step"));
        }
        assert_same_curve(&a, &b, tolerance, &format!("bf16, {layout}"));
    }
}

/// Muon orthogonalises whole matrices, and a stage holds its layers' matrices whole.
#[test]
fn muon_updates_each_stage_s_whole_matrices_as_one_process_does() {
    let muon = "train.optimizer=\"muon\"";
    let one = scratch("pp-muon-1");
    sft(1, &one, &[muon]);
    for (ranks, layout) in [(2, "pp=2"), (4, "dp=2,pp=2,zero=1")] {
        let dir = scratch(&format!("pp-muon-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[muon]);
        // As with data parallel: a chunk's summation order turns over a bf16 rounding of the
        // Newton–Schulz iteration here and there, so the curves agree to 2⁻¹² after step 1.
        let (m1, m2) = (series(&one, "loss"), series(&dir, "loss"));
        assert_same_curve(&m1[..1], &m2[..1], 1e-6, &format!("muon, {layout}, first step"));
        assert_same_curve(&m1, &m2, 2f64.powi(-12), &format!("muon, {layout}"));
    }
}

#[test]
fn a_qwen3_with_an_untied_head_cuts_into_stages_of_unequal_length() {
    let base = scratch("pp-qwen3-base");
    let model = qwen3_base(&base);
    let one = scratch("pp-qwen3-1");
    sft(1, &one, &[&model]);
    for (ranks, layout, chunks) in [(2, "pp=2", 4), (3, "pp=3", 5), (4, "tp=2,pp=2,zero=2", 3)] {
        let dir = scratch(&format!("pp-qwen3-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model, &format!("train.pp_chunks={chunks}")]);
        assert_same_curve(&series(&one, "loss"), &series(&dir, "loss"), 1e-5, layout);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, layout);
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("qwen3 {layout}: the final checkpoint"),
        );
    }
}

#[test]
fn every_recipe_follows_its_curve_under_pipeline_parallel() {
    let teacher = scratch("pp-teacher");
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
        let a = scratch(&format!("pp-{recipe}-1"));
        run(recipe, 1, &a, &one, false);
        assert!(series(&a, "grad_norm").iter().any(|g| *g > 0.0), "{recipe}: no gradient to compare");
        // DPO (GPipe order: its weights need every chunk's nll) and GRPO (generation through
        // the stages, prefills and decode steps pipelined in chunks, on the model ZeRO-3
        // gathers for it) also with data parallel and ZeRO-2 or 3, and with tensor parallel
        // (a stage's chunks decoded by its tensor group). GRPO's tp2 x pp2 runs without
        // sequence parallel, whose norm gradients, summed over each rank's tokens first, round
        // differently: after step 1 one weight of 4 layers' norms differs by 6e-8 (one f32
        // step) from the run without it, every other weight agreeing exactly, and step 2's
        // sampling turns that into a KL 1.7e-4 off (measured).
        let mut layouts = vec![(2, "pp=2")];
        match recipe {
            "dpo" => layouts.extend([(4, "dp=2,pp=2,zero=2"), (4, "tp=2,pp=2")]),
            "grpo" => layouts.extend([(4, "dp=2,pp=2,zero=3"), (4, "tp=2,pp=2,sp=off")]),
            _ => {}
        }
        for (ranks, layout) in layouts {
            let b = scratch(&format!("pp-{recipe}-{layout}"));
            let (layout, c1) = match layout.strip_suffix(",chunks1") {
                Some(l) => (l, true),
                None => (layout, false),
            };
            let laid_out = format!("train.layout={layout:?}");
            let mut overrides = [&one[..], &[laid_out.as_str()]].concat();
            if c1 {
                overrides.push("train.pp_chunks=1");
            }
            if layout.starts_with("dp=2") && recipe == "dpo" {
                overrides.push("train.grad_accum=1");
            }
            run(recipe, ranks, &b, &overrides, false);
            let what = format!("{recipe}, {layout}");
            assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), 1e-5, &what);
            assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, &what);
        }
    }
}

#[test]
fn deepseek_v3_cuts_into_stages_alone_and_with_expert_and_tensor_parallel() {
    let base = scratch("pp-v3-base");
    let model = deepseek_base(&base, 4);
    let one = scratch("pp-v3-1");
    sft(1, &one, &[&model]);
    let reference = series(&one, "loss");
    let held = |dir: &Path, key: &str| steps(dir)[0][key].as_f64().unwrap();
    // 3 layers: a dense one and a MoE one on stage 0, a MoE one on stage 1. Expert parallel's
    // exchanges are collectives of a stage's data-parallel peers, so every pass has the same
    // chunks, on 1F1B; at the epoch's end (step 3: 1 of 9 micro-batches) one data-parallel
    // rank runs an idle pass in the same order.
    for (ranks, layout) in [
        (2, "pp=2"),
        (2, "pp=2,recompute=full"),
        (4, "dp=2,pp=2,ep=2"),
        (4, "dp=2,pp=2,ep=2,zero=1"),
        (4, "dp=2,pp=2,ep=2,zero=1,overlap"),
        (4, "dp=2,pp=2,ep=2,zero=2,overlap"),
        (4, "dp=2,pp=2,zero=2"),
        (8, "dp=2,tp=2,pp=2,ep=2"),
    ] {
        let dir = scratch(&format!("pp-v3-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        let what = format!("deepseek_v3, {layout}");
        let (whole, here) = (held(&one, "weights_mb"), held(&dir, "weights_mb"));
        assert!(here < 0.75 * whole, "{what}: rank 0 holds {here} MB of {whole}");
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &what);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
        assert_same_curve(&eval_losses(&one), &eval_losses(&dir), 1e-5, &format!("{what}, eval"));
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("{what}: the final checkpoint"),
        );
    }
    // The pp2 x ep2 checkpoint (sharded by expert rank) resumes on one process and on tp=2.
    for (ranks, layout) in [(1, "dp=1"), (2, "tp=2")] {
        let dir = scratch(&format!("pp-v3-resume-{layout}"));
        copy_dir(&scratch_keep("pp-v3-dp=2,pp=2,ep=2"), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let layout_key = format!("train.layout={layout:?}");
        run(
            "sft",
            ranks,
            &dir,
            &[&model, "train.steps=6", "output.save_every=3", "train.grad_accum=4", &layout_key],
            true,
        );
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &format!("pp2 x ep2 resumed as {layout}"));
    }
    // The sequence-wise balance loss, per chunk of rows, and the router's bias updates.
    let aux = ["train.moe_aux_loss_alpha=0.3"];
    let (a, b) = (scratch("pp-v3-aux-1"), scratch("pp-v3-aux-pp2"));
    sft(1, &a, &[&model, aux[0]]);
    sft_laid_out(4, &b, "dp=2,pp=2,ep=2", &[&model, aux[0]]);
    assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), 1e-5, "deepseek_v3 with its balance loss, pp2 x ep2");
    let moved = series(&a, "loss").iter().zip(&reference).any(|(x, y)| (x - y).abs() > 1e-4 * y);
    assert!(moved, "the balance loss left the curve unchanged");
    // Its value and the expert loads in the metrics are the whole model's, summed over the
    // stages and the data-parallel ranks.
    assert_same_curve(&series(&a, "moe_aux_loss"), &series(&b, "moe_aux_loss"), 1e-5, "the balance loss, pp2 x ep2");
    assert_eq!(steps(&a)[1]["expert_load"], steps(&b)[1]["expert_load"], "expert loads, pp2 x ep2");
    // DPO (every forward first), GRPO (generation through the stages in 6 chunks, each
    // stage's experts exchanged per chunk; 3 prompts a step, so one data-parallel rank
    // prefills 2 prompts and decodes 16 sequences where the other has 1 and 8: chunks empty
    // on one and not the other, idle forwards meeting the peer's exchanges; 1 prompt a step,
    // so one rank generates while the other runs idle chunks; micro-batches of 8 completions,
    // as one process cuts them) and reward modelling (a micro-batch as one chunk). DPO and
    // the reward model train on 3 pairs, a pair per micro-batch: on every other step one
    // data-parallel rank runs an idle pass in their order.
    let layout = "train.layout=\"dp=2,pp=2,ep=2\"";
    let pairs = scratch("pp-v3-3-pairs.jsonl");
    let all = std::fs::read_to_string(format!("{EXAMPLES}/preference_train.jsonl")).unwrap();
    let rows: Vec<&str> = all.lines().take(3).collect();
    std::fs::write(&pairs, rows.join("\n")).unwrap();
    let pairs = format!("data.train={:?}", pairs.display().to_string());
    let (pairs, pair_rows) = (pairs.as_str(), "train.batch_tokens=256");
    let grpo = |prompts| vec!["grpo.beta=0.04", prompts, "grpo.micro_batch=8"];
    let runs = [
        ("dpo", vec!["train.grad_accum=2", pairs, pair_rows], vec!["train.grad_accum=1", pairs, pair_rows, layout]),
        (
            "grpo",
            grpo("grpo.prompts_per_step=3"),
            [grpo("grpo.prompts_per_step=3"), vec!["train.pp_chunks=6", layout]].concat(),
        ),
        (
            "grpo",
            grpo("grpo.prompts_per_step=1"),
            [grpo("grpo.prompts_per_step=1"), vec!["train.pp_chunks=6", layout]].concat(),
        ),
        ("rm", vec!["train.grad_accum=2", pairs, pair_rows], vec!["train.grad_accum=1", pairs, pair_rows, layout]),
    ];
    for (i, (recipe, one, four)) in runs.into_iter().enumerate() {
        let (a, b) = (scratch(&format!("pp-v3-{i}-{recipe}-1")), scratch(&format!("pp-v3-{i}-{recipe}-4")));
        let one = [&[model.as_str(), "train.steps=4"], &one[..]].concat();
        let four = [&[model.as_str(), "train.steps=4"], &four[..]].concat();
        run(recipe, 1, &a, &one, false);
        run(recipe, 4, &b, &four, false);
        let what = format!("deepseek_v3 {recipe}, dp=2,pp=2,ep=2");
        assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), 1e-5, &what);
        assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, &what);
    }
}

/// DeepSeek-V4's three layers (a hash-routed MoE one, then two scored; sliding, compressed
/// sparse and heavily compressed attention) cut into stages: the hyper-connected streams travel
/// between them, each stage's layers keep their own attention and routing kinds, and the head
/// (with its stream mix) sits on the last stage. On 3 stages a micro-batch's 16 rows go in 6
/// chunks of 3 rows, the last padded: the padding's routes count in no expert's load.
#[test]
fn deepseek_v4_cuts_into_stages_alone_and_with_expert_parallel() {
    let base = scratch("pp-v4-base");
    let model = deepseek_v4_base(&base);
    let one = scratch("pp-v4-1");
    sft(1, &one, &[&model]);
    for (ranks, layout) in [(2, "pp=2"), (3, "pp=3"), (4, "dp=2,pp=2,ep=2,zero=1")] {
        let dir = scratch(&format!("pp-v4-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        assert_v4_follows(&one, &dir, &format!("deepseek_v4, {layout}"));
    }
    // GRPO: generation through the stages in chunks, each with its layers' caches (sliding
    // window, compressed entries) for its chunk's sequences; and with expert parallel, each
    // chunk's experts exchanged.
    assert_v4_grpo_follows(&model, 2, "pp=2", "pp-v4");
    assert_v4_grpo_follows(&model, 4, "dp=2,pp=2,ep=2", "pp-v4");
}

#[test]
fn what_pipeline_parallel_cannot_cut_is_refused_with_the_reason() {
    let err = sft_error(8, &scratch("pp-refuse-layers"), &["train.pp=8", "train.grad_accum=4"], false);
    assert!(err.contains("8 stages (pp, times vpp under interleaving) for the model's 4 layers"), "{err}");
    let err = sft_error(4, &scratch("pp-refuse-ranks"), &["train.pp=3"], false);
    assert!(err.contains("`train.pp` = 3 does not divide the 4 ranks"), "{err}");
}

#[test]
fn stages_cut_where_given_or_balanced_follow_the_one_process_curve() {
    let one = scratch("pp-split-1");
    sft(1, &one, &[]);
    let held = |dir: &Path| steps(dir)[0]["weights_mb"].as_f64().unwrap();
    let mut rank0 = Vec::new();
    // The demo's 4 layers as 1 + 3 and 3 + 1 (the tied embedding on both ends either way), and
    // balanced: its head (99 x 192) weighs a twentieth of a layer, so the even 2 + 2.
    for (name, split) in [("1+3", "[1, 3]"), ("3+1", "[3, 1]"), ("balanced", "\"balanced\"")] {
        let dir = scratch(&format!("pp-split-{name}"));
        sft_laid_out(2, &dir, "pp=2", &[&format!("train.pp_layers={split}")]);
        assert_same_curve(&series(&one, "loss"), &series(&dir, "loss"), 1e-5, name);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, name);
        let (a, b) = (one.join("checkpoints/step-00000006"), dir.join("checkpoints/step-00000006"));
        assert_same_weights(&a, &b, &format!("{name}: the final checkpoint"));
        rank0.push(held(&dir));
    }
    // Rank 0 holds its stage's layers: 1, 3 and 2 of them.
    assert!(rank0[0] < rank0[2] && rank0[2] < rank0[1], "rank 0's weights, MB: {rank0:?}");
    // A cut that does not fit the stages is refused with the reason: when the run file is read
    // (naming it), or, for the layers, when the model is.
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/sft.toml"));
    let overrides = ["train.pp=2".to_string(), "train.pp_layers=[1, 2, 1]".to_string()];
    let err = kiln_train::config::RunConfig::load_resolved(example, &overrides).unwrap_err().to_string();
    assert!(err.contains("sft.toml: `train.pp_layers` = [1, 2, 1] gives 3 stages, `train.pp` is 2"), "{err}");
    let bad_sum = ["train.pp=2", "train.grad_accum=2", "train.pp_layers=[1, 2]"];
    let err = sft_error(2, &scratch("pp-split-bad-sum"), &bad_sum, false);
    assert!(err.contains("4 layers in all"), "{err}");
}
