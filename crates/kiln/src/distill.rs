//! `kiln distill run.toml`: on-policy distillation from a teacher (reverse KL).

use crate::run_args::RunArgs;
use anyhow::Result;
use kiln_train::distill;

pub fn run(args: &RunArgs) -> Result<()> {
    let (config, resume) = args.load()?;
    let s = distill::run(&config, resume, args.quiet)?;
    println!(
        "{} after {} steps: reverse KL {:.4}; {:.0} training tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        s.last.reverse_kl,
        s.tokens_per_s,
        s.seconds
    );
    println!("checkpoint {}\nloss plot {}", s.checkpoint.display(), s.plot.display());
    Ok(())
}
