//! DeepSeek-V4's generation caches (transformers' `DeepseekV4HCACache` and `DeepseekV4CSACache`)
//! laid out in kiln's slots, one sequence per slot, and where each forward over them reads and
//! writes (`V4Step`, worked out on the host from the `CachePlan`). Per layer:
//!
//! - the sliding window's keys (which are also its values): a ring of `ring = min(window,
//!   max_len)` rows per slot, token p of slot s in row s·ring + p mod ring;
//! - a compressed layer (rate m, c = 2 series with CSA's overlapping windows, else 1): the
//!   compressor's projected kv and gate rows of the last c·m tokens (what the next entry still
//!   pools: the window being filled and, with overlap, the one before), in a ring of c·m rows
//!   per slot; and every entry pooled so far, normalised and rotated, entry w of slot s in row
//!   s·(max_len / m) + w. A CSA layer keeps the same two for its indexer's keys.
//!
//! A prefill runs the training forward over its prompts and then stores these from its
//! activations. A decode step stores each new token's rows, pools the entries whose windows
//! its tokens complete, and attends the cached window and entries (`layers::v4_decode`).

use crate::compress_plan::every_visible;
use crate::config::Config;
use crate::config_v4::{Compression, V4Attention, V4Config};
use crate::kv_cache::CachePlan;
use kiln_core::Backend;

/// The caches of every layer for `slots` sequences of up to `max_len` tokens.
pub struct V4Cache<B: Backend> {
    slots: usize,
    max_len: usize,
    window: usize,
    /// Sliding rows per slot.
    ring: usize,
    pub(crate) layers: Vec<V4LayerCache<B>>,
}

pub struct V4LayerCache<B: Backend> {
    /// `[slots·ring, head_dim]`.
    pub(crate) kv: B::Buf,
    pub(crate) compressed: Option<CompressedCache<B>>,
}

pub struct CompressedCache<B: Backend> {
    /// `[slots·c·rate, c·head_dim]` each.
    pub(crate) raw_kv: B::Buf,
    pub(crate) raw_gate: B::Buf,
    /// `[slots·max_entries, head_dim]`.
    pub(crate) entries: B::Buf,
    /// The indexer's raw rows (`[slots·2·rate, 2·index_head_dim]` each) and keys
    /// (`[slots·max_entries, index_head_dim]`), for CSA.
    pub(crate) indexer: Option<(B::Buf, B::Buf, B::Buf)>,
}

impl<B: Backend> V4Cache<B> {
    pub fn new(b: &B, c: &Config, v4: &V4Config, slots: usize, max_len: usize) -> Self {
        let ring = v4.window.min(max_len);
        let hd = c.head_dim;
        let layers = (v4.layers.iter())
            .map(|kind| V4LayerCache {
                kv: b.zeros(slots * ring * hd),
                compressed: kind.compression().map(|k| {
                    let (rate, series) = (k.rate, k.series());
                    let (raw, entries) = (slots * series * rate, slots * (max_len / rate));
                    let ihd = v4.index_head_dim;
                    CompressedCache {
                        raw_kv: b.zeros(raw * series * hd),
                        raw_gate: b.zeros(raw * series * hd),
                        entries: b.zeros(entries * hd),
                        indexer: k
                            .overlap
                            .then(|| (b.zeros(raw * 2 * ihd), b.zeros(raw * 2 * ihd), b.zeros(entries * ihd))),
                    }
                }),
            })
            .collect();
        Self { slots, max_len, window: v4.window, ring, layers }
    }
}

/// Where one forward's tokens go in the caches and, when decoding, what they attend.
pub struct V4Step<B: Backend> {
    /// Each token's sliding row; −1 for padding and for prompt tokens that the window has
    /// already left behind by the prompt's end.
    kv_rows: B::Index,
    /// Decoding: each token's window (`[tokens, ring]`, its rows oldest first, −1 after).
    window: Option<B::Index>,
    /// Sliding rows in all (`slots·ring`) and per token's window.
    kv_table: usize,
    ring: usize,
    /// Per (rate, overlap) of the compressed layers.
    compress: Vec<CompressStep<B>>,
}

pub struct CompressStep<B: Backend> {
    pub compression: Compression,
    /// Each token's raw ring row; −1 for padding and for prompt tokens no later entry pools.
    pub raw_rows: B::Index,
    /// Entries in the cache (`slots·max_entries`).
    pub table: usize,
    /// Prefill: the cache row of each of the batch's pooled entries (in `CompressPlan` order).
    /// Decoding: that of each entry completed by this step. `entries` counts them.
    pub entry_rows: B::Index,
    pub entries: usize,
    /// Decoding: the completed entries' windows (raw ring rows, `[entries, c·rate]`, as
    /// `CompressPlan::slots`) and positions; each token's visible entries (`[tokens, 2]`:
    /// first cache row and count) and all of them (`[tokens, most_visible]`, −1 after).
    pub windows: B::Index,
    pub positions: B::Index,
    pub visible: B::Index,
    pub all_visible: B::Index,
    pub most_visible: usize,
}

/// A layer's part of a `V4Step`.
pub struct LayerStep<'a, B: Backend> {
    pub kv_rows: &'a B::Index,
    /// Decoding: each token's window rows, with the table and window sizes.
    pub window: Option<(&'a B::Index, usize, usize)>,
    pub compress: Option<&'a CompressStep<B>>,
}

/// A token of the forward: its slot and position.
#[derive(Clone, Copy)]
struct Token {
    slot: usize,
    pos: usize,
}

impl<B: Backend> V4Step<B> {
    /// The step of a forward over rows of `seq` tokens.
    pub fn new(b: &B, cache: &V4Cache<B>, v4: &V4Config, plan: &CachePlan, seq: usize) -> Self {
        let tokens: Vec<Option<Token>> = (plan.rows.iter())
            .map(|&r| (r >= 0).then(|| Token { slot: r as usize / cache.max_len, pos: r as usize % cache.max_len }))
            .collect();
        // Each slot's tokens so far, once this forward's are in.
        let mut length = vec![0; cache.slots];
        for t in tokens.iter().flatten() {
            length[t.slot] = length[t.slot].max(t.pos + 1);
        }
        let decoding = plan.decode.is_some();
        let ring = cache.ring;
        // A cached row of the last `keep` tokens of its sequence, else −1.
        let kept = |t: &Option<Token>, keep: usize| match t {
            Some(t) if t.pos + keep >= length[t.slot] => (t.slot * keep + t.pos % keep) as i32,
            _ => -1,
        };
        let kv_rows: Vec<i32> = tokens.iter().map(|t| kept(t, ring)).collect();
        let window = decoding.then(|| {
            let rows = tokens.iter().flat_map(|t| {
                let t = t.expect("a decoded token has a cache row");
                let first = (t.pos + 1).saturating_sub(cache.window);
                (0..ring).map(move |j| {
                    let p = first + j;
                    if p <= t.pos {
                        (t.slot * ring + p % ring) as i32
                    } else {
                        -1
                    }
                })
            });
            b.upload_index(&rows.collect::<Vec<_>>())
        });
        let compress = (v4.compressions().into_iter())
            .map(|compression| {
                let rate = compression.rate;
                let (raw_ring, per_slot) = (compression.series() * rate, cache.max_len / rate);
                let raw_rows: Vec<i32> = tokens.iter().map(|t| kept(t, raw_ring)).collect();
                let (mut entry_rows, mut windows, mut positions) = (Vec::new(), Vec::new(), Vec::new());
                if decoding {
                    for t in tokens.iter().flatten().filter(|t| (t.pos + 1) % rate == 0) {
                        let w = (t.pos + 1) / rate - 1;
                        let raw =
                            |w: usize| (0..rate).map(move |i| (t.slot * raw_ring + (w * rate + i) % raw_ring) as i32);
                        if compression.overlap {
                            match w {
                                0 => windows.extend(std::iter::repeat_n(-1, rate)),
                                _ => windows.extend(raw(w - 1)),
                            }
                        }
                        windows.extend(raw(w));
                        positions.push((w * rate) as i32);
                        entry_rows.push((t.slot * per_slot + w) as i32);
                    }
                } else {
                    // The prefill's entries, sequence after sequence as `CompressPlan` numbers
                    // them (a prompt fills its row from position 0).
                    for row in plan.rows.chunks(seq) {
                        let Some(&first) = row.iter().find(|&&r| r >= 0) else { continue };
                        let slot = first as usize / cache.max_len;
                        let len = row.iter().filter(|&&r| r >= 0).count();
                        entry_rows.extend((0..len / rate).map(|w| (slot * per_slot + w) as i32));
                    }
                }
                let visible: Vec<i32> = (tokens.iter())
                    .flat_map(|t| t.map_or([0, 0], |t| [(t.slot * per_slot) as i32, ((t.pos + 1) / rate) as i32]))
                    .collect();
                let (all_visible, most_visible) = every_visible(&visible);
                CompressStep {
                    compression,
                    raw_rows: b.upload_index(&raw_rows),
                    table: cache.slots * per_slot,
                    entries: entry_rows.len(),
                    entry_rows: b.upload_index(&entry_rows),
                    windows: b.upload_index(&windows),
                    positions: b.upload_index(&positions),
                    visible: b.upload_index(&visible),
                    all_visible: b.upload_index(&all_visible),
                    most_visible,
                }
            })
            .collect();
        Self { kv_rows: b.upload_index(&kv_rows), window, kv_table: cache.slots * ring, ring, compress }
    }

    /// The part of layer kind `kind`.
    pub fn layer(&self, kind: &V4Attention) -> LayerStep<'_, B> {
        LayerStep {
            kv_rows: &self.kv_rows,
            window: self.window.as_ref().map(|w| (w, self.kv_table, self.ring)),
            compress: kind
                .compression()
                .map(|k| (self.compress.iter()).find(|s| s.compression == k).expect("a step per compression")),
        }
    }
}
