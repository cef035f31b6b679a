//! `kiln sft run.toml`: supervised fine-tuning.

use crate::run_args::RunArgs;
use anyhow::Result;
use kiln_core::Backend;
use kiln_train::{sft, Runtime};

pub fn run<B: Backend>(args: &RunArgs, rt: Runtime<B>) -> Result<()> {
    let (config, resume) = args.load()?;
    let root = rt.world.is_root();
    let s = sft::run(rt, &config, resume, args.quiet)?;
    if !root {
        return Ok(());
    }
    let eval = s.eval.map_or(String::new(), |e| format!(", eval loss {:.4}", e.loss));
    println!(
        "{} after {} steps: loss {:.4}{eval}; {:.0} tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        s.last.loss,
        s.tokens_per_s,
        s.seconds
    );
    println!("checkpoint {}\nplot {}", s.checkpoint.display(), s.plot.display());
    Ok(())
}
