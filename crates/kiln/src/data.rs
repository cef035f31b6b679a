//! `kiln data inspect run.toml`: what the run's data becomes before any compute is spent.

use anyhow::Result;
use kiln_data::example::Example;
use kiln_train::data::{encode_split, encode_splits, encoder, load_tokenizer};
use kiln_train::loader::DataOrder;
use kiln_train::RunConfig;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Token counts, lengths, packing efficiency and samples with the loss mask shown.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Run configuration (TOML).
    config: PathBuf,
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Samples to print.
    #[arg(long, default_value_t = 3)]
    samples: usize,
}

/// Renders an example with its trainable tokens marked: green on a terminal, else between
/// `[[` and `]]`.
fn highlight(tok: &kiln_data::Tokenizer, e: &Example, color: bool) -> String {
    let (open, close) = if color { ("\x1b[32;1m", "\x1b[0m") } else { ("[[", "]]") };
    let mut out = String::new();
    let mut i = 0;
    while i < e.ids.len() {
        let on = e.trainable[i] && i > 0;
        let start = i;
        while i < e.ids.len() && (e.trainable[i] && i > 0) == on {
            i += 1;
        }
        let text = tok.decode(&e.ids[start..i]);
        if on {
            out.push_str(&format!("{open}{text}{close}"));
        } else {
            out.push_str(&text);
        }
    }
    out
}

fn report(name: &str, examples: &[Example], config: &RunConfig) {
    let tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
    let trainable: usize = examples.iter().map(Example::trainable_targets).sum();
    println!(
        "{name}: {} examples, {tokens} tokens, {trainable} trainable ({:.1}%)",
        examples.len(),
        100.0 * trainable as f64 / tokens.max(1) as f64
    );
    let max = config.data.max_seq_len;
    let buckets = 8;
    let mut hist = vec![0usize; buckets];
    for e in examples {
        hist[((e.ids.len() - 1) * buckets / max).min(buckets - 1)] += 1;
    }
    let peak = hist.iter().copied().max().unwrap_or(1).max(1);
    println!("  length histogram (tokens):");
    for (i, &n) in hist.iter().enumerate() {
        let (lo, hi) = (i * max / buckets + 1, (i + 1) * max / buckets);
        println!("  {lo:>6}-{hi:<6} {n:>7} {}", "#".repeat(n * 40 / peak));
    }
    let order = DataOrder::new(examples, config.rows(), max, config.train.grad_accum, config.train.seed);
    let micro = order.steps_per_epoch() as usize * config.train.grad_accum;
    let rows = kiln_train::loader::pack(examples, 1, max, None).len();
    println!(
        "  packing: {rows} rows of {max} tokens, {:.1}% filled; ~{micro} micro-batches of {} rows, {} optimizer steps per epoch",
        100.0 * tokens as f64 / (rows * max).max(1) as f64,
        config.rows(),
        order.steps_per_epoch()
    );
}

pub fn run(cmd: &Command) -> Result<()> {
    let Command::Inspect(args) = cmd;
    let config = RunConfig::load_resolved(&args.config, &args.overrides).map_err(anyhow::Error::msg)?;
    let (tok, template) = load_tokenizer(&config.model.path)?;
    let encoder = encoder(&config, &tok, template.as_ref());
    if let Some(t) = &template {
        println!("assistant turns of conversations carry the loss; they are found from {}", t.assistant_mask);
    }
    let bad = config.data.max_bad_fraction;
    let (train, eval) = encode_splits(&config, |files, split| encode_split(files, &encoder, bad, split))?;
    report("train", &train, &config);
    if !eval.is_empty() {
        report("eval", &eval, &config);
    }
    let color = std::io::stdout().is_terminal();
    for e in train.iter().take(args.samples) {
        println!("\n--- {} ({} tokens, {} trainable)", e.location, e.ids.len(), e.trainable_targets());
        println!("{}", highlight(&tok, e, color));
    }
    Ok(())
}
