//! `tokenizer.json` and the special tokens of `tokenizer_config.json`.

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A token's byte range `(start, end)` in the encoded text.
pub type Span = (usize, usize);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_id: Option<u32>,
    /// The `chat_template` of `tokenizer_config.json` (or `chat_template.jinja`), if any.
    pub chat_template: Option<String>,
    /// `tokenizer_config.json` as read, so an export can write it back unchanged.
    pub config: Value,
}

/// A special token is written either as a string or as `{"content": "..."}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` from a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::at(path.display().to_string(), e.to_string()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| Error::at(config_path.display().to_string(), format!("cannot read: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::at(config_path.display().to_string(), format!("invalid JSON: {e}")))?
        } else {
            Value::Object(Default::default())
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = match config.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            _ if jinja_path.exists() => Some(
                std::fs::read_to_string(&jinja_path)
                    .map_err(|e| Error::at(jinja_path.display().to_string(), format!("cannot read: {e}")))?,
            ),
            _ => None,
        };
        let eos_token = token_text(config.get("eos_token"));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Self { inner, bos_token: token_text(config.get("bos_token")), eos_token, eos_id, chat_template, config })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids and the byte span of each in `text`; special tokens written in the text are
    /// recognised, and nothing is added around it.
    pub fn encode_with_offsets(&self, text: &str) -> std::result::Result<(Vec<u32>, Vec<Span>), String> {
        let enc = self.inner.encode(text, false).map_err(|e| e.to_string())?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of `text`; `special` adds what the tokenizer's post-processor adds (BOS...).
    pub fn encode(&self, text: &str, special: bool) -> std::result::Result<Vec<u32>, String> {
        Ok(self.inner.encode(text, special).map_err(|e| e.to_string())?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
