//! Data, ZeRO and expert parallel in one process (`kiln_dist::Threads`, a thread per rank),
//! under plain `cargo test`: the same run on 1, 2 and 4 ranks, each rank taking its share of
//! every step, follows the one-process curve, replicated, with ZeRO-1 (moments 1/N per rank),
//! ZeRO-2 (moments and gradients 1/N) and ZeRO-3 (weights too, but for one gathered layer and
//! the outer tensors); ZeRO checkpoints resume on other numbers of ranks, other stages and
//! without ZeRO; expert parallel (alone, with data parallel, recomputation and ZeRO 1 to 3)
//! gives the one-process curve with each rank holding its share of the experts, for
//! DeepSeek-V3 and V4; every layout reduces to the same gradients with the reductions started
//! during backward; and every recipe follows its one-process curve on two ranks with ZeRO-2
//! and ZeRO-3, and with the gradients reduced during backward.
//! `crates/kiln/tests/dp_mpi.rs` runs the same layouts as processes under mpirun.

mod common;

use common::*;
use std::path::Path;

#[test]
fn one_two_and_four_ranks_give_the_same_curve_replicated_and_with_zero_1_2_and_3() {
    let one = scratch("1");
    sft(1, &one, &[]);
    let reference = series(&one, "loss");
    let held = |dir: &Path, key: &str| steps(dir)[0][key].as_f64().unwrap();
    for ranks in [2, 4] {
        for zero in [0, 1, 2, 3] {
            let dir = scratch(&format!("{ranks}-zero-{zero}"));
            sft(ranks, &dir, &[&format!("train.zero={zero}")]);
            let what = format!("{ranks} ranks, ZeRO-{zero}");
            assert_same_curve(&reference, &series(&dir, "loss"), 1e-6, &what);
            assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
            assert_same_curve(&eval_losses(&one), &eval_losses(&dir), 1e-6, &format!("{what}, eval"));
            // ZeRO-1 shards the moments over the ranks; ZeRO-2 the gradients too.
            let share = |key: &str, sharded: bool| {
                let (full, here) = (held(&one, key), held(&dir, key));
                let want = if sharded { full / ranks as f64 } else { full };
                assert!((here - want).abs() <= 1e-4 * full, "{what}: {key} {here} MB, expected {want}");
            };
            share("optimizer_state_mb", zero >= 1);
            share("gradients_mb", zero >= 2);
            let (full, here) = (held(&one, "weights_mb"), held(&dir, "weights_mb"));
            let want = if zero == 3 { zero_3_weights_mb(ranks) } else { full };
            assert!((here - want).abs() <= 1e-9 * full, "{what}: weights {here} MB, expected {want}");
            assert_step_times(&dir, &what);
        }
    }
    // The gradients reduced during backward sum to the same: whole ones in buckets during
    // the step's last backward (all-reduced, or reduce-scattered into ZeRO-1's shards), ZeRO-2
    // and 3's each layer's reduce-scatter started as backward hands it over.
    for (ranks, zero) in [(2, 0), (4, 0), (4, 1), (2, 2), (4, 2), (4, 3)] {
        let dir = scratch(&format!("{ranks}-zero-{zero}-overlap"));
        sft(ranks, &dir, &["train.overlap_grad_reduce=true", &format!("train.zero={zero}")]);
        let what = format!("{ranks} ranks, ZeRO-{zero}, gradients reduced during backward");
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-6, &what);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
    }
    // The 4-rank ZeRO-1 run's step-3 checkpoint resumes on 2 ranks with ZeRO-2 and ZeRO-3
    // (re-cut) and on one process without ZeRO (moments gathered), and the 4-rank ZeRO-3 one
    // on one process, continuing the same curve.
    for (from, ranks, zero) in [("4-zero-1", 2, 2), ("4-zero-1", 2, 3), ("4-zero-1", 1, 0), ("4-zero-3", 1, 0)] {
        let dir = scratch(&format!("resume-{from}-{ranks}-{zero}"));
        copy_dir(&scratch_keep(from), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let accum = format!("train.grad_accum={}", 4 / ranks);
        let zero = format!("train.zero={zero}");
        run("sft", ranks, &dir, &["train.steps=6", "output.save_every=3", &accum, &zero], true);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-6, &format!("{from} resumed on {ranks}, ZeRO-{zero}"));
    }
}

/// What rank 0 of `ranks` holds of the example's weights under ZeRO-3, in MB: its shard, two
/// gathered layers (the one running and the next, prefetched) and the tensors outside the
/// layers.
fn zero_3_weights_mb(ranks: usize) -> f64 {
    let base = config("sft", &scratch("zero-3-layout"), &[]).model.path;
    let flat = kiln_model::FlatLayout::new(&kiln_model::weights::layout(&kiln_model::Config::load(&base).unwrap()));
    let layer = (0..flat.ranges.layers.len()).map(|l| flat.layer(l).0.len()).max().unwrap();
    let outer: usize = flat.outer().iter().map(|r| r.len()).sum();
    let shard = kiln_dist::shard(flat.total, 0, ranks).len();
    (4 * (shard + 2 * layer + outer)) as f64 / 1e6
}

#[test]
fn expert_parallel_gives_the_one_process_curve_alone_and_with_data_parallel() {
    let base = scratch("ep-base");
    let model = deepseek_base(&base, 3);
    let one = scratch("ep-1");
    sft(1, &one, &[&model]);
    let reference = series(&one, "loss");
    // Two MoE layers of 8 routed experts, each three 24 x 48 matrices, in f32.
    let routed_mb = (2 * 8 * 3 * 24 * 48 * 4) as f64 / 1e6;
    // Two ranks with ep 2 have one replica of each expert: their moments' space is one rank's.
    let cases: [(usize, usize, &[&str]); 12] = [
        (2, 2, &["train.zero=0"]),
        (4, 2, &["train.overlap_grad_reduce=true"]),
        (2, 2, &["train.zero=1", "train.overlap_grad_reduce=true"]),
        (4, 2, &["train.zero=1", "train.overlap_grad_reduce=true"]),
        (4, 2, &["train.zero=2", "train.overlap_grad_reduce=true"]),
        (2, 2, &["train.zero=2"]),
        (4, 4, &["train.zero=0"]),
        (4, 2, &["train.recompute=true"]),
        (4, 2, &["train.zero=1"]),
        (4, 2, &["train.zero=2"]),
        (4, 2, &["train.zero=3"]),
        (4, 2, &["train.zero=3", "train.zero3_prefetch=false"]),
    ];
    let mut zero_3_weights = Vec::new();
    for (ranks, ep, extra) in cases {
        let dir = scratch(&format!("ep-{ranks}-{ep}-{}", extra.join("-")));
        sft(ranks, &dir, &[&[model.as_str(), &format!("train.ep={ep}")][..], extra].concat());
        let extra = extra.join(" ");
        let what = format!("{ranks} ranks, ep {ep}, {extra}");
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-6, &what);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
        assert_same_curve(&eval_losses(&one), &eval_losses(&dir), 1e-6, &format!("{what}, eval"));
        // Each rank holds 1/ep of the routed experts, and everything else whole (ZeRO-3: less).
        let saved = series(&one, "weights_mb")[0] - series(&dir, "weights_mb")[0];
        let expected = routed_mb * (1.0 - 1.0 / ep as f64);
        // ZeRO-3 holds gathered layers besides its shards (two with prefetch): without
        // prefetch, this 3-layer model holds less than under expert parallel alone.
        match extra.as_str() {
            "train.zero=3" => zero_3_weights.push(series(&dir, "weights_mb")[0]),
            "train.zero=3 train.zero3_prefetch=false" => {
                zero_3_weights.push(series(&dir, "weights_mb")[0]);
                assert!(saved > expected, "{what}: {saved} MB fewer weights, below {expected}");
            }
            _ => assert!((saved - expected).abs() < 1e-6, "{what}: {saved} MB fewer weights, expected {expected}"),
        }
        if extra.starts_with("train.zero=") && !extra.starts_with("train.zero=0") {
            // Everything but the experts sharded over all ranks; each rank's 1/ep of the experts
            // over its ranks/ep replicas: 1/ranks of the moments either way.
            let (full, sharded) = (series(&one, "optimizer_state_mb")[0], series(&dir, "optimizer_state_mb")[0]);
            let want = full / ranks as f64;
            assert!((sharded - want).abs() <= 1e-3 * full, "{what}: {sharded} MB of moments, expected {want}");
        }
    }
    let (prefetching, not) = (zero_3_weights[0], zero_3_weights[1]);
    let whole = series(&one, "weights_mb")[0];
    assert!(
        not < prefetching && prefetching < whole,
        "ZeRO-3 weights: {prefetching} MB prefetching, {not} not, {whole} whole"
    );
    // The ep-4 run's step-3 checkpoint (sharded by expert rank) resumes on 2 ranks with ep 2,
    // and the ZeRO-1 one with ep 2 and ZeRO-1, its spaces re-cut.
    for (from, extra) in [("ep-4-4-train.zero=0", "train.zero=0"), ("ep-4-2-train.zero=1", "train.zero=1")] {
        let dir = scratch(&format!("ep-resume-{extra}"));
        copy_dir(&scratch_keep(from), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
        let overrides =
            [model.as_str(), "train.ep=2", extra, "train.steps=6", "output.save_every=3", "train.grad_accum=2"];
        run("sft", 2, &dir, &overrides, true);
        assert_same_curve(&reference, &series(&dir, "loss"), 1e-6, &format!("resumed from {from} with ep 2"));
    }
    // Every other recipe on the MoE model, expert parallel over two ranks (the pair recipes
    // two micro-batches a step either way; GRPO with a KL term runs its reference expert
    // parallel too; distillation's teacher is the dense demo base).
    for (recipe, one, two) in [
        ("dpo", vec!["train.grad_accum=2"], vec!["train.ep=2"]),
        ("rm", vec!["train.grad_accum=2"], vec!["train.ep=2"]),
        ("kto", vec!["train.grad_accum=2"], vec!["train.ep=2"]),
        ("grpo", vec!["grpo.beta=0.04"], vec!["grpo.beta=0.04", "train.ep=2"]),
        ("distill", vec!["train.seed=1"], vec!["train.seed=1", "train.ep=2"]),
    ] {
        let (one, two) = (
            [&[model.as_str(), "train.steps=4"], &one[..]].concat(),
            [&[model.as_str(), "train.steps=4"], &two[..]].concat(),
        );
        assert_same_recipe(recipe, &format!("{recipe} with ep 2"), &one, &two);
    }
}

/// DeepSeek-V4 (hash-routed and scored MoE, hyper-connections, compressed attention): expert
/// parallel with ZeRO-2, and with data parallel and ZeRO-1, follows the one-process curve, and
/// GRPO samples and trains with the experts split over two ranks.
#[test]
fn deepseek_v4_follows_the_one_process_curve_with_expert_parallel_and_zero() {
    let base = scratch("v4-base");
    let model = deepseek_v4_base(&base);
    let one = scratch("v4-1");
    sft(1, &one, &[&model]);
    let cases = [
        (2, 2, "train.zero=2"),
        (4, 2, "train.zero=1"),
        (2, 1, "train.zero=3"),
        (4, 2, "train.overlap_grad_reduce=true"),
    ];
    for (ranks, ep, extra) in cases {
        let dir = scratch(&format!("v4-{ranks}-{ep}-{extra}"));
        sft(ranks, &dir, &[&model, &format!("train.ep={ep}"), extra]);
        let what = format!("deepseek_v4 on {ranks} ranks, ep {ep}, {extra}");
        assert_same_curve(&series(&one, "loss"), &series(&dir, "loss"), 1e-6, &what);
        assert_same_curve(&series(&one, "grad_norm"), &series(&dir, "grad_norm"), 1e-5, &what);
    }
    let one = [model.as_str(), "train.steps=4"];
    let two = [model.as_str(), "train.steps=4", "train.ep=2"];
    assert_same_recipe("grpo", "deepseek_v4 grpo with ep 2", &one, &two);
}

#[test]
fn bf16_gives_the_same_curve_within_its_rounding() {
    let (one, two) = (scratch("bf16-1"), scratch("bf16-2"));
    sft(1, &one, &["train.dtype=\"bf16\""]);
    sft(2, &two, &["train.dtype=\"bf16\"", "train.zero=2"]);
    let (a, b) = (series(&one, "loss"), series(&two, "loss"));
    // Step 1 sees the same weights: f32 noise. Later, the ranks' summation order leaves the
    // masters a few f32 ulps apart, which turns over the bf16 rounding of the few weights
    // that sit on a boundary: those move by one bf16 ulp and the curves part slowly (4.5e-5
    // relative by step 6, measured). Held to 2⁻¹², a sixteenth of bf16's unit roundoff; a
    // lost or doubled gradient share moves the loss by 1e-2 or more.
    assert_same_curve(&a[..1], &b[..1], 1e-6, "bf16, 2 ranks, ZeRO-2, first step");
    assert_same_curve(&a, &b, 2f64.powi(-12), "bf16, 2 ranks, ZeRO-2");
}

#[test]
fn every_recipe_gives_the_same_curve_on_one_process_and_two_ranks_with_zero_2_and_3_and_overlap() {
    // A teacher for distillation that differs from the student: the demo base after 3 SFT steps.
    let teacher = scratch("teacher");
    run("sft", 1, &teacher, &["train.steps=3", "output.save_every=0"], false);
    let teacher = format!("distill.teacher={:?}", teacher.join("checkpoints/step-00000003").display().to_string());
    let runs: [(&str, Vec<&str>, Vec<&str>); 5] = [
        // Pair and unpaired recipes: 2 micro-batches a step either way.
        ("dpo", vec!["train.grad_accum=2"], vec!["train.zero=2"]),
        ("rm", vec!["train.grad_accum=2"], vec!["train.zero=2"]),
        ("kto", vec!["train.grad_accum=2"], vec!["train.zero=2"]),
        // Rollout recipes: the step's prompts split over the ranks.
        ("grpo", vec![], vec!["train.zero=2"]),
        ("distill", vec![&teacher], vec![&teacher, "train.zero=2"]),
    ];
    for (recipe, one, two) in runs {
        let (one, two) = ([&["train.steps=4"], &one[..]].concat(), [&["train.steps=4"], &two[..]].concat());
        assert_same_recipe(recipe, &format!("{recipe} with ZeRO-2"), &one, &two);
        let with = |zero: &'static str| two.iter().map(|o| if *o == "train.zero=2" { zero } else { o }).collect();
        let three: Vec<&str> = with("train.zero=3");
        assert_same_recipe(recipe, &format!("{recipe} with ZeRO-3"), &one, &three);
        // No ZeRO, the gradients summed in buckets during the step's last backward; ZeRO-2
        // (a pair recipe, a rollout one), each layer's reduction started as backward hands it
        // over.
        let overlap: Vec<&str> = with("train.overlap_grad_reduce=true");
        assert_same_recipe(recipe, &format!("{recipe} with the reduction during backward"), &one, &overlap);
        if ["dpo", "grpo"].contains(&recipe) {
            let overlap_2 = [&two[..], &["train.overlap_grad_reduce=true"]].concat();
            assert_same_recipe(recipe, &format!("{recipe} with ZeRO-2's reductions started"), &one, &overlap_2);
        }
    }
    // Three prompts a step over two ranks, a completion per micro-batch: the rank with one
    // fewer runs an idle pass, which gathers the ZeRO-3 teacher's shards as its forwards do.
    let uneven = [teacher.as_str(), "train.steps=4", "distill.prompts_per_step=3", "distill.chunk_rows=1"];
    let sharded = [&uneven[..], &["train.zero=3"]].concat();
    assert_same_recipe("distill", "distill with ZeRO-3 and idle passes", &uneven, &sharded);
}

/// `recipe` on one process with `one` and on two ranks with `two` take the same steps.
fn assert_same_recipe(recipe: &str, what: &str, one: &[&str], two: &[&str]) {
    let (a, b) = (scratch(&format!("{what}-1")), scratch(&format!("{what}-2")));
    run(recipe, 1, &a, one, false);
    run(recipe, 2, &b, two, false);
    assert!(series(&a, "grad_norm").iter().any(|g| *g > 0.0), "{what}: no gradient to compare");
    // Sums in another order leave the weights a few ulps apart after an update; the rollout
    // recipes then sample from, and score with, those weights.
    // (2e-6 for the rest: a pair loss of ~0.36 moves by ~1e-6 relative for weights ~1 ulp apart.)
    let tolerance = if ["grpo", "distill"].contains(&recipe) { 1e-5 } else { 2e-6 };
    assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), tolerance, what);
    assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, what);
}

#[test]
fn muon_trains_on_one_and_two_ranks_with_and_without_zero_and_refuses_an_optimizer_switch() {
    let (adamw, one) = (scratch("muon-adamw"), scratch("muon-1"));
    let muon = "train.optimizer=\"muon\"";
    sft(1, &adamw, &[]);
    sft(1, &one, &[muon]);
    let (a, m1) = (series(&adamw, "loss"), series(&one, "loss"));
    assert!(m1[5] < m1[0], "Muon's loss does not fall: {m1:?}");
    assert!((a[5] - m1[5]).abs() > 1e-4 * a[5], "Muon ran AdamW's updates: {a:?} vs {m1:?}");
    // ZeRO's shards cut matrices here: those are gathered for their update.
    for zero in [0, 1, 2, 3] {
        let two = scratch(&format!("muon-2-zero-{zero}"));
        sft(2, &two, &[muon, &format!("train.zero={zero}")]);
        let m2 = series(&two, "loss");
        // Step 1 sees the same weights; later the ranks' summation order turns over a bf16
        // rounding of the Newton–Schulz iteration here and there (one ulp of one value).
        let what = format!("Muon, 2 ranks, ZeRO-{zero}");
        assert_same_curve(&m1[..1], &m2[..1], 1e-6, &format!("{what}, first step"));
        assert_same_curve(&m1, &m2, 2f64.powi(-12), &what);
    }
    // The checkpoint at step 3 holds Muon's momentum: AdamW may not resume from it.
    let resumed = scratch("muon-resume-adamw");
    copy_dir(&one, &resumed);
    let err = sft_error(1, &resumed, &["train.steps=6"], true);
    assert!(err.contains("Muon") && err.contains("train.optimizer"), "{err}");
}
