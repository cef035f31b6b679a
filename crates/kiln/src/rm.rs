//! `kiln rm run.toml`: reward modelling (Bradley-Terry).

use crate::run_args::RunArgs;
use anyhow::Result;
use kiln_train::rm;

pub fn run(args: &RunArgs) -> Result<()> {
    let (config, resume) = args.load()?;
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
