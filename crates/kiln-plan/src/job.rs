//! What is trained (`Job`) and how it is spread over the devices (`Layout`).

use crate::{ModelShape, StageCut};
use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
    Grpo,
    Distill,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "sft" => Self::Sft,
            "dpo" => Self::Dpo,
            "grpo" => Self::Grpo,
            "distill" => Self::Distill,
            other => bail!("method `{other}`: use sft, dpo, grpo or distill"),
        })
    }

    /// Whether a step starts by sampling completions.
    pub fn has_rollout(self) -> bool {
        matches!(self, Self::Grpo | Self::Distill)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// f32 master weights, first and second moments: 12 bytes per parameter.
    AdamW,
    /// f32 master weights and one momentum for the hidden matrices (8 bytes per parameter);
    /// embeddings, head and vectors stay on AdamW, as in DeepSeek-V4 and Moonlight.
    Muon,
}

impl Optimizer {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "adamw" => Self::AdamW,
            "muon" => Self::Muon,
            other => bail!("optimizer `{other}`: use adamw or muon"),
        })
    }
}

/// How the weights and gradients are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// Mixed precision as accelerators run it: bf16 weights and gradients, an f32 master copy.
    Mixed,
    /// kiln's engine (either `train.dtype`): f32 weights, which are the master copy, and f32
    /// gradients; under ZeRO-3 two layers (one prefetched) and the embedding and head gathered.
    F32,
}

impl Storage {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "mixed" => Self::Mixed,
            "f32" => Self::F32,
            other => bail!("storage `{other}`: use mixed or f32"),
        })
    }
}

/// What backward keeps, and what it recomputes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation backward reads.
    None,
    /// DeepSeek-V3's set: recompute norms, MLA up-projections and SwiGLU products; keep
    /// routed experts' inputs in fp8.
    Selective,
    /// Keep each layer's input only; recompute the layer's forward during backward.
    Full,
}

impl Recompute {
    pub const ALL: [Self; 3] = [Self::None, Self::Selective, Self::Full];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Self::None,
            "selective" => Self::Selective,
            "full" => Self::Full,
            other => bail!("recompute `{other}`: use none, selective or full"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Selective => "selective",
            Self::Full => "full",
        }
    }
}

/// The training job, independent of the layout.
#[derive(Clone, Debug)]
pub struct Job {
    pub model: ModelShape,
    pub method: Method,
    /// Tokens per sequence (prompt + completion for rollouts).
    pub seq: f64,
    /// Trained tokens per optimizer step, over the whole cluster.
    pub global_batch_tokens: f64,
    /// Sequences per micro-batch on one pipeline.
    pub micro_batch_seqs: f64,
    pub optimizer: Optimizer,
    pub storage: Storage,
    /// Achieved fraction of peak matrix throughput in training (model FLOPs utilisation).
    pub efficiency: f64,
    /// Fraction of communication hidden behind computation.
    pub overlap: f64,
    /// grpo: a frozen reference model for the KL term is resident (β > 0).
    pub reference: bool,
    /// distill: the teacher (default: a model of the student's shape).
    pub teacher: Option<ModelShape>,
    /// Rollouts: the completion's share of `seq`.
    pub completion_share: f64,
    /// Where pipeline parallel cuts the layers.
    pub stage_cut: StageCut,
}

impl Job {
    pub fn new(model: ModelShape, method: Method) -> Self {
        Self {
            model,
            method,
            seq: 4096.0,
            global_batch_tokens: 8.0 * 1024.0 * 1024.0,
            micro_batch_seqs: 1.0,
            optimizer: Optimizer::AdamW,
            storage: Storage::Mixed,
            efficiency: 0.40,
            overlap: 0.8,
            reference: method == Method::Grpo,
            teacher: None,
            completion_share: 0.75,
            stage_cut: StageCut::Even,
        }
    }

    pub fn micro_batch_tokens(&self) -> f64 {
        self.seq * self.micro_batch_seqs
    }
}

/// How the devices are used: world = dp · tp · pp; expert parallel groups of `ep` ranks are
/// carved out of the data-parallel ranks, so `ep` divides `dp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    /// Interleaved stages: each pipeline stage holds this many runs of layers (virtual
    /// stages), a `vpp`-fold smaller bubble for `vpp`-fold the hand-overs and more
    /// activations in flight (1: one run per stage).
    pub vpp: usize,
    pub ep: usize,
    /// 0: replicated; 1: optimizer states sharded over data parallel; 2: and gradients;
    /// 3: and weights.
    pub zero: u8,
    pub recompute: Recompute,
    /// Under tensor parallel, the residual stream cut by tokens over the group (Megatron-LM's
    /// sequence parallel, kiln's default); false keeps it whole on every rank.
    pub sequence_parallel: bool,
}

impl Layout {
    /// `dp` replicas of the whole model (one stage, no tensor or expert parallel), ZeRO-1.
    pub fn replicated(dp: usize, recompute: Recompute) -> Self {
        Self { dp, tp: 1, pp: 1, vpp: 1, ep: 1, zero: 1, recompute, sequence_parallel: true }
    }

    pub fn devices(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// Parses `dp=128,tp=1,pp=16,vpp=1,ep=64,zero=1,recompute=selective,sp=on` (missing sizes
    /// are 1, `zero` 1, `recompute` selective, `sp` on; `dp` may be left out and follows from
    /// `devices`).
    pub fn parse(s: &str, devices: usize) -> Result<Self> {
        let mut l = Self::replicated(0, Recompute::Selective);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                bail!("layout `{s}`: `{part}` is not key=value");
            };
            let n = || -> Result<usize> {
                value.parse().map_err(|_| anyhow::anyhow!("layout `{s}`: `{key}` = `{value}` is not a whole number"))
            };
            match key {
                "dp" => l.dp = n()?,
                "tp" => l.tp = n()?,
                "pp" => l.pp = n()?,
                "vpp" => l.vpp = n()?,
                "ep" => l.ep = n()?,
                "zero" => l.zero = n()? as u8,
                "recompute" => l.recompute = Recompute::parse(value)?,
                "sp" => {
                    l.sequence_parallel = match value {
                        "on" => true,
                        "off" => false,
                        _ => bail!("layout `{s}`: `sp` = `{value}`: sequence parallel is `on` or `off`"),
                    }
                }
                other => bail!("layout `{s}`: unknown key `{other}` (dp, tp, pp, vpp, ep, zero, recompute, sp)"),
            }
        }
        if l.tp == 0 || l.pp == 0 || l.vpp == 0 || l.ep == 0 {
            bail!("layout `{s}`: sizes must be positive");
        }
        if l.dp == 0 {
            if !devices.is_multiple_of(l.tp * l.pp) {
                bail!("layout `{s}`: tp·pp = {} does not divide the {devices} devices", l.tp * l.pp);
            }
            l.dp = devices / (l.tp * l.pp);
        }
        Ok(l)
    }

    /// Why this layout cannot run the model on `devices` devices with `per_node` a node, if
    /// it cannot.
    pub fn check(&self, model: &ModelShape, devices: usize, per_node: usize) -> Result<()> {
        let name = self.to_string();
        if self.devices() != devices {
            bail!("{name}: dp·tp·pp = {} does not equal the {devices} devices", self.devices());
        }
        if self.zero > 3 {
            bail!("{name}: ZeRO stages are 0 to 3");
        }
        if self.tp > per_node || !per_node.is_multiple_of(self.tp) {
            bail!("{name}: tensor parallel must divide the {per_node} devices of a node (its all-reduces run every layer)");
        }
        if !model.heads.is_multiple_of(self.tp) {
            bail!("{name}: tp = {} does not divide the {} attention heads", self.tp, model.heads);
        }
        if self.pp * self.vpp > model.layers {
            bail!("{name}: {} pipeline stages for {} layers", self.pp * self.vpp, model.layers);
        }
        if self.vpp > 1 && self.pp == 1 {
            bail!("{name}: interleaved stages (vpp = {}) need pipeline parallel", self.vpp);
        }
        if !self.dp.is_multiple_of(self.ep) {
            bail!("{name}: ep = {} does not divide dp = {}", self.ep, self.dp);
        }
        match &model.moe {
            Some(m) if !m.experts.is_multiple_of(self.ep) => {
                bail!("{name}: ep = {} does not divide the {} routed experts", self.ep, m.experts)
            }
            None if self.ep > 1 => bail!("{name}: expert parallel on a model without experts"),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DP{} TP{} PP{} EP{} ZeRO-{} recompute={}",
            self.dp,
            self.tp,
            self.pp,
            self.ep,
            self.zero,
            self.recompute.name()
        )?;
        if self.vpp > 1 {
            write!(f, " vpp={}", self.vpp)?;
        }
        match self.sequence_parallel || self.tp == 1 {
            true => Ok(()),
            false => write!(f, " sp=off"),
        }
    }
}
