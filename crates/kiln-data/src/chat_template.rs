//! Hugging Face chat templates, rendered with minijinja the way transformers renders them
//! (jinja2 with `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`,
//! `strftime_now` and Python string methods), and the spans of assistant text that carry
//! the loss: from `{% generation %}` markers when the template has them, else from those of
//! TRL's training variant of the template when TRL has one (`trl_template`), else by
//! rendering each conversation prefix and taking what each assistant turn adds.

use crate::rows::Message;
use crate::trl_template;
use minijinja::{context, Environment, ErrorKind};
use std::ops::Range;

/// Private-use characters that stand for `{% generation %}` / `{% endgeneration %}` in
/// the rendered text until the spans are extracted.
const GEN_START: char = '\u{E000}';
const GEN_END: char = '\u{E001}';

/// Where the assistant spans of a conversation come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssistantMask {
    /// The template's own `{% generation %}` markers.
    GenerationMarkers,
    /// The markers of TRL's training variant of this family's template, rendered in its place.
    TrlTrainingTemplate(&'static str),
    /// What each assistant turn adds to the text of the conversation before it.
    PrefixDiff,
}

impl std::fmt::Display for AssistantMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GenerationMarkers => write!(f, "the template's {{% generation %}} markers"),
            Self::TrlTrainingTemplate(family) => write!(f, "TRL's training template for {family}"),
            Self::PrefixDiff => write!(f, "what each assistant turn adds to the conversation before it"),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    assistant_mask: AssistantMask,
    bos_token: String,
    eos_token: String,
}

/// Rewrites `{% generation %}` and `{% endgeneration %}` (with any whitespace control) into
/// expressions that print the marker characters, keeping the whitespace control.
fn replace_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start..start + len + 2];
        let inner = tag[2..tag.len() - 2].trim_start_matches('-').trim_end_matches('-').trim();
        out.push_str(&rest[..start]);
        let marker = match inner {
            "generation" => Some(GEN_START),
            "endgeneration" => Some(GEN_END),
            _ => None,
        };
        match marker {
            Some(m) => {
                found = true;
                let left = if tag.starts_with("{%-") { "{{-" } else { "{{" };
                let right = if tag.ends_with("-%}") { "-}}" } else { "}}" };
                out.push_str(&format!("{left} '{m}' {right}"));
            }
            None => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Formats the current UTC time with the strftime directives chat templates use.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, String> {
        let (marked, has_generation_markers) = replace_generation_tags(source);
        let variant = trl_template::training_variant(source).filter(|_| !has_generation_markers);
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| e.to_string())?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", marked).map_err(|e| format!("chat template does not parse: {e}"))?;
        let assistant_mask = match variant {
            Some((family, training)) => {
                let (training, _) = replace_generation_tags(training);
                env.add_template_owned("training", training).map_err(|e| format!("{family} training template: {e}"))?;
                AssistantMask::TrlTrainingTemplate(family)
            }
            None if has_generation_markers => AssistantMask::GenerationMarkers,
            None => AssistantMask::PrefixDiff,
        };
        Ok(Self {
            env,
            assistant_mask,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    fn render_raw(&self, name: &str, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template(name).map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => format!("chat template refused the row: {}", e.detail().unwrap_or("")),
                _ => format!("chat template failed: {e}"),
            })
    }

    /// Where this template's assistant spans come from.
    pub fn assistant_mask(&self) -> AssistantMask {
        self.assistant_mask
    }

    /// The conversation as text, as `apply_chat_template(tokenize=False)` gives it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        Ok(self.render_raw("chat", messages, add_generation_prompt)?.replace([GEN_START, GEN_END], ""))
    }

    /// The rendered conversation and the byte ranges of it that assistant turns contribute
    /// (for a template TRL has a training variant of, the variant's rendering, as TRL trains).
    pub fn render_with_assistant_spans(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>), String> {
        let marked = match self.assistant_mask {
            AssistantMask::GenerationMarkers => Some("chat"),
            AssistantMask::TrlTrainingTemplate(_) => Some("training"),
            AssistantMask::PrefixDiff => None,
        };
        if let Some(name) = marked {
            let raw = self.render_raw(name, messages, false)?;
            let mut text = String::with_capacity(raw.len());
            let (mut spans, mut open) = (Vec::new(), None);
            for c in raw.chars() {
                match c {
                    GEN_START => open = Some(text.len()),
                    GEN_END => spans.extend(open.take().map(|s| s..text.len())),
                    _ => text.push(c),
                }
            }
            return Ok((text, spans));
        }
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(format!(
                    "chat template renders assistant turn {i} inconsistently (a conversation prefix is not a prefix of the whole), \
                     so its loss mask cannot be found; add {{% generation %}} markers to the template"
                ));
            }
            if through.len() > before.len() && !m.content.is_empty() {
                spans.push(before.len()..through.len());
            }
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect()
    }

    // A ChatML template, as Qwen ships it (trim_blocks matters for the newlines).
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn prefix_diffing_finds_assistant_turns() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let m = msgs(&[("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6")]);
        let (text, spans) = t.render_with_assistant_spans(&m).unwrap();
        let parts: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(parts, vec!["4<|im_end|>\n", "6<|im_end|>\n"]);
    }

    #[test]
    fn generation_markers_give_the_spans() {
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, None, Some("</s>".into())).unwrap();
        let (text, spans) = t.render_with_assistant_spans(&msgs(&[("user", "hi"), ("assistant", "yo")])).unwrap();
        assert_eq!(text, "U: hi\nA: yo</s>\n");
        assert_eq!(spans.iter().map(|s| &text[s.clone()]).collect::<Vec<_>>(), vec!["yo</s>"]);
    }

    #[test]
    fn raise_exception_and_python_methods_work() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}{{ m.content.strip() | upper }}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "  hi ")]), false).unwrap(), "HI");
        let err = t.render(&msgs(&[("tool", "x")]), false).unwrap_err();
        assert!(err.contains("unknown role tool"), "{err}");
        let date = strftime_now("%d %b %Y".into());
        assert_eq!(date.len(), 11, "{date}");
    }
}
