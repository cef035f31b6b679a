//! `kiln data inspect run.toml`: what the run's data becomes before any compute is spent, read
//! as the run's recipe reads it (SFT rows; preference pairs for `[dpo]`/`[rm]`; unpaired
//! completions for `[kto]`; prompts for `[grpo]`/`[distill]`).

use anyhow::Result;
use kiln_data::example::{Encoder, Example};
use kiln_data::prompts::read_prompts;
use kiln_data::unpaired::LabeledCompletion;
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_train::data::{encode_split, encode_splits, encoder, load_tokenizer};
use kiln_train::kto::encode_unpaired;
use kiln_train::loader::DataOrder;
use kiln_train::preference::{preference_splits, prompt_completion};
use kiln_train::RunConfig;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Token counts, lengths, packing efficiency and samples with the loss mask shown, for
    /// the rows of any recipe.
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

/// Counts and a length histogram of `examples`; returns their tokens.
fn summary(name: &str, what: &str, examples: &[Example], max: usize) -> usize {
    let tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
    let trainable: usize = examples.iter().map(Example::trainable_targets).sum();
    println!(
        "{name}: {} {what}, {tokens} tokens, {trainable} trainable ({:.1}%)",
        examples.len(),
        100.0 * trainable as f64 / tokens.max(1) as f64
    );
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
    tokens
}

/// SFT examples: counts, lengths, and how they pack.
fn report(name: &str, examples: &[Example], config: &RunConfig) {
    let max = config.data.max_seq_len;
    let tokens = summary(name, "examples", examples, max);
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

/// What a run's rows are, by the recipe section its configuration has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    Sft,
    Pairs,
    Unpaired,
    Prompts,
}

impl Rows {
    fn of(config: &RunConfig) -> Self {
        if config.kto.is_some() {
            Self::Unpaired
        } else if config.dpo.is_some() || config.rm.is_some() {
            Self::Pairs
        } else if config.grpo.is_some() || config.distill.is_some() {
            Self::Prompts
        } else {
            Self::Sft
        }
    }
}

fn inspect_sft(config: &RunConfig, encoder: &Encoder, tok: &Tokenizer, samples: usize, color: bool) -> Result<()> {
    if let Some(t) = encoder.template {
        println!("assistant turns of conversations carry the loss; they are found from {}", t.assistant_mask());
    }
    let bad = config.data.max_bad_fraction;
    let (train, eval) = encode_splits(config, |files, split| encode_split(files, encoder, bad, split))?;
    report("train", &train, config);
    if !eval.is_empty() {
        report("eval", &eval, config);
    }
    for e in train.iter().take(samples) {
        println!("\n--- {} ({} tokens, {} trainable)", e.location, e.ids.len(), e.trainable_targets());
        println!("{}", highlight(tok, e, color));
    }
    Ok(())
}

/// Preference pairs (`[dpo]`, `[rm]`): examples `2k` (chosen) and `2k + 1` (rejected).
fn inspect_pairs(
    config: &RunConfig,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    samples: usize,
    color: bool,
) -> Result<()> {
    let (train, eval) = preference_splits(config, tok, template)?;
    let max = config.data.max_seq_len;
    summary("train", "answers (chosen and rejected)", &train.examples, max);
    if !eval.examples.is_empty() {
        summary("eval", "answers (chosen and rejected)", &eval.examples, max);
    }
    for (k, pair) in train.examples.chunks(2).take(samples).enumerate() {
        let margin = train.margins[k].map(|m| format!(", margin {m}")).unwrap_or_default();
        println!(
            "\n--- {} (chosen {} tokens, rejected {}{margin})",
            pair[0].location,
            pair[0].ids.len(),
            pair[1].ids.len()
        );
        println!("chosen:   {}", highlight(tok, &pair[0], color));
        println!("rejected: {}", highlight(tok, &pair[1], color));
    }
    Ok(())
}

/// Unpaired completions (`[kto]`), each labelled desirable or not.
fn inspect_unpaired(config: &RunConfig, encoder: &Encoder, tok: &Tokenizer, samples: usize, color: bool) -> Result<()> {
    let bad = config.data.max_bad_fraction;
    let (train, eval) = encode_splits(config, |files, split| encode_unpaired(files, encoder, bad, split))?;
    let example = |c: &LabeledCompletion| prompt_completion(&c.prompt, &c.completion, &c.location);
    let max = config.data.max_seq_len;
    for (name, split) in [("train", &train), ("eval", &eval)].into_iter().filter(|(_, s)| !s.is_empty()) {
        let desirable = split.iter().filter(|c| c.label).count();
        let what = format!("completions ({desirable} desirable, {} undesirable)", split.len() - desirable);
        summary(name, &what, &split.iter().map(example).collect::<Vec<_>>(), max);
    }
    for c in train.iter().take(samples) {
        let label = if c.label { "desirable" } else { "undesirable" };
        println!("\n--- {} ({label}, {} tokens)", c.location, c.prompt.len() + c.completion.len());
        println!("{}", highlight(tok, &example(c), color));
    }
    Ok(())
}

/// Prompts (`[grpo]`, `[distill]`) as the generator receives them.
fn inspect_prompts(config: &RunConfig, tok: &Tokenizer, template: Option<&ChatTemplate>, samples: usize) -> Result<()> {
    let train = read_prompts(&config.data.train, tok, template)?;
    let tokens: Vec<usize> = train.iter().map(|p| p.ids.len()).collect();
    println!(
        "train: {} prompts, {} tokens, longest {}; {} with a reference answer",
        train.len(),
        tokens.iter().sum::<usize>(),
        tokens.iter().max().copied().unwrap_or(0),
        train.iter().filter(|p| p.answer.is_some()).count()
    );
    for p in train.iter().take(samples) {
        println!("\n--- {} ({} tokens)", p.location, p.ids.len());
        println!("{}", p.text);
        if let Some(a) = &p.answer {
            println!("answer: {a}");
        }
        if !p.columns.is_empty() {
            println!("columns for rewards: {}", serde_json::Value::Object(p.columns.clone()));
        }
    }
    Ok(())
}

pub fn run(cmd: &Command) -> Result<()> {
    let Command::Inspect(args) = cmd;
    let config = RunConfig::load_resolved(&args.config, &args.overrides).map_err(anyhow::Error::msg)?;
    let (tok, template) = load_tokenizer(&config.model.path)?;
    let encoder = encoder(&config, &tok, template.as_ref());
    let color = std::io::stdout().is_terminal();
    match Rows::of(&config) {
        Rows::Sft => inspect_sft(&config, &encoder, &tok, args.samples, color),
        Rows::Pairs => inspect_pairs(&config, &tok, template.as_ref(), args.samples, color),
        Rows::Unpaired => inspect_unpaired(&config, &encoder, &tok, args.samples, color),
        Rows::Prompts => inspect_prompts(&config, &tok, template.as_ref(), args.samples),
    }
}
