//! What every recipe does with its data before training: the model directory's tokenizer and
//! chat template, rows read and tokenized, and bad rows reported by `file:line` (and the run
//! refused when too many are bad).

use crate::config::RunConfig;
use anyhow::{bail, Result};
use kiln_core::Backend;
use kiln_data::example::{Encoder, Example, Tokenized};
use kiln_data::{rows, ChatTemplate, Tokenizer};
use kiln_model::Model;
use std::path::{Path, PathBuf};

/// Bounds the list of bad rows printed before a run.
const BAD_ROWS_SHOWN: usize = 10;

/// The tokenizer and chat template of a model directory.
pub fn load_tokenizer(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = Tokenizer::load(dir)?;
    let template = match &tokenizer.chat_template {
        Some(src) => Some(
            ChatTemplate::new(src, tokenizer.bos_token.clone(), tokenizer.eos_token.clone())
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer_config.json").display()))?,
        ),
        None => None,
    };
    Ok((tokenizer, template))
}

/// Refuses a tokenizer with ids beyond the model's embedding.
pub fn check_vocab<B: Backend>(model: &Model<B>, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let vocab = model.whole_config().vocab_size;
    if tokenizer.vocab_size() > vocab {
        bail!("{}: tokenizer has {} tokens, the model's vocab_size is {vocab}", dir.display(), tokenizer.vocab_size());
    }
    Ok(())
}

/// How `config` turns rows into tokens with `tokenizer` and `template`.
pub fn encoder<'a>(config: &RunConfig, tokenizer: &'a Tokenizer, template: Option<&'a ChatTemplate>) -> Encoder<'a> {
    Encoder { tokenizer, template, max_seq_len: config.data.max_seq_len, policy: config.data.length_policy }
}

/// Tokenizes the files of one split, reporting bad rows; fails when too many are bad.
pub fn encode_split(files: &[PathBuf], encoder: &Encoder, max_bad_fraction: f64, split: &str) -> Result<Vec<Example>> {
    let mut rows = Vec::new();
    for f in files {
        rows.extend(rows::read_rows(f)?);
    }
    let Tokenized { examples, bad } = encoder.encode_all(rows);
    check_bad_rows(split, files, examples.len(), &bad, max_bad_fraction)?;
    Ok(examples)
}

/// Prints the first bad rows of a split, and fails when there are no good rows or more bad
/// ones than `max_bad_fraction` allows.
pub fn check_bad_rows(
    split: &str,
    files: &[PathBuf],
    good: usize,
    bad: &[kiln_data::Error],
    max_bad_fraction: f64,
) -> Result<()> {
    let total = good + bad.len();
    for e in bad.iter().take(BAD_ROWS_SHOWN) {
        eprintln!("warning: {split} row skipped: {e}");
    }
    if bad.len() > BAD_ROWS_SHOWN {
        eprintln!("warning: ... and {} more bad {split} rows", bad.len() - BAD_ROWS_SHOWN);
    }
    if total == 0 {
        bail!(
            "{split} data: no rows in {}",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let fraction = bad.len() as f64 / total as f64;
    if fraction > max_bad_fraction {
        bail!(
            "{split} data: {} of {total} rows are bad ({:.1}%, more than data.max_bad_fraction = {}); first: {}",
            bad.len(),
            100.0 * fraction,
            max_bad_fraction,
            bad[0]
        );
    }
    Ok(())
}

/// The train and eval splits of `config` (eval may be empty), each tokenized by `encode_split`.
pub fn encode_splits<T: Default>(
    config: &RunConfig,
    encode_split: impl Fn(&[PathBuf], &str) -> Result<T>,
) -> Result<(T, T)> {
    let train = encode_split(&config.data.train, "train")?;
    let eval = if config.data.eval.is_empty() { T::default() } else { encode_split(&config.data.eval, "eval")? };
    Ok((train, eval))
}
