//! The key/value cache of generation: every layer's keys and values (after RoPE) for `slots`
//! sequences of up to `max_len` tokens, slot `s` holding token `p` in row `s·max_len + p`. A
//! slot is reused by the next sequence as soon as its own finishes: rows are overwritten, and
//! attention only reads a sequence's first `length` rows, so nothing needs clearing.
//!
//! Multi-head latent attention caches, per token, only its latent rows as DeepSeek's inference
//! does: `[c' ; k_pe]` as one shared key head and `c'` as its value (kv_lora_rank +
//! qk_rope_head_dim + kv_lora_rank values, against heads × (qk_head_dim + v_head_dim)
//! expanded), with the up-projections absorbed into the query and the output at decode
//! (`layers::mla`). Where the backend's decode attention cannot take rows that wide, it
//! caches the expanded keys and values instead.

use crate::config::{AttentionKind, Config};
use crate::v4_cache::V4Cache;
use kiln_core::{Backend, DecodeAttention, Precision};

pub struct KvCache<B: Backend> {
    pub slots: usize,
    pub max_len: usize,
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

impl<B: Backend> KvCache<B> {
    /// A cache storing its keys and values in `storage` (bf16 for a bf16 model: decode reads
    /// every cached row for every new token, so this halves its memory traffic).
    pub fn new(b: &B, cfg: &Config, slots: usize, max_len: usize, storage: Precision) -> Self {
        let mut latent = false;
        let (kv_heads, head_dim, v_head_dim) = match &cfg.attention {
            AttentionKind::Gqa => (cfg.num_kv_heads, cfg.head_dim, cfg.head_dim),
            AttentionKind::Mla(m) if m.kv_lora_rank + m.qk_rope_head_dim <= b.max_decode_head_dim() => {
                latent = true;
                (1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank)
            }
            AttentionKind::Mla(m) => (cfg.num_heads, cfg.head_dim, m.v_head_dim),
            AttentionKind::V4(v4) => {
                let v4 = Some(V4Cache::new(b, cfg, v4, slots, max_len));
                let storage = Precision::F32;
                return Self {
                    slots,
                    max_len,
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
        let rows = slots * max_len;
        Self {
            slots,
            max_len,
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

    /// The cache row of token `pos` of the sequence in `slot`.
    pub fn row(&self, slot: usize, pos: usize) -> i32 {
        assert!(slot < self.slots && pos < self.max_len, "kv cache: slot {slot}, position {pos} out of range");
        (slot * self.max_len + pos) as i32
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
/// not cached), further rows to write the same keys and values into (`copies`, each a list
/// like `rows`: a prompt prefilled once for the several sequences that share it), when
/// decoding one new token per row the cached rows each one attends (`starts[i] .. starts[i] +
/// lengths[i]`, itself included), and the tokens whose next-token logits are wanted.
pub struct CachePlan<'a> {
    pub rows: &'a [i32],
    pub copies: &'a [Vec<i32>],
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
