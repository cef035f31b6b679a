//! Chat templates against transformers' `apply_chat_template`: rendered text, the prompt with
//! a generation prompt, assistant token masks, and template errors
//! (fixtures by `tools/golden/chat_template.py`).

use kiln_data::example::{Encoder, LengthPolicy};
use kiln_data::{ChatTemplate, Message, Row, RowKind, Tokenizer};
use std::path::PathBuf;

#[derive(serde::Deserialize)]
struct Case {
    template_name: String,
    template: String,
    messages: Vec<Message>,
    bos_token: String,
    eos_token: String,
    text: Option<String>,
    prompt_text: Option<String>,
    ids: Option<Vec<u32>>,
    assistant_mask: Option<Vec<u8>>,
    error: Option<String>,
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

#[test]
fn renders_and_masks_like_transformers() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("golden.json")).unwrap()).unwrap();
    let tok = Tokenizer::load(&fixture()).unwrap();
    let mut masks_checked = 0;
    for c in &cases {
        let name = &c.template_name;
        let t = ChatTemplate::new(&c.template, Some(c.bos_token.clone()), Some(c.eos_token.clone())).unwrap();
        if let Some(err) = &c.error {
            let ours = t.render(&c.messages, false).unwrap_err();
            assert!(ours.contains(err.as_str()), "{name}: transformers says {err:?}, kiln says {ours:?}");
            continue;
        }
        assert_eq!(t.render(&c.messages, false).unwrap(), *c.text.as_ref().unwrap(), "{name}: rendered text");
        let prompt = t.render(&c.messages[..c.messages.len() - 1], true).unwrap();
        assert_eq!(prompt, *c.prompt_text.as_ref().unwrap(), "{name}: prompt with generation prompt");
        if let (Some(ids), Some(mask)) = (&c.ids, &c.assistant_mask) {
            let encoder =
                Encoder { tokenizer: &tok, template: Some(&t), max_seq_len: 4096, policy: LengthPolicy::Drop };
            let e = encoder.encode(&Row { location: name.clone(), kind: RowKind::Chat(c.messages.clone()) }).unwrap();
            assert_eq!(&e.ids, ids, "{name}: token ids");
            let want: Vec<bool> = mask.iter().map(|&m| m == 1).collect();
            assert_eq!(e.trainable, want, "{name}: assistant mask");
            masks_checked += 1;
        }
    }
    assert!(masks_checked >= 2, "the fixture must exercise assistant masks");
}
