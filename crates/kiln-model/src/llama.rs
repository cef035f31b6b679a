//! The Llama family (`llama`, `mistral`, `qwen2`, `qwen3`) with explicit forward and backward.
//!
//! Per layer, with residual stream x:
//!   xn = RMSNorm(x);  q, k, v = xn·W{q,k,v}ᵀ (+b);  [Qwen3: q, k = RMSNorm per head]
//!   q, k = RoPE(q, k);  a = Attention(q, k, v);  x' = x + a·Woᵀ
//!   xn' = RMSNorm(x');  x'' = x' + (silu(xn'·Wgᵀ) ⊙ xn'·Wuᵀ)·Wdᵀ
//! then logits = RMSNorm(x)·Wₗₘᵀ (Wₗₘ = embedding when tied). Backward runs the same steps
//! in reverse; the residual gradient lives in one buffer that each branch adds into.

use crate::activations::{Activations, BatchInputs, GradScratch, LayerActs};
use crate::batch::Batch;
use crate::config::Config;
use crate::error::Result;
use crate::weights::{self, LayerWeights, StorageDtype, TensorSpec, Weights};
use kiln_core::{Attention, Backend, Heads, Matmul, Rope};
use std::path::Path;

pub struct Model<B: Backend> {
    pub config: Config,
    pub layout: Weights<TensorSpec>,
    pub params: Weights<B::Buf>,
    /// Dtype of the checkpoint it came from, used again when saving.
    pub dtype: StorageDtype,
    rope_table: B::Buf,
    rope_positions: usize,
}

/// `y = x·Wᵀ (+ bias)`.
#[allow(clippy::too_many_arguments)]
fn linear<B: Backend>(
    b: &B,
    y: &mut B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    bias: Option<&B::Buf>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    b.matmul(y, x, w, Matmul::linear(rows, d_in, d_out));
    if let Some(bias) = bias {
        b.add_bias(y, bias);
    }
}

/// Backward of `linear`: `dW += dyᵀ·x`, `dbias += Σ dy`, and `dx (+)= dy·W` when asked.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: Backend>(
    b: &B,
    dx: Option<(&mut B::Buf, bool)>,
    dw: &mut B::Buf,
    dbias: Option<&mut B::Buf>,
    dy: &B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    (rows, d_in, d_out): (usize, usize, usize),
) {
    b.matmul(dw, dy, x, Matmul::linear_dw(rows, d_in, d_out));
    if let Some(db) = dbias {
        b.bias_backward(db, dy);
    }
    if let Some((dx, accumulate)) = dx {
        b.matmul(dx, dy, w, Matmul::linear_dx(rows, d_in, d_out, accumulate));
    }
}

impl<B: Backend> Model<B> {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(b: &B, dir: &Path) -> Result<Self> {
        let config = Config::load(dir)?;
        let layout = weights::layout(&config);
        let loaded = weights::load(dir, &layout)?;
        Ok(Self::from_tensors(b, config, &loaded.tensors, loaded.dtype))
    }

    /// A randomly initialised model (matrices ~ N(0, 0.02²), norms 1, biases 0), as
    /// transformers' `_init_weights` does for the Llama family.
    pub fn random(b: &B, config: Config, seed: u64) -> Self {
        let mut rng = kiln_core::rng::Rng::new(seed);
        let tensors = weights::layout(&config).map(|spec| {
            if spec.name.ends_with("norm.weight") || spec.name.ends_with("layernorm.weight") {
                vec![1.0; spec.numel()]
            } else if spec.name.ends_with(".bias") {
                vec![0.0; spec.numel()]
            } else {
                rng.normal_vec(spec.numel(), 0.02)
            }
        });
        Self::from_tensors(b, config, &tensors, StorageDtype::F32)
    }

    pub fn from_tensors(b: &B, config: Config, tensors: &Weights<Vec<f32>>, dtype: StorageDtype) -> Self {
        let layout = weights::layout(&config);
        let params = tensors.map(|t| b.upload(t));
        let rope_positions = 0;
        Self { config, layout, params, dtype, rope_table: b.zeros(0), rope_positions }
    }

    /// Writes `model.safetensors` with the same tensor names it was loaded with.
    pub fn save_weights(&self, b: &B, dir: &Path) -> Result<()> {
        weights::save(&dir.join("model.safetensors"), &self.layout, &self.params.map(|p| b.read(p)), self.dtype)
    }

    /// Zeroed buffers shaped like the parameters, for gradients or optimiser moments.
    pub fn zeros_like_params(&self, b: &B) -> Weights<B::Buf> {
        self.layout.map(|s| b.zeros(s.numel()))
    }

    /// Loads a batch's tokens into `acts` and makes sure the rope table covers its positions.
    fn prepare(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) {
        assert!(batch.rows == acts.rows && batch.seq == acts.seq, "batch shape differs from the activations' layout");
        let needed = batch.positions.iter().copied().max().unwrap_or(0) as usize + 1;
        if needed > self.rope_positions {
            let positions = needed.next_power_of_two().max(256);
            let c = &self.config;
            self.rope_table = b.upload(&c.rope.table(c.rope_theta, c.rot_dim, positions));
            self.rope_positions = positions;
        }
        let inputs = &mut acts.inputs;
        b.write_index(&mut inputs.ids, &batch.ids);
        b.write_index(&mut inputs.positions, &batch.positions);
        b.write_index(&mut inputs.segments, &batch.segments);
        b.write_index(&mut inputs.targets, &batch.targets);
        b.write(&mut inputs.weights, &batch.weights);
    }

    fn attention_spec(&self, rows: usize, seq: usize, layer: usize) -> Attention {
        let c = &self.config;
        Attention {
            batch: rows,
            seq,
            q_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            v_head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: c.layer_windows[layer],
        }
    }

    fn rope_spec(&self, tokens: usize, heads: usize) -> Rope {
        let c = &self.config;
        Rope { x: Heads { tokens, heads, head_dim: c.head_dim }, rot_dim: c.rot_dim, interleaved: false }
    }

    /// Forward of layer `l` from `x_in` into `a` and, unless only recomputing what backward
    /// needs, into `x_out`.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        b: &B,
        l: usize,
        a: &mut LayerActs<B>,
        x_in: &B::Buf,
        x_out: Option<&mut B::Buf>,
        acts: &ActsView<B>,
    ) {
        let c = &self.config;
        let w = &self.params.layers[l];
        let n = acts.tokens;
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let eps = c.rms_norm_eps;

        b.rmsnorm_forward(&mut a.xn1, &mut a.rstd1, x_in, &w.input_norm, eps);
        match (&mut a.q_raw, &mut a.k_raw) {
            (Some((q_raw, q_rstd)), Some((k_raw, k_rstd))) => {
                linear(b, q_raw, &a.xn1, &w.q, w.q_bias.as_ref(), n, d, qd);
                linear(b, k_raw, &a.xn1, &w.k, w.k_bias.as_ref(), n, d, kvd);
                b.rmsnorm_forward(&mut a.q, q_rstd, q_raw, w.q_norm.as_ref().expect("qk_norm weights"), eps);
                b.rmsnorm_forward(&mut a.k, k_rstd, k_raw, w.k_norm.as_ref().expect("qk_norm weights"), eps);
            }
            _ => {
                linear(b, &mut a.q, &a.xn1, &w.q, w.q_bias.as_ref(), n, d, qd);
                linear(b, &mut a.k, &a.xn1, &w.k, w.k_bias.as_ref(), n, d, kvd);
            }
        }
        linear(b, &mut a.v, &a.xn1, &w.v, w.v_bias.as_ref(), n, d, kvd);
        b.rope_forward(&mut a.q, acts.rope_table, acts.positions, self.rope_spec(n, c.num_heads));
        b.rope_forward(&mut a.k, acts.rope_table, acts.positions, self.rope_spec(n, c.num_kv_heads));
        b.attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, acts.segments, acts.attention[l]);
        // x_mid = att·Woᵀ, then x_mid += x_in fused with the second norm.
        linear(b, &mut a.x_mid, &a.att, &w.o, w.o_bias.as_ref(), n, qd, d);
        b.add_rmsnorm_forward(&mut a.x_mid, x_in, &mut a.xn2, &mut a.rstd2, &w.post_norm, eps);
        linear(b, &mut a.gate, &a.xn2, &w.gate, w.gate_bias.as_ref(), n, d, ff);
        linear(b, &mut a.up, &a.xn2, &w.up, w.up_bias.as_ref(), n, d, ff);
        b.swiglu_forward(&mut a.h, &a.gate, &a.up);
        if let Some(x_out) = x_out {
            linear(b, x_out, &a.h, &w.down, w.down_bias.as_ref(), n, ff, d);
            b.add_assign(x_out, &a.x_mid);
        }
    }

    /// Runs the model over `batch`, leaving logits in `acts.logits`.
    pub fn forward(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) {
        self.prepare(b, acts, batch);
        let c = &self.config;
        b.embedding_forward(&mut acts.layer_inputs[0], &self.params.embed, &acts.inputs.ids, c.hidden_size);
        let view = ActsView::new(self, acts.rows, acts.seq, &acts.inputs);
        for l in 0..c.num_layers {
            let (inputs, outputs) = acts.layer_inputs.split_at_mut(l + 1);
            let slot = if acts.layers.len() == 1 { 0 } else { l };
            self.layer_forward(b, l, &mut acts.layers[slot], &inputs[l], Some(&mut outputs[0]), &view);
        }
        b.rmsnorm_forward(
            &mut acts.xf,
            &mut acts.rstdf,
            &acts.layer_inputs[c.num_layers],
            &self.params.norm,
            c.rms_norm_eps,
        );
        let head = self.params.lm_head.as_ref().unwrap_or(&self.params.embed);
        b.matmul(&mut acts.logits, &acts.xf, head, Matmul::linear(acts.rows * acts.seq, c.hidden_size, c.vocab_size));
    }

    /// Per-token negative log-likelihood of `batch.targets` (0 where there is no target).
    pub fn nll(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) -> Vec<f32> {
        self.forward(b, acts, batch);
        b.cross_entropy_forward(&mut acts.nll, &acts.logits, &acts.inputs.targets, self.config.vocab_size);
        b.read(&acts.nll)
    }

    /// Forward and backward of `loss = Σ weight·nll` over `batch`; parameter gradients are
    /// added into `grads`. Returns the loss.
    pub fn forward_backward(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut Weights<B::Buf>,
    ) -> f64 {
        self.forward(b, acts, batch);
        let c = &self.config;
        let (n, d) = (acts.rows * acts.seq, c.hidden_size);
        let inputs = &acts.inputs;
        b.cross_entropy_backward(&mut acts.logits, &mut acts.nll, &inputs.targets, &inputs.weights, c.vocab_size);
        let loss = b.read(&acts.nll).iter().zip(&batch.weights).map(|(&l, &w)| l as f64 * w as f64).sum();

        let view = ActsView::new(self, acts.rows, acts.seq, inputs);
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        // Head: logits = xf·Wᵀ.
        let (head, dhead) = match (&self.params.lm_head, &mut grads.lm_head) {
            (Some(h), Some(dh)) => (h, dh),
            _ => (&self.params.embed, &mut grads.embed),
        };
        linear_backward(b, Some((&mut s.dxn, false)), dhead, None, &acts.logits, &acts.xf, head, (n, d, c.vocab_size));
        b.fill(&mut s.dres, 0.0);
        b.rmsnorm_backward(
            &mut s.dres,
            &mut grads.norm,
            &s.dxn,
            &acts.layer_inputs[c.num_layers],
            &self.params.norm,
            &acts.rstdf,
        );

        for l in (0..c.num_layers).rev() {
            let a = if acts.recompute {
                self.layer_forward(b, l, &mut acts.layers[0], &acts.layer_inputs[l], None, &view);
                &acts.layers[0]
            } else {
                &acts.layers[l]
            };
            self.layer_backward(b, l, a, &acts.layer_inputs[l], s, &mut grads.layers[l], &view);
        }
        b.embedding_backward(&mut grads.embed, &s.dres, &inputs.ids, d);
        loss
    }

    /// Backward of layer `l`: reads `s.dres` = dL/d(layer output), leaves dL/d(layer input)
    /// there, and adds the layer's parameter gradients into `g`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        b: &B,
        l: usize,
        a: &LayerActs<B>,
        x_in: &B::Buf,
        s: &mut GradScratch<B>,
        g: &mut LayerWeights<B::Buf>,
        acts: &ActsView<B>,
    ) {
        let c = &self.config;
        let w = &self.params.layers[l];
        let n = acts.tokens;
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);

        // MLP branch: out = x_mid + down(swiglu(gate(xn2), up(xn2))).
        linear_backward(
            b,
            Some((&mut s.dh, false)),
            &mut g.down,
            g.down_bias.as_mut(),
            &s.dres,
            &a.h,
            &w.down,
            (n, ff, d),
        );
        b.swiglu_backward(&mut s.dgate, &mut s.dup, &s.dh, &a.gate, &a.up);
        linear_backward(
            b,
            Some((&mut s.dxn, false)),
            &mut g.gate,
            g.gate_bias.as_mut(),
            &s.dgate,
            &a.xn2,
            &w.gate,
            (n, d, ff),
        );
        linear_backward(b, Some((&mut s.dxn, true)), &mut g.up, g.up_bias.as_mut(), &s.dup, &a.xn2, &w.up, (n, d, ff));
        b.rmsnorm_backward(&mut s.dres, &mut g.post_norm, &s.dxn, &a.x_mid, &w.post_norm, &a.rstd2);

        // Attention branch: x_mid = x_in + o(attention(rope(q), rope(k), v)).
        linear_backward(b, Some((&mut s.datt, false)), &mut g.o, g.o_bias.as_mut(), &s.dres, &a.att, &w.o, (n, qd, d));
        let spec = acts.attention[l];
        b.attention_backward(
            &mut s.dq,
            &mut s.dk,
            &mut s.dv,
            &s.datt,
            &a.q,
            &a.k,
            &a.v,
            &a.att,
            &a.lse,
            acts.segments,
            spec,
        );
        b.rope_backward(&mut s.dq, acts.rope_table, acts.positions, self.rope_spec(n, c.num_heads));
        b.rope_backward(&mut s.dk, acts.rope_table, acts.positions, self.rope_spec(n, c.num_kv_heads));
        let (dq, dk) = match (&a.q_raw, &a.k_raw, &mut s.dq_raw, &mut s.dk_raw) {
            (Some((q_raw, q_rstd)), Some((k_raw, k_rstd)), Some(dq_raw), Some(dk_raw)) => {
                let (dqn, dkn) = (g.q_norm.as_mut().expect("q_norm grad"), g.k_norm.as_mut().expect("k_norm grad"));
                b.fill(dq_raw, 0.0);
                b.fill(dk_raw, 0.0);
                b.rmsnorm_backward(dq_raw, dqn, &s.dq, q_raw, w.q_norm.as_ref().expect("q_norm"), q_rstd);
                b.rmsnorm_backward(dk_raw, dkn, &s.dk, k_raw, w.k_norm.as_ref().expect("k_norm"), k_rstd);
                (&*dq_raw, &*dk_raw)
            }
            _ => (&s.dq, &s.dk),
        };
        linear_backward(b, Some((&mut s.dxn, false)), &mut g.q, g.q_bias.as_mut(), dq, &a.xn1, &w.q, (n, d, qd));
        linear_backward(b, Some((&mut s.dxn, true)), &mut g.k, g.k_bias.as_mut(), dk, &a.xn1, &w.k, (n, d, kvd));
        linear_backward(b, Some((&mut s.dxn, true)), &mut g.v, g.v_bias.as_mut(), &s.dv, &a.xn1, &w.v, (n, d, kvd));
        b.rmsnorm_backward(&mut s.dres, &mut g.input_norm, &s.dxn, x_in, &w.input_norm, &a.rstd1);
    }
}

/// The per-batch inputs every layer reads, borrowed apart from the buffers layers write.
struct ActsView<'a, B: Backend> {
    tokens: usize,
    rope_table: &'a B::Buf,
    positions: &'a B::Index,
    segments: &'a B::Index,
    attention: Vec<Attention>,
}

impl<'a, B: Backend> ActsView<'a, B> {
    fn new(model: &'a Model<B>, rows: usize, seq: usize, inputs: &'a BatchInputs<B>) -> Self {
        Self {
            tokens: rows * seq,
            rope_table: &model.rope_table,
            positions: &inputs.positions,
            segments: &inputs.segments,
            attention: (0..model.config.num_layers).map(|l| model.attention_spec(rows, seq, l)).collect(),
        }
    }
}
