//! A prompt and its answers as tokens, split the way TRL splits them: the prompt alone (with
//! the generation prompt, for a conversation) and the prompt followed by each answer are
//! tokenized whole, and the answer starts where those token sequences diverge. Usually that is
//! the end of the prompt; where a template renders the prompt differently once an answer
//! follows (DeepSeek-V3 opens a `<think>` only for generation), or tokens merge across the
//! boundary, the diverging end of the prompt is left out, as TRL leaves it out. A text answer
//! ends with the end-of-sequence token, appended unless it is there.

use crate::example::Encoder;
use crate::rows::{Answer, Message, Prompt};

/// How many leading tokens `a` and `b` share.
fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Encoder<'_> {
    /// The tokens of `prompt` followed by `answer`: one conversation rendered, or one string.
    fn prompt_and_answer_ids(&self, prompt: &Prompt, answer: &Answer) -> Result<Vec<u32>, String> {
        match (prompt, answer) {
            (Prompt::Text(p), Answer::Text(a)) => {
                let eos = self.tokenizer.eos_token.as_deref().filter(|e| !a.ends_with(e)).unwrap_or_default();
                self.tokens(&format!("{p}{a}{eos}"), true)
            }
            (Prompt::Chat(p), answer) => {
                let answer = match answer {
                    Answer::Text(a) => vec![Message { role: "assistant".into(), content: a.clone() }],
                    Answer::Chat(m) => m.clone(),
                };
                self.tokens(&self.chat_template()?.render(&[p.clone(), answer].concat(), false)?, false)
            }
            (Prompt::Text(_), Answer::Chat(_)) => {
                Err("answers given as messages need the prompt as messages too (`messages` or a list in `prompt`)"
                    .into())
            }
        }
    }

    /// The prompt's tokens, and each answer's after them (see the module docs).
    pub(crate) fn prompt_and_answers(
        &self,
        prompt: &Prompt,
        answers: &[&Answer],
    ) -> Result<(Vec<u32>, Vec<Vec<u32>>), String> {
        let prompt_ids = match prompt {
            Prompt::Text(p) => self.tokens(p, true)?,
            Prompt::Chat(p) => self.tokens(&self.chat_template()?.render(p, true)?, false)?,
        };
        let whole: Vec<Vec<u32>> =
            answers.iter().map(|a| self.prompt_and_answer_ids(prompt, a)).collect::<Result<_, _>>()?;
        let shared = whole.iter().map(|w| common_prefix_len(&prompt_ids, w)).min().unwrap_or(prompt_ids.len());
        Ok((prompt_ids[..shared].to_vec(), whole.into_iter().map(|w| w[shared..].to_vec()).collect()))
    }

    /// The prompt's tokens and one answer's.
    pub(crate) fn prompt_and_answer(&self, prompt: &Prompt, answer: &Answer) -> Result<(Vec<u32>, Vec<u32>), String> {
        let (prompt, mut answers) = self.prompt_and_answers(prompt, &[answer])?;
        Ok((prompt, answers.pop().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::common_prefix_len;

    #[test]
    fn common_prefix_stops_at_the_first_difference() {
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(common_prefix_len(&[1, 2, 9], &[1, 2, 3, 4]), 2);
        assert_eq!(common_prefix_len(&[], &[1]), 0);
    }
}
