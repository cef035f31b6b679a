//! Which tokens carry the loss, against TRL's own `SFTTrainer` data preparation
//! (fixtures by `tools/golden/assistant_masks.py`): assistant-only loss on conversations in
//! the published Qwen2.5, Qwen3, Llama 3 and DeepSeek-V3 templates (which TRL masks through
//! its training variants of them), and completion-only loss on conversational
//! prompt-completion rows, Mistral's template included.

use kiln_data::example::{Encoder, LengthPolicy};
use kiln_data::{AssistantMask, ChatTemplate, Row, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

#[derive(serde::Deserialize)]
struct Case {
    family: String,
    template: String,
    bos_token: Option<String>,
    eos_token: String,
    messages: Option<Value>,
    prompt: Option<Value>,
    completion: Option<Value>,
    ids: Vec<u32>,
    mask: Vec<u8>,
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_masks")
}

/// The case's row as a JSONL row would give it.
fn row(c: &Case) -> Value {
    match (&c.messages, &c.prompt, &c.completion) {
        (Some(m), None, None) => serde_json::json!({ "messages": m }),
        (None, Some(p), Some(a)) => serde_json::json!({ "prompt": p, "completion": a }),
        _ => panic!("{}: a case has messages or a prompt and a completion", c.family),
    }
}

#[test]
fn loss_masks_equal_trls() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("golden.json")).unwrap()).unwrap();
    let mut tok = Tokenizer::load(&fixture()).unwrap();
    let mut families_through_trl_variants = std::collections::BTreeSet::new();
    for (i, c) in cases.iter().enumerate() {
        let name = format!("case {i} ({})", c.family);
        tok.eos_id = Some(tok.token_to_id(&c.eos_token).unwrap());
        tok.eos_token = Some(c.eos_token.clone());
        let template = ChatTemplate::new(&c.template, c.bos_token.clone(), Some(c.eos_token.clone())).unwrap();
        if let AssistantMask::TrlTrainingTemplate(family) = template.assistant_mask() {
            families_through_trl_variants.insert(family);
        }
        let encoder =
            Encoder { tokenizer: &tok, template: Some(&template), max_seq_len: 4096, policy: LengthPolicy::Drop };
        let kind = kiln_data::rows::parse_value(row(c)).unwrap();
        let e = encoder.encode(&Row { location: name.clone(), kind }).unwrap();
        assert_eq!(e.ids, c.ids, "{name}: token ids:\nkiln {:?}\nTRL  {:?}", tok.decode(&e.ids), tok.decode(&c.ids));
        let trained = |ids: &[u32], mask: &dyn Fn(usize) -> bool| {
            let kept: Vec<u32> = ids.iter().enumerate().filter(|&(t, _)| mask(t)).map(|(_, &id)| id).collect();
            tok.decode(&kept)
        };
        assert_eq!(
            e.trainable,
            c.mask.iter().map(|&m| m == 1).collect::<Vec<_>>(),
            "{name}: trained tokens:\nkiln {:?}\nTRL  {:?}",
            trained(&e.ids, &|t| e.trainable[t]),
            trained(&c.ids, &|t| c.mask[t] == 1),
        );
    }
    assert_eq!(families_through_trl_variants.len(), 4, "{families_through_trl_variants:?}");
    assert!(cases.len() >= 13);
}
