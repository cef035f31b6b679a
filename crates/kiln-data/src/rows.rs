//! Dataset rows: JSONL or Parquet files whose rows are chat, prompt/completion (text or
//! conversational, as TRL's dataset types) or plain text, and the fields rows share.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt: text, or messages rendered through the chat template with its generation prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

/// An answer to a prompt: text, or messages (what the chat template adds after the prompt).
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Text(String),
    Chat(Vec<Message>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum RowKind {
    /// `{"messages": [...]}`: loss on the assistant turns.
    Chat(Vec<Message>),
    /// `{"prompt": ..., "completion": ...}`, text or conversational: loss on the completion.
    PromptCompletion { prompt: Prompt, completion: Answer },
    /// `{"text": "..."}`: loss on every token.
    Text(String),
}

/// Field `field` as a non-empty list of messages.
pub(crate) fn messages(value: &Value, field: &str) -> std::result::Result<Vec<Message>, String> {
    let m: Vec<Message> = serde_json::from_value(value.clone())
        .map_err(|e| format!("field `{field}`: expected [{{\"role\", \"content\"}}, ..]: {e}"))?;
    if m.is_empty() {
        return Err(format!("field `{field}` is empty"));
    }
    Ok(m)
}

/// Field `field` as an answer: a string or a list of messages.
pub(crate) fn answer(obj: &serde_json::Map<String, Value>, field: &str) -> std::result::Result<Answer, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(Answer::Text(s.clone())),
        Some(v @ Value::Array(_)) => Ok(Answer::Chat(messages(v, field)?)),
        Some(other) => Err(format!("field `{field}` must be a string or a list of messages, got {other}")),
        None => Err(format!("field `{field}` is missing")),
    }
}

/// The prompt of a row: `messages`, or `prompt` as a string or a list of messages.
pub(crate) fn prompt(obj: &serde_json::Map<String, Value>) -> std::result::Result<Prompt, String> {
    Ok(match (obj.get("messages"), obj.get("prompt")) {
        (Some(m), _) => Prompt::Chat(messages(m, "messages")?),
        (None, Some(Value::String(s))) => Prompt::Text(s.clone()),
        (None, Some(v @ Value::Array(_))) => Prompt::Chat(messages(v, "prompt")?),
        (None, Some(other)) => {
            return Err(format!("field `prompt` must be a string or a list of messages, got {other}"))
        }
        (None, None) => return Err("field `prompt` (or `messages`) is missing".into()),
    })
}

/// A row and where it came from, `file:line`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub location: String,
    pub kind: RowKind,
}

fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field `{key}` must be a string, got {other}")),
        None => Err(format!("field `{key}` is missing")),
    }
}

/// Parses one JSON line into a row kind; the error names the field at fault.
pub fn parse_row(line: &str) -> std::result::Result<RowKind, String> {
    parse_value(serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?)
}

/// A row kind from a JSON object (a JSONL line, or a Parquet record read as JSON).
pub fn parse_value(value: Value) -> std::result::Result<RowKind, String> {
    let Value::Object(obj) = value else { return Err("expected a JSON object".into()) };
    if let Some(messages) = obj.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(messages.clone())
            .map_err(|e| format!("field `messages`: expected [{{\"role\", \"content\"}}, ..]: {e}"))?;
        if messages.is_empty() {
            return Err("field `messages` is empty".into());
        }
        return Ok(RowKind::Chat(messages));
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        return Ok(RowKind::PromptCompletion { prompt: prompt(&obj)?, completion: answer(&obj, "completion")? });
    }
    if obj.contains_key("text") {
        return Ok(RowKind::Text(string_field(&obj, "text")?));
    }
    Err("expected a field `messages`, `prompt` and `completion`, or `text`".into())
}

/// Reads a dataset file: Parquet when it ends in `.parquet`, JSONL otherwise. Rows that do
/// not parse come back as errors, one per row, so the caller can count them against its
/// tolerance instead of stopping at the first.
pub fn read_rows(path: &Path) -> Result<Vec<std::result::Result<Row, Error>>> {
    Ok(read_records(path)?
        .into_iter()
        .map(|record| {
            let (location, value) = record?;
            parse_value(value).map(|kind| Row { location: location.clone(), kind }).map_err(|m| Error::at(location, m))
        })
        .collect())
}

/// The JSON object of every row of a dataset file, with its location (`file:line` for JSONL,
/// `file:row N` for Parquet); rows that cannot be read are errors.
pub fn read_records(path: &Path) -> Result<Vec<std::result::Result<(String, Value), Error>>> {
    if path.extension().is_some_and(|e| e == "parquet") {
        read_parquet(path)
    } else {
        read_jsonl(path)
    }
}

/// Parquet records as JSON (columns `messages` as a list of `{role, content}` structs become
/// a JSON list of objects).
fn read_parquet(path: &Path) -> Result<Vec<std::result::Result<(String, Value), Error>>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let at = |e: &dyn std::fmt::Display| Error::at(path.display().to_string(), format!("cannot read Parquet: {e}"));
    let file =
        std::fs::File::open(path).map_err(|e| Error::at(path.display().to_string(), format!("cannot open: {e}")))?;
    let reader = SerializedFileReader::new(file).map_err(|e| at(&e))?;
    let mut rows = Vec::new();
    for (i, record) in reader.get_row_iter(None).map_err(|e| at(&e))?.enumerate() {
        let location = format!("{}:row {}", path.display(), i + 1);
        rows.push(match record {
            Ok(record) => Ok((location, record.to_json_value())),
            Err(e) => Err(Error::at(location, format!("unreadable record: {e}"))),
        });
    }
    Ok(rows)
}

/// JSONL lines as JSON values; blank lines are skipped.
fn read_jsonl(path: &Path) -> Result<Vec<std::result::Result<(String, Value), Error>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::at(path.display().to_string(), format!("cannot read: {e}")))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let location = format!("{}:{}", path.display(), i + 1);
            serde_json::from_str(line)
                .map(|v| (location.clone(), v))
                .map_err(|e| Error::at(location, format!("invalid JSON: {e}")))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shape_parses_and_bad_fields_are_named() {
        assert!(
            matches!(parse_row(r#"{"messages": [{"role": "user", "content": "hi"}]}"#), Ok(RowKind::Chat(m)) if m.len() == 1)
        );
        assert_eq!(
            parse_row(r#"{"prompt": "a", "completion": "b", "id": 7}"#),
            Ok(RowKind::PromptCompletion { prompt: Prompt::Text("a".into()), completion: Answer::Text("b".into()) })
        );
        assert_eq!(parse_row(r#"{"text": "x"}"#), Ok(RowKind::Text("x".into())));
        assert!(parse_row(r#"{"prompt": "a"}"#).unwrap_err().contains("field `completion` is missing"));
        assert!(parse_row(r#"{"text": 3}"#).unwrap_err().contains("field `text` must be a string"));
        assert!(parse_row(r#"{"messages": [{"role": "user"}]}"#).unwrap_err().contains("field `messages`"));
        assert!(parse_row(r#"{"foo": 1}"#).unwrap_err().contains("expected a field"));
        assert!(parse_row("{oops").unwrap_err().contains("invalid JSON"));
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data").join(name)
    }

    #[test]
    fn parquet_rows_written_by_pyarrow() {
        let rows: Vec<Row> = read_rows(&fixture("chat.parquet")).unwrap().into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 4);
        assert!(rows[2].location.ends_with("chat.parquet:row 3"), "{}", rows[2].location);
        let RowKind::Chat(m) = &rows[2].kind else { panic!("{:?}", rows[2].kind) };
        assert_eq!(
            (m[0].content.as_str(), m[1].role.as_str(), m[1].content.as_str()),
            ("What is 10 plus 5?", "assistant", "15")
        );
        let rows = read_rows(&fixture("prompt_completion.parquet")).unwrap();
        assert_eq!(
            rows[1].as_ref().unwrap().kind,
            RowKind::PromptCompletion { prompt: Prompt::Text("5-3=".into()), completion: Answer::Text("2".into()) }
        );
    }
}
