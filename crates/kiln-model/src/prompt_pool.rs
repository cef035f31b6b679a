//! The prompts a generation holds in its cache: which prompt slot holds which prompt, how many
//! of the running sequences read it, and the next-token logits after it. A request whose prompt
//! is still held (another completion of its GRPO group, admitted later) joins it: it reads the
//! same cached rows and draws its first token from the same logits, with no prefill, exactly
//! as if it had been admitted with the others. A slot is free again once its last reader
//! finishes.

pub(crate) struct PromptPool<'r> {
    slots: Vec<Option<HeldPrompt<'r>>>,
    /// Whether requests of the same prompt share its slot (else each opens its own).
    share: bool,
}

struct HeldPrompt<'r> {
    tokens: &'r [i32],
    readers: usize,
    /// The logits after the prompt's last token, once prefilled.
    logits: Vec<f32>,
}

impl<'r> PromptPool<'r> {
    pub fn new(slots: usize, share: bool) -> Self {
        Self { slots: (0..slots).map(|_| None).collect(), share }
    }

    /// A slot for `prompt` with one more reader, and whether it was opened now (its prompt
    /// still to be prefilled): the slot already holding it when sharing, else a free one.
    pub fn place(&mut self, prompt: &'r [i32]) -> (usize, bool) {
        let held =
            (self.slots.iter()).position(|s| s.as_ref().is_some_and(|h| h.tokens == prompt)).filter(|_| self.share);
        if let Some(slot) = held {
            self.slots[slot].as_mut().expect("held").readers += 1;
            return (slot, false);
        }
        let slot = (self.slots.iter().position(Option::is_none))
            .expect("prompt pool: a free slot (held prompts never outnumber running sequences)");
        self.slots[slot] = Some(HeldPrompt { tokens: prompt, readers: 1, logits: Vec::new() });
        (slot, true)
    }

    pub fn tokens(&self, slot: usize) -> &'r [i32] {
        self.held(slot).tokens
    }

    pub fn set_logits(&mut self, slot: usize, logits: &[f32]) {
        self.slots[slot].as_mut().expect("prompt pool: setting the logits of a free slot").logits = logits.to_vec();
    }

    pub fn logits(&self, slot: usize) -> &[f32] {
        &self.held(slot).logits
    }

    /// One reader of `slot` finished; the slot is free once none is left.
    pub fn leave(&mut self, slot: usize) {
        let held = self.slots[slot].as_mut().expect("prompt pool: leaving a free slot");
        held.readers -= 1;
        if held.readers == 0 {
            self.slots[slot] = None;
        }
    }

    fn held(&self, slot: usize) -> &HeldPrompt<'r> {
        self.slots[slot].as_ref().expect("prompt pool: a free slot read")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_prompts_share_a_slot_until_their_last_reader_leaves() {
        let (a, b) = ([1, 2, 3], [4, 5]);
        let mut pool = PromptPool::new(2, true);
        assert_eq!(pool.place(&a), (0, true));
        assert_eq!(pool.place(&b), (1, true));
        assert_eq!(pool.place(&a), (0, false));
        pool.leave(0);
        assert_eq!(pool.tokens(0), &a, "a reader is left");
        pool.leave(0);
        assert_eq!(pool.place(&b), (1, false));
        assert_eq!(pool.place(&a), (0, true), "its slot was freed, so it is prefilled again");
    }

    #[test]
    fn without_sharing_every_request_opens_a_slot() {
        let a = [1, 2, 3];
        let mut pool = PromptPool::new(2, false);
        assert_eq!(pool.place(&a), (0, true));
        assert_eq!(pool.place(&a), (1, true));
    }
}
