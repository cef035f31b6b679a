//! `kiln sft run.toml`: supervised fine-tuning.

use crate::run_args::RunArgs;
use anyhow::Result;
use kiln_train::sft;

pub fn run(args: &RunArgs) -> Result<()> {
    let (config, resume) = args.load()?;
    let s = sft::run(&config, resume, args.quiet)?;
    if !kiln_dist::world().is_root() {
        return Ok(());
    }
    let eval = s.eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4}"));
    println!(
        "{} after {} steps: loss {:.4}{eval}; {:.0} tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        s.last_loss,
        s.tokens_per_s,
        s.seconds
    );
    println!("checkpoint {}\nplot {}", s.checkpoint.display(), s.plot.display());
    Ok(())
}
