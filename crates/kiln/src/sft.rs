//! `kiln sft run.toml`: supervised fine-tuning.

use anyhow::Result;
use kiln_train::sft::{self, Resume};
use kiln_train::RunConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Run configuration (TOML).
    config: PathBuf,
    /// Override a key: --set train.lr=1e-5 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest checkpoint of the run, or from the checkpoint given.
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    resume: Option<Option<PathBuf>>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let config = RunConfig::load_resolved(&args.config, &args.overrides).map_err(anyhow::Error::msg)?;
    let resume = args.resume.clone().map(|r| r.map_or(Resume::Latest, Resume::From));
    let s = sft::run(&config, resume, args.quiet)?;
    let eval = s.eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}"));
    println!(
        "{} after {} steps: loss {:.4}{eval}; {:.0} tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        s.last_loss,
        s.tokens_per_s,
        s.seconds
    );
    println!("checkpoint {}\nloss plot {}", s.checkpoint.display(), s.plot.display());
    Ok(())
}
