//! `kiln score`: log p(ids[t+1] | ids[..=t]) for every sequence of a token file, or, with
//! `--reward`, a reward model's reward for each sequence (its score head on the last token).

use crate::tokens_file;
use anyhow::{bail, Context, Result};
use kiln_core::Backend;
use kiln_model::{Activations, Batch, Model};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (config.json and safetensors weights).
    #[arg(long)]
    model: PathBuf,
    /// JSONL file with one {"ids": [..]} per line.
    #[arg(long)]
    tokens: PathBuf,
    /// Write the results here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Most padded tokens per forward pass.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    /// Print {"reward": r} per sequence from a reward model (`kiln rm`) instead of log-probs.
    #[arg(long)]
    reward: bool,
    /// Inputs of the matrix products: f32, bf16 (mixed precision) or auto.
    #[arg(long, value_enum, default_value_t = crate::dtype_arg::DtypeArg::Auto)]
    dtype: crate::dtype_arg::DtypeArg,
}

#[derive(serde::Serialize)]
struct Scored {
    logprobs: Vec<f32>,
}

#[derive(serde::Serialize)]
struct Rewarded {
    reward: f32,
}

pub fn run<B: Backend>(args: &Args, b: &B) -> Result<()> {
    let mut model = Model::load(b, &args.model)?;
    model.set_matmul_precision(args.dtype.precision(b));
    eprintln!("{}", kiln_train::config::describe_precision(b, model.matmul_precision()));
    match (args.reward, model.config.num_labels) {
        (true, None) => {
            bail!("{}: --reward needs a reward model (a ...ForSequenceClassification directory)", args.model.display())
        }
        (true, Some(n)) if n != 1 => {
            bail!("{}: --reward needs num_labels = 1, the model has {n}", args.model.display())
        }
        (false, Some(_)) => {
            bail!("{}: a sequence classification model has no log-probs; pass --reward", args.model.display())
        }
        _ => {}
    }
    let sequences = tokens_file::read(&args.tokens, model.whole_config().vocab_size)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut start = 0;
    while start < sequences.len() {
        // Take sequences in order while the padded batch fits the token budget.
        let mut end = start + 1;
        let mut longest = sequences[start].len();
        while end < sequences.len() {
            let l = longest.max(sequences[end].len());
            if l * (end - start + 1) > args.batch_tokens {
                break;
            }
            longest = l;
            end += 1;
        }
        let batch = Batch::causal_lm(&sequences[start..end]);
        let mut acts = Activations::new(b, &model.config, batch.rows, batch.seq, false, false);
        if args.reward {
            model.forward_hidden(b, &mut acts, &batch, false);
            let last: Vec<i32> =
                sequences[start..end].iter().enumerate().map(|(r, s)| (r * batch.seq + s.len() - 1) as i32).collect();
            for reward in model.score_forward(b, &acts, &last) {
                writeln!(out, "{}", serde_json::to_string(&Rewarded { reward })?)?;
            }
            start = end;
            continue;
        }
        let nll = model.nll(b, &mut acts, &batch);
        for (r, s) in sequences[start..end].iter().enumerate() {
            let row = &nll[r * batch.seq..r * batch.seq + s.len() - 1];
            let scored = Scored { logprobs: row.iter().map(|&x| -x).collect() };
            writeln!(out, "{}", serde_json::to_string(&scored)?)?;
        }
        start = end;
    }
    out.flush()?;
    Ok(())
}
