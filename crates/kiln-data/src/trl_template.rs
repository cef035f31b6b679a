//! TRL's training variants of published chat templates. TRL trains a conversation's assistant
//! turns on what a training variant of the model's template marks with `{% generation %}`
//! when the template itself has no markers; it recognises the template by its exact text.
//! Kiln does the same with the same files (`trl_templates/`), so its assistant masks equal
//! TRL's for these families.

/// A family's published template and TRL's training variant of it.
struct Variant {
    family: &'static str,
    published: &'static str,
    training: &'static str,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        family: "Qwen2.5",
        published: include_str!("trl_templates/qwen2_5.jinja"),
        training: include_str!("trl_templates/qwen2_5_training.jinja"),
    },
    Variant {
        family: "Qwen3",
        published: include_str!("trl_templates/qwen3.jinja"),
        training: include_str!("trl_templates/qwen3_training.jinja"),
    },
    Variant {
        family: "Llama 3",
        published: include_str!("trl_templates/llama3.jinja"),
        training: include_str!("trl_templates/llama3_training.jinja"),
    },
    Variant {
        family: "DeepSeek-V3",
        published: include_str!("trl_templates/deepseekv3.jinja"),
        training: include_str!("trl_templates/deepseekv3_training.jinja"),
    },
];

/// The family and TRL's training variant of `source`, when it is a template TRL knows
/// (compared by text, as TRL compares, trailing whitespace aside).
pub fn training_variant(source: &str) -> Option<(&'static str, &'static str)> {
    let source = source.trim_end();
    VARIANTS.iter().find(|v| v.published.trim_end() == source).map(|v| (v.family, v.training))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_templates_map_to_their_variants_and_others_to_none() {
        for v in &VARIANTS {
            assert_eq!(training_variant(&format!("{}\n", v.published.trim_end())).map(|(f, _)| f), Some(v.family));
            assert!(v.training.contains("{%- generation %}"), "{}", v.family);
        }
        assert!(training_variant("{{ messages }}").is_none());
    }
}
