//! Prompt rows for on-policy training (RL, distillation) and batch generation:
//! `{"prompt": "..."}` (text, tokenized with special tokens) or `{"messages": [...]}` (rendered
//! through the chat template with its generation prompt), with an optional reference
//! `"answer"` for rewards that check it.

use crate::rows::{read_records, Message};
use crate::{ChatTemplate, Error, Result, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

/// A prompt and its reference answer.
#[derive(Clone, Debug)]
pub struct PromptRow {
    pub ids: Vec<i32>,
    pub text: String,
    pub answer: Option<String>,
    pub location: String,
}

/// One prompt row from a JSON object; the error names the field at fault.
fn prompt_row(
    (location, value): (String, Value),
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<PromptRow> {
    let at = |message: String| Error::at(location.clone(), message);
    let answer = match value.get("answer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => Some(v.to_string()),
    };
    let text = match (value.get("messages"), value.get("prompt")) {
        (Some(m), _) => {
            let messages: Vec<Message> = serde_json::from_value(m.clone())
                .map_err(|e| at(format!("field `messages`: expected [{{\"role\", \"content\"}}, ..]: {e}")))?;
            let template = template.ok_or_else(|| at("a chat prompt needs the model's chat_template".into()))?;
            template.render(&messages, true).map_err(at)?
        }
        (None, Some(Value::String(p))) => p.clone(),
        _ => return Err(at("field `prompt` (a string) or `messages` is missing".into())),
    };
    let special = value.get("messages").is_none();
    let ids = tokenizer.encode(&text, special).map_err(at)?;
    Ok(PromptRow { ids: ids.into_iter().map(|t| t as i32).collect(), text, answer, location })
}

/// Every prompt row of `files` (JSONL or Parquet); the first bad row is an error.
pub fn read_prompts(
    files: &[PathBuf],
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<PromptRow>> {
    let mut out = Vec::new();
    for f in files {
        for record in read_records(f)? {
            out.push(prompt_row(record?, tokenizer, template)?);
        }
    }
    if out.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(Error::at(names.join(", "), "no prompts"));
    }
    Ok(out)
}
