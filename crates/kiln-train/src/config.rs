//! The TOML run configuration, one section per part of the recipe; every key maps onto one
//! knob, unknown keys are rejected with their name, and `--set section.key=value` overrides
//! any of them.

use crate::grpo_loss::{Aggregation, ImportanceLevel, ScaleRewards};
use crate::muon::MuonSettings;
use crate::preference_loss::LossKind;
use crate::schedule::ScheduleKind;
use kiln_core::{Backend, Precision};
use kiln_data::example::LengthPolicy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
    /// Preference optimisation (`kiln dpo`).
    #[serde(default)]
    pub dpo: Option<DpoSection>,
    /// Reward modelling (`kiln rm`).
    #[serde(default)]
    pub rm: Option<RmSection>,
    /// Kahneman-Tversky optimisation (`kiln kto`).
    #[serde(default)]
    pub kto: Option<KtoSection>,
    /// RL with verifiable rewards (`kiln grpo`).
    #[serde(default)]
    pub grpo: Option<GrpoSection>,
    /// On-policy distillation (`kiln distill`).
    #[serde(default)]
    pub distill: Option<DistillSection>,
}

/// `[distill]`: the teacher, the student's sampling, and the estimator of the reverse KL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher's model directory (same tokenizer as the student).
    pub teacher: PathBuf,
    #[serde(default = "default_prompts_per_step")]
    pub prompts_per_step: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one_f32")]
    pub temperature: f32,
    /// `full` (reverse KL over the vocabulary) or `sampled` (its sampled-token estimate).
    #[serde(default = "default_estimator")]
    pub estimator: String,
    /// Completions per forward through student and teacher.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
}

/// `[grpo]`: rollouts, the clipped objective and its variants (see `grpo_loss`), and the
/// reward functions (`[[grpo.rewards]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Completions sampled per prompt.
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    #[serde(default = "default_prompts_per_step")]
    pub prompts_per_step: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one_f32")]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "one_f32")]
    pub top_p: f32,
    /// Clip range: ratios outside [1 − epsilon, 1 + epsilon_high] carry no gradient.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// DAPO's clip-higher; defaults to `epsilon`.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// KL weight to a frozen reference; 0 loads none.
    #[serde(default)]
    pub beta: f64,
    /// Optimizer steps on each rollout batch: a rollout is sampled every `num_iterations`
    /// steps, and the later steps' ratios compare with the policy that sampled it.
    #[serde(default = "one")]
    pub num_iterations: usize,
    /// Completions per forward/backward, TRL's per-device batch: `grpo`, `bnpo` and `dr_grpo`
    /// normalise within each micro-batch and average over the step's micro-batches (all
    /// ranks), as TRL does under gradient accumulation; `dapo` over the whole step.
    #[serde(default = "default_micro_batch")]
    pub micro_batch: usize,
    /// Loss aggregation: `grpo`, `bnpo`, `dr_grpo` or `dapo`.
    #[serde(default = "default_loss_type")]
    pub loss_type: Aggregation,
    /// `group`, `batch` or `none`.
    #[serde(default = "default_scale_rewards")]
    pub scale_rewards: ScaleRewards,
    /// `token` (GRPO) or `sequence` (GSPO).
    #[serde(default = "default_importance_sampling")]
    pub importance_sampling: ImportanceLevel,
    /// Skip groups whose completions all got the same reward (DAPO's dynamic sampling).
    #[serde(default)]
    pub dynamic_sampling: bool,
    pub rewards: Vec<RewardSpec>,
}

/// One reward function: `type` = `exact_match` (optional `pattern`), `format` (`pattern`),
/// `length` (`max_chars`), `command` (`command` = [program, args..], `timeout_s`), `http`
/// (`url`, `timeout_s`) or `model` (`path` of a `kiln rm` model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
    #[serde(default = "one_f64")]
    pub weight: f64,
    pub pattern: Option<String>,
    pub max_chars: Option<usize>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
}

impl RewardSpec {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.kind.clone())
    }
}

/// `train.pp_layers`: a split's name or each stage's layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PpLayers {
    Named(String),
    Counts(Vec<usize>),
}

impl Default for PpLayers {
    fn default() -> Self {
        Self::Named("even".into())
    }
}

impl PpLayers {
    /// The split it names.
    pub fn split(&self) -> Result<kiln_model::StageSplit, String> {
        use kiln_model::StageSplit;
        match self {
            Self::Named(name) if name == "even" => Ok(StageSplit::Even),
            Self::Named(name) if name == "balanced" => Ok(StageSplit::Balanced),
            Self::Named(other) => {
                Err(format!("`train.pp_layers` = \"{other}\": expected \"even\", \"balanced\" or each stage's layers"))
            }
            Self::Counts(counts) => Ok(StageSplit::Given(counts.clone())),
        }
    }
}

/// `[rm]`: the Bradley-Terry loss `−log σ(r_chosen − r_rejected − margin)`, plus
/// `center_rewards_coefficient · (r_chosen + r_rejected)²` to keep rewards centred at 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmSection {
    #[serde(default)]
    pub margin: f64,
    #[serde(default)]
    pub center_rewards_coefficient: f64,
}

/// `[kto]`: Kahneman-Tversky optimisation on unpaired completions (TRL's KTOTrainer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoSection {
    /// `kto`, or `apo_zero_unpaired` (no KL reference point).
    #[serde(default = "default_kto_loss")]
    pub loss_type: KtoLoss,
    #[serde(default = "default_dpo_beta")]
    pub beta: f64,
    /// λ_D and λ_U: weights of desirable and undesirable completions' losses.
    #[serde(default = "one_f64")]
    pub desirable_weight: f64,
    #[serde(default = "one_f64")]
    pub undesirable_weight: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    Kto,
    ApoZeroUnpaired,
}

/// `[dpo]`: the preference losses, combined as `Σ weight_k · loss_k` averaged over pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// One loss or a list: `sigmoid` (DPO), `ipo`, `hinge`, `simpo`, `orpo`.
    #[serde(default = "default_dpo_loss")]
    pub loss: Vec<LossKind>,
    /// One weight per loss (default 1 each).
    #[serde(default)]
    pub loss_weights: Vec<f64>,
    #[serde(default = "default_dpo_beta")]
    pub beta: f64,
    /// cDPO / robust label smoothing ε for `sigmoid` and `simpo`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ.
    #[serde(default = "default_simpo_gamma")]
    pub simpo_gamma: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory.
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL file(s) of training rows.
    pub train: Vec<PathBuf>,
    /// JSONL file(s) of evaluation rows.
    #[serde(default)]
    pub eval: Vec<PathBuf>,
    pub max_seq_len: usize,
    #[serde(default = "default_length_policy")]
    pub length_policy: LengthPolicy,
    /// Stop before training when more than this fraction of rows is bad.
    #[serde(default = "default_max_bad_fraction")]
    pub max_bad_fraction: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub lr: f32,
    /// `constant`, `constant_with_warmup`, `linear`, `cosine` or `cosine_with_min_lr`, as
    /// transformers defines them (`schedule`).
    #[serde(default = "default_lr_schedule")]
    pub lr_schedule: ScheduleKind,
    /// The floor of `cosine_with_min_lr`.
    #[serde(default)]
    pub min_lr: f32,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the run's steps (⌈ratio · steps⌉), instead of `warmup_steps`.
    pub warmup_ratio: Option<f64>,
    /// Optimizer steps; or give `epochs`.
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    /// Tokens per micro-batch: `batch_tokens / max_seq_len` packed rows.
    pub batch_tokens: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub weight_decay: f32,
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// Global gradient-norm clip; 0 disables it.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub recompute: bool,
    /// Data parallel: 0 replicates AdamW's moments on every rank; 1 shards them (ZeRO-1); 2
    /// also keeps only each rank's chunk of the gradients (ZeRO-2); 3 the weights too, each
    /// layer gathered as forward and backward reach it (ZeRO-3).
    #[serde(default)]
    pub zero: u8,
    /// ZeRO-3: start gathering the next layer's weights as a layer starts, so the gather runs
    /// behind its compute (room for a second gathered layer); false gathers each layer only
    /// when it is reached.
    #[serde(default = "yes")]
    pub zero3_prefetch: bool,
    /// Data parallel: start the gradients' reduction during backward, for a network that
    /// moves data while the rank computes. Without ZeRO and with ZeRO-1, the all-reduce (ZeRO-1:
    /// reduce-scatter) in buckets during the step's last backward, each as soon as backward
    /// has completed it (not under pipeline parallel); with ZeRO-2/3, each layer's
    /// reduce-scatter as backward hands it over, finished before the update. Up to 64 MB of
    /// gradients under way, as copies MPI sends. Off, they are summed after backward (ZeRO-2/3:
    /// as each layer is handed over, waiting). Off by default: on one machine's shared memory
    /// the transfer is the rank's own CPU work, which overlap cannot hide (bench/README.md).
    #[serde(default)]
    pub overlap_grad_reduce: bool,
    /// Expert parallel (MoE models, under mpirun): the routed experts of every MoE layer are
    /// split over groups of this many ranks (1: every rank holds them all). Divides the number
    /// of ranks and of routed experts.
    #[serde(default = "default_ep")]
    pub ep: usize,
    /// Tensor parallel (Llama-family and DeepSeek-V3/V4 models, under mpirun): every layer's
    /// attention heads and MLP (and expert) width are split over groups of this many consecutive
    /// ranks (1: no split). Divides the number of ranks, of heads, of key/value heads (of
    /// DeepSeek-V4, its output groups instead) and the MLP and expert widths; with `ep`, the
    /// expert groups are the data-parallel ranks.
    #[serde(default = "one")]
    pub tp: usize,
    /// Tensor parallel: cut the residual stream, the norms and the embedding's output by tokens
    /// over the tensor group (Megatron-LM's sequence parallel), so each rank keeps 1/tp of what
    /// lies between the split blocks, as `kiln plan` assumes; false keeps them whole on every
    /// rank (DeepSeek-V4: its hyper-connected streams). The same bytes move either way.
    #[serde(default = "yes")]
    pub sequence_parallel: bool,
    /// Pipeline parallel (Llama-family and DeepSeek-V3/V4 models, under mpirun): the layers are cut into this many
    /// stages of consecutive layers, one per rank of a pipeline, the first stage also holding
    /// the embedding and the last the final norm and head (1: no cut). At most the layers.
    #[serde(default = "one")]
    pub pp: usize,
    /// Pipeline parallel: interleaved stages (Megatron-LM's virtual pipeline): each stage
    /// holds this many runs of layers (`pp · vpp` runs in all, stage s the runs s, s + pp, ..),
    /// so a chunk passes the stages `vpp` times and the bubble shrinks `vpp`-fold, for `vpp`
    /// times as many hand-overs (`kiln_model::interleaved_schedule`). 1: one run per stage.
    #[serde(default = "one")]
    pub vpp: usize,
    /// Pipeline parallel: the chunks each micro-batch's rows are cut into (at most one row
    /// each), which the stages run on a 1F1B schedule: more chunks, a smaller bubble of
    /// (pp − 1) / (chunks + pp − 1), and smaller products. Under ZeRO-2/3 and expert parallel
    /// every pass has exactly this many (short ones padded), as their per-chunk collectives
    /// need. 0: twice `pp` (there at most the rows of `batch_tokens`). Generation (GRPO's and
    /// distillation's rollouts) cuts each prefill's prompts and each decode step's sequences
    /// into as many, at most one row each (under expert parallel exactly as many, some empty).
    #[serde(default)]
    pub pp_chunks: usize,
    /// Pipeline parallel: how the stages cut the layers. "even" (the default: as evenly as
    /// they go, the first stages one more, as `kiln plan` assumes), "balanced" (the largest
    /// stage's compute per token as small as it goes, the LM head counted on the last stage:
    /// `kiln_model::stage_split`), or each stage's layers, e.g. `[9, 9, 8, 6]`.
    #[serde(default)]
    pub pp_layers: PpLayers,
    /// The layout in `kiln plan`'s syntax (`dp=..,tp=..,pp=..,ep=..,zero=..,recompute=..`), setting the
    /// keys it names (`crate::layout`).
    #[serde(default)]
    pub layout: Option<String>,
    /// Evaluate every this many steps (and at the end); 0: only at the end.
    #[serde(default)]
    pub eval_every: u64,
    /// MoE models: γ of DeepSeek-V3's aux-loss-free balancing, the step by which each
    /// expert's routing bias moves toward even load after every optimizer step; 0 freezes it.
    #[serde(default = "default_router_bias_rate")]
    pub router_bias_rate: f32,
    /// MoE models: α of DeepSeek-V3's sequence-wise balance loss (the report uses 1e-4);
    /// 0 turns it off.
    #[serde(default)]
    pub moe_aux_loss_alpha: f32,
    /// Inputs of the matrix products (`ComputeDtype`): `f32`, `bf16` or `auto`.
    #[serde(default)]
    pub dtype: ComputeDtype,
    /// `adamw`, or `muon`: Muon for the hidden weight matrices (`crate::muon`), AdamW (with
    /// the settings above) for embeddings, head, norms, biases and routers.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Muon's settings (`[train.muon]`); `lr` and `weight_decay` are the run's.
    #[serde(default)]
    pub muon: MuonSettings,
}

/// The optimizer of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Muon,
}

/// The precision of a run's matrix products. `bf16` is mixed precision's: bf16 inputs with
/// f32 sums in the products of every layer and the LM head (training forwards and backwards,
/// reference and teacher forwards, rollouts), while weights, gradients, optimizer moments,
/// routers, norms, softmax, losses and checkpoints stay f32. `auto` is `bf16` where the
/// device computes bf16 products natively (AMX or AVX512-BF16 on CPUs), else `f32`. The default is f32 until every recipe's tests hold in bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    Bf16,
    #[default]
    Auto,
}

/// The startup line that says what device `b` computes on and in what precision.
pub fn describe_precision<B: Backend>(b: &B, precision: Precision) -> String {
    let native = if b.native_bf16() { "natively" } else { "emulated" };
    let products = match precision {
        Precision::Bf16 => format!("matrix products: bf16 inputs, f32 sums ({} computes bf16 {native})", b.name()),
        Precision::F32 => "matrix products: f32".to_string(),
    };
    format!("device: {}; {products}", b.device())
}

impl ComputeDtype {
    /// The precision this run computes in on `b`.
    pub fn precision<B: Backend>(self, b: &B) -> Precision {
        match self {
            ComputeDtype::F32 => Precision::F32,
            ComputeDtype::Bf16 => Precision::Bf16,
            ComputeDtype::Auto if b.native_bf16() => Precision::Bf16,
            ComputeDtype::Auto => Precision::F32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// Checkpoint every this many steps (and at the end); 0: only at the end.
    #[serde(default)]
    pub save_every: u64,
    /// Checkpoints kept; older ones are deleted once a newer one is whole.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Also write every metric to a TensorBoard event file in `dir`.
    #[serde(default)]
    pub tensorboard: bool,
}

/// Functions that give serde the keys' defaults.
macro_rules! defaults {
    ($($name:ident: $t:ty = $v:expr;)*) => { $(fn $name() -> $t { $v })* };
}

defaults! {
    default_estimator: String = "full".into();
    default_group_size: usize = 8;
    default_micro_batch: usize = 32;
    one_f32: f32 = 1.0;
    default_epsilon: f64 = 0.2;
    default_scale_rewards: ScaleRewards = ScaleRewards::Group;
    default_timeout_s: f64 = 60.0;
    default_kto_loss: KtoLoss = KtoLoss::Kto;
    default_dpo_loss: Vec<LossKind> = vec![LossKind::Sigmoid];
    default_simpo_gamma: f64 = 0.5;
    default_ep: usize = 1;
    default_lr_schedule: ScheduleKind = ScheduleKind::CosineWithMinLr;
    default_router_bias_rate: f32 = 0.001;
    default_length_policy: LengthPolicy = LengthPolicy::Drop;
    one: usize = 1;
    default_beta2: f32 = 0.999;
    default_max_grad_norm: f32 = 1.0;
    default_chunk_rows: usize = 16;
    default_prompts_per_step: usize = 8;
    default_max_new_tokens: usize = 64;
    one_f64: f64 = 1.0;
    default_loss_type: Aggregation = Aggregation::Grpo;
    default_importance_sampling: ImportanceLevel = ImportanceLevel::Token;
    default_dpo_beta: f64 = 0.1;
    default_max_bad_fraction: f64 = 0.0;
    default_beta1: f32 = 0.9;
    default_eps: f32 = 1e-8;
    default_keep_last: usize = 2;
    yes: bool = true;
}

/// Accepts `train = "a.jsonl"` as well as `train = ["a.jsonl", "b.jsonl"]` (and a single
/// `dpo.loss` or `dpo.loss_weights` as well as lists).
fn normalise_file_lists(table: &mut toml::Table) {
    for (section, keys) in [("data", &["train", "eval"][..]), ("dpo", &["loss", "loss_weights"][..])] {
        if let Some(toml::Value::Table(data)) = table.get_mut(section) {
            for key in keys {
                if let Some(v) = data.get_mut(*key).filter(|v| !v.is_array()) {
                    *v = toml::Value::Array(vec![v.clone()]);
                }
            }
        }
    }
}

/// Sets `section.key` to `value`, read as a TOML value (a bare word becomes a string).
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (path, raw) =
        assignment.split_once('=').ok_or_else(|| format!("--set {assignment}: expected section.key=value"))?;
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut keys: Vec<&str> = path.trim().split('.').collect();
    let last = keys.pop().filter(|k| !k.is_empty()).ok_or_else(|| format!("--set {assignment}: empty key"))?;
    let mut node = table;
    for k in keys {
        node = node
            .entry(k)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("--set {assignment}: `{k}` is not a section"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

impl RunConfig {
    /// Parses a run file, then applies `--set` overrides; errors name the file and the key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text, overrides).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Self, String> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        normalise_file_lists(&mut table);
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        normalise_file_lists(&mut table);
        let mut config: RunConfig = table.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        if let Some(spec) = &config.train.layout {
            crate::layout::RunLayout::parse(spec)?.apply(&mut config.train);
        }
        config.validate()?;
        Ok(config)
    }

    /// `load`, with relative paths taken from the run file's directory.
    pub fn load_resolved(path: &Path, overrides: &[String]) -> Result<Self, String> {
        let mut config = Self::load(path, overrides)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Resolves relative paths against the directory of the run file.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                // `Path::join` keeps a lone "." as a component: "out/." reads badly in messages.
                let rel: PathBuf = p.components().filter(|c| *c != std::path::Component::CurDir).collect();
                *p = base.join(rel);
            }
        };
        fix(&mut self.model.path);
        self.data.train.iter_mut().for_each(fix);
        self.data.eval.iter_mut().for_each(fix);
        fix(&mut self.output.dir);
        if let Some(d) = &mut self.distill {
            fix(&mut d.teacher);
        }
        if let Some(g) = &mut self.grpo {
            g.rewards.iter_mut().filter_map(|r| r.path.as_mut()).for_each(fix);
        }
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        match (t.steps, t.epochs) {
            (Some(_), Some(_)) => return Err("give `train.steps` or `train.epochs`, not both".into()),
            (None, None) => return Err("`train.steps` or `train.epochs` is required".into()),
            (Some(0), _) | (_, Some(0)) => return Err("`train.steps`/`train.epochs` must be positive".into()),
            _ => {}
        }
        if self.data.max_seq_len < 2 {
            return Err("`data.max_seq_len` must be at least 2".into());
        }
        if t.batch_tokens < self.data.max_seq_len || !t.batch_tokens.is_multiple_of(self.data.max_seq_len) {
            return Err(format!(
                "`train.batch_tokens` ({}) must be a positive multiple of `data.max_seq_len` ({})",
                t.batch_tokens, self.data.max_seq_len
            ));
        }
        if t.optimizer == OptimizerKind::Muon {
            let m = &t.muon;
            if !(0.0..1.0).contains(&m.momentum) || m.ns_steps == 0 || m.ns_steps >= 100 {
                return Err(format!(
                    "`train.muon`: momentum {} must lie in [0, 1) and ns_steps {} in 1..100",
                    m.momentum, m.ns_steps
                ));
            }
        }
        if t.zero > 3 {
            return Err(format!("`train.zero` = {}: ZeRO has stages 0 to 3", t.zero));
        }
        if let Some(ratio) = t.warmup_ratio {
            if t.warmup_steps > 0 || !(0.0..1.0).contains(&ratio) {
                return Err(
                    "`train.warmup_ratio` is a fraction in [0, 1), given instead of `train.warmup_steps`".into()
                );
            }
        }
        if t.grad_accum == 0 {
            return Err("`train.grad_accum` must be at least 1".into());
        }
        if t.ep == 0 {
            return Err("`train.ep` must be at least 1".into());
        }
        if t.tp == 0 {
            return Err("`train.tp` must be at least 1".into());
        }
        if t.pp == 0 {
            return Err("`train.pp` must be at least 1".into());
        }
        if t.vpp == 0 {
            return Err("`train.vpp` must be at least 1".into());
        }
        if t.vpp > 1 && t.pp == 1 {
            return Err(format!("`train.vpp` = {}: interleaved stages need pipeline parallel (`train.pp` > 1)", t.vpp));
        }
        t.pp_layers.split()?;
        if let PpLayers::Counts(counts) = &t.pp_layers {
            if counts.len() != t.pp * t.vpp {
                let of = if t.vpp > 1 {
                    format!("`train.pp` · `train.vpp` is {}·{}", t.pp, t.vpp)
                } else {
                    format!("`train.pp` is {}", t.pp)
                };
                return Err(format!("`train.pp_layers` = {counts:?} gives {} stages, {of}", counts.len()));
            }
        }
        if t.tp > 1 && t.optimizer == OptimizerKind::Muon {
            return Err(format!(
                "`train.tp` = {}: Muon orthogonalises whole matrices, which tensor parallel cuts (use AdamW, or tp = 1)",
                t.tp
            ));
        }
        if self.data.train.is_empty() {
            return Err("`data.train` names no file".into());
        }
        if !(0.0..=1.0).contains(&self.data.max_bad_fraction) {
            return Err("`data.max_bad_fraction` must be between 0 and 1".into());
        }
        if let Some(d) = &self.distill {
            if !["full", "sampled"].contains(&d.estimator.as_str()) {
                return Err(format!("`distill.estimator` is `{}`; use `full` or `sampled`", d.estimator));
            }
        }
        if let Some(g) = &self.grpo {
            if g.group_size < 2 {
                return Err("`grpo.group_size` must be at least 2 (advantages compare completions of a prompt)".into());
            }
            if g.prompts_per_step == 0 || g.max_new_tokens == 0 || g.micro_batch == 0 || g.num_iterations == 0 {
                return Err(
                    "`grpo.prompts_per_step`, `max_new_tokens`, `micro_batch` and `num_iterations` must be positive"
                        .into(),
                );
            }
            if g.rewards.is_empty() {
                return Err("`grpo.rewards` names no reward function ([[grpo.rewards]] type = \"exact_match\")".into());
            }
        }
        if let Some(k) = &self.kto {
            if k.beta <= 0.0 || k.desirable_weight < 0.0 || k.undesirable_weight < 0.0 {
                return Err(
                    "`kto.beta` must be positive and `kto.desirable_weight`, `undesirable_weight` not negative".into(),
                );
            }
        }
        if let Some(d) = &self.dpo {
            if d.loss.is_empty() {
                return Err("`dpo.loss` names no loss".into());
            }
            if !d.loss_weights.is_empty() && d.loss_weights.len() != d.loss.len() {
                return Err(format!(
                    "`dpo.loss_weights` has {} weights for {} losses",
                    d.loss_weights.len(),
                    d.loss.len()
                ));
            }
            if d.beta <= 0.0 {
                return Err("`dpo.beta` must be positive".into());
            }
            if !(0.0..0.5).contains(&d.label_smoothing) {
                return Err("`dpo.label_smoothing` must be in [0, 0.5)".into());
            }
        }
        Ok(())
    }

    /// Packed rows per micro-batch.
    pub fn rows(&self) -> usize {
        self.train.batch_tokens / self.data.max_seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "m"
[data]
train = "t.jsonl"
max_seq_len = 64
[train]
lr = 1e-3
steps = 10
batch_tokens = 256
[output]
dir = "out"
"#;

    #[test]
    fn defaults_overrides_and_unknown_keys() {
        let c = RunConfig::parse(BASE, &[]).unwrap();
        assert_eq!(c.data.train, vec![PathBuf::from("t.jsonl")]);
        assert_eq!((c.train.grad_accum, c.rows(), c.output.keep_last), (1, 4, 2));
        let c =
            RunConfig::parse(BASE, &["train.lr=0.5".into(), "data.eval=e.jsonl".into(), "train.recompute=true".into()])
                .unwrap();
        assert_eq!((c.train.lr, c.train.recompute), (0.5, true));
        assert_eq!(c.data.eval, vec![PathBuf::from("e.jsonl")]);
        let err = RunConfig::parse(&BASE.replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 2"), &[]).unwrap_err();
        assert!(err.contains("unknown field `learning_rate`"), "{err}");
        let err = RunConfig::parse(BASE, &["train.bogus=1".into()]).unwrap_err();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        let err = RunConfig::parse(BASE, &["train.batch_tokens=100".into()]).unwrap_err();
        assert!(err.contains("batch_tokens"), "{err}");
    }
}
