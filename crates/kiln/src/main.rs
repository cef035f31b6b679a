//! `kiln`: full-parameter post-training of large language models.

mod bench;
mod score;
mod tokens_file;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Full-parameter post-training of large language models")]
struct Cli {
    /// Worker threads for the CPU backend (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-token log-probabilities of token sequences under a model.
    Score(score::Args),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::Command),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    match cli.command {
        Command::Score(args) => score::run(&args),
        Command::Bench(cmd) => bench::run(&cmd),
    }
}
