//! Activation and gradient scratch memory, laid out once for a batch shape.

use crate::config::{AttentionKind, Config};
use crate::layers::gqa::{GqaActs, GqaGrads};
use crate::layers::hyper::{HcActs, HcDims, HcGrads};
use crate::layers::mla::{MlaActs, MlaGrads};
use crate::layers::mlp::{MlpActs, MlpGrads};
use crate::layers::moe::{MoeActs, MoeGrads, MoeShape};
use crate::layers::v4_attention::{V4AttnActs, V4AttnGrads};
use crate::sequence_parallel::SequenceBufs;
use kiln_core::Backend;

pub enum AttnActs<B: Backend> {
    Gqa(GqaActs<B>),
    Mla(MlaActs<B>),
    V4(V4AttnActs<B>),
}

pub enum FfnActs<B: Backend> {
    Dense(MlpActs<B>),
    Moe(MoeActs<B>),
}

/// A hyper-connected layer's (DeepSeek-V4's) two hyper-connections and its blocks' outputs.
pub struct StreamActs<B: Backend> {
    pub attn_hc: HcActs<B>,
    pub ffn_hc: HcActs<B>,
    pub attn_out: B::Buf,
    pub ffn_out: B::Buf,
}

/// The hyper-connections' sizes for `n` tokens of `cfg`, if it has them.
pub(crate) fn hc_dims(cfg: &Config, n: usize, head: bool) -> Option<HcDims> {
    match &cfg.attention {
        AttentionKind::V4(v4) => Some(HcDims { n, d: cfg.hidden_size, hc: v4.hc, head }),
        _ => None,
    }
}

/// Residual streams per token: `hc_mult` with hyper-connections, else 1.
pub(crate) fn streams(cfg: &Config) -> usize {
    hc_dims(cfg, 0, false).map_or(1, |h| h.hc.streams)
}

/// What one layer's forward keeps for its backward. Under sequence parallel the norms' inputs,
/// outputs and statistics and the residual `x_mid` are the rank's tokens' only.
pub struct LayerActs<B: Backend> {
    pub xn1: B::Buf,
    pub rstd1: B::Buf,
    pub attn: AttnActs<B>,
    /// Residual stream (all of them, with hyper-connections) after attention.
    pub x_mid: B::Buf,
    pub xn2: B::Buf,
    pub rstd2: B::Buf,
    pub ffn: FfnActs<B>,
    pub streams: Option<StreamActs<B>>,
}

impl<B: Backend> LayerActs<B> {
    /// A layer's over `n` tokens, `here` of them the rank's (all but under sequence parallel).
    fn new(b: &B, cfg: &Config, (n, here): (usize, usize), moe: bool) -> Self {
        let d = cfg.hidden_size;
        Self {
            xn1: b.zeros(here * d),
            rstd1: b.zeros(here),
            attn: match cfg.attention {
                AttentionKind::Gqa => AttnActs::Gqa(GqaActs::new(b, cfg, n)),
                AttentionKind::Mla(_) => AttnActs::Mla(MlaActs::new(b, cfg, n)),
                AttentionKind::V4(_) => AttnActs::V4(V4AttnActs::new(b, cfg, n)),
            },
            streams: hc_dims(cfg, here, false).map(|dims| StreamActs {
                attn_hc: HcActs::new(b, dims),
                ffn_hc: HcActs::new(b, dims),
                attn_out: b.zeros(here * d),
                ffn_out: b.zeros(here * d),
            }),
            x_mid: b.zeros(here * d * streams(cfg)),
            xn2: b.zeros(here * d),
            rstd2: b.zeros(here),
            ffn: match MoeShape::new(cfg).filter(|_| moe) {
                Some(shape) => FfnActs::Moe(MoeActs::new(b, &shape, n)),
                None => FfnActs::Dense(MlpActs::new(b, n, cfg.intermediate_size)),
            },
        }
    }
}

pub enum AttnGrads<B: Backend> {
    Gqa(GqaGrads<B>),
    Mla(MlaGrads<B>),
    V4(V4AttnGrads<B>),
}

/// Gradient scratch for backward, shared by all layers.
pub struct GradScratch<B: Backend> {
    /// Gradient of the residual stream (all of them), flowing down through the layers.
    pub dres: B::Buf,
    pub dxn: B::Buf,
    /// With hyper-connections: the streams' gradient between a layer's two blocks, a block
    /// output's gradient, and the hyper-connections' scratch.
    pub hc: Option<(B::Buf, B::Buf, HcGrads<B>)>,
    pub attn: AttnGrads<B>,
    /// Scratch of dense MLP layers and of MoE layers, where the model has them.
    pub dense: Option<MlpGrads<B>>,
    pub moe: Option<MoeGrads<B>>,
}

impl<B: Backend> GradScratch<B> {
    /// Scratch for a backward over `n` tokens (`here` of them the rank's under sequence
    /// parallel) of a model of `cfg`, for the kinds of layers it has.
    pub fn new(b: &B, cfg: &Config, (n, here): (usize, usize)) -> Self {
        let (d, s) = (cfg.hidden_size, streams(cfg));
        let has_dense = (0..cfg.num_layers).any(|l| !cfg.is_moe_layer(l));
        let has_moe = (0..cfg.num_layers).any(|l| cfg.is_moe_layer(l));
        Self {
            dres: b.zeros(here * d * s),
            dxn: b.zeros(n * d),
            hc: hc_dims(cfg, here, false).map(|dims| (b.zeros(here * d * s), b.zeros(here * d), HcGrads::new(b, dims))),
            attn: match cfg.attention {
                AttentionKind::Gqa => AttnGrads::Gqa(GqaGrads::new(b, cfg, n)),
                AttentionKind::Mla(_) => AttnGrads::Mla(MlaGrads::new(b, cfg, n)),
                AttentionKind::V4(_) => AttnGrads::V4(V4AttnGrads::new(b, cfg, n)),
            },
            dense: has_dense.then(|| MlpGrads::new(b, n, cfg.intermediate_size)),
            moe: MoeShape::new(cfg).filter(|_| has_moe).map(|shape| MoeGrads::new(b, &shape, n)),
        }
    }

    /// The stream's gradient (`dres`) of `here` tokens alone, the rest empty.
    fn stream_only(b: &B, cfg: &Config, here: usize) -> Self {
        let (d, s) = (cfg.hidden_size, streams(cfg));
        Self { dres: b.zeros(here * d * s), ..Self::new(b, cfg, (0, 0)) }
    }
}

/// A batch's tokens on the device.
pub struct BatchInputs<B: Backend> {
    pub ids: B::Index,
    pub positions: B::Index,
    pub segments: B::Index,
    pub targets: B::Index,
    pub weights: B::Buf,
}

/// Everything a forward and backward pass over a `rows × seq` batch writes.
pub struct Activations<B: Backend> {
    pub rows: usize,
    pub seq: usize,
    pub recompute: bool,
    /// The model's local layer whose activations are this one's first: 0, or for one part of
    /// an interleaved pipeline stage (`for_part`) that part's first layer.
    pub first_layer: usize,
    pub inputs: BatchInputs<B>,
    /// Residual stream (all of them) entering each layer, and (last) leaving the final layer.
    pub layer_inputs: Vec<B::Buf>,
    /// DeepSeek-V4's collapse of the streams before the final norm.
    pub hc_head: Option<HcActs<B>>,
    /// Each hash-routed layer's experts for the batch's tokens (`top_k` per token).
    pub routes: Vec<(usize, Vec<i32>)>,
    /// The batch's compressed entries, per compression rate of DeepSeek-V4's layers.
    pub compress: Vec<crate::compress_plan::CompressPlan<B>>,
    /// Per layer, or, when recomputing in backward (or not training), one set per layer kind
    /// reused by every layer of that kind; `slots[l]` picks layer `l`'s.
    pub layers: Vec<LayerActs<B>>,
    pub slots: Vec<usize>,
    pub xf: B::Buf,
    pub rstdf: B::Buf,
    /// Logits; overwritten by their gradient in backward.
    pub logits: B::Buf,
    pub nll: B::Buf,
    /// 1 where a token's target has its largest logit (token accuracy), else 0.
    pub correct: B::Buf,
    pub grad: Option<GradScratch<B>>,
    /// Under sequence parallel (training activations of a `Config::sequence_parallel` model),
    /// the rank's tokens and the gathered buffers; the residual stream (`layer_inputs`, the
    /// layers' norms and `x_mid`, `rstdf`, `grad.dres`) then holds the rank's tokens only.
    pub sequence: Option<SequenceBufs<B>>,
}

impl<B: Backend> Activations<B> {
    /// `new`'s activations of the local layers `run` only of a model of `cfg` (one part of
    /// a pipeline stage), with no logits unless the part `heads` (ends with the head), and of
    /// the gradient scratch only the stream's gradient: a backward borrows the rest, which the
    /// stage's chunks share (`part_slots::PartSlots::lend_scratch`).
    pub fn for_part(
        b: &B,
        cfg: &Config,
        run: std::ops::Range<usize>,
        (rows, seq): (usize, usize),
        (training, recompute): (bool, bool),
        heads: bool,
    ) -> Self {
        let first_layer = run.start;
        let part = crate::pipeline::run_config(cfg, run);
        Self { first_layer, ..Self::laid_out(b, &part, (rows, seq), (training, recompute), (heads, false)) }
    }

    /// `training` adds the gradient scratch; `recompute` keeps only each layer's input and
    /// recomputes the rest of a layer's activations during backward.
    pub fn new(b: &B, cfg: &Config, rows: usize, seq: usize, training: bool, recompute: bool) -> Self {
        Self::laid_out(b, cfg, (rows, seq), (training, recompute), (true, true))
    }

    fn laid_out(
        b: &B,
        cfg: &Config,
        (rows, seq): (usize, usize),
        (training, recompute): (bool, bool),
        (logits, whole_scratch): (bool, bool),
    ) -> Self {
        let n = rows * seq;
        let d = cfg.hidden_size;
        let sequence = cfg.sequence_parallel.filter(|_| training).map(|group| SequenceBufs::new(b, cfg, n, group));
        let here = sequence.as_ref().map_or(n, |sp| sp.tokens.len());
        let has_dense = (0..cfg.num_layers).any(|l| !cfg.is_moe_layer(l));
        let has_moe = (0..cfg.num_layers).any(|l| cfg.is_moe_layer(l));
        let (layers, slots) = if recompute || !training {
            let kinds: Vec<bool> =
                [(has_dense, false), (has_moe, true)].into_iter().filter(|k| k.0).map(|k| k.1).collect();
            let slots = (0..cfg.num_layers).map(|l| kinds.iter().position(|&m| m == cfg.is_moe_layer(l)).unwrap_or(0));
            (kinds.iter().map(|&moe| LayerActs::new(b, cfg, (n, here), moe)).collect(), slots.collect())
        } else {
            let layers = (0..cfg.num_layers).map(|l| LayerActs::new(b, cfg, (n, here), cfg.is_moe_layer(l))).collect();
            (layers, (0..cfg.num_layers).collect())
        };
        let s = streams(cfg);
        let grad = training.then(|| match whole_scratch {
            true => GradScratch::new(b, cfg, (n, here)),
            false => GradScratch::stream_only(b, cfg, here),
        });
        Self {
            rows,
            seq,
            recompute: recompute && training,
            first_layer: 0,
            inputs: BatchInputs {
                ids: b.upload_index(&vec![0; n]),
                positions: b.upload_index(&vec![0; n]),
                segments: b.upload_index(&vec![0; n]),
                targets: b.upload_index(&vec![0; n]),
                weights: b.zeros(n),
            },
            layer_inputs: (0..=cfg.num_layers).map(|_| b.zeros(here * d * s)).collect(),
            hc_head: hc_dims(cfg, here, true).map(|dims| HcActs::new(b, dims)),
            routes: Vec::new(),
            compress: Vec::new(),
            layers,
            slots,
            xf: b.zeros(n * d),
            rstdf: b.zeros(here),
            logits: b.zeros(if logits { n * cfg.vocab_size } else { 0 }),
            nll: b.zeros(n),
            correct: b.zeros(n),
            grad,
            sequence,
        }
    }
}

/// Activations laid out once per row count and reused: batches whose row count varies a
/// little (decode steps as sequences finish, RL steps that drop groups, the last chunk of a
/// step) then allocate only the first time each count appears.
pub struct ActivationsPool<B: Backend> {
    config: Config,
    seq: usize,
    training: bool,
    recompute: bool,
    by_rows: std::collections::HashMap<usize, Activations<B>>,
}

impl<B: Backend> ActivationsPool<B> {
    pub fn new(config: &Config, seq: usize, training: bool, recompute: bool) -> Self {
        Self { config: config.clone(), seq, training, recompute, by_rows: Default::default() }
    }

    /// The activations for `rows × seq` batches.
    pub fn get(&mut self, b: &B, rows: usize) -> &mut Activations<B> {
        self.get_for(b, rows, self.seq)
    }

    /// The activations for `rows × seq` batches of a shorter (or longer) `seq` than the pool's:
    /// laid out anew when a row count's last layout had another length.
    pub fn get_for(&mut self, b: &B, rows: usize, seq: usize) -> &mut Activations<B> {
        let (c, training, recompute) = (&self.config, self.training, self.recompute);
        let acts = self.by_rows.entry(rows).or_insert_with(|| Activations::new(b, c, rows, seq, training, recompute));
        if acts.seq != seq {
            *acts = Activations::new(b, c, rows, seq, training, recompute);
        }
        acts
    }
}
