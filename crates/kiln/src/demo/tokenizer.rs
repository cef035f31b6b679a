//! The demo's tokenizer: one token per character (newline and printable ASCII) plus three
//! special tokens, written as a standard `tokenizer.json` (a BPE model with no merges and a
//! `Fuse` decoder), with a ChatML template in `tokenizer_config.json`, so transformers and
//! any Hugging Face tool load it as they load any other tokenizer.

use serde_json::{json, Map, Value};

pub const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, with `{% generation %}` around what the assistant says.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}\
{{ '<|im_start|>' + message['role'] + '\n' }}\
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}\
{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Every character the demo's text uses.
fn alphabet() -> Vec<char> {
    std::iter::once('\n').chain((32u8..=126).map(char::from)).collect()
}

pub fn vocab_size() -> usize {
    SPECIAL.len() + alphabet().len()
}

pub fn tokenizer_json() -> Value {
    let mut vocab = Map::new();
    let added: Vec<Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(id, s)| {
            vocab.insert(s.to_string(), json!(id));
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    for (i, c) in alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIAL.len() + i));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

pub fn tokenizer_config_json() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    })
}
