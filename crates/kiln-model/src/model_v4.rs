//! DeepSeek-V4's decoder (transformers' `DeepseekV4DecoderLayer` and `DeepseekV4Model`): the
//! residual is `hc_mult` streams per token, each block reads and writes them through its own
//! hyper-connection (`layers::hyper`):
//!
//!   X₀ = [e; e; …; e]  (the token's embedding in every stream)
//!   c = collapse_attn(X);  X' = expand_attn(X, Attention(RMSNorm(c)))
//!   c' = collapse_ffn(X'); X'' = expand_ffn(X', MoE(RMSNorm(c')))
//!   xf = RMSNorm(collapse_head(X_L))
//!
//! Backward runs the same steps in reverse with two stream-sized gradient buffers, the block
//! outputs' gradients going through the hyper-connections' expand and collapse.

use crate::activations::{Activations, AttnActs, AttnGrads, FfnActs, GradScratch, LayerActs};
use crate::batch::Batch;
use crate::config::AttentionKind;
use crate::layers::hyper;
use crate::layers::moe;
use crate::layers::moe_aux_loss::SeqAux;
use crate::layers::v4_attention;
use crate::layers::AttnCtx;
use crate::model::Model;
use crate::safetensors_io::RawTensor;
use crate::sequence_parallel::SequenceBufs;
use crate::v4_cache::{LayerStep, V4LayerCache};
use crate::weights::{AttnWeights, FfnWeights, HcWeights, LayerWeights};
use kiln_core::{Backend, ColumnCopy};

/// A frozen token-to-expert table (`tid2eid`, int64 `[vocab, top_k]`) read as i32.
pub(crate) fn hash_table(t: &RawTensor) -> Option<Vec<i32>> {
    (t.dtype == safetensors::Dtype::I64)
        .then(|| t.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as i32).collect())
}

/// The name of layer `l`'s token-to-expert table.
pub(crate) fn hash_table_name(l: usize) -> String {
    format!("model.layers.{l}.ffn.gate.tid2eid")
}

/// A `[vocab, top_k]` table of zeros, as transformers initialises one, stored as int64.
pub(crate) fn zero_hash_table(l: usize, vocab: usize, top_k: usize) -> RawTensor {
    RawTensor {
        name: hash_table_name(l),
        dtype: safetensors::Dtype::I64,
        shape: vec![vocab, top_k],
        bytes: vec![0; vocab * top_k * 8],
    }
}

impl<B: Backend> Model<B> {
    /// Whether this is a hyper-connected (DeepSeek-V4) model.
    pub(crate) fn is_v4(&self) -> bool {
        matches!(self.config.attention, AttentionKind::V4(_))
    }

    /// Each hash-routed layer's experts for `batch`'s tokens.
    pub(crate) fn hash_routes(&self, batch: &Batch) -> Vec<(usize, Vec<i32>)> {
        let k = self.config.moe.as_ref().map_or(0, |m| m.top_k);
        let tables = self.hash_tables.iter().enumerate();
        tables
            .filter_map(|(l, t)| t.as_ref().map(|t| (l, t)))
            .map(|(l, table)| {
                let routes = batch.ids.iter().flat_map(|&id| &table[id as usize * k..(id as usize + 1) * k]);
                (l, routes.copied().collect())
            })
            .collect()
    }

    /// The batch's compressed entries, per (rate, overlap) of the compressed layers.
    pub(crate) fn compress_plans(&self, b: &B, batch: &Batch) -> Vec<crate::compress_plan::CompressPlan<B>> {
        let AttentionKind::V4(v4) = &self.config.attention else { return Vec::new() };
        let kinds = v4.compressions().into_iter();
        kinds.map(|k| crate::compress_plan::CompressPlan::new(b, batch, k.rate, k.overlap)).collect()
    }

    /// `dst` (`[n, streams·d]`) = the `[n, d]` embeddings in every stream.
    pub(crate) fn embed_streams(&self, b: &B, dst: &mut B::Slice, embedded: &B::Slice, n: usize) {
        let (d, s) = (self.config.hidden_size, crate::activations::streams(&self.config));
        for j in 0..s {
            b.copy_columns(dst, embedded, ColumnCopy::put_block(n, d, (s * d, j * d)));
        }
    }

    /// `dst` (`[n, d]`) = the sum over the streams of `dres` (`[n, streams·d]`): the
    /// embeddings' gradient.
    pub(crate) fn sum_streams(&self, b: &B, dst: &mut B::Slice, dres: &B::Slice, n: usize) {
        let (d, s) = (self.config.hidden_size, crate::activations::streams(&self.config));
        for j in 0..s {
            let spec = ColumnCopy { accumulate: j > 0, ..ColumnCopy::take_block(n, d, (s * d, j * d)) };
            b.copy_columns(dst, dres, spec);
        }
    }

    /// The head's collapse of the last streams `x`, then the final norm into `acts.xf` (under
    /// sequence parallel, of the rank's tokens, gathered).
    pub(crate) fn v4_head_forward(&self, b: &B, acts: &mut Activations<B>) {
        let w = self.outer_weights(b);
        let c = &self.config;
        let head = acts.hc_head.as_mut().expect("the head's hyper-connection");
        let hw = w.hc_head.as_ref().expect("hc_head weights");
        let x_last = acts.layer_inputs.last().expect("the last layer's output");
        hyper::collapse(b, hw, x_last, head, &self.hc_ones, c.rms_norm_eps);
        self.final_norm_forward(b, &head.collapsed, (&mut acts.xf, &mut acts.rstdf), acts.sequence.as_mut());
    }

    /// Backward of `v4_head_forward` from `s.dxn` = dL/dxf, into `s.dres` (overwritten).
    pub(crate) fn v4_head_backward(
        &self,
        b: &B,
        acts: &mut Activations<B>,
        grads: &mut dyn crate::grad_sink::GradSink<B>,
    ) {
        let c = &self.config;
        let d = c.hidden_size;
        let w = self.outer_weights(b);
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        let (_, dblock, hcg) = s.hc.as_mut().expect("hyper-connection scratch");
        let head = acts.hc_head.as_ref().expect("the head's hyper-connection");
        let mut outer = grads.outer(b);
        let hw = w.hc_head.as_ref().expect("hc_head");
        let x = acts.layer_inputs.last().expect("the last layer's output");
        b.fill(dblock, 0.0);
        b.fill(&mut s.dres, 0.0);
        let Some((sp, tp)) = acts.sequence.as_mut().zip(self.tensor_parallel.as_ref()) else {
            b.rmsnorm_backward(dblock, outer.norm, &s.dxn, &head.collapsed, w.norm, &acts.rstdf);
            let gw = outer.hc_head.as_mut().expect("hc_head grads");
            return hyper::collapse_backward(b, hw, gw, head, x, dblock, &mut s.dres, hcg, &self.hc_ones);
        };
        // dL/dxf is whole on every rank: the rank's rows; the norm's and the head's
        // hyper-connection's gradients, over the rank's tokens, summed over the group.
        let dxf = sp.rows_of(b, &s.dxn, d);
        b.fill(&mut sp.douter, 0.0);
        let (dnorm, rest) = b.split_at_mut(&mut sp.douter, d);
        b.rmsnorm_backward(dblock, dnorm, dxf, &head.collapsed, w.norm, &acts.rstdf);
        let (mut dhead, _) = hc_views(b, rest, hw);
        hyper::collapse_backward(b, hw, &mut dhead, head, x, dblock, &mut s.dres, hcg, &self.hc_ones);
        tp.sum(&mut sp.douter, "final norm and head hyper-connection gradients");
        b.add_assign(outer.norm, b.slice(&sp.douter, 0..d));
        let (_, rest) = b.split_at_mut(&mut sp.douter, d);
        add_hc(b, outer.hc_head.as_mut().expect("hc_head grads"), &hc_views(b, rest, hw).0);
    }

    /// Forward of V4 layer `l` from the streams `x_in` into `a` and, unless only recomputing
    /// what backward needs, into `x_out`; with the layer's generation cache when generating.
    /// Under sequence parallel (`sp`) the streams are the rank's tokens': each block's normed
    /// input is gathered and its partial output scattered.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v4_layer_forward(
        &self,
        b: &B,
        (l, w): (usize, &LayerWeights<&B::Slice>),
        a: &mut LayerActs<B>,
        x_in: &B::Slice,
        x_out: Option<&mut B::Slice>,
        ctx: &AttnCtx<B>,
        routes: Option<&[i32]>,
        cache: Option<(&mut V4LayerCache<B>, &LayerStep<B>)>,
        sp: Option<&mut SequenceBufs<B>>,
    ) {
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let ones = &self.hc_ones;
        let tp = self.tensor_parallel.as_ref();
        let mut sp = sp.map(|sp| (tp.expect("sequence parallel under tensor parallel"), sp));
        let st = a.streams.as_mut().expect("a hyper-connected layer's activations");
        let (wa, wf) = (w.hc_attn.as_ref().expect("hc_attn"), w.hc_ffn.as_ref().expect("hc_ffn"));
        hyper::collapse(b, wa, x_in, &mut st.attn_hc, ones, eps);
        b.rmsnorm_forward(&mut a.xn1, &mut a.rstd1, &st.attn_hc.collapsed, w.input_norm, eps);
        let (AttnWeights::V4(w_attn), AttnActs::V4(a_attn)) = (&w.attn, &mut a.attn) else {
            unreachable!("a V4 layer has V4 attention")
        };
        let what = format!("layer {l}: attention output");
        match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn1, &sp.counts, &mut sp.whole_in, &format!("layer {l}: attention input"));
                v4_attention::forward(b, c, w_attn, &sp.whole_in, &mut sp.whole_out, a_attn, ctx, ones, cache);
                tp.sum_scatter_tokens(&sp.whole_out, &sp.counts, &mut st.attn_out, &what);
            }
            None => {
                v4_attention::forward(b, c, w_attn, &a.xn1, &mut st.attn_out, a_attn, ctx, ones, cache);
                if let Some(tp) = tp {
                    tp.sum(&mut st.attn_out, &what);
                }
            }
        }
        hyper::expand(b, &st.attn_hc, x_in, &st.attn_out, &mut a.x_mid);

        hyper::collapse(b, wf, &a.x_mid, &mut st.ffn_hc, ones, eps);
        b.rmsnorm_forward(&mut a.xn2, &mut a.rstd2, &st.ffn_hc.collapsed, w.post_norm, eps);
        let (FfnWeights::Moe(w_moe), FfnActs::Moe(a_moe)) = (&w.ffn, &mut a.ffn) else {
            unreachable!("a V4 layer has a MoE block")
        };
        if let Some(routes) = routes {
            a_moe.set_routes(b, routes);
        }
        let ep = self.expert_parallel.as_ref().map(|ep| (ep, l));
        let shape = self.moe_shape.as_ref().expect("moe shape");
        // Summed even when only recomputing: the expansion's backward reads the output.
        let what = format!("layer {l}: MoE output");
        match sp {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn2, &sp.counts, &mut sp.whole_in, &format!("layer {l}: MoE input"));
                moe::forward(b, shape, w_moe, &sp.whole_in, Some(&mut sp.whole_out), a_moe, ep);
                tp.sum_scatter_tokens(&sp.whole_out, &sp.counts, &mut st.ffn_out, &what);
            }
            None => {
                moe::forward(b, shape, w_moe, &a.xn2, Some(&mut st.ffn_out), a_moe, ep);
                if let Some(tp) = tp {
                    tp.sum(&mut st.ffn_out, &what);
                }
            }
        }
        if let Some(x_out) = x_out {
            hyper::expand(b, &st.ffn_hc, &a.x_mid, &st.ffn_out, x_out);
        }
    }

    /// Backward of V4 layer `l`: reads `s.dres` = dL/d(layer output), leaves dL/d(layer input)
    /// there, and adds the layer's parameter gradients into `g`. Returns the balance loss.
    /// Under sequence parallel (`sp`) the streams' gradients are the rank's tokens'; the norms'
    /// and hyper-connections' weight gradients are summed over the group.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v4_layer_backward(
        &self,
        b: &B,
        (l, w): (usize, &LayerWeights<&B::Slice>),
        a: &LayerActs<B>,
        x_in: &B::Slice,
        s: &mut GradScratch<B>,
        g: &mut LayerWeights<&mut B::Slice>,
        ctx: &AttnCtx<B>,
        aux: Option<&SeqAux>,
        sp: Option<&mut SequenceBufs<B>>,
    ) -> f64 {
        let c = &self.config;
        let d = c.hidden_size;
        let ones = &self.hc_ones;
        let tp = self.tensor_parallel.as_ref();
        let mut sp = sp.map(|sp| (tp.expect("sequence parallel under tensor parallel"), sp));
        let st = a.streams.as_ref().expect("a hyper-connected layer's activations");
        let (dmid, dblock, hcg) = s.hc.as_mut().expect("hyper-connection scratch");
        let (wa, wf) = (w.hc_attn.as_ref().expect("hc_attn"), w.hc_ffn.as_ref().expect("hc_ffn"));
        if let Some((_, sp)) = sp.as_mut() {
            b.fill(&mut sp.douter, 0.0);
        }

        // Feed-forward: X'' = expand_ffn(X', MoE(RMSNorm(collapse_ffn(X')))).
        hyper::expand_backward(b, &st.ffn_hc, &a.x_mid, &st.ffn_out, &s.dres, dblock, dmid, hcg);
        let (FfnWeights::Moe(w_moe), FfnWeights::Moe(g_moe), FfnActs::Moe(a_moe)) = (&w.ffn, &mut g.ffn, &a.ffn) else {
            unreachable!("a V4 layer has a MoE block")
        };
        let scratch = s.moe.as_mut().expect("MoE scratch");
        b.fill(&mut s.dxn, 0.0);
        let shape = self.moe_shape.as_ref().expect("moe shape");
        let (xn2, dy) = match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn2, &sp.counts, &mut sp.whole_in, &format!("layer {l}: MoE input again"));
                tp.gather_tokens(dblock, &sp.counts, &mut sp.whole_out, &format!("layer {l}: MoE output gradient"));
                (&*sp.whole_in, &*sp.whole_out)
            }
            None => (&*a.xn2, &**dblock),
        };
        let aux_loss = moe::backward(b, shape, w_moe, xn2, dy, &mut s.dxn, g_moe, a_moe, scratch, aux, tp);
        let what = format!("layer {l}: MoE input gradient");
        b.fill(dblock, 0.0);
        let gf = g.hc_ffn.as_mut().expect("hc_ffn grads");
        match (sp.as_mut(), tp) {
            (Some((tp, sp)), _) => {
                tp.sum_scatter_tokens(&s.dxn, &sp.counts, &mut sp.local, &what);
                let (norms, rest) = b.split_at_mut(&mut sp.douter, 2 * d);
                let dpost = b.slice_mut(norms, d..2 * d);
                b.rmsnorm_backward(dblock, dpost, &sp.local, &st.ffn_hc.collapsed, w.post_norm, &a.rstd2);
                let (_, rest) = hc_views(b, rest, wa);
                let (mut dffn, _) = hc_views(b, rest, wf);
                hyper::collapse_backward(b, wf, &mut dffn, &st.ffn_hc, &a.x_mid, dblock, dmid, hcg, ones);
            }
            (None, tp) => {
                if let Some(tp) = tp {
                    tp.sum(&mut s.dxn, &what);
                }
                b.rmsnorm_backward(dblock, g.post_norm, &s.dxn, &st.ffn_hc.collapsed, w.post_norm, &a.rstd2);
                hyper::collapse_backward(b, wf, gf, &st.ffn_hc, &a.x_mid, dblock, dmid, hcg, ones);
            }
        }

        // Attention: X' = expand_attn(X, Attention(RMSNorm(collapse_attn(X)))).
        hyper::expand_backward(b, &st.attn_hc, x_in, &st.attn_out, dmid, dblock, &mut s.dres, hcg);
        let (AttnWeights::V4(w_attn), AttnWeights::V4(g_attn), AttnActs::V4(a_attn), AttnGrads::V4(s_attn)) =
            (&w.attn, &mut g.attn, &a.attn, &mut s.attn)
        else {
            unreachable!("a V4 layer has V4 attention")
        };
        let (xn1, dy) = match sp.as_mut() {
            Some((tp, sp)) => {
                tp.gather_tokens(&a.xn1, &sp.counts, &mut sp.whole_in, &format!("layer {l}: attention input again"));
                let what = format!("layer {l}: attention output gradient");
                tp.gather_tokens(dblock, &sp.counts, &mut sp.whole_out, &what);
                (&*sp.whole_in, &*sp.whole_out)
            }
            None => (&*a.xn1, &**dblock),
        };
        // Under tensor parallel dL/dxn comes out whole (`v4_attention::backward`): no sum.
        v4_attention::backward(b, c, w_attn, xn1, dy, &mut s.dxn, g_attn, a_attn, s_attn, ctx, ones, tp);
        b.fill(dblock, 0.0);
        let ga = g.hc_attn.as_mut().expect("hc_attn grads");
        match sp {
            Some((tp, sp)) => {
                let dxn1 = sp.rows_of(b, &s.dxn, d);
                let (norms, rest) = b.split_at_mut(&mut sp.douter, 2 * d);
                let dinput = b.slice_mut(norms, 0..d);
                b.rmsnorm_backward(dblock, dinput, dxn1, &st.attn_hc.collapsed, w.input_norm, &a.rstd1);
                let (mut dattn, _) = hc_views(b, rest, wa);
                hyper::collapse_backward(b, wa, &mut dattn, &st.attn_hc, x_in, dblock, &mut s.dres, hcg, ones);
                // The norms' and hyper-connections' gradients over the rank's tokens, summed.
                tp.sum(&mut sp.douter, &format!("layer {l}: norm and hyper-connection gradients"));
                b.add_assign(g.input_norm, b.slice(&sp.douter, 0..d));
                b.add_assign(g.post_norm, b.slice(&sp.douter, d..2 * d));
                let (_, rest) = b.split_at_mut(&mut sp.douter, 2 * d);
                let (dattn, rest) = hc_views(b, rest, wa);
                add_hc(b, ga, &dattn);
                add_hc(b, g.hc_ffn.as_mut().expect("hc_ffn grads"), &hc_views(b, rest, wf).0);
            }
            None => {
                b.rmsnorm_backward(dblock, g.input_norm, &s.dxn, &st.attn_hc.collapsed, w.input_norm, &a.rstd1);
                hyper::collapse_backward(b, wa, ga, &st.attn_hc, x_in, dblock, &mut s.dres, hcg, ones);
            }
        }
        aux_loss
    }
}

/// The first values of `buf` as gradients shaped as the hyper-connection weights `like`, and
/// the rest of `buf`.
fn hc_views<'a, B: Backend>(
    b: &B,
    buf: &'a mut B::Slice,
    like: &HcWeights<&B::Slice>,
) -> (HcWeights<&'a mut B::Slice>, &'a mut B::Slice) {
    let (mix, rest) = b.split_at_mut(buf, b.len(like.mix));
    let (base, rest) = b.split_at_mut(rest, b.len(like.base));
    let (scale, rest) = b.split_at_mut(rest, b.len(like.scale));
    (HcWeights { mix, base, scale }, rest)
}

/// `g += d`, tensor by tensor.
fn add_hc<B: Backend>(b: &B, g: &mut HcWeights<&mut B::Slice>, d: &HcWeights<&mut B::Slice>) {
    b.add_assign(g.mix, d.mix);
    b.add_assign(g.base, d.base);
    b.add_assign(g.scale, d.scale);
}
