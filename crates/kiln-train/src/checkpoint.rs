//! Checkpoints, and every file format in them: a directory per save holding the f32 master
//! weights (a loadable Hugging Face directory: config, tokenizer and `model.safetensors`), the
//! AdamW moments and the step. Written to a temporary directory, fsynced and renamed into
//! place, so a run killed at any instant leaves every earlier checkpoint whole and never a
//! partial one under a final name.
//!
//! Moments: a replicated run writes them by tensor name (`adam_m.safetensors`,
//! `adam_v.safetensors`); a ZeRO run writes each rank's shard of each space of
//! `DataParallel` (`adam_shard-R-of-N.safetensors`, and `adam_expert_shard-E-R-of-N` for the
//! routed experts of expert rank E), with the shard's start in the space. Either resumes as the
//! other, on any number of ranks: the moments of a space are assembled whole and re-cut.
//!
//! Under expert parallel no rank holds every routed expert: the ranks of the first expert
//! group each write theirs (rank 0 also every other tensor) into shard files, as a sharded
//! Hugging Face directory does (`model-00001-of-0000K.safetensors` and an index), and the
//! replicated moments likewise (`adam_m-00001-of-0000K.safetensors`). Tensors are found by name
//! on load, so such a checkpoint resumes on any split of the experts, or on none.

use crate::config::RunConfig;
use crate::data_parallel::{DataParallel, Space};
use anyhow::{bail, Context, Result};
use kiln_core::Backend;
use kiln_model::safetensors_io::{self, Pick};
use kiln_model::{weights, FlatLayout, Model, StorageDtype, TensorSpec, Weights};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// Model-directory files carried into each checkpoint, so it exports on its own.
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    /// Updates AdamW has applied (fewer than `step` when non-finite steps were skipped).
    pub adam_step: u64,
    /// Trainable tokens seen so far, and tokens (not padding) processed (TRL's `num_tokens`).
    pub tokens: u64,
    #[serde(default)]
    pub num_tokens: u64,
    /// The dtype of the model the run started from, used again by `kiln export`.
    pub source_dtype: String,
    pub config: RunConfig,
}

pub fn dtype_name(d: StorageDtype) -> &'static str {
    match d {
        StorageDtype::F32 => "f32",
        StorageDtype::BF16 => "bf16",
        StorageDtype::F16 => "f16",
    }
}

pub fn parse_dtype(name: &str) -> Result<StorageDtype> {
    Ok(match name {
        "f32" | "float32" => StorageDtype::F32,
        "bf16" | "bfloat16" => StorageDtype::BF16,
        "f16" | "float16" => StorageDtype::F16,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("{}: cannot fsync", dir.display()))
}

/// Where a checkpoint of `step` is written before it is renamed into place.
pub fn tmp_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{}.tmp", step_dir_name(step)))
}

/// The directory a checkpoint of `step` gets under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(step_dir_name(step))
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            p.is_dir() && name.starts_with("step-") && !name.ends_with(".tmp") && !name.ends_with(".old")
        })
        .collect();
    dirs.sort();
    dirs
}

/// Removes what a killed save (`.tmp`) or prune (`.old`) left behind.
pub fn clean_partial(root: &Path) {
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.ends_with(".old") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Deletes a checkpoint so that no half-deleted one is ever left under a checkpoint's name:
/// renamed away first (atomic), then removed.
fn remove_checkpoint(dir: &Path) -> Result<()> {
    let doomed = dir.with_extension("old");
    fs::rename(dir, &doomed).with_context(|| format!("{}: cannot retire", dir.display()))?;
    fs::remove_dir_all(&doomed).with_context(|| format!("{}: cannot remove", doomed.display()))
}

pub struct SaveRequest<'a> {
    pub root: &'a Path,
    /// Writes the weights and moments (`write_model_part`, ZeRO's shards) into the checkpoint's
    /// temporary directory before it is sealed.
    pub write: &'a dyn Fn(&Path) -> Result<()>,
    pub state: &'a State,
    /// The model directory's config and tokenizer files (`read_model_files`).
    pub model_files: &'a [(String, Vec<u8>)],
    pub keep_last: usize,
}

/// The config and tokenizer files of a model directory, read once when a run starts: the
/// directory may be a checkpoint that the run later prunes.
pub fn read_model_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for name in MODEL_FILES {
        let path = dir.join(name);
        if path.exists() {
            files
                .push((name.to_string(), fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?));
        }
    }
    Ok(files)
}

/// Writes a checkpoint atomically and prunes old ones; returns its directory.
pub fn save(req: &SaveRequest) -> Result<PathBuf> {
    fs::create_dir_all(req.root).with_context(|| format!("{}: cannot create", req.root.display()))?;
    let name = step_dir_name(req.state.step);
    let tmp = tmp_dir(req.root, req.state.step);
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    (req.write)(&tmp)?;
    for (name, bytes) in req.model_files {
        fs::write(tmp.join(name), bytes).with_context(|| format!("{}: cannot write", tmp.join(name).display()))?;
    }
    let state = serde_json::to_string_pretty(req.state)?;
    fs::write(tmp.join("state.json"), state).with_context(|| format!("{}: cannot write state", tmp.display()))?;
    for entry in fs::read_dir(&tmp)? {
        fs::File::open(entry?.path())?.sync_all()?;
    }
    sync_dir(&tmp)?;

    let dest = req.root.join(&name);
    if dest.exists() {
        remove_checkpoint(&dest)?;
    }
    fs::rename(&tmp, &dest).with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    sync_dir(req.root)?;

    let all = list(req.root);
    for old in all.iter().take(all.len().saturating_sub(req.keep_last.max(1))) {
        remove_checkpoint(old)?;
    }
    Ok(dest)
}

fn shard_name(prefix: &str, rank: usize, ranks: usize) -> String {
    format!("{prefix}-{:05}-of-{ranks:05}.safetensors", rank + 1)
}

/// AdamW's moments of this rank's tensors, read one at a time (`Model::visit_whole`'s `local`).
type Local<'a> = Box<dyn Fn(usize) -> Vec<f32> + 'a>;

/// Writes a rank's part of the whole model into checkpoint directory `dir`, a tensor at a time:
/// the f32 weights and, given `moments`, AdamW's (this rank's, by tensor). Under pipeline and
/// tensor parallel the tensors are assembled from the stages and the groups as they are
/// written (a collective over them: every rank of the writer's groups calls this), and only
/// the rank that passes `keep` writes; under ZeRO-3 the weights are gathered a layer at a time
/// as they are written (`Model::visit_weights`; the data-parallel ranks that write nothing
/// take part with `writes` false). Under expert parallel expert rank `expert` of `ranks`
/// writes shard files of the routed experts it holds, expert rank 0 also every other tensor
/// and the index; otherwise one file each.
pub fn write_model_part<B: Backend>(
    b: &B,
    dir: &Path,
    model: &mut Model<B>,
    moments: Option<&Moments>,
    (writes, keep): (bool, bool),
    (expert, ranks): (usize, usize),
) -> Result<()> {
    if !writes {
        return Ok(model.visit_weights(b, &|_| false, false, &mut |_, _| Ok(()))?);
    }
    let sharded = ranks > 1;
    let file =
        |name: &str| dir.join(if sharded { shard_name(name, expert, ranks) } else { format!("{name}.safetensors") });
    let kept = |spec: &TensorSpec| expert == 0 || spec.is_routed_experts();
    let writer = |model: &Model<B>, name: &str, passthrough: &[safetensors_io::RawTensor]| {
        let layout = model.whole_layout();
        keep.then(|| safetensors_io::LayoutWriter::create(&file(name), layout, StorageDtype::F32, passthrough, &kept))
            .transpose()
    };
    let mut weights = writer(model, "model", if expert == 0 { &model.passthrough } else { &[] })?;
    model.visit_weights(b, &kept, keep, &mut |spec, values| match &mut weights {
        Some(w) => Ok(w.push(spec, values)?),
        None => Ok(()),
    })?;
    weights.map(|w| w.finish()).transpose()?;
    if let Some((m, v)) = moments {
        let (m, v) = (m.iter(), v.iter());
        let moments: [(&str, Local); 2] =
            [("adam_m", Box::new(move |i| m[i].clone())), ("adam_v", Box::new(move |i| v[i].clone()))];
        for (name, local) in moments {
            let mut writer = writer(model, name, &[])?;
            model.visit_whole(b, &local, &kept, keep, &mut |spec, values| match &mut writer {
                Some(w) => Ok(w.push(spec, values)?),
                None => Ok(()),
            })?;
            writer.map(|w| w.finish()).transpose()?;
        }
    }
    if keep && sharded && expert == 0 {
        write_expert_index(dir, model.whole_config(), &model.passthrough, ranks)?;
    }
    Ok(())
}

/// The index of an expert-parallel checkpoint's weight shards: each routed expert's tensors
/// are in the shard of the rank that holds the expert, everything else in rank 0's.
fn write_expert_index(
    dir: &Path,
    config: &kiln_model::Config,
    passthrough: &[safetensors_io::RawTensor],
    ranks: usize,
) -> Result<()> {
    let mut map = BTreeMap::new();
    let mut bytes = 0;
    for spec in weights::layout(config).iter() {
        bytes += spec.numel() * 4;
        if spec.is_routed_experts() {
            let per_rank = spec.parts.len() / ranks;
            for (expert, part) in spec.parts.iter().enumerate() {
                map.insert(part.clone(), shard_name("model", expert / per_rank, ranks));
            }
        } else {
            map.insert(spec.name.clone(), shard_name("model", 0, ranks));
        }
    }
    for t in passthrough {
        bytes += t.bytes.len();
        map.insert(t.name.clone(), shard_name("model", 0, ranks));
    }
    Ok(safetensors_io::write_index(dir, &map, bytes)?)
}

/// The files of a checkpoint's moment `name` (`adam_m`, `adam_v`): one, or its shards.
fn moment_files(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{name}.safetensors"));
    if single.exists() {
        return Ok(vec![single]);
    }
    let files = shard_files(dir, name)?;
    if files.is_empty() {
        let cut = fs::read_dir(dir)?.filter_map(|e| e.ok()).any(|e| {
            let file = e.file_name().to_string_lossy().to_string();
            (file.starts_with("tp") || file.starts_with("pp")) && file.contains("_adam_")
        });
        if cut {
            bail!(
                "{}: its AdamW moments are ZeRO shards of a tensor- or pipeline-parallel run's blocks \
                 (pp*_tp*_adam_shard-*), which resume with the same `train.tp` and `train.pp` (the weights load on any \
                 layout; a run without ZeRO writes whole moments)",
                dir.display()
            );
        }
        bail!("{}: no {name}.safetensors (or shards of it) in the checkpoint", dir.display());
    }
    Ok(files)
}

/// The shard files `{name}-….safetensors` of a checkpoint, in name order.
pub(crate) fn shard_files(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!("{name}-");
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let file = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            file.starts_with(&prefix) && file.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The checkpoint's moment `name` for the tensors of `layout`, wherever they were written.
/// The moments `name` of checkpoint `dir` of the tensors `pick` reads (of `layout`, the whole
/// model's), what it keeps of each.
fn read_moments(dir: &Path, name: &str, layout: &Weights<TensorSpec>, pick: Pick) -> Result<Weights<Vec<f32>>> {
    Ok(safetensors_io::load_file_set(&dir.join(name), &moment_files(dir, name)?, layout, pick)?.tensors)
}

pub fn read_state(dir: &Path) -> Result<State> {
    let path = dir.join("state.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("{}: cannot read checkpoint state", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid checkpoint state", path.display()))
}

/// AdamW's first and second moments of every tensor, by name.
pub type Moments = (Weights<Vec<f32>>, Weights<Vec<f32>>);

/// The moments of a replicated run (every space whole), by tensor name.
pub fn replicated_moments<B: Backend>(b: &B, dp: &DataParallel<B>, flat: &FlatLayout) -> Moments {
    let whole = |pick: &dyn Fn(&Space<B>) -> &B::Slice| {
        let mut host = vec![0f32; flat.total];
        for space in &dp.spaces {
            host[space.range.clone()].copy_from_slice(&b.read(pick(space)));
        }
        flat.ranges.map(|r| host[r.clone()].to_vec())
    };
    (whole(&|s| &s.m), whole(&|s| &s.v))
}

/// Writes this rank's shard of every space's moments into checkpoint directory `dir` (ZeRO).
pub fn save_moment_shards<B: Backend>(b: &B, dir: &Path, dp: &DataParallel<B>) -> Result<()> {
    for space in &dp.spaces {
        let bytes = |x: &B::Slice| b.read(x).iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let (m, v) = (bytes(&space.m), bytes(&space.v));
        let views = [("m", &m), ("v", &v)].map(|(name, data)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![space.mine.len()], data);
            view.map(|v| (name.to_string(), v))
        });
        let views: Vec<_> = views.into_iter().collect::<std::result::Result<_, _>>()?;
        let metadata = HashMap::from([
            ("start".to_string(), (space.mine.start - space.range.start).to_string()),
            ("total".to_string(), space.range.len().to_string()),
        ]);
        let path = dir.join(format!("{}-{}-of-{}.safetensors", space.name, space.comm.rank(), space.comm.size()));
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// Restores every space's moments from checkpoint `dir`, whichever way they were written
/// (by name, or in the shards of any number of ranks), and returns its state.
pub fn load_moments<B: Backend>(b: &B, dir: &Path, model: &Model<B>, dp: &mut DataParallel<B>) -> Result<State> {
    let state = read_state(dir)?;
    let mut by_name: Option<Vec<Vec<f32>>> = None;
    for space in &mut dp.spaces {
        let (m, v) = match shard_files(dir, &space.name)?.is_empty() {
            false => read_shards(dir, &space.name, space.range.len())?,
            true => {
                if by_name.is_none() {
                    let flatten = |w: Weights<Vec<f32>>| {
                        let mut host = vec![0f32; model.flat.total];
                        for (r, t) in model.flat.ranges.iter().into_iter().zip(w.iter()) {
                            host[r.clone()].copy_from_slice(t);
                        }
                        host
                    };
                    // Under pipeline and tensor parallel, only this rank's part, read as its blocks.
                    let part = model.rank_part();
                    let (reads, keep) = (|i| part.holds(i), |i, p, values| part.keep(i, p, values));
                    let pick = Pick { reads: &reads, keep: &keep };
                    let read = |name: &str| -> Result<Weights<Vec<f32>>> {
                        Ok(part.arrange(read_moments(dir, name, model.whole_layout(), pick)?, &model.layout))
                    };
                    by_name = Some(vec![flatten(read("adam_m")?), flatten(read("adam_v")?)]);
                }
                let full = by_name.as_ref().expect("read above");
                (full[0][space.range.clone()].to_vec(), full[1][space.range.clone()].to_vec())
            }
        };
        let mine = space.mine.start - space.range.start..space.mine.end - space.range.start;
        b.write(&mut space.m, &m[mine.clone()]);
        b.write(&mut space.v, &v[mine]);
    }
    dp.hyper.step = state.adam_step;
    Ok(state)
}

/// The flat moments of a space (`name`: its shard files) of `total` parameters, assembled
/// from a checkpoint's shard files.
fn read_shards(dir: &Path, name: &str, total: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut m, mut v) = (vec![0.0; total], vec![0.0; total]);
    let mut covered = 0;
    for path in shard_files(dir, name)? {
        let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let field = |k: &str| -> Result<usize> {
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get(k))
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("{}: metadata field `{k}` is missing", path.display()))
        };
        let (start, shard_total) = (field("start")?, field("total")?);
        if shard_total != total {
            bail!(
                "{}: moments of {shard_total} parameters, this run's space has {total} (a ZeRO checkpoint of an expert-parallel run resumes with the same `train.ep`)",
                path.display()
            );
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{}", path.display()))?;
        for (tensor, into) in [("m", &mut m), ("v", &mut v)] {
            let t = st.tensor(tensor).with_context(|| format!("{}: tensor `{tensor}` is missing", path.display()))?;
            let values: Vec<f32> =
                t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if start + values.len() > total {
                bail!("{}: tensor `{tensor}` runs past the space's {total} parameters", path.display());
            }
            into[start..start + values.len()].copy_from_slice(&values);
            if tensor == "m" {
                covered += values.len();
            }
        }
    }
    if covered != total {
        bail!("{}: the {name} files cover {covered} of {total} parameters' moments", dir.display());
    }
    Ok((m, v))
}
