//! ZeRO stages 1 and 2: AdamW's moments sharded over the data-parallel ranks (stage 2 also
//! keeps only the rank's chunk of the gradients, `grads.rs`).
//!
//! The parameters, in `Weights::iter` order, form one flat index space of `total` values,
//! cut into `size` contiguous chunks of `chunk = ⌈total / size⌉` (the last one padded). A
//! step reduce-scatters the gradients (rank r receives the sum of chunk r), clips with the
//! global norm (an all-reduce of the chunks' sums of squares), updates its chunk of the
//! parameters with its moments, and all-gathers the updated chunks: the same update as
//! replicated AdamW, with 1/size of the moments per rank. Checkpoints hold one moment file
//! per rank (`adam_shard-R-of-N.safetensors`, with the chunk's start); resuming on any number
//! of ranks re-cuts the flat moments, from shard files or from a replicated run's
//! `adam_m`/`adam_v`.
//!
//! Under expert parallel the routed experts are not replicated on every rank, so they form a
//! space of their own, sharded over the ranks that hold the same experts (files
//! `adam_expert_shard-E-R-of-N.safetensors` for expert rank E); everything else is sharded over all
//! ranks as above.

use crate::checkpoint::Moments;
use anyhow::{bail, Context, Result};
use kiln_core::AdamW as Hyper;
use kiln_dist::Comm;
use kiln_model::{TensorSpec, Weights};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// ZeRO's optimizer: a space of every tensor sharded over all ranks or, under expert
/// parallel, of every tensor but the routed experts, which form a space of their own sharded
/// over the ranks holding the same experts.
pub struct Zero {
    pub dense: ShardedAdamW,
    pub experts: Option<ShardedAdamW>,
}

impl Zero {
    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.dense.state_bytes() + self.experts.as_ref().map_or(0, |x| x.state_bytes())
    }

    /// Restores both spaces from shard files or (`full`) a replicated run's moments.
    pub fn load(&mut self, dir: &Path, full: Option<&Moments>, adam_step: u64) -> Result<()> {
        self.dense.load(dir, full, adam_step)?;
        self.experts.as_mut().map_or(Ok(()), |x| x.load(dir, full, adam_step))
    }
}

/// AdamW sharded over one group of ranks, for one set of tensors (a space).
pub struct ShardedAdamW {
    pub hyper: Hyper,
    /// This rank's slice of the flat parameters.
    pub range: Range<usize>,
    pub chunk: usize,
    pub total: usize,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Per tensor of the space: its place in `Weights::iter` order, its flat start and length,
    /// and whether weight decay applies (matrices).
    tensors: Vec<(usize, usize, usize, bool)>,
    /// Shard files are `{name}-R-of-N.safetensors`.
    name: String,
    /// Every rank's chunks (`chunk · size`, padded) and this rank's, kept between steps.
    flat: Vec<f32>,
    mine: Vec<f32>,
}

/// The outcome of a sharded step's gradient reduction.
pub struct Reduced {
    /// ‖g‖² over the space's parameters.
    pub squares: f64,
    /// This rank's chunk of the summed gradients.
    pub grads: Vec<f32>,
}

impl ShardedAdamW {
    /// Over every tensor of `layout`.
    pub fn new(layout: &Weights<TensorSpec>, hyper: Hyper, rank: usize, size: usize) -> Self {
        Self::over(layout, &|_| true, "adam_shard", hyper, (rank, size))
    }

    /// Over the tensors of `layout` that `select` picks, on rank `rank` of `size`.
    pub fn over(
        layout: &Weights<TensorSpec>,
        select: &dyn Fn(&TensorSpec) -> bool,
        name: &str,
        hyper: Hyper,
        (rank, size): (usize, usize),
    ) -> Self {
        let mut start = 0;
        let tensors = layout
            .iter()
            .into_iter()
            .enumerate()
            .filter(|(_, s)| select(s))
            .map(|(i, s)| {
                let t = (i, start, s.numel(), s.shape.len() >= 2);
                start += s.numel();
                t
            })
            .collect();
        let total = start;
        let chunk = total.div_ceil(size);
        let range = (rank * chunk).min(total)..((rank + 1) * chunk).min(total);
        let n = range.len();
        let (flat, mine) = (Vec::with_capacity(chunk * size), Vec::with_capacity(chunk));
        let name = name.to_string();
        Self { hyper, range, chunk, total, m: vec![0.0; n], v: vec![0.0; n], tensors, name, flat, mine }
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        (self.m.len() + self.v.len()) * 4
    }

    /// Sums the ranks' gradients into this rank's chunk, and the squares of the space's summed
    /// gradients.
    pub fn reduce(&mut self, comm: &dyn Comm, grads: &Weights<Vec<f32>>, what: &str) -> Result<Reduced> {
        let (flat, all) = (&mut self.flat, grads.iter());
        flat.clear();
        self.tensors.iter().for_each(|&(i, ..)| flat.extend_from_slice(all[i]));
        flat.resize(self.chunk * comm.size(), 0.0);
        let mut mine = vec![0.0; self.chunk];
        comm.reduce_scatter_sum(flat, &mut mine, what)?;
        mine.truncate(self.range.len());
        Ok(Reduced { squares: Self::squares(comm, &mine, what)?, grads: mine })
    }

    /// ‖g‖² over the space, from every rank's chunk of the summed gradients.
    pub fn squares(comm: &dyn Comm, chunk: &[f32], what: &str) -> Result<f64> {
        let mut squares = [chunk.iter().map(|&g| g as f64 * g as f64).sum::<f64>()];
        comm.all_reduce_sum_f64(&mut squares, what)?;
        Ok(squares[0])
    }

    /// AdamW on this rank's chunk, then every rank's updated chunk gathered into `params`.
    pub fn step(&mut self, comm: &dyn Comm, params: &mut Weights<Vec<f32>>, grads: &[f32], what: &str) -> Result<()> {
        self.hyper.step += 1;
        let mut all = params.iter_mut();
        for &(i, start, len, decays) in &self.tensors {
            let p = &mut all[i];
            let (lo, hi) = (start.max(self.range.start), (start + len).min(self.range.end));
            if lo >= hi {
                continue;
            }
            let (local, shard) = (lo - start..hi - start, lo - self.range.start..hi - self.range.start);
            let hyper = if decays { self.hyper } else { Hyper { weight_decay: 0.0, ..self.hyper } };
            kiln_core::cpu::adamw_step(
                &mut p[local],
                &grads[shard.clone()],
                &mut self.m[shard.clone()],
                &mut self.v[shard],
                hyper,
            );
        }
        let (mine, flat) = (&mut self.mine, &mut self.flat);
        mine.clear();
        for &(i, start, len, _) in &self.tensors {
            let (lo, hi) = (start.max(self.range.start), (start + len).min(self.range.end));
            if lo < hi {
                mine.extend_from_slice(&all[i][lo - start..hi - start]);
            }
        }
        mine.resize(self.chunk, 0.0);
        flat.resize(self.chunk * comm.size(), 0.0);
        comm.all_gather(mine, flat, what)?;
        for &(i, start, len, _) in &self.tensors {
            all[i].copy_from_slice(&flat[start..start + len]);
        }
        Ok(())
    }

    /// Writes this rank's moments into checkpoint directory `dir`.
    pub fn save(&self, dir: &Path, rank: usize, size: usize) -> Result<()> {
        let bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let (m, v) = (bytes(&self.m), bytes(&self.v));
        let views = [("m", &m), ("v", &v)].map(|(name, data)| {
            (name.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![self.m.len()], data))
        });
        let views: Vec<_> = views.into_iter().map(|(n, v)| v.map(|v| (n, v))).collect::<std::result::Result<_, _>>()?;
        let metadata = HashMap::from([
            ("start".to_string(), self.range.start.to_string()),
            ("total".to_string(), self.total.to_string()),
        ]);
        let path = dir.join(shard_file(&self.name, rank, size));
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(())
    }

    /// Restores this rank's moments from a checkpoint written with any number of ranks (or
    /// none: a replicated run's moments, passed whole as `full`).
    pub fn load(&mut self, dir: &Path, full: Option<&Moments>, adam_step: u64) -> Result<()> {
        let (m, v) = match full {
            Some((m, v)) => (self.flatten(m), self.flatten(v)),
            None => read_shards(dir, &self.name, self.total)?,
        };
        self.m.copy_from_slice(&m[self.range.clone()]);
        self.v.copy_from_slice(&v[self.range.clone()]);
        self.hyper.step = adam_step;
        Ok(())
    }
}

fn shard_file(name: &str, rank: usize, size: usize) -> String {
    format!("{name}-{rank}-of-{size}.safetensors")
}

impl ShardedAdamW {
    /// The space's tensors of `tensors` (all of a layout), flat.
    fn flatten(&self, tensors: &Weights<Vec<f32>>) -> Vec<f32> {
        let all = tensors.iter();
        self.tensors.iter().flat_map(|&(i, ..)| all[i].iter().copied()).collect()
    }
}

/// Whether a checkpoint holds sharded moments.
pub fn has_shards(dir: &Path) -> bool {
    crate::checkpoint::shard_files(dir, "adam_shard").is_ok_and(|s| !s.is_empty())
}

/// The flat moments of a space (`name`: its shard files) of `total` parameters, assembled
/// from a checkpoint's shard files.
pub fn read_shards(dir: &Path, name: &str, total: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut m, mut v) = (vec![0.0; total], vec![0.0; total]);
    let mut covered = 0;
    for path in crate::checkpoint::shard_files(dir, name)? {
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
                "{}: moments of {shard_total} parameters, this run shards {total} (a ZeRO checkpoint of an expert-parallel run resumes with the same `train.ep`, and only with ZeRO)",
                path.display()
            );
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{}", path.display()))?;
        for (name, into) in [("m", &mut m), ("v", &mut v)] {
            let t = st.tensor(name).with_context(|| format!("{}: tensor `{name}` is missing", path.display()))?;
            let values: Vec<f32> =
                t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            into[start..start + values.len()].copy_from_slice(&values);
            if name == "m" {
                covered += values.len();
            }
        }
    }
    if covered != total {
        bail!("{}: the {name} files cover {covered} of {total} parameters' moments", dir.display());
    }
    Ok((m, v))
}
