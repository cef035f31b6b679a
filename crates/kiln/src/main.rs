//! `kiln`: full-parameter post-training of large language models.

mod backend_arg;
mod bench;
mod bench_gemm;
mod bench_generate;
mod data;
mod demo;
mod dtype_arg;
mod export;
mod generate;
mod plan;
mod recipes;
mod run_args;
mod score;
mod sft;
mod tokens_file;

use backend_arg::on_backend;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Full-parameter post-training of large language models")]
struct Cli {
    /// Worker threads for the CPU backend (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Seconds any collective of a multi-process run may wait for the other ranks before the
    /// job stops with an error naming the missing ones.
    #[arg(long, global = true, default_value_t = 300.0)]
    comm_timeout: f64,
    /// What computes: cuda when this process finds a GPU (auto), or the one named.
    #[arg(long, global = true, value_enum, default_value_t = backend_arg::BackendArg::Auto)]
    backend: backend_arg::BackendArg,
    /// The GPU to use (CUDA ordinal; default 0).
    #[arg(long, global = true)]
    device: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tiny end-to-end run: SFT of a small arithmetic model, with before/after numbers.
    Demo(demo::Args),
    /// Supervised fine-tuning from a run configuration.
    Sft(run_args::RunArgs),
    /// Preference optimisation (DPO, IPO, hinge, SimPO, ORPO) from a run configuration.
    Dpo(run_args::RunArgs),
    /// RL with verifiable rewards (GRPO and variants) from a run configuration.
    Grpo(run_args::RunArgs),
    /// On-policy distillation from a teacher (reverse KL) from a run configuration.
    Distill(run_args::RunArgs),
    /// Train a reward model (Bradley-Terry on preference pairs) from a run configuration.
    Rm(run_args::RunArgs),
    /// Kahneman-Tversky optimisation on unpaired desirable/undesirable completions.
    Kto(run_args::RunArgs),
    /// Write a checkpoint out as a Hugging Face model directory.
    Export(export::Args),
    /// Look at a run's data before training on it.
    #[command(subcommand)]
    Data(data::Command),
    /// Generate: interactive chat, or a batch of prompts from a JSONL file.
    Generate(generate::Args),
    /// Per-token log-probabilities of token sequences under a model.
    Score(score::Args),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::Command),
    /// Size a post-training job for a cluster: parameters, memory per device, step time.
    Plan(plan::Args),
}

/// glibc returns large freed blocks to the kernel at once (mmap/munmap), so a buffer that a
/// library allocates per call (gemm's packing space) is page-faulted in again every call,
/// with TLB shootdowns across threads. Keep freed memory in the heap instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's ceiling on 64-bit
        mallopt(M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    kiln_core::cpu::threads::init(cli.threads)?;
    let (_mpi, world) = kiln_dist::init(std::time::Duration::from_secs_f64(cli.comm_timeout))?;
    match cli.command {
        Command::Demo(args) => on_backend!(cli, world, |rt| demo::run(&args, rt)),
        Command::Sft(args) => on_backend!(cli, world, |rt| sft::run(&args, rt)),
        Command::Dpo(args) => on_backend!(cli, world, |rt| recipes::dpo(&args, rt)),
        Command::Rm(args) => on_backend!(cli, world, |rt| recipes::rm(&args, rt)),
        Command::Kto(args) => on_backend!(cli, world, |rt| recipes::kto(&args, rt)),
        Command::Grpo(args) => on_backend!(cli, world, |rt| recipes::grpo(&args, rt)),
        Command::Distill(args) => on_backend!(cli, world, |rt| recipes::distill(&args, rt)),
        Command::Export(args) => export::run(&args),
        Command::Data(cmd) => data::run(&cmd),
        Command::Score(args) => on_backend!(cli, world, |rt| score::run(&args, &rt.b)),
        Command::Generate(args) => on_backend!(cli, world, |rt| generate::run(&args, &rt.b)),
        Command::Bench(bench::Command::Train(args)) => on_backend!(cli, world, |rt| bench::train(&args, rt)),
        Command::Bench(cmd) => on_backend!(cli, world, |rt| bench::run(&cmd, &rt.b)),
        Command::Plan(args) => plan::run(&args),
    }
}
