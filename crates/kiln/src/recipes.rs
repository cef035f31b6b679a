//! `kiln dpo`, `kiln rm`, `kiln kto`, `kiln grpo` and `kiln distill`: run a recipe from a run file and
//! say how it ended. (`kiln sft` keeps its own module for the SFT summary.)

use crate::run_args::RunArgs;
use anyhow::Result;
use kiln_core::Backend;
use kiln_train::session::RunSummary;
use kiln_train::{distill, dpo, grpo, kto, rm, Runtime};

/// Prints how a run ended (on rank 0); `describe` renders a step's (or an evaluation's)
/// statistics and `headline` picks the number shown for the evaluation before training.
fn report<S>(root: bool, s: &RunSummary<S>, describe: impl Fn(&S) -> String, headline: impl Fn(&S) -> f64) {
    if !root {
        return;
    }
    println!(
        "{} after {} steps: {}; {:.0} training tokens/s over {:.1} s",
        if s.interrupted { "interrupted" } else { "done" },
        s.steps,
        describe(&s.last),
        s.tokens_per_s,
        s.seconds
    );
    if let Some(e) = &s.eval {
        let before = s.eval_before.as_ref().map_or(String::new(), |b| format!(" (before: {:.3})", headline(b)));
        println!("eval: {}{before}", describe(e));
    }
    println!("checkpoint {}\nplot {}", s.checkpoint.display(), s.plot.display());
}

pub fn dpo<B: Backend>(args: &RunArgs, rt: Runtime<B>) -> Result<()> {
    let (config, resume) = args.load()?;
    let root = rt.world.is_root();
    let s = dpo::run(rt, &config, resume, args.quiet)?;
    report(root, &s, |x| format!("loss {:.4}, reward accuracy {:.3}", x.loss, x.accuracy), |x| x.accuracy);
    Ok(())
}

pub fn rm<B: Backend>(args: &RunArgs, rt: Runtime<B>) -> Result<()> {
    let (config, resume) = args.load()?;
    let root = rt.world.is_root();
    let s = rm::run(rt, &config, resume, args.quiet)?;
    report(root, &s, |x| format!("loss {:.4}, accuracy {:.3}", x.loss, x.accuracy), |x| x.accuracy);
    Ok(())
}

pub fn grpo<B: Backend>(args: &RunArgs, rt: Runtime<B>) -> Result<()> {
    let (config, resume) = args.load()?;
    let root = rt.world.is_root();
    let s = grpo::run(rt, &config, resume, args.quiet)?;
    report(root, &s, |x| format!("reward {:.3}, solved {:.3}", x.reward, x.solved), |x| x.solved);
    Ok(())
}

pub fn distill<B: Backend>(args: &RunArgs, rt: Runtime<B>) -> Result<()> {
    let (config, resume) = args.load()?;
    let root = rt.world.is_root();
    let s = distill::run(rt, &config, resume, args.quiet)?;
    report(root, &s, |x| format!("reverse KL {:.4}", x.reverse_kl), |x| x.reverse_kl);
    Ok(())
}

pub fn kto<B: Backend>(args: &RunArgs, rt: Runtime<B>) -> Result<()> {
    let (config, resume) = args.load()?;
    let root = rt.world.is_root();
    let s = kto::run(rt, &config, resume, args.quiet)?;
    report(
        root,
        &s,
        |x| format!("loss {:.4}, KL {:.4}, reward margin {:.3}", x.loss, x.kl, x.margin()),
        |x| x.margin(),
    );
    Ok(())
}
