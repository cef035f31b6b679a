//! Rows to token sequences with a loss mask.

use crate::chat_template::ChatTemplate;
use crate::rows::{Row, RowKind};
use crate::tokenizer::Tokenizer;
use crate::Error;
use serde::{Deserialize, Serialize};

/// What to do with a row longer than the sequence limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthPolicy {
    /// Report the row as bad and leave it out.
    Drop,
    /// Keep its first `max_seq_len` tokens.
    Truncate,
}

/// A tokenized row: `trainable[t]` says whether predicting `ids[t]` counts in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trainable: Vec<bool>,
    pub location: String,
}

impl Example {
    /// Targets that carry loss (position 0 is never a target: nothing precedes it).
    pub fn trainable_targets(&self) -> usize {
        self.trainable.iter().skip(1).filter(|&&t| t).count()
    }
}

/// The examples of a dataset and the rows that could not become one.
pub struct Tokenized {
    pub examples: Vec<Example>,
    pub bad: Vec<Error>,
}

impl Tokenized {
    pub fn total_rows(&self) -> usize {
        self.examples.len() + self.bad.len()
    }
}

/// How rows become examples.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub max_seq_len: usize,
    pub policy: LengthPolicy,
}

impl Encoder<'_> {
    pub(crate) fn tokens(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer.encode(text, special).map_err(|e| format!("tokenizer failed: {e}"))
    }

    /// The model's chat template, which a conversational row needs.
    pub(crate) fn chat_template(&self) -> Result<&ChatTemplate, String> {
        self.template.ok_or_else(|| "a conversational row needs the model's chat_template, and it has none".into())
    }

    /// `ids` ending with the end-of-sequence token: appended only when missing, as TRL does.
    pub(crate) fn with_eos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        ids.extend(self.tokenizer.eos_id.filter(|&e| ids.last() != Some(&e)));
        ids
    }

    fn encode_kind(&self, kind: &RowKind) -> Result<(Vec<u32>, Vec<bool>), String> {
        Ok(match kind {
            RowKind::Chat(messages) => {
                let (text, spans) = self.chat_template()?.render_with_assistant_spans(messages)?;
                let (ids, offsets) =
                    self.tokenizer.encode_with_offsets(&text).map_err(|e| format!("tokenizer failed: {e}"))?;
                let trainable = offsets.iter().map(|&(start, _)| spans.iter().any(|s| s.contains(&start))).collect();
                (ids, trainable)
            }
            RowKind::PromptCompletion { prompt, completion } => {
                let (prompt, completion) = self.prompt_and_answer(prompt, completion)?;
                let trainable = (0..prompt.len() + completion.len()).map(|t| t >= prompt.len()).collect();
                ([prompt, completion].concat(), trainable)
            }
            RowKind::Text(text) => {
                let ids = self.with_eos(self.tokens(text, true)?);
                let n = ids.len();
                (ids, vec![true; n])
            }
        })
    }

    /// One row to an example, or the reason it cannot be one.
    pub fn encode(&self, row: &Row) -> Result<Example, Error> {
        let at = |message: String| Error::at(row.location.clone(), message);
        let (mut ids, mut trainable) = self.encode_kind(&row.kind).map_err(at)?;
        if ids.len() > self.max_seq_len {
            match self.policy {
                LengthPolicy::Drop => {
                    return Err(at(format!(
                        "{} tokens, more than max_seq_len {} (length policy `drop`)",
                        ids.len(),
                        self.max_seq_len
                    )))
                }
                LengthPolicy::Truncate => {
                    ids.truncate(self.max_seq_len);
                    trainable.truncate(self.max_seq_len);
                }
            }
        }
        let example = Example { ids, trainable, location: row.location.clone() };
        if example.trainable_targets() == 0 {
            return Err(at("no trainable token (nothing for the loss to fall on)".into()));
        }
        Ok(example)
    }

    /// Every row; bad ones (unparsable or unusable) are collected, not fatal.
    pub fn encode_all(&self, rows: Vec<Result<Row, Error>>) -> Tokenized {
        let mut out = Tokenized { examples: Vec::new(), bad: Vec::new() };
        for row in rows {
            match row.and_then(|r| self.encode(&r)) {
                Ok(e) => out.examples.push(e),
                Err(e) => out.bad.push(e),
            }
        }
        out
    }
}
