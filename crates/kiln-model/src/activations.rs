//! Activation and gradient scratch memory, laid out once for a batch shape.

use crate::config::Config;
use kiln_core::Backend;

/// What one layer's forward keeps for its backward.
pub struct LayerActs<B: Backend> {
    pub xn1: B::Buf,
    pub rstd1: B::Buf,
    /// q and k before their per-head RMSNorm (Qwen3), with that norm's 1/rms.
    pub q_raw: Option<(B::Buf, B::Buf)>,
    pub k_raw: Option<(B::Buf, B::Buf)>,
    /// q and k after RoPE.
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub att: B::Buf,
    pub lse: B::Buf,
    /// Residual stream after attention.
    pub x_mid: B::Buf,
    pub xn2: B::Buf,
    pub rstd2: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub h: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    fn new(b: &B, cfg: &Config, rows: usize, seq: usize) -> Self {
        let n = rows * seq;
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let norm_pair = |width: usize, heads: usize| cfg.qk_norm.then(|| (b.zeros(n * width), b.zeros(n * heads)));
        Self {
            xn1: b.zeros(n * d),
            rstd1: b.zeros(n),
            q_raw: norm_pair(qd, cfg.num_heads),
            k_raw: norm_pair(kvd, cfg.num_kv_heads),
            q: b.zeros(n * qd),
            k: b.zeros(n * kvd),
            v: b.zeros(n * kvd),
            att: b.zeros(n * qd),
            lse: b.zeros(n * cfg.num_heads),
            x_mid: b.zeros(n * d),
            xn2: b.zeros(n * d),
            rstd2: b.zeros(n),
            gate: b.zeros(n * ff),
            up: b.zeros(n * ff),
            h: b.zeros(n * ff),
        }
    }
}

/// Gradient scratch for backward, shared by all layers.
pub struct GradScratch<B: Backend> {
    /// Gradient of the residual stream, flowing down through the layers.
    pub dres: B::Buf,
    pub dxn: B::Buf,
    pub dh: B::Buf,
    pub dgate: B::Buf,
    pub dup: B::Buf,
    pub datt: B::Buf,
    pub dq: B::Buf,
    pub dk: B::Buf,
    pub dv: B::Buf,
    /// Gradients of q and k before their per-head norm (Qwen3).
    pub dq_raw: Option<B::Buf>,
    pub dk_raw: Option<B::Buf>,
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
    pub inputs: BatchInputs<B>,
    /// Residual stream entering each layer, and (last) leaving the final layer.
    pub layer_inputs: Vec<B::Buf>,
    /// Per layer, or a single set reused by every layer when recomputing in backward.
    pub layers: Vec<LayerActs<B>>,
    pub xf: B::Buf,
    pub rstdf: B::Buf,
    /// Logits; overwritten by their gradient in backward.
    pub logits: B::Buf,
    pub nll: B::Buf,
    pub grad: Option<GradScratch<B>>,
}

impl<B: Backend> Activations<B> {
    /// `training` adds the gradient scratch; `recompute` keeps only each layer's input and
    /// recomputes the rest of a layer's activations during backward.
    pub fn new(b: &B, cfg: &Config, rows: usize, seq: usize, training: bool, recompute: bool) -> Self {
        let n = rows * seq;
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let kept = if recompute || !training { 1 } else { cfg.num_layers };
        let grad = training.then(|| GradScratch {
            dres: b.zeros(n * d),
            dxn: b.zeros(n * d),
            dh: b.zeros(n * ff),
            dgate: b.zeros(n * ff),
            dup: b.zeros(n * ff),
            datt: b.zeros(n * qd),
            dq: b.zeros(n * qd),
            dk: b.zeros(n * kvd),
            dv: b.zeros(n * kvd),
            dq_raw: cfg.qk_norm.then(|| b.zeros(n * qd)),
            dk_raw: cfg.qk_norm.then(|| b.zeros(n * kvd)),
        });
        Self {
            rows,
            seq,
            recompute: recompute && training,
            inputs: BatchInputs {
                ids: b.upload_index(&vec![0; n]),
                positions: b.upload_index(&vec![0; n]),
                segments: b.upload_index(&vec![0; n]),
                targets: b.upload_index(&vec![0; n]),
                weights: b.zeros(n),
            },
            layer_inputs: (0..=cfg.num_layers).map(|_| b.zeros(n * d)).collect(),
            layers: (0..kept).map(|_| LayerActs::new(b, cfg, rows, seq)).collect(),
            xf: b.zeros(n * d),
            rstdf: b.zeros(n),
            logits: b.zeros(n * cfg.vocab_size),
            nll: b.zeros(n),
            grad,
        }
    }
}
