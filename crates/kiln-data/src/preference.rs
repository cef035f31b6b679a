//! Preference pairs: a prompt and two answers to it, `chosen` preferred over `rejected`.
//!
//! Rows are `{"prompt": "...", "chosen": "...", "rejected": "..."}` (text: the answer follows
//! the prompt and ends with the end-of-sequence token, appended unless it is there) or
//! conversational, with the prompt as `"messages"` (or `"prompt"`) holding a list of messages
//! and each answer a string (one assistant turn) or a list of messages. Without a prompt
//! (TRL's implicit prompt) the prompt is what `chosen` and `rejected` share at their start: the
//! messages both begin with, or, for text, the characters (less a trailing space), as TRL's
//! `extract_prompt` takes it. Prompt and answers are split into tokens as TRL splits them
//! (`completion`); both answers share the prompt's tokens.

use crate::example::{Encoder, LengthPolicy};
use crate::rows::{answer, prompt, read_records, Answer, Prompt};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceRow {
    pub location: String,
    pub prompt: Prompt,
    pub chosen: Answer,
    pub rejected: Answer,
    /// TRL's optional `margin` column: the reward gap a reward model is asked for.
    pub margin: Option<f64>,
}

/// A tokenized pair.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub location: String,
    pub margin: Option<f64>,
}

/// The prompt `chosen` and `rejected` share at their start, and their answers after it.
fn implicit_prompt(chosen: Answer, rejected: Answer) -> std::result::Result<(Prompt, Answer, Answer), String> {
    let none =
        || "fields `chosen` and `rejected` share no prompt at their start (and there is no `prompt`)".to_string();
    match (chosen, rejected) {
        (Answer::Chat(c), Answer::Chat(r)) => {
            let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                return Err(none());
            }
            Ok((
                Prompt::Chat(c[..shared].to_vec()),
                Answer::Chat(c[shared..].to_vec()),
                Answer::Chat(r[shared..].to_vec()),
            ))
        }
        (Answer::Text(c), Answer::Text(r)) => {
            let mut shared = c
                .char_indices()
                .zip(r.chars())
                .find(|((_, a), b)| a != b)
                .map_or(c.len().min(r.len()), |((i, _), _)| i);
            if c[..shared].ends_with(' ') {
                shared -= 1;
            }
            if shared == 0 {
                return Err(none());
            }
            Ok((
                Prompt::Text(c[..shared].to_string()),
                Answer::Text(c[shared..].to_string()),
                Answer::Text(r[shared..].to_string()),
            ))
        }
        _ => Err("fields `chosen` and `rejected` must both be text or both be lists of messages".into()),
    }
}

/// A preference row from a JSON object; the error names the field at fault.
pub fn parse_preference(value: Value) -> std::result::Result<(Prompt, Answer, Answer), String> {
    let Value::Object(obj) = value else { return Err("expected a JSON object".into()) };
    let (chosen, rejected) = (answer(&obj, "chosen")?, answer(&obj, "rejected")?);
    if chosen == rejected {
        return Err("fields `chosen` and `rejected` are identical".into());
    }
    let (prompt, chosen, rejected) = match obj.contains_key("prompt") || obj.contains_key("messages") {
        true => (prompt(&obj)?, chosen, rejected),
        false => implicit_prompt(chosen, rejected)?,
    };
    Ok((prompt, chosen, rejected))
}

/// The row's `margin`, if it has one.
fn margin(value: &Value) -> std::result::Result<Option<f64>, String> {
    match value.get("margin") {
        None | Some(Value::Null) => Ok(None),
        Some(m) => m.as_f64().map(Some).ok_or_else(|| format!("field `margin` must be a number, got {m}")),
    }
}

/// Every preference row of a JSONL or Parquet file; bad rows come back as errors.
pub fn read_preference_rows(path: &Path) -> Result<Vec<std::result::Result<PreferenceRow, Error>>> {
    Ok(read_records(path)?
        .into_iter()
        .map(|record| {
            let (location, value) = record?;
            let row = margin(&value).and_then(|margin| Ok((margin, parse_preference(value)?)));
            match row {
                Ok((margin, (prompt, chosen, rejected))) => {
                    Ok(PreferenceRow { location, prompt, chosen, rejected, margin })
                }
                Err(m) => Err(Error::at(location, m)),
            }
        })
        .collect())
}

impl Encoder<'_> {
    /// One preference row to a tokenized pair, or the reason it cannot be one.
    pub fn encode_pair(&self, row: &PreferenceRow) -> std::result::Result<PreferencePair, Error> {
        let at = |message: String| Error::at(row.location.clone(), message);
        let (prompt, answers) = self.prompt_and_answers(&row.prompt, &[&row.chosen, &row.rejected]).map_err(at)?;
        let [mut chosen, mut rejected]: [Vec<u32>; 2] = answers.try_into().expect("two answers");
        if chosen.is_empty() || rejected.is_empty() {
            return Err(at("an answer has no tokens".into()));
        }
        if chosen == rejected {
            return Err(at("`chosen` and `rejected` have the same tokens".into()));
        }
        let longest = prompt.len() + chosen.len().max(rejected.len());
        if longest > self.max_seq_len {
            let room = self.max_seq_len.saturating_sub(prompt.len());
            match self.policy {
                LengthPolicy::Truncate if room > 0 => {
                    chosen.truncate(room);
                    rejected.truncate(room);
                }
                _ => {
                    return Err(at(format!(
                        "{longest} tokens (prompt {} + longest answer), more than max_seq_len {} (length policy `{}`)",
                        prompt.len(),
                        self.max_seq_len,
                        if self.policy == LengthPolicy::Drop { "drop" } else { "truncate" }
                    )))
                }
            }
        }
        Ok(PreferencePair { prompt, chosen, rejected, location: row.location.clone(), margin: row.margin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_margin_column_is_read_or_named() {
        assert_eq!(margin(&serde_json::json!({"margin": 0.5})), Ok(Some(0.5)));
        assert_eq!(margin(&serde_json::json!({"margin": null})), Ok(None));
        assert_eq!(margin(&serde_json::json!({})), Ok(None));
        assert!(margin(&serde_json::json!({"margin": "big"})).unwrap_err().contains("field `margin` must be a number"));
    }

    #[test]
    fn shapes_parse_and_bad_rows_are_named() {
        let text = parse_preference(serde_json::json!({"prompt": "2+2=", "chosen": "4", "rejected": "5"})).unwrap();
        assert_eq!(text.0, Prompt::Text("2+2=".into()));
        let chat = parse_preference(serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": [{"role": "assistant", "content": "go away"}]
        }))
        .unwrap();
        assert!(matches!(chat.0, Prompt::Chat(ref m) if m.len() == 1));
        assert!(matches!(chat.2, Answer::Chat(_)));
        let err = |v: Value| parse_preference(v).unwrap_err();
        assert!(err(serde_json::json!({"prompt": "a", "chosen": "b"})).contains("field `rejected` is missing"));
        assert!(err(serde_json::json!({"chosen": "b", "rejected": "c"})).contains("share no prompt"));
        // TRL's implicit prompt: what both answers start with (text less a trailing space).
        let implicit = parse_preference(serde_json::json!({"chosen": "2+2= 4", "rejected": "2+2= 5"})).unwrap();
        assert_eq!(implicit, (Prompt::Text("2+2=".into()), Answer::Text(" 4".into()), Answer::Text(" 5".into())));
        let msg = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
        let chat = parse_preference(serde_json::json!({
            "chosen": [msg("user", "hi"), msg("assistant", "hello")],
            "rejected": [msg("user", "hi"), msg("assistant", "go away")]
        }))
        .unwrap();
        assert!(matches!(&chat.0, Prompt::Chat(p) if p.len() == 1 && p[0].content == "hi"), "{chat:?}");
        assert!(matches!(&chat.1, Answer::Chat(a) if a[0].content == "hello"));
        assert!(err(serde_json::json!({"prompt": "a", "chosen": "b", "rejected": "b"})).contains("identical"));
        assert!(
            err(serde_json::json!({"prompt": "a", "chosen": 3, "rejected": "b"})).contains("field `chosen` must be")
        );
    }
}
