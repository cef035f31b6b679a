//! Prompt rows for on-policy training (RL, distillation) and batch generation, TRL's
//! prompt-only type: `{"prompt": "..."}` (text, tokenized with special tokens), or the prompt
//! as messages (`{"prompt": [...]}` or `{"messages": [...]}`, rendered through the chat
//! template with its generation prompt). Every other column rides along to the rewards (as TRL
//! passes a dataset's columns to reward functions): `"answer"` for `exact_match`, all of them
//! to reward programs and endpoints.

use crate::rows::{prompt, read_records, Prompt};
use crate::{ChatTemplate, Error, Result, Tokenizer};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// A prompt, its reference answer, and the row's other columns.
#[derive(Clone, Debug)]
pub struct PromptRow {
    pub ids: Vec<i32>,
    pub text: String,
    pub answer: Option<String>,
    /// Every column but the prompt (`prompt` or `messages`).
    pub columns: Map<String, Value>,
    pub location: String,
}

/// One prompt row from a JSON object; the error names the field at fault.
fn prompt_row(
    (location, value): (String, Value),
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<PromptRow> {
    let at = |message: String| Error::at(location.clone(), message);
    let Value::Object(mut columns) = value else { return Err(at("expected a JSON object".into())) };
    let answer = match columns.get("answer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => Some(v.to_string()),
    };
    let (text, special) = match prompt(&columns).map_err(at)? {
        Prompt::Chat(messages) => {
            let template = template.ok_or_else(|| at("a chat prompt needs the model's chat_template".into()))?;
            (template.render(&messages, true).map_err(at)?, false)
        }
        Prompt::Text(text) => (text, true),
    };
    let ids = tokenizer.encode(&text, special).map_err(at)?;
    columns.remove("prompt");
    columns.remove("messages");
    Ok(PromptRow { ids: ids.into_iter().map(|t| t as i32).collect(), text, answer, columns, location })
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
