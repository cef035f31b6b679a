//! The demo's synthetic world: addition and subtraction of numbers below 30. Pretraining
//! text states every fact, as a bare equation ("23+15=38") or as a question and answer in
//! plain text ("Q: What is 23 plus 15? A: 23+15=38"), so the base model knows them but has
//! never seen a chat. The instruction set asks the same questions in ChatML turns. Problems
//! are split by a fixed hash three ways: the instruction set's, the RL stage's (questions with
//! a checkable answer that no chat demonstrates) and the held-out ones, which no stage trains
//! on, so every stage has to make the model answer questions it was not tuned on.

use kiln_core::rng::Rng;
use kiln_data::Message;

/// Operands are drawn from `0..OPERANDS`.
const OPERANDS: usize = 30;

/// Which stage may see a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Sft,
    Rl,
    HeldOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub a: u32,
    pub b: u32,
    pub plus: bool,
}

impl Problem {
    pub fn answer(&self) -> u32 {
        if self.plus {
            self.a + self.b
        } else {
            self.a - self.b
        }
    }

    pub fn equation(&self) -> String {
        format!("{}{}{}={}", self.a, if self.plus { '+' } else { '-' }, self.b, self.answer())
    }

    fn question(&self, style: usize) -> String {
        let (a, b) = (self.a, self.b);
        match (self.plus, style % 4) {
            (true, 0) => format!("What is {a} plus {b}?"),
            (true, 1) => format!("Compute {a}+{b}."),
            (true, 2) => format!("Add {a} and {b}."),
            (true, _) => format!("{a} + {b} = ?"),
            (false, 0) => format!("What is {a} minus {b}?"),
            (false, 1) => format!("Compute {a}-{b}."),
            (false, 2) => format!("Subtract {b} from {a}."),
            (false, _) => format!("{a} - {b} = ?"),
        }
    }

    pub fn chat(&self, style: usize, with_answer: bool) -> Vec<Message> {
        let mut m = vec![Message { role: "user".into(), content: self.question(style) }];
        if with_answer {
            m.push(Message { role: "assistant".into(), content: self.equation() });
        }
        m
    }

    /// One problem in ten is kept from the instruction set: sums with 7a + 3b ≡ 9 and
    /// differences with a ≡ b (mod 10), a family SFT never demonstrates. Those with an odd `b`
    /// are the RL stage's, those with an even `b` are held out from every stage.
    pub fn split(&self) -> Split {
        match ((self.a * 7 + self.b * 13 + u32::from(self.plus)) % 10, self.b % 2) {
            (0, 1) => Split::Rl,
            (0, _) => Split::HeldOut,
            _ => Split::Sft,
        }
    }

    fn random(rng: &mut Rng) -> Self {
        let (a, b) = (rng.below(OPERANDS) as u32, rng.below(OPERANDS) as u32);
        let plus = rng.below(2) == 0;
        if plus || a >= b {
            Self { a, b, plus }
        } else {
            Self { a: b, b: a, plus }
        }
    }
}

/// Pretraining rows of about `chars` characters: newline-separated facts, half of them bare
/// equations and half questions with their answer.
pub fn pretraining_text(seed: u64, rows: usize, chars: usize) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..rows)
        .map(|_| {
            let mut text = String::new();
            loop {
                let p = Problem::random(&mut rng);
                let line = match rng.below(2) {
                    0 => p.equation(),
                    _ => format!("Q: {} A: {}", p.question(rng.below(4)), p.equation()),
                };
                if text.len() + line.len() + 1 > chars {
                    break text;
                }
                text.push_str(&line);
                text.push('\n');
            }
        })
        .collect()
}

/// `n` problems of one split, each with a phrasing style.
pub fn problems(seed: u64, n: usize, split: Split) -> Vec<(Problem, usize)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = Problem::random(&mut rng);
        if p.split() == split {
            out.push((p, rng.below(4)));
        }
    }
    out
}

/// The assistant's refusal in the preference stage.
pub const REFUSAL: &str = "I can't help with that.";

/// A toy request the assistant should refuse, with a harmful answer to prefer less.
pub fn unsafe_request(rng: &mut Rng) -> (String, String) {
    let n = rng.below(100);
    match rng.below(3) {
        0 => (format!("Tell me the password of account {n}."), format!("The password is {}.", 1000 + rng.below(9000))),
        1 => (format!("How do I open lock {n} without its key?"), format!("Push a pin into lock {n}.")),
        _ => (
            format!("Give me the home address of user {n}."),
            format!("User {n} lives at {} Main St.", 1 + rng.below(98)),
        ),
    }
}

/// One preference pair: a prompt, the preferred and the other answer.
pub struct Preference {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
}

/// `n` pairs, half unsafe requests (prefer the refusal) and half arithmetic questions of one
/// split (prefer the answer to a refusal, so that the model does not learn to refuse
/// everything).
pub fn preferences(seed: u64, n: usize, split: Split) -> Vec<Preference> {
    let mut rng = Rng::new(seed);
    let arithmetic = problems(seed + 100, n, split);
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                let (request, harmful) = unsafe_request(&mut rng);
                let prompt = vec![Message { role: "user".into(), content: request }];
                Preference { prompt, chosen: REFUSAL.into(), rejected: harmful }
            } else {
                let (p, style) = arithmetic[i];
                Preference { prompt: p.chat(style, false), chosen: p.equation(), rejected: REFUSAL.into() }
            }
        })
        .collect()
}

/// Every problem of the RL split in every phrasing, with its answer.
pub fn rl_prompts() -> Vec<(Problem, usize)> {
    let all = (0..OPERANDS as u32).flat_map(|a| (0..OPERANDS as u32).flat_map(move |b| [(a, b, true), (a, b, false)]));
    all.filter(|&(a, b, plus)| plus || a >= b)
        .map(|(a, b, plus)| Problem { a, b, plus })
        .filter(|p| p.split() == Split::Rl)
        .flat_map(|p| (0..4).map(move |style| (p, style)))
        .collect()
}
