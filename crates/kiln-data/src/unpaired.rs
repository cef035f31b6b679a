//! Unpaired preference rows (KTO): a prompt, one completion, and whether the completion is
//! desirable, `{"prompt": ..., "completion": ..., "label": true|false}`, text or
//! conversational (the prompt as `messages` or a list in `prompt`, the completion a string or a
//! list of messages), as TRL's KTOTrainer reads them. A paired row (`chosen`, `rejected`) is
//! two unpaired ones, as the KTOTrainer unpairs it. Prompt and completion are split into
//! tokens as TRL splits them (`completion`).

use crate::example::{Encoder, LengthPolicy};
use crate::preference::parse_preference;
use crate::rows::{answer, prompt, read_records, Answer, Prompt};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedRow {
    pub location: String,
    pub prompt: Prompt,
    pub completion: Answer,
    /// Desirable (true) or undesirable (false).
    pub label: bool,
}

/// A tokenized unpaired row.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledCompletion {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub label: bool,
    pub location: String,
}

/// The unpaired rows of a JSON object (one, or two from a paired row); the error names the
/// field at fault.
pub fn parse_unpaired(value: Value) -> std::result::Result<Vec<(Prompt, Answer, bool)>, String> {
    let Value::Object(obj) = &value else { return Err("expected a JSON object".into()) };
    if obj.contains_key("chosen") || obj.contains_key("rejected") {
        let (prompt, chosen, rejected) = parse_preference(value)?;
        return Ok(vec![(prompt.clone(), chosen, true), (prompt, rejected, false)]);
    }
    let label = match obj.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("field `label` must be true or false, got {other}")),
        None => return Err("field `label` is missing (true for a desirable completion, false otherwise)".into()),
    };
    Ok(vec![(prompt(obj)?, answer(obj, "completion")?, label)])
}

/// Every unpaired row of a JSONL or Parquet file; bad rows come back as errors.
pub fn read_unpaired_rows(path: &Path) -> Result<Vec<std::result::Result<UnpairedRow, Error>>> {
    let mut out = Vec::new();
    for record in read_records(path)? {
        match record.and_then(|(location, value)| {
            parse_unpaired(value).map(|r| (location.clone(), r)).map_err(|m| Error::at(location, m))
        }) {
            Ok((location, rows)) => out.extend(rows.into_iter().map(|(prompt, completion, label)| {
                Ok(UnpairedRow { location: location.clone(), prompt, completion, label })
            })),
            Err(e) => out.push(Err(e)),
        }
    }
    Ok(out)
}

impl Encoder<'_> {
    /// One unpaired row to tokens, or the reason it cannot be used.
    pub fn encode_unpaired(&self, row: &UnpairedRow) -> std::result::Result<LabeledCompletion, Error> {
        let at = |message: String| Error::at(row.location.clone(), message);
        let (prompt, mut completion) = self.prompt_and_answer(&row.prompt, &row.completion).map_err(at)?;
        if completion.is_empty() {
            return Err(at("the completion has no tokens".into()));
        }
        let len = prompt.len() + completion.len();
        if len > self.max_seq_len {
            let room = self.max_seq_len.saturating_sub(prompt.len());
            match self.policy {
                LengthPolicy::Truncate if room > 0 => completion.truncate(room),
                _ => {
                    return Err(at(format!(
                        "{len} tokens (prompt {} + completion), more than max_seq_len {} (length policy `{}`)",
                        prompt.len(),
                        self.max_seq_len,
                        if self.policy == LengthPolicy::Drop { "drop" } else { "truncate" }
                    )))
                }
            }
        }
        Ok(LabeledCompletion { prompt, completion, label: row.label, location: row.location.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_rows_are_named() {
        let rows = parse_unpaired(serde_json::json!({"prompt": "2+2=", "completion": "4", "label": true})).unwrap();
        assert_eq!(rows, [(Prompt::Text("2+2=".into()), Answer::Text("4".into()), true)]);
        let chat = parse_unpaired(serde_json::json!({
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "go away"}], "label": false
        }))
        .unwrap();
        assert!(matches!(&chat[0], (Prompt::Chat(p), Answer::Chat(_), false) if p.len() == 1));
        let paired = parse_unpaired(serde_json::json!({"prompt": "a", "chosen": "b", "rejected": "c"})).unwrap();
        assert_eq!(paired.iter().map(|r| r.2).collect::<Vec<_>>(), [true, false]);
        let err = |v: Value| parse_unpaired(v).unwrap_err();
        assert!(err(serde_json::json!({"prompt": "a", "completion": "b"})).contains("field `label` is missing"));
        assert!(err(serde_json::json!({"prompt": "a", "completion": "b", "label": 1})).contains("`label` must be"));
        assert!(err(serde_json::json!({"prompt": "a", "label": true})).contains("field `completion` is missing"));
        assert!(err(serde_json::json!({"completion": "b", "label": true})).contains("field `prompt`"));
    }
}
