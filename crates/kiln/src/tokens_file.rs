//! Token files: JSONL, one `{"ids": [..]}` per line.

use anyhow::{bail, Context, Result};
use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    ids: Vec<i64>,
}

/// Reads every sequence, checking each id against the vocabulary; errors name file and line.
pub fn read(path: &Path, vocab: usize) -> Result<Vec<Vec<i32>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut sequences = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            bail!("{at}: empty line (expected {{\"ids\": [..]}})");
        }
        let row: Row = serde_json::from_str(line).with_context(|| format!("{at}: expected {{\"ids\": [..]}}"))?;
        if row.ids.is_empty() {
            bail!("{at}: field `ids` is empty");
        }
        if let Some((pos, id)) = row.ids.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= vocab) {
            bail!("{at}: field `ids[{pos}]` = {id} is outside the vocabulary (0..{vocab})");
        }
        sequences.push(row.ids.iter().map(|&id| id as i32).collect());
    }
    Ok(sequences)
}
