//! Interleaved pipeline stages (`train.vpp`, Megatron-LM's virtual pipeline) in one process
//! (`kiln_dist::Threads`, a thread per rank): the demo's Llama (4 layers, tied embedding) cut
//! into 2 stages of 2 runs each (stage 0 layers 0 and 2, stage 1 layers 1 and 3, the head
//! after the last run), its chunks on the interleaved schedule's ticks, follows the
//! one-process curve alone, with data parallel under ZeRO 0-3 (the data-parallel peers'
//! per-chunk collectives in the ticks' order; ZeRO-0's buckets started during the last
//! chunks' backwards), tensor parallel and recomputation; its
//! checkpoints hold the whole model and resume on a plain pipeline; every other recipe follows
//! its curve, DPO (every forward first) and GRPO (rollouts and log-probs on the forward ticks)
//! also with data parallel;
//! DeepSeek-V3 with expert parallel and DeepSeek-V4 (layers of different kinds in one stage)
//! too; what cannot be cut is refused with the reason.
//! `interleaved_schedule`'s unit tests check the ticks.

mod common;

use common::*;
use std::path::Path;

#[test]
fn interleaved_stages_follow_the_one_process_curve_and_checkpoint_the_whole_model() {
    let one = scratch("vpp-1");
    sft(1, &one, &[]);
    let reference = series(&one, "loss");
    let held = |dir: &Path, key: &str| steps(dir)[0][key].as_f64().unwrap();
    for (ranks, layout) in [
        (2, "pp=2,vpp=2"),
        (2, "pp=2,vpp=2,recompute=full"),
        (4, "dp=2,pp=2,vpp=2,zero=1"),
        (4, "dp=2,pp=2,vpp=2,overlap"),
        (4, "dp=2,pp=2,vpp=2,zero=2"),
        (4, "dp=2,pp=2,vpp=2,zero=3"),
        (4, "tp=2,pp=2,vpp=2"),
    ] {
        let dir = scratch(&format!("vpp-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[]);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, layout);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, layout);
        assert_same_curve(&eval_losses(&one), &eval_losses(&dir), 1e-5, &format!("{layout}, eval"));
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
    // The interleaved run's step-3 checkpoint resumes on a plain pipeline and the one-process
    // run's on interleaved stages, continuing the curve.
    for (from, ranks, layout) in [("vpp-pp=2,vpp=2", 2, "pp=2"), ("vpp-1", 2, "pp=2,vpp=2")] {
        let dir = scratch(&format!("vpp-resume-{from}-{layout}"));
        copy_dir(&scratch_keep(from), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let layout_key = format!("train.layout={layout:?}");
        let overrides = ["train.steps=6", "output.save_every=3", "train.grad_accum=4", &layout_key];
        run("sft", ranks, &dir, &overrides, true);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-5, &format!("{from} resumed as {layout}"));
    }
}

#[test]
fn every_recipe_follows_its_curve_on_interleaved_stages() {
    let teacher = scratch("vpp-teacher");
    deepseek_base(&teacher, 4);
    let teacher = format!("distill.teacher={:?}", teacher.display().to_string());
    for (recipe, one) in [
        ("dpo", vec!["train.grad_accum=2"]),
        ("grpo", vec!["grpo.beta=0.04"]),
        ("rm", vec!["train.grad_accum=2"]),
        ("kto", vec!["train.grad_accum=2"]),
        ("distill", vec![teacher.as_str()]),
    ] {
        let one = [&["train.steps=4"], &one[..]].concat();
        let a = scratch(&format!("vpp-{recipe}-1"));
        run(recipe, 1, &a, &one, false);
        assert!(series(&a, "grad_norm").iter().any(|g| *g > 0.0), "{recipe}: no gradient to compare");
        // DPO (every forward first) and GRPO (rollouts on the forward ticks) also with data
        // parallel and ZeRO-2; the reward model's whole micro-batch runs the parts in turn.
        let mut layouts = vec![(2, "pp=2,vpp=2")];
        if ["dpo", "grpo"].contains(&recipe) {
            layouts.push((4, "dp=2,pp=2,vpp=2,zero=2"));
        }
        for (ranks, layout) in layouts {
            let b = scratch(&format!("vpp-{recipe}-{layout}"));
            let laid_out = format!("train.layout={layout:?}");
            let mut overrides = [&one[..], &[laid_out.as_str()]].concat();
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

/// DeepSeek-V4 over 2 × 2 runs: stage 0 holds a sliding, hash-routed layer and a heavily
/// compressed one (laid out apart: pools of their own), stage 1 two compressed sparse ones,
/// the stream-mixing head after the second.
#[test]
fn deepseek_v4_interleaves_its_layer_kinds() {
    let base = scratch("vpp-v4-base");
    let model = deepseek_v4_base_of_4_layers(&base);
    let one = scratch("vpp-v4-1");
    sft(1, &one, &[&model]);
    for (ranks, layout) in [(2, "pp=2,vpp=2"), (4, "dp=2,pp=2,vpp=2,ep=2,zero=1")] {
        let dir = scratch(&format!("vpp-v4-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        assert_v4_follows(&one, &dir, &format!("deepseek_v4, {layout}"));
    }
    // GRPO: generation on the forward ticks, each part's layers' caches written per chunk.
    assert_v4_grpo_follows(&model, 2, "pp=2,vpp=2", "vpp-v4");
}

#[test]
fn deepseek_v3_interleaves_with_expert_parallel_and_what_cannot_be_cut_is_refused() {
    let base = scratch("vpp-v3-base");
    let model = deepseek_base_of(&base, 4, 4);
    let one = scratch("vpp-v3-1");
    sft(1, &one, &[&model]);
    // 4 layers, one dense: stage 0 runs layers 0 and 2, stage 1 layers 1 and 3. Expert
    // parallel's exchanges are collectives of a stage's data-parallel peers, run in the
    // ticks' order; at the epoch's end one data-parallel rank runs an idle pass in that order.
    for (ranks, layout) in [(2, "pp=2,vpp=2"), (4, "dp=2,pp=2,vpp=2,ep=2")] {
        let dir = scratch(&format!("vpp-v3-{layout}"));
        sft_laid_out(ranks, &dir, layout, &[&model]);
        let what = format!("deepseek_v3, {layout}");
        assert_same_curve(&series(&one, "loss"), &series(&dir, "loss"), 1e-5, &what);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
        assert_eq!(steps(&one)[1]["expert_load"], steps(&dir)[1]["expert_load"], "{what}: expert loads");
        assert_same_weights(
            &one.join("checkpoints/step-00000006"),
            &dir.join("checkpoints/step-00000006"),
            &format!("{what}: the final checkpoint"),
        );
    }
    // GRPO: generation on the forward ticks in 6 chunks, each part's experts exchanged per
    // chunk. 3 prompts a step leave one data-parallel rank 2 prompts and 16 sequences, the
    // other 1 and 8: chunks empty on one and not the other, idle parts meeting the peer's
    // exchanges; 1 prompt a step leaves one rank idle, its parts' idle chunks on the ticks.
    // Micro-batches of 8 completions, so that both layouts cut the step's completions into
    // the same micro-batches (the "grpo" loss averages within one, as TRL's per device).
    for prompts in ["grpo.prompts_per_step=3", "grpo.prompts_per_step=1"] {
        let grpo = ["grpo.beta=0.04", prompts, "grpo.micro_batch=8", "train.steps=3"];
        let (a, b) = (scratch(&format!("vpp-v3-{prompts}-1")), scratch(&format!("vpp-v3-{prompts}-4")));
        run("grpo", 1, &a, &[&[model.as_str()], &grpo[..]].concat(), false);
        let laid_out = [model.as_str(), "train.layout=\"dp=2,pp=2,vpp=2,ep=2\"", "train.pp_chunks=6"];
        run("grpo", 4, &b, &[&laid_out[..], &grpo[..]].concat(), false);
        let what = format!("deepseek_v3 grpo, {prompts}, dp=2,pp=2,vpp=2,ep=2");
        assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), 1e-5, &what);
        assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, &what);
    }
    let err = sft_error(2, &scratch("vpp-refused"), &[&model, "train.layout=\"pp=2,vpp=3\""], false);
    assert!(err.contains("6 stages") && err.contains("4 layers"), "{err}");
    // Refused when the run file is read, naming it.
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/sft.toml"));
    let refused = |overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        kiln_train::config::RunConfig::load_resolved(example, &overrides).unwrap_err().to_string()
    };
    let err = refused(&["train.vpp=2"]);
    assert!(err.contains("sft.toml: `train.vpp` = 2: interleaved stages need pipeline parallel"), "{err}");
    let err = refused(&["train.layout=\"pp=2,vpp=2\"", "train.pp_layers=[2, 2]"]);
    assert!(err.contains("`train.pp_layers` = [2, 2] gives 2 stages, `train.pp` · `train.vpp` is 2·2"), "{err}");
}
