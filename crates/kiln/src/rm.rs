//! `kiln rm run.toml`: reward modelling (Bradley-Terry).

use anyhow::Result;
use kiln_train::rm;
use kiln_train::session::Resume;
use kiln_train::RunConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Run configuration (TOML) (an optional [rm] section).
    config: PathBuf,
    /// Override a key: --set rm.margin=0.5 (repeatable).
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
    let s = rm::run(&config, resume, args.quiet)?;
    println!(
        "{} after {} steps: loss {:.4}, accuracy {:.3}; {:.0} tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        s.last.loss,
        s.last.accuracy,
        s.tokens_per_s,
        s.seconds
    );
    if let Some(e) = s.eval {
        let before = s.eval_before.map_or(String::new(), |b| format!(" (before: {:.3})", b.accuracy));
        println!("eval: loss {:.4}, accuracy {:.3}{before}", e.loss, e.accuracy);
    }
    println!("checkpoint {}\nloss plot {}", s.checkpoint.display(), s.plot.display());
    Ok(())
}
