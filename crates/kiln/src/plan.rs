//! `kiln plan`: parameter counts of a model, and the layouts of a cluster that fit a
//! post-training job, ranked by estimated throughput.

use anyhow::{Context, Result};
use kiln_plan::memory::EXPLAIN as MEMORY_TERMS;
use kiln_plan::model::ParamCounts;
use kiln_plan::search::USABLE_HBM;
use kiln_plan::time::EXPLAIN as TIME_TERMS;
use kiln_plan::{
    evaluate, search, Cluster, Estimate, Job, Layout, Method, ModelShape, Optimizer, StageCut, Storage, GB,
};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face config.json, or a model directory holding one.
    #[arg(long)]
    model: PathBuf,
    /// COUNTxDEVICE (e.g. 1000x910c, 256xh800) or a cluster TOML file.
    #[arg(long)]
    cluster: String,
    /// sft, dpo, grpo or distill.
    #[arg(long, default_value = "sft")]
    method: String,
    /// Tokens per sequence (prompt + completion for grpo/distill).
    #[arg(long, default_value_t = 4096)]
    seq: u64,
    /// Trained tokens per optimizer step over the whole cluster.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    global_batch_tokens: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    micro_batch: u64,
    /// adamw or muon.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// How weights and gradients are stored: mixed (bf16 with an f32 master copy, as
    /// accelerators train) or f32 (kiln's engine, to compare with a kiln run's memory).
    #[arg(long, default_value = "mixed")]
    storage: String,
    /// Assumed fraction of peak bf16 throughput achieved in matrix products.
    #[arg(long, default_value_t = 0.40)]
    efficiency: f64,
    /// Assumed fraction of communication hidden behind computation.
    #[arg(long, default_value_t = 0.8)]
    overlap: f64,
    /// Evaluate this layout only: dp=..,tp=..,pp=..,ep=..,zero=..,recompute=none|selective|full,sp=on|off.
    #[arg(long)]
    layout: Option<String>,
    /// Where pipeline parallel cuts the layers (`train.pp_layers`): even, balanced (by the
    /// layers' and the head's matrix weights per token), or each stage's layers (9,9,8,6:
    /// only layouts with that many stages).
    #[arg(long, default_value = "even")]
    pp_layers: String,
    /// distill: the teacher's config.json (default: the student's shape).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// grpo: no KL term, so no reference model is resident.
    #[arg(long)]
    no_reference: bool,
    /// How many layouts to list.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Explain every term of the estimate, with the best layout's breakdown.
    #[arg(long)]
    explain: bool,
}

fn config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    }
}

pub fn run(args: &Args) -> Result<()> {
    let model = ModelShape::load(&config_path(&args.model))?;
    let cluster = Cluster::parse(&args.cluster)?;
    let mut job = Job::new(model, Method::parse(&args.method)?);
    job.seq = args.seq as f64;
    job.global_batch_tokens = args.global_batch_tokens as f64;
    job.micro_batch_seqs = args.micro_batch.max(1) as f64;
    job.optimizer = Optimizer::parse(&args.optimizer)?;
    job.storage = Storage::parse(&args.storage)?;
    job.efficiency = args.efficiency;
    job.overlap = args.overlap;
    job.reference = job.method == Method::Grpo && !args.no_reference;
    job.stage_cut = StageCut::parse(&args.pp_layers).context("--pp-layers")?;
    if !(0.0..=1.0).contains(&job.efficiency) || job.efficiency == 0.0 || !(0.0..=1.0).contains(&job.overlap) {
        anyhow::bail!("--efficiency must be in (0, 1] and --overlap in [0, 1]");
    }
    if let Some(t) = &args.teacher {
        job.teacher = Some(ModelShape::load(&config_path(t))?);
    }
    // The parameter count first: it is what a user needs most when nothing fits.
    if !args.json {
        print_params(&job.model);
        println!();
    }
    let estimates = match &args.layout {
        Some(spec) => {
            let layout = Layout::parse(spec, cluster.count)?;
            vec![evaluate(&job, &cluster, &layout).with_context(|| format!("layout `{spec}`"))?]
        }
        None => search(&job, &cluster, args.top)?,
    };
    if args.json {
        let out = json!({
            "model": params_json(&job.model),
            "cluster": cluster,
            "job": {
                "method": job.method, "seq": job.seq, "global_batch_tokens": job.global_batch_tokens,
                "micro_batch_seqs": job.micro_batch_seqs, "optimizer": job.optimizer, "storage": job.storage,
                "efficiency": job.efficiency, "overlap": job.overlap, "reference": job.reference,
                "pp_layers": args.pp_layers,
            },
            "usable_hbm_fraction": USABLE_HBM,
            "layouts": estimates.iter().map(|e| json!({
                "estimate": e,
                "hours_per_billion_tokens": e.hours_per_billion_tokens(),
                "device_hours_per_trillion_tokens": e.device_hours_per_trillion_tokens(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} on {} x {} ({:.0} GB HBM, {:.0}% usable, {:.0} TFLOP/s bf16 at {:.0}% efficiency), seq {}, {} tokens a step, {}",
        args.method,
        cluster.count,
        cluster.device.name,
        cluster.device.hbm_gb,
        USABLE_HBM * 100.0,
        cluster.device.bf16_tflops,
        job.efficiency * 100.0,
        args.seq,
        args.global_batch_tokens,
        args.optimizer
    );
    println!();
    println!("| layout | devices | memory/device | fits | step | tokens/s | hours per 1B tokens |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for e in &estimates {
        println!(
            "| {} | {} | {:.1} GB | {} | {:.2} s | {:.0} | {:.2} |",
            e.layout,
            e.layout.devices(),
            e.memory.peak / GB,
            e.reason.as_deref().map_or("yes".to_string(), |r| format!("no: {r}")),
            e.time.step,
            e.time.tokens_per_s,
            e.hours_per_billion_tokens()
        );
    }
    if args.explain || args.layout.is_some() {
        print_breakdown(&estimates[0]);
    }
    if args.explain {
        println!("\nWhat each term counts:");
        for (name, text) in MEMORY_TERMS.iter().chain(TIME_TERMS) {
            println!("  {name}: {text}");
        }
    }
    Ok(())
}

fn params_json(m: &ModelShape) -> serde_json::Value {
    let kinds = |p: &ParamCounts| {
        json!({
            "embedding": p.embedding, "lm_head": p.lm_head, "attention": p.attention, "dense_mlp": p.dense_mlp,
            "shared_experts": p.shared_experts, "routed_experts": p.routed_experts, "router": p.router,
            "other": p.other, "total": p.total(),
        })
    };
    json!({"model_type": m.model_type, "total": m.params.total(), "active": m.active,
           "by_kind": kinds(&m.params), "mtp": kinds(&m.mtp)})
}

fn billions(x: f64) -> String {
    if x >= 1e11 {
        format!("{:.0}B", x / 1e9)
    } else {
        format!("{:.2}B", x / 1e9)
    }
}

fn print_params(m: &ModelShape) {
    let p = &m.params;
    println!(
        "{}: {} parameters, {} active per token (MTP layers: {} more)",
        m.model_type,
        billions(p.total()),
        billions(m.active),
        billions(m.mtp.total())
    );
    for (kind, n) in [
        ("embedding", p.embedding),
        ("lm head", p.lm_head),
        ("attention", p.attention),
        ("dense MLP", p.dense_mlp),
        ("shared experts", p.shared_experts),
        ("routed experts", p.routed_experts),
        ("routers", p.router),
        ("norms and other", p.other),
    ] {
        if n > 0.0 {
            println!("  {kind:<16} {:>10}", billions(n));
        }
    }
}

fn print_breakdown(e: &Estimate) {
    println!("\n{}:", e.layout);
    if e.stage_layers.len() > 1 {
        let cut: Vec<String> = e.stage_layers.iter().map(usize::to_string).collect();
        println!("  pipeline stages of {} layers", cut.join(" + "));
    }
    println!(
        "  parameters per device: {} outside routed experts, {} in them (before ZeRO sharding)",
        billions(e.memory.params_non_expert),
        billions(e.memory.params_expert)
    );
    for t in &e.memory.terms {
        if t.bytes > 0.0 {
            println!("  {:<18} {:>8.2} GB", t.name, t.bytes / GB);
        }
    }
    println!("  {:<18} {:>8.2} GB (usable {:.1} GB)", "peak", e.memory.peak / GB, e.usable / GB);
    let t = &e.time;
    println!("  step {:.2} s:", t.step);
    for (name, s) in [("compute", t.compute), ("recompute", t.recompute), ("bubble", t.bubble), ("rollout", t.rollout)]
    {
        if s > 0.0 {
            println!("    {name:<20} {s:>8.2} s");
        }
    }
    for (name, s) in &t.comm {
        if *s > 0.0 {
            println!("    {name:<20} {s:>8.2} s before overlap");
        }
    }
    println!("    {:<20} {:>8.2} s", "exposed communication", t.exposed_comm);
    println!(
        "  {:.0} tokens/s, {:.2} hours per billion tokens, {:.0} device-hours per trillion tokens",
        t.tokens_per_s,
        e.hours_per_billion_tokens(),
        e.device_hours_per_trillion_tokens()
    );
}
