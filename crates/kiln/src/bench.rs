//! `kiln bench train`: time forward + backward + AdamW steps on one batch shape; `kiln bench
//! moe`: the MoE layer against a dense MLP; `kiln bench generate` and `kiln bench gemm` live in
//! `bench_generate` and `bench_gemm`.

use anyhow::Result;
use kiln_core::{rng::Rng, AdamW, Backend};
use kiln_model::{Activations, Batch, Config, Model};
use kiln_train::data_parallel::DataParallel;
use kiln_train::Runtime;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Time training steps (forward, backward, AdamW) after warm-up.
    Train(TrainArgs),
    /// Time a DeepSeekMoE layer (forward + backward) against a dense SwiGLU MLP with the same
    /// active FLOPs (intermediate = top_k · expert_ff).
    Moe(MoeArgs),
    /// Time batched generation with the KV-cache generator (new tokens per second).
    Generate(crate::bench_generate::GenerateArgs),
    /// Time the matrix products of a training step in f32 and with bf16 inputs.
    Gemm(crate::bench_gemm::GemmArgs),
}

#[derive(clap::Args)]
pub struct MoeArgs {
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    #[arg(long, default_value_t = 16)]
    experts: usize,
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// Width of one routed expert.
    #[arg(long, default_value_t = 352)]
    expert_ff: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Hugging Face model directory to load.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    model: Option<PathBuf>,
    /// config.json of a randomly initialised model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Recompute each layer's activations in backward instead of keeping them.
    #[arg(long)]
    recompute: bool,
    /// Inputs of the matrix products: f32, bf16 (mixed precision) or auto, as `train.dtype`.
    #[arg(long, value_enum, default_value_t = crate::dtype_arg::DtypeArg::Auto)]
    dtype: crate::dtype_arg::DtypeArg,
    /// The optimizer, as `train.optimizer`: adamw, or muon (default settings).
    #[arg(long, default_value = "adamw", value_parser = ["adamw", "muon"])]
    optimizer: String,
    /// Under mpirun, start the gradients' reduction during backward instead of after it
    /// (`train.overlap_grad_reduce`).
    #[arg(long)]
    overlap: bool,
    /// Under mpirun, ZeRO stage 0, 1 (AdamW's moments sharded over the ranks, the gradients
    /// reduce-scattered) or 2 (the gradients sharded too, reduced as backward hands each layer
    /// over), as `train.zero`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    zero: u8,
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Matrix-product FLOPs of one training step: 6 per parameter per token for the linear
/// layers, plus causal attention (QKᵀ and PV: 2·2·T²/2·d per head per row, ×3 with backward).
fn step_flops(c: &Config, rows: usize, seq: usize) -> f64 {
    let tokens = (rows * seq) as f64;
    let (d, ff, hd) = (c.hidden_size as f64, c.intermediate_size as f64, c.head_dim as f64);
    let (qd, kvd) = (c.num_heads as f64 * hd, c.num_kv_heads as f64 * hd);
    let per_layer = d * (2.0 * qd + 2.0 * kvd) + 3.0 * d * ff;
    let linear = 6.0 * tokens * (c.num_layers as f64 * per_layer + d * c.vocab_size as f64);
    let attention = 3.0 * 2.0 * (rows as f64) * (seq as f64).powi(2) * qd * c.num_layers as f64;
    linear + attention
}

/// Every benchmark but `train` (which needs the job's ranks) on the backend `b`.
pub fn run<B: Backend>(cmd: &Command, b: &B) -> Result<()> {
    match cmd {
        Command::Train(_) => unreachable!("main runs bench train with the job's ranks"),
        Command::Moe(args) => moe(args, b),
        Command::Generate(args) => crate::bench_generate::run(args, b),
        Command::Gemm(args) => crate::bench_gemm::run(args, b),
    }
}

/// Median seconds of `steps` calls of `f` after two warm-up calls.
pub(crate) fn median_time(steps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut times: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn moe<B: Backend>(args: &MoeArgs, b: &B) -> Result<()> {
    use kiln_core::Routing;
    use kiln_model::layers::mlp::{self, MlpActs, MlpGrads};
    use kiln_model::layers::moe::{self, MoeActs, MoeGrads, MoeShape};
    use kiln_model::weights::{MlpWeights, MoeWeights};
    let (n, d, e, k, ff) = (args.tokens, args.hidden, args.experts, args.top_k, args.expert_ff);
    let groups = if e.is_multiple_of(4) && e / 4 >= 2 { 4 } else { 1 };
    let routing = Routing {
        scoring: kiln_core::Scoring::Sigmoid,
        fixed: false,
        tokens: n,
        experts: e,
        top_k: k,
        groups,
        top_groups: groups.clamp(1, 2),
        normalize: true,
        scale: 1.0,
    };
    anyhow::ensure!(k <= routing.top_groups * (e / groups), "--top-k {k} is more than the experts of the kept groups");
    let shape = MoeShape {
        hidden: d,
        expert_ff: ff,
        experts: e,
        shared_ff: 0,
        routing,
        precision: kiln_core::Precision::F32,
        limit: f32::INFINITY,
    };
    let mut rng = Rng::new(0);
    let mut init = |len: usize| b.upload(&rng.normal_vec(len, 0.05));
    let w = MoeWeights {
        router: init(e * d),
        bias: Some(b.zeros(e)),
        gate: init(e * ff * d),
        up: init(e * ff * d),
        down: init(e * d * ff),
        shared_gate: None,
        shared_up: None,
        shared_down: None,
    };
    let mut g = MoeWeights {
        router: b.zeros(e * d),
        bias: Some(b.zeros(e)),
        gate: b.zeros(e * ff * d),
        up: b.zeros(e * ff * d),
        down: b.zeros(e * d * ff),
        shared_gate: None,
        shared_up: None,
        shared_down: None,
    };
    let (x, dout) = (init(n * d), init(n * d));
    let (mut out, mut dx) = (b.zeros(n * d), b.zeros(n * d));
    let mut acts = MoeActs::new(b, &shape, n);
    let mut scratch = MoeGrads::new(b, &shape, n);
    let (w, mut g) = (w.map(&mut |t| &**t), g.map_mut(&mut |t| &mut **t));
    let moe_s = median_time(args.steps, || {
        moe::forward(b, &shape, &w, &x, Some(&mut out), &mut acts, None);
        moe::backward(b, &shape, &w, &x, &dout, &mut dx, &mut g, &acts, &mut scratch, None, None);
        b.synchronize();
    });

    // The dense SwiGLU MLP doing the same active work: intermediate = top_k · expert_ff.
    let i = k * ff;
    let none = || None;
    let w = MlpWeights {
        gate: init(i * d),
        up: init(i * d),
        down: init(d * i),
        gate_bias: none(),
        up_bias: none(),
        down_bias: none(),
    };
    let mut g = w.map(&mut |t| b.zeros(b.len(t)));
    let (w, mut g) = (w.map(&mut |t| &**t), g.map_mut(&mut |t| &mut **t));
    let mut acts = MlpActs::new(b, n, i);
    let mut scratch = MlpGrads::new(b, n, i);
    let dense_s = median_time(args.steps, || {
        mlp::forward(b, kiln_core::Precision::F32, &w, &x, Some(&mut out), &mut acts, (n, d, i));
        mlp::backward(b, kiln_core::Precision::F32, &w, &x, &dout, &mut dx, &mut g, &acts, &mut scratch, (n, d, i));
        b.synchronize();
    });
    println!(
        "kiln bench moe on {}: {n} tokens, hidden {d}, {e} experts of width {ff}, top-{k}, {} threads",
        b.device(),
        rayon::current_num_threads()
    );
    println!("  MoE layer  fwd+bwd median {:.2} ms", moe_s * 1e3);
    println!("  dense MLP  fwd+bwd median {:.2} ms (intermediate {i}, same active FLOPs)", dense_s * 1e3);
    println!("  ratio      {:.2}x", moe_s / dense_s);
    Ok(())
}

pub fn train<B: Backend>(args: &TrainArgs, rt: Runtime<B>) -> Result<()> {
    let Runtime { b, world: comm } = rt;
    let mut model = match (&args.model, &args.config) {
        (Some(dir), _) => Model::load(&b, dir)?,
        (None, Some(config)) => Model::random(&b, Config::load(config)?, 0),
        (None, None) => unreachable!("clap requires --model or --config"),
    };
    model.set_matmul_precision(args.dtype.precision(&b));
    let c = model.config.clone();
    // Under mpirun: data parallel, `--batch` sequences per rank, gradients summed over ranks.
    let mut rng = Rng::new(1 + comm.rank() as u64);
    let sequences: Vec<Vec<i32>> =
        (0..args.batch).map(|_| (0..args.seq).map(|_| rng.below(c.vocab_size) as i32).collect()).collect();
    let batch = Batch::causal_lm(&sequences);
    let mut acts = Activations::new(&b, &c, batch.rows, batch.seq, true, args.recompute);
    let hyper = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 0 };
    let muon = (args.optimizer == "muon").then(kiln_train::muon::MuonSettings::default);
    let mut dp = DataParallel::new(&b, &model, (&comm, None), args.zero, hyper, muon);
    dp.overlap_grad_reduce(args.overlap);

    let mut times = Vec::with_capacity(args.steps);
    let mut comm_times = Vec::with_capacity(args.steps);
    let mut update_times = Vec::with_capacity(args.steps);
    let mut losses = Vec::new();
    dp.what = "bench gradients".into();
    for step in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        dp.zero_grads(&b);
        dp.last_backward_next();
        let loss = model.forward_backward(&b, &mut acts, &batch, &mut dp);
        let t_comm = Instant::now();
        dp.start_reduce(&b)?;
        dp.reduce(&b)?;
        let comm_s = t_comm.elapsed().as_secs_f64();
        b.synchronize();
        let t_update = Instant::now();
        dp.step(&b, &mut model.params, 1e-4, 1.0)?;
        b.synchronize();
        let dt = t0.elapsed().as_secs_f64();
        losses.push(loss);
        if step >= args.warmup {
            times.push(dt);
            comm_times.push(comm_s);
            update_times.push(t_update.elapsed().as_secs_f64());
        }
    }
    if !comm.is_root() {
        return Ok(());
    }
    times.sort_by(f64::total_cmp);
    comm_times.sort_by(f64::total_cmp);
    update_times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tokens = (batch.tokens() * comm.size()) as f64;
    let flops = step_flops(&c, batch.rows, batch.seq) * comm.size() as f64;
    println!(
        "kiln bench train: {} params, batch {}x{}{}, {}, {} threads, recompute {}, matrix products {:?}",
        c.num_parameters(),
        batch.rows,
        batch.seq,
        if comm.size() > 1 { format!(" on each of {} ranks", comm.size()) } else { String::new() },
        b.device(),
        rayon::current_num_threads(),
        args.recompute,
        model.matmul_precision()
    );
    if comm.size() > 1 {
        let comm_median = comm_times[comm_times.len() / 2];
        let reduction = match (args.zero, args.overlap) {
            (0, false) => "gradient all-reduce after backward",
            (0, true) => "gradient all-reduce after backward (what backward left of the buckets)",
            (1, false) => "gradient reduce-scatter after backward",
            (1, true) => "gradient reduce-scatter after backward (what backward left of the buckets)",
            (_, false) => "ZeRO-2: gradient reduce-scatters after backward (none: backward waits for each)",
            (_, true) => "ZeRO-2: gradient reduce-scatters after backward (what backward left under way)",
        };
        println!(
            "  comm      {reduction} median {:.1} ms, {:.1}% of the median step",
            comm_median * 1e3,
            100.0 * comm_median / median
        );
    }
    println!(
        "  step      median {:.1} ms, mean {:.1} ms, min {:.1} ms ({} steps)",
        median * 1e3,
        mean * 1e3,
        times[0] * 1e3,
        times.len()
    );
    let update = update_times[update_times.len() / 2];
    println!(
        "  update    {}{} median {:.1} ms, {:.1}% of the median step",
        dp.describe_optimizer().trim_start_matches("optimizer: "),
        if dp.sharded { " on this rank's shard, then the weights' all-gather" } else { "" },
        update * 1e3,
        100.0 * update / median
    );
    println!(
        "  speed     {:.0} tokens/s (median), {:.1} GFLOP/s of matrix products",
        tokens / median,
        flops / median / 1e9
    );
    println!("  loss      {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
    if let Some(bytes) = b.peak_device_memory() {
        println!("  peak device memory  {:.0} MiB", bytes as f64 / (1u64 << 20) as f64);
    }
    match peak_rss_mib() {
        Some(mib) => println!("  peak RSS  {mib:.0} MiB"),
        None => println!("  peak RSS  unavailable on this platform"),
    }
    Ok(())
}
