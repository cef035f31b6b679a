//! A decoder-only transformer with explicit forward and backward: the Llama family (`llama`,
//! `mistral`, `qwen2`, `qwen3`) and DeepSeek-V3 (multi-head latent attention, DeepSeekMoE).
//!
//! Per layer, with residual stream x:
//!   x' = x + Attention(RMSNorm(x))        (grouped-query, `layers::gqa`, or latent, `layers::mla`)
//!   x'' = x' + FeedForward(RMSNorm(x'))   (dense SwiGLU, `layers::mlp`, or MoE, `layers::moe`)
//! then logits = RMSNorm(x)·Wₗₘᵀ (Wₗₘ = embedding when tied). Backward runs the same steps
//! in reverse; the residual gradient lives in one buffer that each branch adds into.

use crate::activations::{
    Activations, ActivationsPool, AttnActs, AttnGrads, BatchInputs, FfnActs, GradScratch, LayerActs,
};
use crate::batch::Batch;
use crate::compress_plan::CompressPlan;
use crate::config::{AttentionKind, Config, ModelType};
use crate::error::Result;
use crate::flat::FlatLayout;
use crate::grad_sink::{FlatGrads, GradSink};
use crate::kv_cache::{CachePlan, KvCache};
use crate::layers::expert_parallel::ExpertParallel;
use crate::layers::moe::MoeShape;
use crate::layers::moe_aux_loss::SeqAux;
use crate::layers::{gqa, mla, mlp, moe, AttnCtx, CacheCtx};
use crate::model_pipeline::PipelineLoss;
use crate::model_share::{ModelShare, RankPart};
use crate::param_shards::ParamShards;
use crate::part_slots::{ChunkActs, TickBuffers};
use crate::pipeline::Pipeline;
use crate::pipeline_schedule::{ChunkOrder, Op};
use crate::safetensors_io::{self, RawTensor, StorageDtype};
use crate::sequence_parallel::SequenceBufs;
use crate::tensor_parallel::TensorParallel;
use crate::v4_cache::V4Step;
use crate::weights::{
    self, v4_layout, AttnWeights, FfnWeights, GqaWeights, Init, LayerWeights, MlaWeights, MlpWeights, MoeWeights,
    TensorSpec, Weights,
};
use kiln_core::{Attention, Backend, DecodeAttention, Matmul, Precision};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Chooses token weights from every token's nll (see `Model::forward_backward_with`).
pub(crate) type WeightsOf<'a> = &'a mut dyn FnMut(&[f32]) -> Vec<f32>;

pub struct Model<B: Backend> {
    pub config: Config,
    pub layout: Weights<TensorSpec>,
    /// Where each tensor lies in `params` (and in gradients and moments laid out alike).
    pub flat: Arc<FlatLayout>,
    /// Every parameter, in one buffer; under ZeRO-3 (`shards`) this rank's shards of them.
    pub params: B::Buf,
    /// ZeRO-3: how the ranks shard the parameters, and the gathered layer and outer tensors.
    pub(crate) shards: Option<ParamShards<B>>,
    /// Dtype of the checkpoint it came from, used again when saving.
    pub dtype: StorageDtype,
    /// Stored tensors kiln does not use (multi-token-prediction layers), written back as read.
    pub passthrough: Vec<RawTensor>,
    /// Tokens routed to each expert of each layer (empty for dense layers) by training
    /// forwards since the last router bias update.
    pub expert_load: Vec<Vec<u64>>,
    /// α of the sequence-wise balance loss (`layers::moe_aux_loss`); 0 turns it off.
    pub moe_aux_alpha: f32,
    /// That loss summed over the training backwards since it was last taken.
    pub moe_aux_loss: f64,
    pub(crate) moe_shape: Option<MoeShape>,
    /// Inputs of the matrix products of every layer and the LM head (`set_matmul_precision`).
    matmul_precision: Precision,
    /// Set when this rank holds only its share of the routed experts (`layout` and `params`
    /// then hold that share).
    pub(crate) expert_parallel: Option<ExpertParallel<B>>,
    /// Set when this rank holds only its block of the layers' heads and MLP width (`config`,
    /// `layout` and `params` are then the block's: `tensor_parallel`).
    pub(crate) tensor_parallel: Option<TensorParallel<B>>,
    /// Set when this rank holds one stage of the layers (`config`, `layout` and `params` are
    /// then the stage's: `pipeline`).
    pub(crate) pipeline: Option<Pipeline<B>>,
    /// Pipeline parallel: the activations of the chunks (rows) a stage holds at once, per part
    /// (one part without interleaving).
    pub(crate) chunk_acts: Option<ChunkActs<B>>,
    /// Pipeline parallel: the activations of the one chunk a forward-only pass holds (with
    /// interleaved stages, per part, those it holds at once).
    pub(crate) forward_chunk: Option<Activations<B>>,
    pub(crate) forward_parts: Option<ChunkActs<B>>,
    /// Under pipeline parallel, the activations of a pipelined decode step's chunks, by rows.
    pub(crate) decode_chunks: Option<ActivationsPool<B>>,
    /// Interleaved stages: the buffers generation's forward ticks hand over through.
    pub(crate) generation_ticks: TickBuffers<B>,
    rope_table: B::Buf,
    rope_positions: usize,
    /// DeepSeek-V4's rope of compressed layers (`rope_parameters["compress"]`), as `rope_table`.
    compress_rope_table: B::Buf,
    /// Ones, the weight of DeepSeek-V4's unweighted norms (empty for other models).
    pub(crate) hc_ones: B::Buf,
    /// DeepSeek-V4's frozen token-to-expert tables (`[vocab, top_k]`), of its hash layers.
    pub(crate) hash_tables: Vec<Option<Vec<i32>>>,
}

impl<B: Backend> Model<B> {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(b: &B, dir: &Path) -> Result<Self> {
        Self::load_with(b, dir, None)
    }

    /// `load`; under expert parallel, of the routed experts only this rank's share.
    pub fn load_with(b: &B, dir: &Path, ep: Option<ExpertParallel<B>>) -> Result<Self> {
        Self::load_share(b, dir, ModelShare::experts(ep), None)
    }

    /// DeepSeek-V4's frozen token-to-expert tables of its hash layers, from the tensors carried
    /// through (`passthrough`, read from `dir`; named as DeepSeek publishes them with
    /// `deepseek_names`).
    pub(crate) fn read_hash_tables(
        &mut self,
        dir: &Path,
        passthrough: &[RawTensor],
        deepseek_names: bool,
    ) -> Result<()> {
        for l in 0..self.hash_tables.len() {
            if self.hash_tables[l].is_none() {
                continue;
            }
            let name = crate::model_v4::hash_table_name(l);
            let name = if deepseek_names { v4_layout::deepseek_name(&name) } else { name };
            let stored = passthrough.iter().find(|t| t.name == name);
            let table = stored.and_then(crate::model_v4::hash_table).ok_or_else(|| {
                crate::Error::new(
                    dir,
                    format!("missing int64 tensor `{name}` (the hash layer's token-to-expert table)"),
                )
            })?;
            // Indexed by token id: the whole vocabulary, also under vocabulary parallel.
            let (vocab, k, experts) = (
                self.whole_config().vocab_size,
                self.moe_shape.as_ref().map_or(0, |s| s.routing.top_k),
                expert_total(&self.config),
            );
            if table.len() != vocab * k || table.iter().any(|&e| e < 0 || e as usize >= experts) {
                return Err(crate::Error::new(
                    dir,
                    format!("tensor `{name}`: expected [{vocab}, {k}] experts below {experts}"),
                ));
            }
            self.hash_tables[l] = Some(table);
        }
        Ok(())
    }

    /// A view of every parameter tensor (the model must hold them all: not ZeRO-3's shards).
    pub fn weights(&self, b: &B) -> Weights<&B::Slice> {
        assert!(!self.params_sharded(), "ZeRO-3 holds shards of the weights: `unshard` gathers them all");
        self.flat.views(b, &self.params)
    }

    /// The tensors outside the layers (embedding, final norm, head, score), as the last
    /// forward gathered them under ZeRO-3, in a `Weights` with no layers.
    pub(crate) fn outer_weights(&self, b: &B) -> Weights<&B::Slice> {
        match active(&self.shards) {
            Some(s) => s.outer_views(b),
            None => self.flat.outer_ranges().map(|r| b.slice(&self.params, r.clone())),
        }
    }

    /// Layer `l`'s tensors (under ZeRO-3 as last gathered).
    pub(crate) fn layer_weights(&self, b: &B, l: usize) -> LayerWeights<&B::Slice> {
        match active(&self.shards) {
            Some(s) => s.layer_views(b, l),
            None => self.flat.ranges.layers[l].map(&mut |r| b.slice(&self.params, r.clone())),
        }
    }

    /// Whether this rank holds shards of the parameters (ZeRO-3, not unsharded).
    pub fn params_sharded(&self) -> bool {
        active(&self.shards).is_some()
    }

    /// ZeRO-3: gathers every parameter into `params` (a collective, a layer at a time), for what
    /// needs them all at once on every rank (generation); `reshard` goes back. Does nothing for
    /// a model that holds every parameter.
    pub fn unshard(&mut self, b: &B) {
        let Some(s) = self.shards.as_mut().filter(|s| s.parked.is_none()) else { return };
        let mut whole = b.zeros(self.flat.total);
        s.gather_all(b, &self.flat, &self.params, &mut whole);
        s.parked = Some(std::mem::replace(&mut self.params, whole));
    }

    /// ZeRO-3: drops the whole parameters `unshard` gathered and keeps this rank's shards again
    /// (unchanged: nothing updates an unsharded model).
    pub fn reshard(&mut self) {
        if let Some(shard) = self.shards.as_mut().and_then(|s| s.parked.take()) {
            self.params = shard;
        }
    }

    /// ZeRO-3: whether each layer's gather starts the next layer's (`ParamShards::prefetch`).
    pub fn prefetch_gathers(&mut self, on: bool) {
        if let Some(s) = &mut self.shards {
            s.prefetch = on;
        }
    }

    /// Names the gathers of ZeRO-3 in errors ("weights at step 12").
    pub fn label_gathers(&mut self, what: &str) {
        if let Some(s) = &mut self.shards {
            s.what = what.to_string();
        }
    }

    /// Values this rank holds for the weights: all of them, or its shards with the buffers of
    /// the layers gathered (two with prefetch) and the outer tensors.
    pub fn weights_len(&self, b: &B) -> usize {
        match active(&self.shards) {
            Some(s) => s.held_len(b, &self.params),
            None => b.len(&self.params),
        }
    }

    /// Every parameter tensor, read into host memory.
    pub fn tensors(&self, b: &B) -> Weights<Vec<f32>> {
        self.weights(b).map(|w| b.read(w))
    }

    /// A randomly initialised model (matrices ~ N(0, 0.02²), norms 1, biases 0), as
    /// transformers' `_init_weights` does for the Llama family.
    pub fn random(b: &B, config: Config, seed: u64) -> Self {
        let mut rng = kiln_core::rng::Rng::new(seed);
        let tensors = weights::layout(&config).map(|spec| match spec.init {
            Init::Ones => vec![1.0; spec.numel()],
            Init::Zeros => vec![0.0; spec.numel()],
            Init::Normal => rng.normal_vec(spec.numel(), 0.02),
        });
        Self::from_tensors(b, config, &tensors, StorageDtype::F32)
    }

    pub fn from_tensors(b: &B, config: Config, tensors: &Weights<Vec<f32>>, dtype: StorageDtype) -> Self {
        let layout = weights::layout(&config);
        Self::from_layout(b, config, layout, tensors, dtype)
    }

    pub(crate) fn from_layout(
        b: &B,
        config: Config,
        layout: Weights<TensorSpec>,
        tensors: &Weights<Vec<f32>>,
        dtype: StorageDtype,
    ) -> Self {
        let flat = FlatLayout::new(&layout);
        let params = upload_flat(b, &flat, tensors);
        Self::from_params(b, config, layout, flat, params, dtype)
    }

    /// A model of the parameters `params` laid out as `flat` (or of ZeRO-3's shards of them,
    /// whose `ParamShards` the caller sets: `load_share`).
    pub(crate) fn from_params(
        b: &B,
        config: Config,
        layout: Weights<TensorSpec>,
        flat: FlatLayout,
        params: B::Buf,
        dtype: StorageDtype,
    ) -> Self {
        let expert_load = layout.layers.iter().map(|l| vec![0; expert_count(l)]).collect();
        let moe_shape = MoeShape::new(&config);
        let (mut passthrough, mut hash_tables, mut hc_ones) = (Vec::new(), vec![None; config.num_layers], b.zeros(0));
        if let AttentionKind::V4(v4) = &config.attention {
            let k = moe_shape.as_ref().map_or(0, |s| s.routing.top_k);
            for (l, _) in v4.hash_layers.iter().enumerate().filter(|h| *h.1) {
                hash_tables[l] = Some(vec![0; config.vocab_size * k]);
                passthrough.push(crate::model_v4::zero_hash_table(l, config.vocab_size, k));
            }
            hc_ones = b.upload(&vec![1.0; (v4.hc.streams * config.hidden_size).max(config.head_dim)]);
        }
        Self {
            config,
            layout,
            flat: Arc::new(flat),
            params,
            shards: None,
            dtype,
            passthrough,
            expert_load,
            moe_aux_alpha: 0.0,
            moe_aux_loss: 0.0,
            moe_shape,
            matmul_precision: Precision::F32,
            expert_parallel: None,
            tensor_parallel: None,
            pipeline: None,
            chunk_acts: None,
            forward_chunk: None,
            forward_parts: None,
            decode_chunks: None,
            generation_ticks: TickBuffers::default(),
            rope_table: b.zeros(0),
            rope_positions: 0,
            compress_rope_table: b.zeros(0),
            hc_ones,
            hash_tables,
        }
    }

    /// Runs the matrix products of every layer and of the LM head with inputs in `precision`
    /// (mixed precision's bf16, or f32), attention's too where the backend has bf16 attention
    /// kernels (CUDA's tensor cores). Routers, norms, attention's softmax, losses and the
    /// weights themselves stay f32.
    pub fn set_matmul_precision(&mut self, precision: Precision) {
        self.matmul_precision = precision;
        if let Some(shape) = &mut self.moe_shape {
            shape.precision = precision;
        }
    }

    pub fn matmul_precision(&self) -> Precision {
        self.matmul_precision
    }

    /// Whether completions may train prompt-shared (`CompletionRows`): the prompt once, its
    /// completions after it. Sliding windows measure distance in the row, not in positions;
    /// DeepSeek-V4's compressed caches and the sequence-wise balance loss are built per
    /// segment; so these models keep a row per completion.
    pub fn can_share_prompts(&self) -> bool {
        !self.is_v4() && self.moe_aux_alpha == 0.0 && self.config.layer_windows.iter().all(Option::is_none)
    }

    /// The expert group this rank shares the routed experts with, under expert parallel.
    pub fn expert_parallel(&self) -> Option<&ExpertParallel<B>> {
        self.expert_parallel.as_ref()
    }

    /// The group this rank splits the layers' tensors with, under tensor parallel.
    pub fn tensor_parallel(&self) -> Option<&TensorParallel<B>> {
        self.tensor_parallel.as_ref()
    }

    /// Under pipeline and tensor parallel, this rank's part of the whole model's tensors: which
    /// it holds and its blocks of them (`RankPart`).
    pub fn rank_part(&self) -> RankPart {
        RankPart::new(
            self.pipeline.as_ref(),
            self.tensor_parallel.as_ref(),
            &self.layout,
            self.whole_layout().iter().len(),
        )
    }

    /// The layout of the whole model (what checkpoints hold): `layout`, or under pipeline or
    /// tensor parallel the layout before the cut.
    pub fn whole_layout(&self) -> &Weights<TensorSpec> {
        match (&self.pipeline, &self.tensor_parallel) {
            (Some(pp), _) => pp.whole_layout.as_ref(),
            (None, Some(tp)) => &tp.whole_layout,
            (None, None) => &self.layout,
        }
    }

    /// The whole model's config (what checkpoints hold): `config`, or under pipeline or tensor
    /// parallel the config before the cut.
    pub fn whole_config(&self) -> &Config {
        match (&self.pipeline, &self.tensor_parallel) {
            (Some(pp), _) => pp.whole.as_ref(),
            (None, Some(tp)) => &tp.whole,
            (None, None) => &self.config,
        }
    }

    /// Writes `model.safetensors` with the same tensor names it was loaded with.
    pub fn save_weights(&self, b: &B, dir: &Path) -> Result<()> {
        self.save_weights_to(b, &dir.join("model.safetensors"), self.dtype)
    }

    /// Writes every tensor, and the carried-through ones, to `path` in `dtype`.
    pub fn save_weights_to(&self, b: &B, path: &Path, dtype: StorageDtype) -> Result<()> {
        assert!(
            self.tensor_parallel.is_none() && self.pipeline.is_none(),
            "a tensor- or pipeline-parallel rank holds part of the model: write its `visit_whole` tensors"
        );
        safetensors_io::save(path, &self.layout, &self.tensors(b), dtype, &self.passthrough)
    }

    /// DeepSeek-V3's auxiliary-loss-free load balancing, run after each optimiser step: every
    /// MoE layer's correction bias moves `b_i += γ·sign(mean load − load_i)`, by the tokens
    /// routed since the last call. Returns those loads (per layer, empty for dense layers) and
    /// starts counting anew.
    pub fn update_router_bias(&mut self, b: &B, gamma: f32) -> Vec<Vec<u64>> {
        let loads = std::mem::replace(
            &mut self.expert_load,
            self.layout.layers.iter().map(|l| vec![0; expert_count(l)]).collect(),
        );
        for (l, load) in loads.iter().enumerate() {
            let FfnWeights::Moe(MoeWeights { bias: Some(range), .. }) = &self.flat.ranges.layers[l].ffn else {
                continue;
            };
            // The bias values this rank holds, where they lie in the flat layout and in `params`.
            let (part, held) = match active(&self.shards) {
                Some(s) => s.local(range).expect("the bias inside one space"),
                None => (range.clone(), range.clone()),
            };
            if part.is_empty() {
                continue;
            }
            let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
            let view = b.slice_mut(&mut self.params, held);
            let mut bias = b.read(view);
            for (bias, &l) in bias.iter_mut().zip(&load[part.start - range.start..]) {
                let diff = mean - l as f64;
                *bias += gamma
                    * if diff > 0.0 {
                        1.0
                    } else if diff < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
            }
            b.write(view, &bias);
        }
        loads
    }

    /// Zeroed gradients of every parameter.
    pub fn grads(&self, b: &B) -> FlatGrads<B> {
        FlatGrads::new(b, &self.flat)
    }

    /// Loads a batch's tokens into `acts` and makes sure the rope table covers its positions.
    fn prepare(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) {
        assert!(batch.rows == acts.rows && batch.seq == acts.seq, "batch shape differs from the activations' layout");
        let needed = batch.positions.iter().copied().max().unwrap_or(0) as usize + 1;
        if needed > self.rope_positions {
            let positions = needed.next_power_of_two().max(256);
            let c = &self.config;
            self.rope_table = b.upload(&c.rope.table(c.rope_theta, c.rot_dim, positions));
            if let AttentionKind::V4(v4) = &c.attention {
                let table = v4.compress_rope.table(v4.compress_rope_theta, c.rot_dim, positions);
                self.compress_rope_table = b.upload(&table);
            }
            self.rope_positions = positions;
        }
        let inputs = &mut acts.inputs;
        b.write_index(&mut inputs.ids, &self.embedding_rows(&batch.ids));
        b.write_index(&mut inputs.positions, &batch.positions);
        b.write_index(&mut inputs.segments, &batch.segments);
        b.write_index(&mut inputs.targets, &batch.targets);
        b.write(&mut inputs.weights, &batch.weights);
        acts.routes = self.hash_routes(batch);
        acts.compress = self.compress_plans(b, batch);
    }

    fn attention_spec(&self, rows: usize, seq: usize, layer: usize) -> Attention {
        let c = &self.config;
        let v_head_dim = match &c.attention {
            AttentionKind::Gqa | AttentionKind::V4(_) => c.head_dim,
            AttentionKind::Mla(m) => m.v_head_dim,
        };
        Attention {
            batch: rows,
            seq,
            q_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            v_head_dim,
            scale: c.attention_scale,
            window: c.layer_windows[layer],
            precision: self.matmul_precision,
        }
    }

    /// Every layer's attention over a batch of `rows` × `seq`.
    fn attention_specs(&self, rows: usize, seq: usize) -> Vec<Attention> {
        (0..self.config.num_layers).map(|l| self.attention_spec(rows, seq, l)).collect()
    }

    /// Forward of layer `l` from `x_in` into `a` and, unless only recomputing what backward
    /// needs, into `x_out`. Under sequence parallel (`sp`) `x_in`, `x_out` and the norms are
    /// the rank's tokens, gathered before each split block and scattered after it.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        b: &B,
        (l, w): (usize, &LayerWeights<&B::Slice>),
        a: &mut LayerActs<B>,
        x_in: &B::Slice,
        x_out: Option<&mut B::Slice>,
        view: &ActsView<B>,
        kv: Option<(&mut B::Slice, &mut B::Slice)>,
        sp: Option<&mut SequenceBufs<B>>,
    ) {
        let c = &self.config;
        let ctx = view.ctx(l);
        let (n, d, eps) = (view.tokens, c.hidden_size, c.rms_norm_eps);

        let tp = self.tensor_parallel.as_ref();
        // Under tensor parallel a row-parallel bias is added once, by rank 0, before the sum.
        let bias_here = tp.is_none_or(|tp| tp.group.rank() == 0);
        let mut sp = sp.map(|sp| (tp.expect("sequence parallel under tensor parallel"), sp));

        b.rmsnorm_forward(&mut a.xn1, &mut a.rstd1, x_in, w.input_norm, eps);
        let (xn1, attn_out) = match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn1, &sp.counts, &mut sp.whole_in, &format!("layer {l}: attention input"));
                (&*sp.whole_in, &mut *sp.whole_out)
            }
            None => (&*a.xn1, &mut *a.x_mid),
        };
        match (&w.attn, &mut a.attn) {
            (AttnWeights::Gqa(w), AttnActs::Gqa(a_)) => {
                let w = GqaWeights { o_bias: w.o_bias.filter(|_| bias_here), ..w.clone() };
                gqa::forward(b, c, &w, xn1, attn_out, a_, &ctx, kv)
            }
            (AttnWeights::Mla(w), AttnActs::Mla(a_)) => {
                let w = MlaWeights { o_bias: w.o_bias.filter(|_| bias_here), ..w.clone() };
                mla::forward(b, c, &w, xn1, attn_out, a_, &ctx, kv)
            }
            _ => unreachable!("activations laid out for another attention kind"),
        }
        let what = format!("layer {l}: attention output");
        match (sp.as_mut(), tp) {
            (Some((tp, sp)), _) => tp.sum_scatter_tokens(&sp.whole_out, &sp.counts, &mut a.x_mid, &what),
            (None, Some(tp)) => tp.sum(&mut a.x_mid, &what),
            (None, None) => {}
        }
        // x_mid = x_in + attention, fused with the second norm.
        b.add_rmsnorm_forward(&mut a.x_mid, x_in, &mut a.xn2, &mut a.rstd2, w.post_norm, eps);
        let mut x_out = x_out;
        let (xn2, out) = match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn2, &sp.counts, &mut sp.whole_in, &format!("layer {l}: MLP input"));
                (&*sp.whole_in, x_out.is_some().then_some(&mut *sp.whole_out))
            }
            None => (&*a.xn2, x_out.as_deref_mut()),
        };
        match (&w.ffn, &mut a.ffn) {
            (FfnWeights::Dense(w), FfnActs::Dense(a_)) => {
                let w = MlpWeights { down_bias: w.down_bias.filter(|_| bias_here), ..w.clone() };
                mlp::forward(b, self.matmul_precision, &w, xn2, out, a_, (n, d, c.intermediate_size))
            }
            (FfnWeights::Moe(w), FfnActs::Moe(a_)) => {
                let ep = self.expert_parallel.as_ref().map(|ep| (ep, l));
                moe::forward(b, self.moe_shape.as_ref().expect("moe shape"), w, xn2, out, a_, ep)
            }
            _ => unreachable!("activations laid out for another feed-forward kind"),
        }
        if let Some(x_out) = x_out {
            let what = format!("layer {l}: MLP output");
            match (sp, tp) {
                (Some((tp, sp)), _) => tp.sum_scatter_tokens(&sp.whole_out, &sp.counts, x_out, &what),
                (None, Some(tp)) => tp.sum(x_out, &what),
                (None, None) => {}
            }
            b.add_assign(x_out, &a.x_mid);
        }
    }

    /// Runs the model over `batch`, leaving logits in `acts.logits`.
    pub fn forward(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) {
        self.forward_hidden(b, acts, batch, false);
        if self.holds_head() {
            self.lm_head_forward(b, acts);
        }
    }

    /// Runs the transformer over `batch`, leaving the final normalised hidden states in
    /// `acts.xf` (`[tokens, hidden]`); with `count_load`, adds the experts' loads into
    /// `expert_load`.
    pub fn forward_hidden(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch, count_load: bool) {
        let counted = count_load.then_some(acts.rows * acts.seq);
        self.forward_layers(b, acts, batch, counted, None, None);
    }

    /// Runs the model over `batch` for generation and returns the logits (`[k, vocab]`) of
    /// the `k` tokens `plan.logits_at`: every token's keys and values go into `cache` at the
    /// rows `plan` gives, and when decoding each token attends its sequence's cached rows
    /// (see `CachePlan`). Only those rows go through the LM head.
    pub fn forward_cached(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        cache: &mut KvCache<B>,
        plan: &CachePlan,
    ) -> Vec<f32> {
        if self.generates_in_chunks(batch) {
            return self.pipelined_generation(b, batch, cache, plan);
        }
        self.forward_layers(b, acts, batch, None, Some((cache, plan)), None);
        let k = plan.logits_at.len();
        if let Some(pp) = self.pipeline.as_ref().filter(|pp| !pp.is_last()) {
            return pp.from_last(b, &[], k * self.whole_config().vocab_size, "pipeline: logits");
        }
        let logits = self.logits_at(b, acts, plan.logits_at);
        match &self.pipeline {
            Some(pp) => pp.from_last(b, &logits, logits.len(), "pipeline: logits"),
            None => logits,
        }
    }

    /// The whole logits rows (`[k, vocab]`) of the `k` tokens `at` of the last forward: only
    /// those rows go through the LM head.
    pub(crate) fn logits_at(&self, b: &B, acts: &Activations<B>, at: &[i32]) -> Vec<f32> {
        let c = &self.config;
        let k = at.len();
        let mut last = b.zeros(k * c.hidden_size);
        b.embedding_forward(&mut last, &acts.xf, &b.upload_index(at), c.hidden_size);
        let w = self.outer_weights(b);
        let mut logits = b.zeros(k * c.vocab_size);
        b.matmul(
            &mut logits,
            &last,
            w.lm_head.unwrap_or(w.embed),
            Matmul::linear(k, c.hidden_size, c.vocab_size).in_precision(self.matmul_precision).of_weight(),
        );
        self.whole_logits(b, b.read(&logits), k)
    }

    /// The transformer's forward (`forward_hidden`), adding the experts' loads of the first
    /// `counted` tokens into `expert_load`. Under pipeline parallel, with `part` `None` a stage
    /// runs each of its parts (virtual stages; one without interleaving) in turn, receiving a
    /// part's input from the virtual stage before and sending its output to the one after;
    /// with `Some(v)` a schedule does (`model_pipeline`): only part `v` runs, its input left in
    /// `acts.layer_inputs[0]` and its output taken from the last of them (`acts` then laid out
    /// for that part's layers: `Activations::first_layer`).
    pub(crate) fn forward_layers(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        counted: Option<usize>,
        cache: Option<(&mut KvCache<B>, &CachePlan)>,
        part: Option<usize>,
    ) {
        self.prepare(b, acts, batch);
        gather_outer(&mut self.shards, b, (&self.flat, &self.params));
        let c = &self.config;
        let mut cache = cache;
        let v4_step = match (&cache, &c.attention) {
            (Some((kv, plan)), AttentionKind::V4(v4)) => {
                Some(V4Step::new(b, kv.v4.as_ref().expect("a V4 cache"), v4, plan, batch.seq))
            }
            _ => None,
        };
        let indices = cache.as_ref().filter(|_| v4_step.is_none()).map(|(_, plan)| {
            let decode = plan.decode.map(|(starts, lengths)| (b.upload_index(starts), b.upload_index(lengths)));
            (b.upload_index(plan.rows), decode)
        });
        let mut loads = Vec::new();
        let at = acts.first_layer;
        for v in self.parts(part) {
            let run = self.part_layers(v);
            if let Some(pp) = self.pipeline.as_ref().filter(|pp| !pp.part_embeds(v)) {
                if part.is_none() {
                    let input = &mut acts.layer_inputs[run.start - at];
                    pp.recv_part_input(b, v, input, "pipeline: hidden states forward");
                }
            } else {
                self.embedding_forward(b, acts);
            }
            let mut view = ActsView::new(
                &self.config,
                (&self.rope_table, &self.compress_rope_table),
                self.attention_specs(acts.rows, acts.seq),
                self.matmul_precision,
                &acts.inputs,
                &acts.compress,
            );
            if let (Some((kv, plan)), Some((rows, decode))) = (&cache, &indices) {
                let spec = kv.decode_spec(plan.rows.len(), c.num_heads, c.attention_scale, None);
                let decode = decode.as_ref().map(|(s, l)| (s, l, spec));
                view.cache = Some(CacheCtx { rows, latent: kv.latent, storage: kv.storage, decode });
            }
            for l in run.clone() {
                let next = (l + 1 < run.end).then_some(l + 1);
                gather_layer(&mut self.shards, b, (&self.flat, &self.params), l, next);
                let w = self.layer_weights(b, l);
                let (inputs, outputs) = acts.layer_inputs.split_at_mut(l - at + 1);
                let a = &mut acts.layers[acts.slots[l - at]];
                if let AttentionKind::V4(v4) = &c.attention {
                    let routes = acts.routes.iter().find(|r| r.0 == l).map(|r| r.1.as_slice());
                    let layer = (l, &w);
                    let step = v4_step.as_ref().map(|step| step.layer(&v4.layers[l]));
                    let layer_cache = match (cache.as_mut(), &step) {
                        (Some((kv, _)), Some(step)) => Some((&mut kv.v4.as_mut().expect("a V4 cache").layers[l], step)),
                        _ => None,
                    };
                    self.v4_layer_forward(
                        b,
                        layer,
                        a,
                        &inputs[l - at],
                        Some(&mut outputs[0]),
                        &view.ctx(l),
                        routes,
                        layer_cache,
                        acts.sequence.as_mut(),
                    );
                } else {
                    let kv = cache.as_mut().map(|(kv, _)| {
                        let (k, v) = (&mut kv.k[l], &mut kv.v[l]);
                        (&mut **k, &mut **v)
                    });
                    let sp = acts.sequence.as_mut();
                    self.layer_forward(b, (l, &w), a, &inputs[l - at], Some(&mut outputs[0]), &view, kv, sp);
                }
                if let (Some(tokens), FfnActs::Moe(m)) = (counted, &a.ffn) {
                    loads.push((l, m.load_of(b, tokens)));
                }
            }
            if let Some(pp) = self.pipeline.as_ref().filter(|pp| !pp.part_heads(v)) {
                if part.is_none() {
                    pp.send_part_output(b, v, &acts.layer_inputs[run.end - at], "pipeline: hidden states forward");
                }
            } else if self.is_v4() {
                self.v4_head_forward(b, acts);
            } else {
                let last = &acts.layer_inputs[run.end - at];
                self.final_norm_forward(b, last, (&mut acts.xf, &mut acts.rstdf), acts.sequence.as_mut());
            }
        }
        for (l, rows) in loads {
            self.expert_load[l].iter_mut().zip(rows).for_each(|(total, r)| *total += r as u64);
        }
    }

    /// The parts (virtual stages) a forward or backward runs: `part`, or with `None` every one
    /// this rank holds (one without interleaving or pipeline parallel).
    fn parts(&self, part: Option<usize>) -> Range<usize> {
        match part {
            Some(v) => v..v + 1,
            None => 0..self.pipeline.as_ref().map_or(1, Pipeline::parts),
        }
    }

    /// The local layers of part `v` (every layer without pipeline parallel).
    pub(crate) fn part_layers(&self, v: usize) -> Range<usize> {
        self.pipeline.as_ref().map_or(0..self.config.num_layers, |pp| pp.part_layers(v))
    }

    /// `acts.layer_inputs[0]` = the embeddings of `acts`' tokens (under sequence parallel the
    /// rank's; DeepSeek-V4: in every stream).
    fn embedding_forward(&self, b: &B, acts: &mut Activations<B>) {
        let c = &self.config;
        let embed = self.outer_weights(b).embed;
        if self.is_v4() {
            match (acts.sequence.as_mut(), &self.tensor_parallel) {
                (Some(sp), Some(tp)) => {
                    b.embedding_forward(&mut sp.whole_out, embed, &acts.inputs.ids, c.hidden_size);
                    tp.sum_scatter_tokens(&sp.whole_out, &sp.counts, &mut sp.local, "embedding");
                    self.embed_streams(b, &mut acts.layer_inputs[0], &sp.local, sp.tokens.len());
                }
                _ => {
                    b.embedding_forward(&mut acts.xf, embed, &acts.inputs.ids, c.hidden_size);
                    self.sum_over_vocab(&mut acts.xf, "embedding");
                    self.embed_streams(b, &mut acts.layer_inputs[0], &acts.xf, acts.rows * acts.seq);
                }
            }
        } else if let (Some(sp), Some(tp)) = (acts.sequence.as_mut(), &self.tensor_parallel) {
            b.embedding_forward(&mut sp.whole_out, embed, &acts.inputs.ids, c.hidden_size);
            tp.sum_scatter_tokens(&sp.whole_out, &sp.counts, &mut acts.layer_inputs[0], "embedding");
        } else {
            b.embedding_forward(&mut acts.layer_inputs[0], embed, &acts.inputs.ids, c.hidden_size);
            self.sum_over_vocab(&mut acts.layer_inputs[0], "embedding");
        }
    }

    /// `xf` = the final norm of `x`; under sequence parallel (`sp`) `x` is the rank's tokens,
    /// normed into `sp.local` and gathered.
    pub(crate) fn final_norm_forward(
        &self,
        b: &B,
        x: &B::Slice,
        (xf, rstdf): (&mut B::Slice, &mut B::Slice),
        sp: Option<&mut SequenceBufs<B>>,
    ) {
        let (norm, eps) = (self.outer_weights(b).norm, self.config.rms_norm_eps);
        match (sp, &self.tensor_parallel) {
            (Some(sp), Some(tp)) => {
                b.rmsnorm_forward(&mut sp.local, rstdf, x, norm, eps);
                tp.gather_tokens(&sp.local, &sp.counts, xf, "final norm output");
            }
            _ => b.rmsnorm_forward(xf, rstdf, x, norm, eps),
        }
    }

    /// `logits = xf·Wₗₘᵀ`.
    pub(crate) fn lm_head_forward(&self, b: &B, acts: &mut Activations<B>) {
        let c = &self.config;
        let w = self.outer_weights(b);
        let head = w.lm_head.unwrap_or(w.embed);
        b.matmul(
            &mut acts.logits,
            &acts.xf,
            head,
            Matmul::linear(acts.rows * acts.seq, c.hidden_size, c.vocab_size)
                .in_precision(self.matmul_precision)
                .of_weight(),
        );
    }

    /// Per-token negative log-likelihood of `batch.targets` (0 where there is no target).
    pub fn nll(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch) -> Vec<f32> {
        if self.pipeline.is_some() {
            return self.pipelined_nll(b, acts, batch);
        }
        self.forward(b, acts, batch);
        self.cross_entropy_forward(b, acts);
        b.read(&acts.nll)
    }

    /// Tokens of the last forward (`nll` or a training forward over next-token targets) whose
    /// target has the largest logit, summed on the backend (each entry is 0 or 1, so the sum
    /// of squares is the count).
    pub fn correct_tokens(&self, b: &B, acts: &Activations<B>) -> usize {
        let correct = if self.holds_head() { b.sum_squares(&acts.correct) } else { 0.0 };
        self.last_stage_scalar(correct, "pipeline: correct tokens").round() as usize
    }

    /// Forward and backward of `loss = Σ weight·nll` over `batch` (plus, for MoE models with
    /// `moe_aux_alpha`, the balance loss, added into `moe_aux_loss`); parameter gradients are
    /// added into `grads` and the experts' loads into `expert_load`. Returns `Σ weight·nll`.
    pub fn forward_backward(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
    ) -> f64 {
        self.lm_forward_backward(b, acts, batch, grads, None).0
    }

    /// `forward_backward` with token weights chosen after the forward pass: `weights_of`
    /// receives every token's nll and returns the weights (for losses of whole-sequence
    /// log-probs, where ∂loss/∂nll_t depends on the sequence: DPO and its variants). Returns
    /// `Σ weight·nll` and the nll.
    pub fn forward_backward_with(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
        weights_of: &mut dyn FnMut(&[f32]) -> Vec<f32>,
    ) -> (f64, Vec<f32>) {
        let (loss, nll) = self.lm_forward_backward(b, acts, batch, grads, Some(weights_of));
        (loss, nll.expect("nll read for the weights"))
    }

    fn lm_forward_backward(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
        weights_of: Option<WeightsOf>,
    ) -> (f64, Option<Vec<f32>>) {
        if self.pipeline.is_some() {
            return self.pipelined(b, acts, batch, grads, (PipelineLoss::Nll(weights_of), None));
        }
        self.forward_hidden(b, acts, batch, true);
        self.lm_head_forward(b, acts);
        let n = acts.rows * acts.seq;
        let (weights, nll) = match weights_of {
            None => (batch.weights.clone(), None),
            Some(f) => {
                self.cross_entropy_forward(b, acts);
                let nll = b.read(&acts.nll);
                let w = f(&nll);
                assert_eq!(w.len(), n, "one weight per token");
                b.write(&mut acts.inputs.weights, &w);
                (w, Some(nll))
            }
        };
        self.cross_entropy_backward(b, acts);
        let loss = b.read(&acts.nll).iter().zip(&weights).map(|(&l, &w)| l as f64 * w as f64).sum();
        self.backward_from_logits(b, acts, batch, grads, None);
        (loss, nll)
    }

    /// Forward and backward of on-policy distillation's `loss = Σ_t weight[t] · KL(p_t ‖ q_t)`
    /// over `batch`, the student p being this model and the teacher's logits `teacher`
    /// (`[tokens, vocab]`, from its forward over the same batch). Parameter gradients are added
    /// into `grads`; returns the loss.
    pub fn forward_backward_kl(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
        teacher: &B::Slice,
    ) -> f64 {
        if self.pipeline.is_some() {
            return self.pipelined(b, acts, batch, grads, (PipelineLoss::Kl, Some(teacher))).0;
        }
        self.forward_hidden(b, acts, batch, true);
        self.lm_head_forward(b, acts);
        self.reverse_kl_backward(b, acts, teacher);
        let loss = b.read(&acts.nll).iter().zip(&batch.weights).map(|(&kl, &w)| kl as f64 * w as f64).sum();
        self.backward_from_logits(b, acts, batch, grads, None);
        loss
    }

    /// Backward of the LM head and the transformer from `acts.logits` = ∂L/∂logits (`part` as
    /// in `backward_stage`).
    pub(crate) fn backward_from_logits(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
        part: Option<usize>,
    ) {
        let c = &self.config;
        let (n, d, vocab) = (acts.rows * acts.seq, c.hidden_size, c.vocab_size);
        // Head: logits = xf·Wᵀ.
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        let w = self.outer_weights(b);
        let outer = grads.outer(b);
        let (head, dhead) = match (w.lm_head, outer.lm_head) {
            (Some(h), Some(dh)) => (h, dh),
            _ => (w.embed, outer.embed),
        };
        b.matmul(dhead, &acts.logits, &acts.xf, Matmul::linear_dw(n, d, vocab).in_precision(self.matmul_precision));
        b.matmul(
            &mut s.dxn,
            &acts.logits,
            head,
            Matmul::linear_dx(n, d, vocab, false).in_precision(self.matmul_precision),
        );
        self.sum_over_vocab(&mut s.dxn, "LM head input gradient");
        self.backward_stage(b, acts, batch, grads, part);
    }

    /// Backward of `forward_hidden` from `acts.grad.dxn` = dL/dxf; parameter gradients are
    /// added into `grads`.
    pub fn backward_hidden(&mut self, b: &B, acts: &mut Activations<B>, batch: &Batch, grads: &mut dyn GradSink<B>) {
        self.backward_stage(b, acts, batch, grads, None);
    }

    /// `backward_hidden`. Under pipeline parallel, with `part` `None` a stage runs the
    /// backward of each of its parts, last to first, receiving dL/d(a part's output) from the
    /// virtual stage after it and sending dL/d(its input) to the one before, and ends the
    /// backward (`GradSink::outer_done`); with `Some(v)` a schedule does (`model_pipeline`):
    /// only part `v` runs, from the output gradient in `grad.dres`, leaving the input gradient
    /// there.
    pub(crate) fn backward_stage(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        grads: &mut dyn GradSink<B>,
        part: Option<usize>,
    ) {
        // Sequence of each token for the balance loss, when it is on: (row, segment), none for
        // padding.
        let sequence: Option<Vec<i64>> = (self.moe_aux_alpha != 0.0).then(|| {
            let seq = acts.seq;
            batch
                .segments
                .iter()
                .enumerate()
                .map(|(t, &seg)| if seg >= 0 { ((t / seq) * seq) as i64 + seg as i64 } else { -1 })
                .collect()
        });
        let aux =
            sequence.as_ref().map(|sequence| SeqAux { alpha: self.moe_aux_alpha, sequence, weights: &batch.weights });
        let mut aux_loss = 0.0;
        if part.is_none() {
            grads.chunks_next(1);
        }
        for v in self.parts(part).rev() {
            let run = self.part_layers(v);
            let output_grad = self.pipeline.as_ref().filter(|pp| !pp.part_heads(v));
            if let Some(pp) = output_grad {
                if part.is_none() {
                    let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
                    pp.recv_part_output_grad(b, v, &mut s.dres, "pipeline: hidden-state gradients backward");
                }
            } else {
                self.head_norm_backward(b, acts, grads);
            }
            aux_loss += self.layers_backward(b, acts, grads, run, aux.as_ref());
            if let Some(pp) = self.pipeline.as_ref().filter(|pp| !pp.part_embeds(v)) {
                if part.is_none() {
                    let s = acts.grad.as_ref().expect("activations were laid out for inference, not training");
                    pp.send_part_input_grad(b, v, &s.dres, "pipeline: hidden-state gradients backward");
                }
            } else {
                self.embedding_backward(b, acts, grads);
            }
        }
        if part.is_none() {
            grads.outer_done(b);
        }
        self.moe_aux_loss += aux_loss;
    }

    /// dL/d(the last layer's output), into `grad.dres`, from dL/dxf in `grad.dxn`: the final
    /// norm's backward (DeepSeek-V4: and the head's hyper-connection's), its weight gradients
    /// added into `grads`.
    fn head_norm_backward(&self, b: &B, acts: &mut Activations<B>, grads: &mut dyn GradSink<B>) {
        if self.is_v4() {
            self.v4_head_backward(b, acts, grads);
            return grads.head_done(b);
        }
        let d = self.config.hidden_size;
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        b.fill(&mut s.dres, 0.0);
        let final_input = acts.layer_inputs.last().expect("the last layer's output");
        let norm = self.outer_weights(b).norm;
        match (acts.sequence.as_mut(), &self.tensor_parallel) {
            (Some(sp), Some(tp)) => {
                // dL/dxf is whole on every rank (summed over the vocabulary, or a whole
                // head's): the rank's rows of it, and the norm's gradient summed over the group.
                let dxf = sp.rows_of(b, &s.dxn, d);
                let dnorm = b.slice_mut(&mut sp.douter, 0..d);
                b.fill(dnorm, 0.0);
                b.rmsnorm_backward(&mut s.dres, dnorm, dxf, final_input, norm, &acts.rstdf);
                tp.sum(dnorm, "final norm weight gradient");
                b.add_assign(grads.outer(b).norm, dnorm);
            }
            _ => b.rmsnorm_backward(&mut s.dres, grads.outer(b).norm, &s.dxn, final_input, norm, &acts.rstdf),
        }
        grads.head_done(b);
    }

    /// The backward of the local layers `run`, last to first, from dL/d(their output) in
    /// `grad.dres` to dL/d(their input) there, their gradients added into `grads`. Returns
    /// their balance losses.
    fn layers_backward(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        grads: &mut dyn GradSink<B>,
        run: Range<usize>,
        aux: Option<&SeqAux>,
    ) -> f64 {
        let view = ActsView::new(
            &self.config,
            (&self.rope_table, &self.compress_rope_table),
            self.attention_specs(acts.rows, acts.seq),
            self.matmul_precision,
            &acts.inputs,
            &acts.compress,
        );
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        let at = acts.first_layer;
        let mut aux_loss = 0.0;
        for l in run.clone().rev() {
            let prev = (l > run.start).then(|| l - 1);
            gather_layer(&mut self.shards, b, (&self.flat, &self.params), l, prev);
            let w = self.layer_weights(b, l);
            let a = &mut acts.layers[acts.slots[l - at]];
            let layer = (l, &w);
            let x_in = &acts.layer_inputs[l - at];
            let mut g = grads.layer(b, l);
            if self.is_v4() {
                let ctx = view.ctx(l);
                if acts.recompute {
                    let routes = acts.routes.iter().find(|r| r.0 == l).map(|r| r.1.as_slice());
                    self.v4_layer_forward(b, layer, a, x_in, None, &ctx, routes, None, acts.sequence.as_mut());
                }
                let sp = acts.sequence.as_mut();
                aux_loss += self.v4_layer_backward(b, layer, a, x_in, s, &mut g, &ctx, aux, sp);
            } else {
                if acts.recompute {
                    self.layer_forward(b, layer, a, x_in, None, &view, None, acts.sequence.as_mut());
                }
                let sp = acts.sequence.as_mut();
                aux_loss += self.layer_backward(b, layer, a, x_in, s, &mut g, &view, aux, sp);
            }
            grads.layer_done(b, l);
        }
        aux_loss
    }

    /// The embedding's backward from dL/d(the first layer's input) in `grad.dres` (under
    /// sequence parallel the rank's tokens'; DeepSeek-V4: every stream's).
    fn embedding_backward(&self, b: &B, acts: &mut Activations<B>, grads: &mut dyn GradSink<B>) {
        let d = self.config.hidden_size;
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        if self.is_v4() {
            match (acts.sequence.as_mut(), &self.tensor_parallel) {
                (Some(sp), Some(tp)) => {
                    self.sum_streams(b, &mut sp.local, &s.dres, sp.tokens.len());
                    tp.gather_tokens(&sp.local, &sp.counts, &mut sp.whole_out, "embedding output gradient");
                    b.embedding_backward(grads.outer(b).embed, &sp.whole_out, &acts.inputs.ids, d);
                }
                _ => {
                    self.sum_streams(b, &mut s.dxn, &s.dres, acts.rows * acts.seq);
                    b.embedding_backward(grads.outer(b).embed, &s.dxn, &acts.inputs.ids, d);
                }
            }
        } else if let (Some(sp), Some(tp)) = (acts.sequence.as_mut(), &self.tensor_parallel) {
            tp.gather_tokens(&s.dres, &sp.counts, &mut sp.whole_out, "embedding output gradient");
            b.embedding_backward(grads.outer(b).embed, &sp.whole_out, &acts.inputs.ids, d);
        } else {
            b.embedding_backward(grads.outer(b).embed, &s.dres, &acts.inputs.ids, d);
        }
    }

    /// A forward pass of a rank with nothing left to run while the others of the step run one,
    /// for the collectives a forward takes part in: under ZeRO-3 the gathers of every tensor,
    /// under expert parallel its experts computing for the rows its group sends (a no-op for
    /// a model with neither). Under pipeline parallel its chunks are those of `order`: the
    /// pipeline's chunks for `nll` (`ForwardsFirst`), one for `forward_hidden` (`Unchunked`).
    pub fn idle_forward(&mut self, b: &B, order: ChunkOrder) {
        let runs: Vec<Range<usize>> = self.parts(None).map(|v| self.part_layers(v)).collect();
        match (&self.pipeline, order) {
            (Some(pp), ChunkOrder::ForwardsFirst | ChunkOrder::OneForwardOneBackward) if pp.parts() > 1 => {
                self.interleaved_idle_forward(b, pp.chunks)
            }
            (Some(pp), ChunkOrder::ForwardsFirst | ChunkOrder::OneForwardOneBackward) => {
                for _ in 0..pp.chunks {
                    self.idle_chunk_forward(b, &runs);
                }
            }
            _ => {
                self.idle_chunk_forward(b, &runs);
            }
        }
    }

    /// `idle_forward` and then a backward's collectives: the gathers (ZeRO-3), the experts
    /// computing for the group's rows and adding their weight gradients into `grads` (expert
    /// parallel; with the forward repeated under `recompute`), and every layer's and the outer
    /// gradients handed over (empty but for those experts), as a backward hands them.
    /// Under pipeline parallel a training pass is a forward and a backward per chunk, and so is
    /// an idle one, its chunks in `order`: the order of the passes the stage's data-parallel
    /// peers run, whose gathers and exchanges are collective.
    pub fn idle_pass(&mut self, b: &B, grads: &mut dyn GradSink<B>, recompute: bool, order: ChunkOrder) {
        let ops = match &self.pipeline {
            Some(pp) if pp.parts() > 1 && order != ChunkOrder::Unchunked => {
                return self.interleaved_idle_pass(b, grads, recompute, order);
            }
            Some(pp) => order.ops(pp.stage(), pp.group.size(), pp.chunks),
            None => ChunkOrder::Unchunked.ops(0, 1, 1),
        };
        let chunks = ops.iter().filter(|op| matches!(op, Op::Forward(_))).count();
        grads.chunks_next(chunks);
        let mut served: Vec<Option<Vec<Option<moe::Served<B>>>>> = (0..chunks).map(|_| None).collect();
        let runs: Vec<Range<usize>> = self.parts(None).map(|v| self.part_layers(v)).collect();
        for op in ops {
            match op {
                Op::Forward(c) => served[c] = Some(self.idle_chunk_forward(b, &runs)),
                Op::Backward(c) => {
                    let chunk = served[c].take().expect("a chunk's forward before its backward");
                    self.idle_chunk_backward(b, grads, recompute, chunk, &runs);
                    grads.outer(b);
                    grads.outer_done(b);
                }
                _ => {}
            }
        }
    }

    /// An idle pass's forward of the local layers `runs` (parts, contiguous, in order): the
    /// gathers, and the experts serving the group's rows.
    pub(crate) fn idle_chunk_forward(&mut self, b: &B, runs: &[Range<usize>]) -> Vec<Option<moe::Served<B>>> {
        gather_outer(&mut self.shards, b, (&self.flat, &self.params));
        let mut served = Vec::new();
        for run in runs {
            for l in run.clone() {
                let next = (l + 1 < run.end).then_some(l + 1);
                gather_layer(&mut self.shards, b, (&self.flat, &self.params), l, next);
                served.push(self.serve_layer(b, l));
            }
        }
        served
    }

    /// An idle pass's backward of the local layers `runs` (parts, contiguous, in order; run
    /// last to first, the head's gradients handed over first where a part ends with it),
    /// after `idle_chunk_forward` served `served`.
    pub(crate) fn idle_chunk_backward(
        &mut self,
        b: &B,
        grads: &mut dyn GradSink<B>,
        recompute: bool,
        mut served: Vec<Option<moe::Served<B>>>,
        runs: &[Range<usize>],
    ) {
        let first = runs[0].start;
        for run in runs.iter().rev() {
            // The head's gradients are handed over where a backward hands them, before the
            // layers (between the expert exchanges, so the collectives they start meet the
            // same ones).
            if run.end == self.config.num_layers && self.holds_head() {
                grads.head_done(b);
            }
            for l in run.clone().rev() {
                let prev = (l > run.start).then(|| l - 1);
                gather_layer(&mut self.shards, b, (&self.flat, &self.params), l, prev);
                let mut g = grads.layer(b, l);
                if let (Some(ep), Some(shape)) = (&self.expert_parallel, &self.moe_shape) {
                    let w = self.layer_weights(b, l);
                    if let (FfnWeights::Moe(w), FfnWeights::Moe(g)) = (&w.ffn, &mut g.ffn) {
                        if recompute {
                            served[l - first] = Some(moe::serve_forward(b, shape, w, (ep, l)));
                        }
                        let served = served[l - first].as_ref().expect("served in the forward");
                        moe::serve_backward(b, shape, (w, g), served);
                    }
                }
                grads.layer_done(b, l);
            }
        }
    }

    /// Under expert parallel, layer `l`'s experts (if it has them) computing for the rows the
    /// group sends to a rank with no tokens of its own.
    fn serve_layer(&self, b: &B, l: usize) -> Option<moe::Served<B>> {
        let (Some(ep), Some(shape)) = (&self.expert_parallel, &self.moe_shape) else { return None };
        match &self.layer_weights(b, l).ffn {
            FfnWeights::Moe(w) => Some(moe::serve_forward(b, shape, w, (ep, l))),
            FfnWeights::Dense(_) => None,
        }
    }

    /// Backward of layer `l`: reads `s.dres` = dL/d(layer output), leaves dL/d(layer input)
    /// there, and adds the layer's parameter gradients into `g`. Returns the layer's balance
    /// loss (0 for dense layers). Under sequence parallel (`sp`) `s.dres` is the rank's tokens';
    /// each block gathers its normed input again and its output gradient, and scatters its
    /// input gradient.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        b: &B,
        (l, w): (usize, &LayerWeights<&B::Slice>),
        a: &LayerActs<B>,
        x_in: &B::Slice,
        s: &mut GradScratch<B>,
        g: &mut LayerWeights<&mut B::Slice>,
        view: &ActsView<B>,
        aux: Option<&SeqAux>,
        sp: Option<&mut SequenceBufs<B>>,
    ) -> f64 {
        let c = &self.config;
        let ctx = view.ctx(l);
        let (n, d) = (view.tokens, c.hidden_size);
        let tp = self.tensor_parallel.as_ref();
        let mut sp = sp.map(|sp| (tp.expect("sequence parallel under tensor parallel"), sp));
        if let Some((_, sp)) = sp.as_mut() {
            b.fill(&mut sp.douter, 0.0);
        }

        // Feed-forward branch: out = x_mid + ffn(xn2).
        let (xn2, dy) = match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn2, &sp.counts, &mut sp.whole_in, &format!("layer {l}: MLP input again"));
                tp.gather_tokens(&s.dres, &sp.counts, &mut sp.whole_out, &format!("layer {l}: MLP output gradient"));
                (&*sp.whole_in, &*sp.whole_out)
            }
            None => (&*a.xn2, &*s.dres),
        };
        let mut aux_loss = 0.0;
        match (&w.ffn, &mut g.ffn, &a.ffn) {
            (FfnWeights::Dense(w), FfnWeights::Dense(g), FfnActs::Dense(a_)) => {
                let scratch = s.dense.as_mut().expect("dense MLP scratch");
                let dims = (n, d, c.intermediate_size);
                mlp::backward(b, self.matmul_precision, w, xn2, dy, &mut s.dxn, g, a_, scratch, dims);
            }
            (FfnWeights::Moe(w), FfnWeights::Moe(g), FfnActs::Moe(a_)) => {
                let scratch = s.moe.as_mut().expect("MoE scratch");
                b.fill(&mut s.dxn, 0.0);
                let shape = self.moe_shape.as_ref().expect("moe shape");
                aux_loss = moe::backward(b, shape, w, xn2, dy, &mut s.dxn, g, a_, scratch, aux, tp);
            }
            _ => unreachable!("gradients laid out for another feed-forward kind"),
        }
        let what = format!("layer {l}: MLP input gradient");
        match (sp.as_mut(), tp) {
            (Some((tp, sp)), _) => {
                tp.sum_scatter_tokens(&s.dxn, &sp.counts, &mut sp.local, &what);
                let dpost = b.slice_mut(&mut sp.douter, d..2 * d);
                b.rmsnorm_backward(&mut s.dres, dpost, &sp.local, &a.x_mid, w.post_norm, &a.rstd2);
            }
            (None, tp) => {
                if let Some(tp) = tp {
                    tp.sum(&mut s.dxn, &what);
                }
                b.rmsnorm_backward(&mut s.dres, g.post_norm, &s.dxn, &a.x_mid, w.post_norm, &a.rstd2);
            }
        }

        // Attention branch: x_mid = x_in + attention(xn1).
        let (xn1, dy) = match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn1, &sp.counts, &mut sp.whole_in, &format!("layer {l}: attention input again"));
                let what = format!("layer {l}: attention output gradient");
                tp.gather_tokens(&s.dres, &sp.counts, &mut sp.whole_out, &what);
                (&*sp.whole_in, &*sp.whole_out)
            }
            None => (&*a.xn1, &*s.dres),
        };
        match (&w.attn, &mut g.attn, &a.attn, &mut s.attn) {
            (AttnWeights::Gqa(w), AttnWeights::Gqa(g), AttnActs::Gqa(a_), AttnGrads::Gqa(s_)) => {
                gqa::backward(b, c, w, xn1, dy, &mut s.dxn, g, a_, s_, &ctx, tp)
            }
            (AttnWeights::Mla(w), AttnWeights::Mla(g), AttnActs::Mla(a_), AttnGrads::Mla(s_)) => {
                mla::backward(b, c, w, xn1, dy, &mut s.dxn, g, a_, s_, &ctx, tp)
            }
            _ => unreachable!("gradients laid out for another attention kind"),
        }
        let what = format!("layer {l}: attention input gradient");
        match (sp, tp) {
            (Some((tp, sp)), _) => {
                tp.sum_scatter_tokens(&s.dxn, &sp.counts, &mut sp.local, &what);
                let dinput = b.slice_mut(&mut sp.douter, 0..d);
                b.rmsnorm_backward(&mut s.dres, dinput, &sp.local, x_in, w.input_norm, &a.rstd1);
                // Both norms' weight gradients, summed over the rank's tokens, summed over the group.
                tp.sum(&mut sp.douter, &format!("layer {l}: norm weight gradients"));
                b.add_assign(g.input_norm, b.slice(&sp.douter, 0..d));
                b.add_assign(g.post_norm, b.slice(&sp.douter, d..2 * d));
            }
            (None, tp) => {
                if let Some(tp) = tp {
                    tp.sum(&mut s.dxn, &what);
                }
                b.rmsnorm_backward(&mut s.dres, g.input_norm, &s.dxn, x_in, w.input_norm, &a.rstd1);
            }
        }
        aux_loss
    }
}

/// The parameters of `config`, under expert parallel with only this rank's routed experts.
pub(crate) fn layout_of<B: Backend>(config: &Config, ep: Option<&ExpertParallel<B>>) -> Weights<TensorSpec> {
    let layout = weights::layout(config);
    match (ep, &config.moe) {
        (Some(ep), Some(moe)) => layout.with_experts(ep.local(moe.experts)),
        _ => layout,
    }
}

/// The layout of the model stored in `dir` (of `config`; under expert parallel with this
/// rank's routed experts `ep`), and whether it keeps DeepSeek's own names (DeepSeek-V4 as
/// DeepSeek publishes it, in and out).
pub(crate) fn stored_layout<B: Backend>(
    dir: &Path,
    config: &Config,
    ep: Option<&ExpertParallel<B>>,
) -> Result<(Weights<TensorSpec>, bool)> {
    let layout = layout_of(config, ep);
    let deepseek_names = config.model_type == ModelType::DeepseekV4
        && v4_layout::uses_deepseek_names(safetensors_io::stored_names(dir)?.iter().map(String::as_str));
    Ok(match deepseek_names {
        true => (v4_layout::deepseek_names(&layout), true),
        false => (layout, false),
    })
}

/// `tensors` uploaded into one flat buffer laid out as `flat`.
pub(crate) fn upload_flat<B: Backend>(b: &B, flat: &FlatLayout, tensors: &Weights<Vec<f32>>) -> B::Buf {
    let mut params = b.zeros(flat.total);
    for (r, t) in flat.ranges.iter().into_iter().zip(tensors.iter()) {
        b.write(b.slice_mut(&mut params, r.clone()), t);
    }
    params
}

/// Routed experts of `config`'s MoE layers (0 without).
fn expert_total(config: &Config) -> usize {
    config.moe.as_ref().map_or(0, |m| m.experts)
}

/// Experts of a layer's MoE block, 0 for a dense one.
pub(crate) fn expert_count(layer: &LayerWeights<TensorSpec>) -> usize {
    match &layer.ffn {
        FfnWeights::Moe(w) => w.router.shape[0],
        FfnWeights::Dense(_) => 0,
    }
}

/// The per-batch inputs every layer reads, borrowed apart from the buffers layers write.
struct ActsView<'a, B: Backend> {
    tokens: usize,
    rope_table: &'a B::Slice,
    compress_rope_table: &'a B::Slice,
    /// Each layer's compressed entries (DeepSeek-V4's CSA and HCA layers).
    compressed: Vec<Option<&'a CompressPlan<B>>>,
    positions: &'a B::Index,
    segments: &'a B::Index,
    attention: Vec<Attention>,
    precision: Precision,
    /// Cache rows of the tokens and, when decoding, each token's cached span and the decode
    /// attention (its window is set per layer).
    cache: Option<CacheCtx<'a, B>>,
}

impl<'a, B: Backend> ActsView<'a, B> {
    /// The view of a pass of `config` over `inputs` (`attention`: each layer's, which give the
    /// batch's shape), with the rope tables and compression `plans` it reads.
    fn new(
        config: &Config,
        (rope_table, compress_rope_table): (&'a B::Buf, &'a B::Buf),
        attention: Vec<Attention>,
        precision: Precision,
        inputs: &'a BatchInputs<B>,
        plans: &'a [CompressPlan<B>],
    ) -> Self {
        let compressed = match &config.attention {
            AttentionKind::V4(v4) => v4
                .layers
                .iter()
                .map(|kind| {
                    kind.compression().map(|k| {
                        plans
                            .iter()
                            .find(|p| p.rate == k.rate && p.overlap == k.overlap)
                            .expect("a plan per compression")
                    })
                })
                .collect(),
            _ => vec![None; config.num_layers],
        };
        Self {
            tokens: attention.first().map_or(0, |a| a.batch * a.seq),
            rope_table,
            compress_rope_table,
            compressed,
            positions: &inputs.positions,
            segments: &inputs.segments,
            attention,
            precision,
            cache: None,
        }
    }

    fn ctx(&self, layer: usize) -> AttnCtx<'a, B> {
        let compressed = self.compressed[layer];
        AttnCtx {
            tokens: self.tokens,
            // DeepSeek-V4's compressed layers rotate with their own rope.
            rope_table: if compressed.is_some() { self.compress_rope_table } else { self.rope_table },
            compressed,
            positions: self.positions,
            segments: self.segments,
            spec: self.attention[layer],
            precision: self.precision,
            cache: self.cache.map(|c| CacheCtx {
                decode: c
                    .decode
                    .map(|(s, l, spec)| (s, l, DecodeAttention { window: self.attention[layer].window, ..spec })),
                ..c
            }),
        }
    }
}

/// ZeRO-3's shards while they are in use (not unsharded).
fn active<B: Backend>(shards: &Option<ParamShards<B>>) -> Option<&ParamShards<B>> {
    shards.as_ref().filter(|s| s.parked.is_none())
}

/// Under ZeRO-3, gathers the tensors outside the layers from the shards in `params` before a
/// forward uses them (collectives); does nothing for a model that holds them all.
pub(crate) fn gather_outer<B: Backend>(
    shards: &mut Option<ParamShards<B>>,
    b: &B,
    (flat, params): (&FlatLayout, &B::Slice),
) {
    if let Some(s) = shards.as_mut().filter(|s| s.parked.is_none()) {
        s.gather_outer(b, flat, params);
    }
}

/// Under ZeRO-3, gathers layer `l`'s tensors before they are used and starts gathering those
/// of `next`, the layer that runs after it (`ParamShards::gather_layer`); does nothing for a
/// model that holds them all.
pub(crate) fn gather_layer<B: Backend>(
    shards: &mut Option<ParamShards<B>>,
    b: &B,
    (flat, params): (&FlatLayout, &B::Slice),
    l: usize,
    next: Option<usize>,
) {
    if let Some(s) = shards.as_mut().filter(|s| s.parked.is_none()) {
        s.gather_layer(b, flat, params, l, next);
    }
}
