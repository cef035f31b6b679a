//! `kiln grpo run.toml`: RL with verifiable rewards (GRPO, DAPO, Dr. GRPO, GSPO variants).

use crate::run_args::RunArgs;
use anyhow::Result;
use kiln_train::grpo;

pub fn run(args: &RunArgs) -> Result<()> {
    let (config, resume) = args.load()?;
    let s = grpo::run(&config, resume, args.quiet)?;
    println!(
        "{} after {} steps: reward {:.3}, solved {:.3}; {:.0} training tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        s.last.reward,
        s.last.solved,
        s.tokens_per_s,
        s.seconds
    );
    if let Some(e) = s.eval {
        let before = s.eval_before.map_or(String::new(), |b| format!(" (before: {:.3})", b.solved));
        println!("eval: reward {:.3}, solved {:.3}{before}", e.reward, e.solved);
    }
    println!("checkpoint {}\nloss plot {}", s.checkpoint.display(), s.plot.display());
    Ok(())
}
