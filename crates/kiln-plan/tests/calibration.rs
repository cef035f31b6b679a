//! The planner against published numbers: parameter counts of known models, DeepSeek-V3's
//! pre-training layout and throughput, and the seed question (DeepSeek-V4-Pro on 1,000
//! Ascend 910C); and its refusals of impossible requests.

use kiln_plan::{evaluate, search, Cluster, Job, Layout, Method, ModelShape, Optimizer, StageCut, GB};
use std::path::Path;

fn model(name: &str) -> ModelShape {
    ModelShape::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(name)).unwrap()
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= tolerance * want,
        "{what}: {got:.4e}, published {want:.4e} (±{:.1}%)",
        tolerance * 100.0
    );
}

#[test]
fn parameter_counts_match_published_totals() {
    let v3 = model("deepseek_v3.json");
    within("DeepSeek-V3 total", v3.params.total(), 671e9, 0.005);
    within("DeepSeek-V3 active", v3.active, 37e9, 0.03);
    // The Hugging Face checkpoint's 685B: the main model, its MTP layer, and the MTP layer's
    // own copies of embedding and head.
    within("DeepSeek-V3 with MTP", v3.params.total() + v3.mtp.total() + v3.params.embedding * 2.0, 685e9, 0.005);
    within("Llama-3-8B", model("llama3_8b.json").params.total(), 8.03e9, 0.005);
    within("Qwen2.5-7B", model("qwen2_5_7b.json").params.total(), 7.61e9, 0.005);
    let v4 = model("deepseek_v4_pro.json");
    within("DeepSeek-V4-Pro total", v4.params.total(), 1.6e12, 0.03);
    within("DeepSeek-V4-Pro active", v4.active, 49e9, 0.03);
}

/// DeepSeek-V3's pre-training job: 2,048 H800, a batch of 15,360 sequences of 4K tokens, its
/// pipeline stages balanced.
fn deepseek_v3_pretraining() -> (Job, Cluster) {
    let mut job = Job::new(model("deepseek_v3.json"), Method::Sft);
    job.global_batch_tokens = 15360.0 * 4096.0;
    job.stage_cut = StageCut::Balanced;
    (job, Cluster::parse("2048xh800").unwrap())
}

/// DeepSeek-V3's pre-training: 2,048 H800, PP16, EP64, ZeRO-1 data parallel (DP128), no TP,
/// sequences of 4K, a batch of 15,360 sequences; 180K H800 GPU-hours per trillion tokens.
/// Its stages are balanced (the even cut's last stage would carry 3 layers and the head, 1.6
/// layers' weights, and run 17% behind the others).
#[test]
fn deepseek_v3_pretraining_layout_fits_and_its_throughput_is_within_a_quarter() {
    let (job, cluster) = deepseek_v3_pretraining();
    let layout = Layout::parse("dp=128,tp=1,pp=16,ep=64,zero=1,recompute=selective", 2048).unwrap();
    let e = evaluate(&job, &cluster, &layout).unwrap();
    assert!(e.fits, "{}: {:?}", e.layout, e.reason);
    assert!(e.memory.peak <= 80.0 * GB);
    within("GPU-hours per trillion tokens", e.device_hours_per_trillion_tokens(), 180e3, 0.25);
    // Without recomputation the same layout does not fit: activations are what fills 80 GB.
    let none = Layout { recompute: kiln_plan::Recompute::None, ..layout };
    assert!(!evaluate(&job, &cluster, &none).unwrap().fits);
}

/// The seed question: full-parameter post-training of DeepSeek-V4-Pro on 1,000 Ascend 910C.
#[test]
fn deepseek_v4_pro_fits_on_a_thousand_910c_with_adamw_and_with_muon() {
    let cluster = Cluster::parse("1000x910c").unwrap();
    let mut adamw = Job::new(model("deepseek_v4_pro.json"), Method::Sft);
    let best_adamw = search(&adamw, &cluster, 3).unwrap();
    assert!(best_adamw.iter().all(|e| e.fits && e.memory.peak <= 128.0 * GB && e.layout.devices() <= 1000));
    adamw.optimizer = Optimizer::Muon;
    let muon = &adamw;
    let best_muon = search(muon, &cluster, 3).unwrap();
    assert!(best_muon[0].fits);
    // On the same layout Muon keeps one f32 moment instead of two for the hidden matrices.
    let same = evaluate(muon, &cluster, &best_adamw[0].layout).unwrap();
    assert!(same.memory.peak < best_adamw[0].memory.peak);
    let saved = best_adamw[0].memory.term("optimizer states") - same.memory.term("optimizer states");
    let shards = (same.layout.dp / same.layout.ep) as f64;
    let expert_saving = 4.0 * same.memory.params_expert / shards;
    assert!(
        saved >= expert_saving,
        "Muon saves {saved:.3e} B of optimizer states; the experts alone {expert_saving:.3e}"
    );
    // GRPO also fits: rollouts, a reference model and the KV cache included.
    let grpo = Job::new(model("deepseek_v4_pro.json"), Method::Grpo);
    let best = search(&grpo, &cluster, 1).unwrap();
    assert!(best[0].time.rollout > 0.0 && best[0].memory.term("reference model") > 0.0);
}

#[test]
fn impossible_requests_are_refused_with_the_reason() {
    let v4 = Job::new(model("deepseek_v4_pro.json"), Method::Sft);
    let err = search(&v4, &Cluster::parse("8xh100").unwrap(), 3).unwrap_err().to_string();
    assert!(err.contains("does not fit on 8 x h100") && err.contains("least memory"), "{err}");
    let err = Layout::parse("tp=8,pp=3", 1000).unwrap_err().to_string();
    assert!(err.contains("does not divide the 1000 devices"), "{err}");
    let cluster = Cluster::parse("1024x910c").unwrap();
    let bad = [
        ("dp=1024,ep=256", "does not divide the 384 routed experts"),
        ("dp=64,tp=16,pp=1", "tensor parallel must divide the 8 devices of a node"),
        ("dp=16,pp=64", "64 pipeline stages for 61 layers"),
    ];
    for (spec, want) in bad {
        let layout = Layout::parse(spec, 1024).unwrap();
        let err = evaluate(&v4, &cluster, &layout).unwrap_err().to_string();
        assert!(err.contains(want), "{spec}: {err}");
    }
    assert!(Cluster::parse("1000xtpu9").unwrap_err().to_string().contains("unknown device `tpu9`"));
    let err = ModelShape::parse(&serde_json::json!({"model_type": "gpt2"}), "c.json").unwrap_err().to_string();
    assert!(err.contains("c.json") && err.contains("gpt2"), "{err}");
    let err = ModelShape::parse(&serde_json::json!({"model_type": "llama", "hidden_size": 8}), "c.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("c.json: field `vocab_size` is missing"), "{err}");
}

#[test]
fn each_zero_stage_needs_no_more_memory_than_the_one_before() {
    let job = Job::new(model("llama3_8b.json"), Method::Sft);
    let cluster = Cluster::parse("64xh100").unwrap();
    let peaks: Vec<f64> = (0..=3)
        .map(|zero| {
            let layout = Layout { zero, ..Layout::replicated(64, kiln_plan::Recompute::Selective) };
            evaluate(&job, &cluster, &layout).unwrap().memory.peak
        })
        .collect();
    assert!(peaks.windows(2).all(|w| w[1] < w[0]), "{peaks:?}");
    // ZeRO-0 holds 16 bytes per parameter of model state: weights, gradients, master, moments.
    let zero0 = evaluate(&job, &cluster, &Layout::parse("dp=64,zero=0", 64).unwrap()).unwrap();
    let state: f64 =
        ["weights", "gradients", "master weights", "optimizer states"].iter().map(|t| zero0.memory.term(t)).sum();
    within("ZeRO-0 state bytes", state, 16.0 * job.model.params.total(), 1e-9);
}

/// Every pipeline stage is estimated and the fullest reported: on DeepSeek-V3's PP16 (61
/// layers: 13 stages of 4, then 3 of 3) the first stage, with 16 micro-batches in flight and
/// no head or logits; with a single micro-batch in flight everywhere, the last stage, with 3
/// layers, the MTP layer, the head and the logits.
#[test]
fn the_fullest_pipeline_stage_is_the_one_reported() {
    let mut job = Job::new(model("deepseek_v3.json"), Method::Sft);
    job.global_batch_tokens = 15360.0 * 4096.0;
    let cluster = Cluster::parse("2048xh800").unwrap();
    let layout = Layout::parse("dp=128,tp=1,pp=16,ep=64,zero=1,recompute=selective", 2048).unwrap();
    let first = evaluate(&job, &cluster, &layout).unwrap().memory;
    assert_eq!(first.term("logits"), 0.0, "the first stage holds no logits");
    let v3 = model("deepseek_v3.json");
    let per_layer = v3.params.routed_experts / v3.layers as f64;
    within(
        "the first stage's routed experts: 4 layers' worth over ep 64",
        first.params_expert,
        4.0 * per_layer / 64.0,
        1e-9,
    );
    job.global_batch_tokens = 128.0 * 4096.0;
    let last = evaluate(&job, &cluster, &Layout { recompute: kiln_plan::Recompute::Full, ..layout }).unwrap().memory;
    assert!(last.term("logits") > 0.0, "one micro-batch in flight: the last stage, with the logits, is the fullest");
    let three_and_mtp = (3.0 * per_layer + v3.mtp.routed_experts) / 64.0;
    within("the last stage's routed experts: 3 layers' and the MTP layer's", last.params_expert, three_and_mtp, 1e-9);
}

/// Without sequence parallel each rank of a tensor group keeps the residual stream's tensors
/// whole: Llama-3-8B on TP8 keeps 7/8 of 4 of them per layer more than with it (no
/// recomputation; 2 under selective, the layer input under full), and TP1 is the same either
/// way.
#[test]
fn sequence_parallel_off_keeps_the_residual_stream_whole_on_every_tensor_rank() {
    let job = Job::new(model("llama3_8b.json"), Method::Sft);
    let cluster = Cluster::parse("8xh100").unwrap();
    let memory = |spec: &str| evaluate(&job, &cluster, &Layout::parse(spec, 8).unwrap()).unwrap().memory;
    let stream_bytes = 2.0 * 4096.0 * job.micro_batch_tokens() * 32.0;
    for (recompute, tensors) in [("none", 4.0), ("selective", 2.0), ("full", 1.0)] {
        let on = memory(&format!("tp=8,recompute={recompute}"));
        let off = memory(&format!("tp=8,recompute={recompute},sp=off"));
        let more = off.term("activations") - on.term("activations");
        within(&format!("recompute={recompute}: sp=off's extra bytes"), more, tensors * stream_bytes * 7.0 / 8.0, 1e-9);
        let one = memory(&format!("dp=8,recompute={recompute},sp=off")).term("activations");
        assert_eq!(one, memory(&format!("dp=8,recompute={recompute}")).term("activations"), "tp=1");
    }
    // DeepSeek-V4-Pro under selective recomputation keeps its 4 hyper-connected streams of
    // 7168 twice per layer (the layer's input and the residual after attention), over 61 layers.
    let v4 = Job::new(model("deepseek_v4_pro.json"), Method::Sft);
    let v4_activations =
        |spec: &str| evaluate(&v4, &cluster, &Layout::parse(spec, 8).unwrap()).unwrap().memory.term("activations");
    let more = v4_activations("tp=8,sp=off") - v4_activations("tp=8");
    let streams = 2.0 * 2.0 * 4.0 * 7168.0 * v4.micro_batch_tokens() * 61.0;
    within("deepseek_v4 sp=off's extra bytes", more, streams * 7.0 / 8.0, 1e-9);
    assert!(Layout::parse("tp=8,sp=maybe", 8).unwrap_err().to_string().contains("`on` or `off`"));
    assert!(Layout::parse("tp=8,sp=off", 8).unwrap().to_string().ends_with("sp=off"));
}

/// Pipeline cuts: on Llama-3-8B over 4 stages the planner's balanced cut is the one kiln trains
/// (8 + 9 + 9 + 6: `kiln_model::stage_split` runs the same cut), and a pipeline runs at its
/// slowest stage's pace. A layer reads 4096·(4096 + 2·1024 + 4096) + 3·4096·14336 weights per
/// token, the head 128256·4096: the even cut's last stage carries 8 layers and the head, the
/// balanced cut's slowest stage 9 layers. A given cut must cut the layout's stages.
#[test]
fn the_planner_estimates_the_even_balanced_or_given_cut() {
    let mut job = Job::new(model("llama3_8b.json"), Method::Sft);
    let cluster = Cluster::parse("8xh100").unwrap();
    let layout = Layout::parse("dp=2,pp=4,zero=1", 8).unwrap();
    let even = evaluate(&job, &cluster, &layout).unwrap();
    assert_eq!(even.stage_layers, [8, 8, 8, 8]);
    job.stage_cut = StageCut::Balanced;
    let balanced = evaluate(&job, &cluster, &layout).unwrap();
    assert_eq!(balanced.stage_layers, [8, 9, 9, 6]);
    let (layer, head) = (4096.0 * (4096.0 + 2.0 * 1024.0 + 4096.0) + 3.0 * 4096.0 * 14336.0, 128256.0 * 4096.0);
    within(
        "balanced against even compute",
        balanced.time.compute / even.time.compute,
        9.0 * layer / (8.0 * layer + head),
        1e-9,
    );
    // One stage: no pace.
    let one = evaluate(&job, &cluster, &Layout::parse("dp=8,zero=1", 8).unwrap()).unwrap();
    let total = 32.0 * layer + head;
    within(
        "pp=4 even against dp=8 compute",
        even.time.compute / one.time.compute,
        4.0 * (8.0 * layer + head) / total,
        1e-9,
    );
    // A given cut: its last stage holds 29 layers, and so the most memory.
    job.stage_cut = StageCut::Given(vec![1, 1, 1, 29]);
    let given = evaluate(&job, &cluster, &layout).unwrap();
    assert!(given.memory.params_non_expert > 3.0 * even.memory.params_non_expert, "29 of 32 layers on a stage");
    let err = evaluate(&job, &cluster, &Layout::parse("dp=4,pp=2", 8).unwrap()).unwrap_err().to_string();
    assert!(err.contains("give 2 stages"), "{err}");
}

/// Interleaved stages: the bubble shrinks vpp-fold, the hand-overs grow vpp-fold, and the
/// first stage keeps (2(pp − 1) + (vpp − 1)·pp + 1) / vpp micro-batches' activations in flight
/// where 1F1B keeps pp (Megatron-LM's interleaved schedule, which kiln trains with
/// `train.vpp`).
#[test]
fn interleaved_stages_trade_activations_and_hand_overs_for_the_bubble() {
    let job = Job::new(model("llama3_8b.json"), Method::Sft);
    let cluster = Cluster::parse("8xh100").unwrap();
    let plain = evaluate(&job, &cluster, &Layout::parse("dp=2,pp=4,zero=1", 8).unwrap()).unwrap();
    let layout = Layout::parse("dp=2,pp=4,vpp=2,zero=1", 8).unwrap();
    assert_eq!(layout.to_string(), "DP2 TP1 PP4 EP1 ZeRO-1 recompute=selective vpp=2");
    let interleaved = evaluate(&job, &cluster, &layout).unwrap();
    assert_eq!(interleaved.stage_layers, [8, 8, 8, 8], "8 runs of 4 layers, two a stage");
    within("bubble", interleaved.time.bubble / plain.time.bubble, 0.5, 1e-9);
    let comm = |e: &kiln_plan::Estimate| e.time.comm.iter().find(|c| c.0 == "pipeline parallel").unwrap().1;
    within("hand-overs", comm(&interleaved) / comm(&plain), 2.0, 1e-9);
    let activations = |e: &kiln_plan::Estimate| e.memory.terms.iter().find(|t| t.name == "activations").unwrap().bytes;
    within("first stage's activations", activations(&interleaved) / activations(&plain), 5.5 / 4.0, 1e-9);
    assert!(interleaved.memory.peak > plain.memory.peak);
    for (spec, why) in
        [("dp=8,vpp=2", "need pipeline parallel"), ("dp=1,pp=8,vpp=5", "40 pipeline stages for 32 layers")]
    {
        let err = evaluate(&job, &cluster, &Layout::parse(spec, 8).unwrap()).unwrap_err().to_string();
        assert!(err.contains(why), "{spec}: {err}");
    }
}

/// The search tries 1 to 4 interleaved parts a stage on every pipeline layout. On DeepSeek-V3's
/// pre-training job (62.9M tokens a step over 2,048 H800) the fastest layout is a pipeline
/// whose stages are interleaved: a vpp-fold smaller bubble for hand-overs that cost less, and
/// no other interleaving of the same layout is faster.
#[test]
fn the_search_interleaves_pipelines_where_the_bubble_costs_more_than_the_hand_overs() {
    let (job, cluster) = deepseek_v3_pretraining();
    let best = &search(&job, &cluster, 1).unwrap()[0];
    assert!(best.layout.pp > 1 && best.layout.vpp > 1, "the fastest layout: {}", best.layout);
    for vpp in (1..=4).filter(|v| *v != best.layout.vpp) {
        let Ok(other) = evaluate(&job, &cluster, &Layout { vpp, ..best.layout }) else { continue };
        assert!(other.time.tokens_per_s <= best.time.tokens_per_s, "{} is slower than vpp={vpp}", best.layout);
    }
    let plain = evaluate(&job, &cluster, &Layout { vpp: 1, ..best.layout }).unwrap();
    within("bubble", best.time.bubble / plain.time.bubble, 1.0 / best.layout.vpp as f64, 1e-9);
    let comm = |e: &kiln_plan::Estimate| e.time.comm.iter().find(|c| c.0 == "pipeline parallel").unwrap().1;
    assert!(comm(best) - comm(&plain) < plain.time.bubble - best.time.bubble, "the hand-overs cost more");
}
