//! The key/value cache of generation: every layer's keys and values (after RoPE) for `slots`
//! sequences decoded at once and `prompts` prompts they continue. A prompt is cached once, in
//! rows `p·prompt_len + t` of prompt slot `p`, and every sequence of that prompt (a GRPO group's
//! completions) reads those rows; a sequence's own tokens follow in its slot `s`, token `t` past
//! its prompt in row `prompts·prompt_len + s·own_len + t`. Slots are reused as soon as their
//! sequences (for a prompt slot, all of them) finish: rows are overwritten, and attention only
//! reads the rows a sequence has written, so nothing needs clearing.
//!
//! Multi-head latent attention caches, per token, only its latent rows as DeepSeek's inference
//! does: `[c' ; k_pe]` as one shared key head and `c'` as its value (kv_lora_rank +
//! qk_rope_head_dim + kv_lora_rank values, against heads × (qk_head_dim + v_head_dim)
//! expanded), with the up-projections absorbed into the query and the output at decode
//! (`layers::mla`). Where the backend's decode attention cannot take rows that wide, it
//! caches the expanded keys and values instead.
//!
//! DeepSeek-V4's caches (`v4_cache`) keep a whole sequence per slot, token `t` of slot `s` at
//! `s·max_len + t`, and share no prompt rows.

use crate::config::{AttentionKind, Config};
use crate::v4_cache::V4Cache;
use kiln_core::{Backend, DecodeAttention, Precision};

pub struct KvCache<B: Backend> {
    pub shape: CacheShape,
    pub(crate) k: Vec<B::Buf>,
    pub(crate) v: Vec<B::Buf>,
    kv_heads: usize,
    head_dim: usize,
    v_head_dim: usize,
    /// How keys and values are stored: the model's matrix-product precision.
    pub(crate) storage: Precision,
    /// DeepSeek-V4's window and compressed caches, in place of `k` and `v` (kept in f32).
    pub(crate) v4: Option<V4Cache<B>>,
    /// Multi-head latent attention's latent rows, in place of expanded keys and values.
    pub(crate) latent: bool,
}

/// How many sequences and prompts a cache holds, and how long they may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub slots: usize,
    /// Tokens a sequence may add to its prompt (its own rows).
    pub own_len: usize,
    pub prompts: usize,
    pub prompt_len: usize,
}

impl CacheShape {
    /// Rows of keys and values in all.
    pub fn rows(&self) -> usize {
        self.prompts * self.prompt_len + self.slots * self.own_len
    }
}

/// Where one sequence is cached: its slot, and its prompt's slot and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slot: usize,
    pub prompt: usize,
    pub prompt_len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache storing its keys and values in `storage` (bf16 for a bf16 model: decode reads
    /// every cached row for every new token, so this halves its memory traffic).
    pub fn new(b: &B, cfg: &Config, shape: CacheShape, storage: Precision) -> Self {
        let mut latent = false;
        let (kv_heads, head_dim, v_head_dim) = match &cfg.attention {
            AttentionKind::Gqa => (cfg.num_kv_heads, cfg.head_dim, cfg.head_dim),
            AttentionKind::Mla(m) if m.kv_lora_rank + m.qk_rope_head_dim <= b.max_decode_head_dim() => {
                latent = true;
                (1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank)
            }
            AttentionKind::Mla(m) => (cfg.num_heads, cfg.head_dim, m.v_head_dim),
            AttentionKind::V4(v4) => {
                let max_len = shape.prompt_len + shape.own_len;
                let v4 = Some(V4Cache::new(b, cfg, v4, shape.slots, max_len));
                let storage = Precision::F32;
                return Self {
                    shape,
                    k: Vec::new(),
                    v: Vec::new(),
                    kv_heads: 0,
                    head_dim: 0,
                    v_head_dim: 0,
                    storage,
                    v4,
                    latent: false,
                };
            }
        };
        let (k_row, v_row) = (kv_heads * head_dim, kv_heads * v_head_dim);
        let rows = shape.rows();
        Self {
            shape,
            k: (0..cfg.num_layers).map(|_| b.zeros(storage.words(rows * k_row))).collect(),
            v: (0..cfg.num_layers).map(|_| b.zeros(storage.words(rows * v_row))).collect(),
            kv_heads,
            head_dim,
            v_head_dim,
            storage,
            v4: None,
            latent,
        }
    }

    /// The cache row of token `pos` of the sequence placed at `at`.
    pub fn row(&self, at: Placement, pos: usize) -> i32 {
        let CacheShape { slots, own_len, prompts, prompt_len } = self.shape;
        let own = pos.checked_sub(at.prompt_len);
        let in_range = at.slot < slots && at.prompt < prompts && at.prompt_len <= prompt_len;
        assert!(
            in_range && own.is_none_or(|t| t < own_len),
            "kv cache: {at:?}, position {pos} out of range of {:?}",
            self.shape
        );
        let row = match (own, self.v4.is_some()) {
            (_, true) => at.slot * (prompt_len + own_len) + pos,
            (None, false) => at.prompt * prompt_len + pos,
            (Some(t), false) => prompts * prompt_len + at.slot * own_len + t,
        };
        row as i32
    }

    /// The rows the token at `pos` of the sequence at `at` attends when decoded (its
    /// prompt's, then its own up to itself), as `DecodeAttention`'s starts and lengths.
    pub fn decode_ranges(&self, at: Placement, pos: usize) -> ([i32; 2], [i32; 2]) {
        assert!(pos >= at.prompt_len, "kv cache: decoding position {pos} inside the prompt");
        ([self.row(at, 0), self.row(at, at.prompt_len)], [at.prompt_len as i32, (pos + 1 - at.prompt_len) as i32])
    }

    /// The decode attention of `queries` new tokens with `q_heads` query heads.
    pub(crate) fn decode_spec(
        &self,
        queries: usize,
        q_heads: usize,
        scale: f32,
        window: Option<usize>,
    ) -> DecodeAttention {
        DecodeAttention {
            queries,
            q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            v_head_dim: self.v_head_dim,
            scale,
            window,
            cache: self.storage,
        }
    }
}

/// Where a cached forward puts its tokens: the cache row of every token (negative: padding,
/// not cached), when decoding one new token per row the cached rows each one attends (two
/// ranges per token, `DecodeAttention`'s starts and lengths), and the tokens whose next-token
/// logits are wanted.
pub struct CachePlan<'a> {
    pub rows: &'a [i32],
    pub decode: Option<(&'a [i32], &'a [i32])>,
    pub logits_at: &'a [i32],
}

impl<B: Backend> KvCache<B> {
    /// Values cached per token over all layers: keys and values, or their latent rows
    /// (DeepSeek-V4's caches, kept apart, are not counted).
    pub fn values_per_token(&self) -> usize {
        (self.kv_heads * (self.head_dim + self.v_head_dim)) * self.k.len()
    }
}
