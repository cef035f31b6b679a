//! What the preference recipes (DPO, reward models, KTO) share: splits of examples packed
//! into micro-batches, each sequence's summed completion log-prob from a forward's per-token
//! nll, and the reference model's log-probs, computed once before training (shared out over
//! the ranks) and cached in the output directory (`reference_logps.json`), so that no second
//! model is in memory while training.

use crate::config::RunConfig;
use crate::data::{check_bad_rows, encode_splits, encoder};
use crate::loader::{build_batch, pack_groups, sequence_spans, PackedRow};
use crate::session::Session;
use anyhow::{Context, Result};
use kiln_core::Backend;
use kiln_data::example::{Encoder, Example};
use kiln_data::preference::{read_preference_rows, PreferencePair};
use kiln_model::{ActivationsPool, ChunkOrder, Model};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A split's examples, their packing into micro-batches, and their reference log-probs.
pub struct Split {
    pub examples: Vec<Example>,
    pub micro_batches: Vec<Vec<PackedRow>>,
    /// Rows a micro-batch is laid out in (at least).
    pub rows: usize,
    pub reference: Option<Vec<f64>>,
    /// Per pair (examples `2k`, `2k + 1`): the row's `margin` column, where it has one.
    pub margins: Vec<Option<f64>>,
}

impl Split {
    /// Preference pairs (examples `2k` and `2k + 1`), packed so that a pair shares its
    /// micro-batch.
    pub fn pairs(
        (examples, margins): (Vec<Example>, Vec<Option<f64>>),
        rows: usize,
        seq: usize,
        name: &str,
    ) -> Result<Self> {
        let micro_batches = pack_groups(&examples, 2, rows, seq).with_context(|| {
            format!("{name} data: a pair does not fit one micro-batch of {rows} rows of {seq} tokens; raise train.batch_tokens")
        })?;
        Ok(Self { examples, micro_batches, rows, reference: None, margins })
    }
}

/// The pairs of one split as examples, `2k` prompt + chosen and `2k + 1` prompt + rejected,
/// trainable on the answers, and each pair's margin.
fn encode_pairs(
    files: &[PathBuf],
    encoder: &Encoder,
    max_bad_fraction: f64,
    split: &str,
) -> Result<(Vec<Example>, Vec<Option<f64>>)> {
    let (mut pairs, mut bad) = (Vec::new(), Vec::new());
    for f in files {
        for row in read_preference_rows(f)? {
            match row.and_then(|r| encoder.encode_pair(&r)) {
                Ok(p) => pairs.push(p),
                Err(e) => bad.push(e),
            }
        }
    }
    check_bad_rows(split, files, pairs.len(), &bad, max_bad_fraction)?;
    let example = |p: &PreferencePair, answer: &[u32]| prompt_completion(&p.prompt, answer, &p.location);
    Ok((
        pairs.iter().flat_map(|p| [example(p, &p.chosen), example(p, &p.rejected)]).collect(),
        pairs.iter().map(|p| p.margin).collect(),
    ))
}

/// A prompt and its completion as one example, trainable on the completion.
pub fn prompt_completion(prompt: &[u32], completion: &[u32], location: &str) -> Example {
    Example {
        ids: [prompt, completion].concat(),
        trainable: (0..prompt.len() + completion.len()).map(|t| t >= prompt.len()).collect(),
        location: location.to_string(),
    }
}

/// The run's train and eval pairs, tokenized and packed (eval may be empty).
pub fn preference_splits(
    config: &RunConfig,
    tokenizer: &kiln_data::Tokenizer,
    template: Option<&kiln_data::ChatTemplate>,
) -> Result<(Split, Split)> {
    let encoder = encoder(config, tokenizer, template);
    let bad = config.data.max_bad_fraction;
    let (train, eval) = encode_splits(config, |files, split| encode_pairs(files, &encoder, bad, split))?;
    let (rows, seq) = (config.rows(), config.data.max_seq_len);
    Ok((Split::pairs(train, rows, seq, "train")?, Split::pairs(eval, rows, seq, "eval")?))
}

/// Summed log-prob and length of every example's trainable tokens in one micro-batch, from
/// the per-token nll of its `build_batch` layout, with the example's first token index.
pub fn micro_batch_logps(
    nll: &[f32],
    targets: &[i32],
    mb: &[PackedRow],
    examples: &[Example],
    seq: usize,
) -> HashMap<usize, (f64, usize, usize)> {
    sequence_spans(mb, examples, seq)
        .into_iter()
        .map(|(i, start)| {
            let span = start..start + examples[i].ids.len();
            let (mut logp, mut n) = (0.0, 0);
            for t in span.filter(|&t| targets[t] >= 0) {
                logp -= nll[t] as f64;
                n += 1;
            }
            (i, (logp, n, start))
        })
        .collect()
}

/// Summed completion log-probs of every example of `micro_batches` under `model` (no
/// gradients), each micro-batch laid out as at least `rows` rows (as training lays it out, so
/// that the numbers are training's); examples in no micro-batch get 0.
pub fn sequence_logps<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    (pool, rows): (&mut ActivationsPool<B>, usize),
    examples: &[Example],
    micro_batches: &[Vec<PackedRow>],
) -> Vec<f64> {
    let mut out = vec![0.0; examples.len()];
    for mb in micro_batches {
        let acts = pool.get(b, rows.max(mb.len()));
        let batch = build_batch(examples, mb, acts.rows, acts.seq, 1.0);
        let nll = model.nll(b, acts, &batch);
        for (i, (logp, _, _)) in micro_batch_logps(&nll, &batch.targets, mb, examples, acts.seq) {
            out[i] = logp;
        }
    }
    out
}

/// `sequence_logps` of a split's micro-batches shared out over the session's ranks and summed
/// over them: each example is computed by one rank, so the sum is exact and every rank gets
/// every log-prob. `model` is the session's, or another one (`None`: the session's).
pub fn sequence_logps_on_ranks<B: Backend>(
    s: &mut Session<B>,
    other: Option<&mut Model<B>>,
    pool: &mut ActivationsPool<B>,
    split: &Split,
    what: &str,
) -> Result<Vec<f64>> {
    let (mine, idle) = s.forward_share(split.micro_batches.len())?;
    let model = match other {
        Some(m) => m,
        None => &mut s.model,
    };
    let mut logps = sequence_logps(&s.b, model, (pool, split.rows), &split.examples, &split.micro_batches[mine]);
    (0..idle).for_each(|_| model.idle_forward(&s.b, ChunkOrder::ForwardsFirst));
    s.data.all_reduce_sum_f64(&mut logps, what)?;
    Ok(logps)
}

/// Reference log-probs as cached on disk, tied to the model and data they were computed on.
#[derive(Serialize, Deserialize)]
struct ReferenceCache {
    fingerprint: String,
    splits: Vec<Vec<f64>>,
}

/// FNV-1a over the reference model's path and every example's tokens and mask.
fn fingerprint(model: &Path, splits: &[&mut Split]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &byte in bytes {
            h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(model.display().to_string().as_bytes());
    for split in splits {
        for e in &split.examples {
            e.ids.iter().for_each(|id| eat(&id.to_le_bytes()));
            eat(&e.trainable.iter().map(|&t| t as u8).collect::<Vec<_>>());
            eat(b"|");
        }
        eat(b"#");
    }
    format!("{h:016x}")
}

/// Fills in the reference log-probs of `splits`: from the cache when it matches, else
/// computed with the model the run started from and cached.
pub fn reference_logps<B: Backend>(
    s: &mut Session<B>,
    config: &RunConfig,
    pool: &mut ActivationsPool<B>,
    mut splits: Vec<&mut Split>,
) -> Result<()> {
    let path = s.out_path("reference_logps.json");
    let fp = fingerprint(&config.model.path, &splits);
    let cached = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<ReferenceCache>(&t).ok());
    if let Some(cache) = cached.filter(|c| c.fingerprint == fp && c.splits.len() == splits.len()) {
        splits.iter_mut().zip(cache.splits).for_each(|(split, logps)| split.reference = Some(logps));
        return Ok(());
    }
    let started = Instant::now();
    // The reference is the model the run started from, which a resumed run no longer holds.
    let mut fresh = match s.resumed {
        true => Some(s.load_reference(&config.model.path)?),
        false => None,
    };
    let mut logps = Vec::new();
    for split in &splits {
        logps.push(sequence_logps_on_ranks(s, fresh.as_mut(), pool, split, "reference log-probs")?);
    }
    let cache = ReferenceCache { fingerprint: fp, splits: logps };
    if s.comm.is_root() {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&cache)?)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
        eprintln!(
            "reference log-probs of {} sequences computed in {:.1} s, cached in {}",
            cache.splits.iter().map(Vec::len).sum::<usize>(),
            started.elapsed().as_secs_f64(),
            path.display()
        );
    }
    splits.iter_mut().zip(cache.splits).for_each(|(split, logps)| split.reference = Some(logps));
    Ok(())
}
