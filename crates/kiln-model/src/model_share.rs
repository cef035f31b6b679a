//! What of a model a rank holds under expert, pipeline and tensor parallel (`ModelShare`), and
//! loading just that: its routed experts, its stage's layers, its blocks of their tensors.
//! Each tensor the rank holds is read alone and cut to its block as it comes
//! (`safetensors_io::Pick`), the others are never read: a rank holds no more of the model than
//! its part and the one whole tensor in hand, so a model larger than one process's memory loads.
//! Under ZeRO-3 it keeps of its part only its shard of the parameters (`param_shards`).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::flat::{overlap, FlatLayout};
use crate::layers::expert_parallel::ExpertParallel;
use crate::model::{layout_of, stored_layout, upload_flat, Model};
use crate::param_shards::{ParamShards, ShardRanks};
use crate::pipeline::{self, Pipeline};
use crate::safetensors_io::{self, LoadSpec, Pick};
use crate::stage_split::StageSplit;
use crate::tensor_parallel::{self, Cut, TensorParallel};
use crate::weights::{TensorSpec, Weights};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

type Group<B> = Arc<dyn Comm<<B as Backend>::Slice>>;

/// The groups a rank shares the model with: its expert group (it holds that share of the
/// routed experts), its pipeline (it holds its stage), its tensor group (it holds its blocks);
/// and whether it keeps the tensors carried through unchanged (`Config::is_carried_tensor`:
/// multi-token-prediction layers, as large as a layer) for the checkpoints it writes. Only the
/// one rank that writes them need: the others read of them just DeepSeek-V4's hash tables,
/// which the forward reads. Under ZeRO-3 (`params`) it keeps only its shard of that part.
pub struct ModelShare<B: Backend> {
    pub experts: Option<ExpertParallel<B>>,
    pub stages: Option<Group<B>>,
    /// How the stages cut the layers (under pipeline parallel), into this many virtual stages
    /// per stage (interleaved stages; 1 without).
    pub split: StageSplit,
    pub virtual_stages: usize,
    pub tensors: Option<Group<B>>,
    /// Under tensor parallel, whether training activations cut the residual stream by tokens
    /// over the tensor group (`sequence_parallel`).
    pub sequence_parallel: bool,
    pub carries: bool,
    /// ZeRO-3: the ranks that shard the parameters; the rank keeps its shard of each tensor.
    pub params: Option<ShardRanks<B>>,
}

impl<B: Backend> ModelShare<B> {
    /// The whole model.
    pub fn whole() -> Self {
        Self {
            experts: None,
            stages: None,
            split: StageSplit::Even,
            virtual_stages: 1,
            tensors: None,
            sequence_parallel: false,
            carries: true,
            params: None,
        }
    }

    /// All but this rank's share `ep` of the routed experts.
    pub fn experts(ep: Option<ExpertParallel<B>>) -> Self {
        Self { experts: ep, ..Self::whole() }
    }
}

/// Where each tensor of the whole model goes on a rank and what of it the rank keeps.
pub struct RankPart {
    /// For each tensor of the whole layout (`Weights::iter` order), its index among the rank's
    /// tensors if the rank holds it.
    local: Vec<Option<usize>>,
    /// Under tensor parallel, for each of the rank's tensors its spec before the cut and the
    /// cut (none without), and the rank's place in the group (rank, size).
    cuts: Vec<(TensorSpec, Cut)>,
    place: (usize, usize),
    /// Under ZeRO-3, for each of the rank's tensors the values (offsets in the tensor) inside
    /// its shards.
    sharded: Option<Vec<Range<usize>>>,
}

impl RankPart {
    /// The part of a rank in `pp` and `tp` (either may be absent) whose tensors are laid out as
    /// `local_layout`; `whole_count` tensors in the whole model.
    pub fn new<B: Backend>(
        pp: Option<&Pipeline<B>>,
        tp: Option<&TensorParallel<B>>,
        local_layout: &Weights<TensorSpec>,
        whole_count: usize,
    ) -> Self {
        let local = match pp {
            Some(pp) => pp.places().into_iter().map(|p| p.local.filter(|_| p.held)).collect(),
            None => (0..whole_count).map(Some).collect(),
        };
        let (cuts, place) = match tp {
            None => (Vec::new(), (0, 1)),
            Some(tp) => {
                let specs = tp.whole_layout.iter().into_iter().zip(local_layout.iter());
                let cuts = specs.map(|(whole, local)| (whole.clone(), Cut::of(whole, local))).collect();
                (cuts, (tp.group.rank(), tp.group.size()))
            }
        };
        Self { local, cuts, place, sharded: None }
    }

    /// Keeps of each tensor only the values inside this rank's ZeRO-3 `shards` of the
    /// parameters laid out as `flat` (the rank's own layout).
    pub fn sharded<B: Backend>(mut self, shards: &ParamShards<B>, flat: &FlatLayout) -> Self {
        let inside = |r: &Range<usize>| match shards.local(r) {
            Some((part, _)) if !part.is_empty() => part.start - r.start..part.end - r.start,
            _ => 0..0,
        };
        self.sharded = Some(flat.ranges.iter().into_iter().map(inside).collect());
        self
    }

    /// Whether the rank holds whole tensor `i`.
    pub fn holds(&self, i: usize) -> bool {
        self.local[i].is_some()
    }

    /// The rank's block of whole tensor `i`'s values, or of its stacked part `part`'s; under
    /// ZeRO-3 only what of it lies in the rank's shards.
    pub fn keep(&self, i: usize, part: Option<usize>, values: Vec<f32>) -> Vec<f32> {
        let Some(j) = self.local[i] else { return values };
        let values = match self.cuts.get(j) {
            None | Some((_, Cut::Whole)) => values,
            Some((spec, Cut::Dim(k))) => match part {
                None => tensor_parallel::slice(&values, &spec.shape, Cut::Dim(*k), self.place),
                // A part is one expert of a stack `[E, ..]` cut past its first dimension.
                Some(_) => {
                    assert!(*k > 0, "tensor parallel cuts an expert's width, not the experts");
                    tensor_parallel::slice(&values, &spec.shape[1..], Cut::Dim(k - 1), self.place)
                }
            },
        };
        self.shard(j, part, values)
    }

    /// Under ZeRO-3, what of the rank's tensor `j` (or of its stacked part `part`, `values`
    /// being one part) lies in the rank's shards; else all of `values`.
    pub fn shard(&self, j: usize, part: Option<usize>, values: Vec<f32>) -> Vec<f32> {
        let Some(sharded) = &self.sharded else { return values };
        let start = part.unwrap_or(0) * values.len();
        let inside = overlap(&sharded[j], &(start..start + values.len()));
        match inside.len() {
            0 => Vec::new(),
            n if n == values.len() => values,
            _ => values[inside.start - start..inside.end - start].to_vec(),
        }
    }

    /// The rank's tensors of `whole` (laid out as the whole model, the rank's blocks of those it
    /// holds, those it does not empty) laid out as its own `local_layout`.
    pub fn arrange(&self, mut whole: Weights<Vec<f32>>, local_layout: &Weights<TensorSpec>) -> Weights<Vec<f32>> {
        let mut local: Vec<Vec<f32>> = vec![Vec::new(); local_layout.iter().len()];
        for (place, values) in self.local.iter().zip(whole.iter_mut()) {
            if let Some(j) = place {
                local[*j] = std::mem::take(values);
            }
        }
        let mut local = local.into_iter();
        local_layout.map(|_| local.next().expect("a tensor per spec"))
    }
}

impl<B: Backend> Model<B> {
    /// `load`, of this rank's share of the model (`share`): of a DeepSeek-style MoE its routed
    /// experts, under pipeline parallel its stage, under tensor parallel its blocks (reading
    /// only those: `RankPart`). Collective over the share's groups. With `reward_seed`, a
    /// causal LM loads as a reward model (`load_as_reward_model`).
    pub fn load_share(b: &B, dir: &Path, share: ModelShare<B>, reward_seed: Option<u64>) -> Result<Self> {
        let mut config = Config::load(dir)?;
        let new_score = reward_seed.filter(|_| config.num_labels.is_none());
        if new_score.is_some() {
            config.num_labels = Some(1);
        }
        let ModelShare { experts: ep, stages, split, virtual_stages, tensors, sequence_parallel, carries, params } =
            share;
        let refused = |why: String| Error::new(dir.join("config.json"), why);
        let (whole_layout, deepseek_names) = stored_layout(dir, &config, ep.as_ref())?;
        let (mut local_config, mut local_layout) = (config.clone(), whole_layout.clone());
        let pp = match stages {
            None => None,
            Some(group) => {
                let (stage, stages) = (group.rank(), group.size());
                let stage_layers = split.layers(&config, stages * virtual_stages).map_err(refused)?;
                local_config = pipeline::stage_config(&config, stage, stages, &stage_layers);
                local_layout = layout_of(&local_config, ep.as_ref());
                let pp = Pipeline::new(group, &config, whole_layout.clone(), stage_layers);
                Some(pp.map_err(|e| refused(format!("pipeline parallel: {e:#}")))?)
            }
        };
        let tp = match tensors {
            None => None,
            Some(group) => {
                let blocks_config =
                    tensor_parallel::local_config(&local_config, (group.rank(), group.size())).map_err(refused)?;
                let stage_config = std::mem::replace(&mut local_config, blocks_config);
                local_config.sequence_parallel = sequence_parallel.then_some((group.rank(), group.size()));
                let stage_layout = std::mem::replace(&mut local_layout, layout_of(&local_config, ep.as_ref()));
                Some(TensorParallel::new(group, &stage_config, stage_layout))
            }
        };
        let whole_specs = whole_layout.iter();
        let flat = FlatLayout::new(&local_layout);
        let shards = params.map(|ranks| ParamShards::new(b, &flat, ranks.spaces(&flat)));
        let mut part = RankPart::new(pp.as_ref(), tp.as_ref(), &local_layout, whole_specs.len());
        if let Some(shards) = &shards {
            part = part.sharded(shards, &flat);
        }
        let score = whole_layout.score.as_ref().filter(|_| new_score.is_some()).map(|s| s.name.as_str());
        let reads = |i: usize| part.holds(i) && Some(whole_specs[i].name.as_str()) != score;
        let keep = |i, p, values| part.keep(i, p, values);
        let passthrough = |name: &str| config.is_carried_tensor(name) && (carries || Config::is_hash_table(name));
        let pick = Pick { reads: &reads, keep: &keep };
        let spec = LoadSpec { layout: &whole_layout, passthrough: &passthrough, fp8_block: config.fp8_block, pick };
        let loaded = safetensors_io::load(dir, &spec)?;
        if loaded.dequantized > 0 {
            eprintln!(
                "note: {}: dequantized {} block-quantized (fp8 e4m3 / fp4 e2m1) tensors to f32 for training; saved weights will be {:?}",
                dir.display(),
                loaded.dequantized,
                loaded.dtype
            );
        }
        let mut tensors = part.arrange(loaded.tensors, &local_layout);
        if let (Some(seed), Some(spec)) = (new_score, &local_layout.score) {
            let values = match spec.numel() {
                0 => Vec::new(),
                n => kiln_core::rng::Rng::new(seed).normal_vec(n, 0.02),
            };
            let score = local_layout.iter().len() - 1;
            tensors.score = Some(part.shard(score, None, values));
        }
        let params = match &shards {
            Some(shards) => shards.upload(b, &flat, &tensors),
            None => upload_flat(b, &flat, &tensors),
        };
        let mut model = Self::from_params(b, local_config, local_layout, flat, params, loaded.dtype);
        model.shards = shards;
        (model.expert_parallel, model.pipeline, model.tensor_parallel) = (ep, pp, tp);
        model.read_hash_tables(dir, &loaded.passthrough, deepseek_names)?;
        model.passthrough = loaded.passthrough;
        Ok(model)
    }
}
