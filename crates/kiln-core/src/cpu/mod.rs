//! The CPU backend: host memory, `gemm` for matrix products, rayon for everything else.

mod adamw;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
/// AdamW on slices, for optimizers that update part of a tensor (ZeRO shards).
pub use adamw::step as adamw_step;
mod attention;
mod attention_decode;
mod attention_sinks;
mod bf16_pack;
mod cross_entropy;
mod elementwise;
mod embedding;
mod frozen_weights;
mod hyper_connection;
mod kv_cache;
mod matmul;
mod matmul_bf16;
mod matmul_f32_packed;
mod moe_dispatch;
mod moe_route;
mod pooling;
mod reverse_kl;
mod rmsnorm;
mod rope;
mod sparse_attention;
pub mod threads;
mod vocab_block_loss;

use crate::backend::{self, Backend, GroupedMatmul, Matmul};
use std::ops::Range;

/// A raw pointer that tasks writing disjoint regions of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// A method, not a field access, so closures capture the `Send` wrapper itself.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Whether this CPU has AVX-512 (the kernels' explicit vector paths; each has a portable one).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The reference backend. Threads come from rayon's global pool (`RAYON_NUM_THREADS`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Slice = [f32];
    type Buf = Vec<f32>;
    type Index = Vec<i32>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn native_bf16(&self) -> bool {
        matmul_bf16::native()
    }
    fn freeze_weights(&self) {
        frozen_weights::freeze();
    }
    fn thaw_weights(&self) {
        frozen_weights::thaw();
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn write(&self, dst: &mut [f32], data: &[f32]) {
        assert_eq!(dst.len(), data.len(), "write: buffer holds {} values, got {}", dst.len(), data.len());
        dst.copy_from_slice(data);
    }
    fn read(&self, src: &[f32]) -> Vec<f32> {
        src.to_vec()
    }
    fn len(&self, buf: &[f32]) -> usize {
        buf.len()
    }
    fn slice<'a>(&self, buf: &'a [f32], range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn slice_mut<'a>(&self, buf: &'a mut [f32], range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn split_at_mut<'a>(&self, buf: &'a mut [f32], mid: usize) -> (&'a mut [f32], &'a mut [f32]) {
        buf.split_at_mut(mid)
    }
    fn upload_index(&self, data: &[i32]) -> Vec<i32> {
        data.to_vec()
    }
    fn write_index(&self, dst: &mut Vec<i32>, data: &[i32]) {
        assert_eq!(dst.len(), data.len(), "write_index: buffer holds {} values, got {}", dst.len(), data.len());
        dst.copy_from_slice(data);
    }
    fn read_index(&self, src: &Vec<i32>) -> Vec<i32> {
        src.clone()
    }
    fn fill(&self, dst: &mut [f32], value: f32) {
        dst.fill(value);
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        assert_eq!(dst.len(), src.len(), "copy: buffers hold {} and {} values", dst.len(), src.len());
        dst.copy_from_slice(src);
    }
    fn copy_columns(&self, dst: &mut [f32], src: &[f32], spec: backend::ColumnCopy) {
        elementwise::copy_columns(dst, src, spec);
    }
    fn add_assign(&self, dst: &mut [f32], src: &[f32]) {
        elementwise::add_assign(dst, src);
    }
    fn scale(&self, dst: &mut [f32], s: f32) {
        elementwise::scale(dst, s);
    }
    fn sum_squares(&self, x: &[f32]) -> f64 {
        elementwise::sum_squares(x)
    }
    fn round_to_bf16(&self, x: &mut [f32]) {
        elementwise::round_to_bf16(x);
    }
    fn muon_momentum(&self, update: &mut [f32], buf: &mut [f32], grad: &[f32], momentum: f64, nesterov: bool) {
        elementwise::muon_momentum(update, buf, grad, momentum, nesterov);
    }

    fn matmul(&self, c: &mut [f32], a: &[f32], b: &[f32], spec: Matmul) {
        matmul::matmul(c, a, b, spec);
    }
    fn grouped_matmul(&self, c: &mut [f32], a: &[f32], b: &[f32], rows: &[usize], spec: GroupedMatmul) {
        matmul::grouped(c, a, b, rows, spec);
    }
    fn grouped_matmul_weight_grad(&self, db: &mut [f32], dc: &[f32], a: &[f32], rows: &[usize], spec: GroupedMatmul) {
        matmul::grouped_weight_grad(db, dc, a, rows, spec);
    }
    fn scale_rows(&self, x: &mut [f32], w: &[f32]) {
        elementwise::scale_rows(x, w);
    }
    fn row_dot(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        elementwise::row_dot(out, a, b);
    }
    fn add_bias(&self, y: &mut [f32], bias: &[f32]) {
        elementwise::add_bias(y, bias);
    }
    fn bias_backward(&self, dbias: &mut [f32], dy: &[f32]) {
        elementwise::bias_backward(dbias, dy);
    }

    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &Vec<i32>, dim: usize) {
        embedding::forward(out, table, ids, dim);
    }
    fn embedding_backward(&self, dtable: &mut [f32], dout: &[f32], ids: &Vec<i32>, dim: usize) {
        embedding::backward(dtable, dout, ids, dim);
    }

    fn rmsnorm_forward(&self, y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        rmsnorm::forward(y, rstd, x, w, eps);
    }
    fn add_rmsnorm_forward(&self, x: &mut [f32], delta: &[f32], y: &mut [f32], rstd: &mut [f32], w: &[f32], eps: f32) {
        rmsnorm::add_forward(x, delta, y, rstd, w, eps);
    }
    fn rmsnorm_backward(&self, dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) {
        rmsnorm::backward(dx, dw, dy, x, w, rstd);
    }

    fn rope_forward(&self, x: &mut [f32], table: &[f32], positions: &Vec<i32>, spec: backend::Rope) {
        rope::forward(x, table, positions, spec);
    }
    fn rope_backward(&self, dx: &mut [f32], table: &[f32], positions: &Vec<i32>, spec: backend::Rope) {
        rope::backward(dx, table, positions, spec);
    }

    fn scatter_rows(&self, dst: &mut [f32], src: &[f32], rows: &Vec<i32>, dim: usize, storage: backend::Precision) {
        kv_cache::scatter_rows(dst, src, rows, dim, storage);
    }
    fn attention_decode(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        starts: &Vec<i32>,
        lengths: &Vec<i32>,
        spec: backend::DecodeAttention,
    ) {
        attention_decode::forward(out, q, k_cache, v_cache, starts, lengths, spec);
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        segments: &Vec<i32>,
        spec: backend::Attention,
    ) {
        attention::forward(out, lse, q, k, v, segments, spec);
    }
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        segments: &Vec<i32>,
        spec: backend::Attention,
    ) {
        attention::backward(dq, dk, dv, dout, q, k, v, out, lse, segments, spec);
    }

    fn swiglu_forward(&self, h: &mut [f32], gate: &[f32], up: &[f32], limit: f32) {
        elementwise::swiglu_forward(h, gate, up, limit);
    }
    fn swiglu_backward(&self, dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32], limit: f32) {
        elementwise::swiglu_backward(dgate, dup, dh, gate, up, limit);
    }

    fn cross_entropy_forward(
        &self,
        nll: &mut [f32],
        correct: &mut [f32],
        logits: &[f32],
        targets: &Vec<i32>,
        vocab: usize,
    ) {
        cross_entropy::forward(nll, correct, logits, targets, vocab);
    }
    fn cross_entropy_backward(
        &self,
        logits: &mut [f32],
        nll: &mut [f32],
        correct: &mut [f32],
        targets: &Vec<i32>,
        weights: &[f32],
        vocab: usize,
    ) {
        cross_entropy::backward(logits, nll, correct, targets, weights, vocab);
    }
    fn reverse_kl_backward(&self, logits: &mut [f32], kl: &mut [f32], teacher: &[f32], weights: &[f32], vocab: usize) {
        reverse_kl::backward(logits, kl, teacher, weights, vocab);
    }
    fn vocab_block_stats(&self, stats: &mut [f32], logits: &[f32], targets: &Vec<i32>, vocab: usize, first: usize) {
        vocab_block_loss::stats(stats, logits, targets, vocab, first);
    }
    fn cross_entropy_block_backward(
        &self,
        logits: &mut [f32],
        lse: &[f32],
        targets: &Vec<i32>,
        weights: &[f32],
        vocab: usize,
        first: usize,
    ) {
        vocab_block_loss::cross_entropy_backward(logits, lse, targets, weights, vocab, first);
    }
    fn reverse_kl_block_forward(&self, kl: &mut [f32], logits: &[f32], teacher: &[f32], lse: &[f32], vocab: usize) {
        vocab_block_loss::reverse_kl_forward(kl, logits, teacher, lse, vocab);
    }
    fn reverse_kl_block_backward(
        &self,
        logits: &mut [f32],
        teacher: &[f32],
        lse: &[f32],
        kl: &[f32],
        weights: &[f32],
        vocab: usize,
    ) {
        vocab_block_loss::reverse_kl_backward(logits, teacher, lse, kl, weights, vocab);
    }

    fn attention_sinks_forward(&self, out: &mut [f32], lse: &mut [f32], sinks: &[f32], spec: backend::Attention) {
        attention_sinks::forward(out, lse, sinks, spec);
    }
    fn attention_sinks_backward(
        &self,
        dsinks: &mut [f32],
        dout: &[f32],
        out: &[f32],
        lse: &[f32],
        sinks: &[f32],
        spec: backend::Attention,
    ) {
        attention_sinks::backward(dsinks, dout, out, lse, sinks, spec);
    }
    fn attention_merge(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        other_out: &[f32],
        other_lse: &[f32],
        spec: backend::Attention,
    ) {
        sparse_attention::merge(out, lse, other_out, other_lse, spec);
    }
    fn sparse_attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        entries: &[f32],
        chosen: &Vec<i32>,
        spec: backend::SparseAttention,
    ) {
        sparse_attention::forward(out, lse, q, entries, chosen, spec);
    }
    fn sparse_attention_backward(
        &self,
        dq: &mut [f32],
        dentries: &mut [f32],
        dout: &[f32],
        q: &[f32],
        entries: &[f32],
        chosen: &Vec<i32>,
        out: &[f32],
        lse: &[f32],
        spec: backend::SparseAttention,
    ) {
        sparse_attention::backward(dq, dentries, dout, q, entries, chosen, out, lse, spec);
    }
    fn indexer_topk(
        &self,
        chosen: &mut Vec<i32>,
        q: &[f32],
        keys: &[f32],
        weights: &[f32],
        visible: &Vec<i32>,
        spec: backend::Indexer,
    ) {
        sparse_attention::indexer_topk(chosen, q, keys, weights, visible, spec);
    }
    fn pool_forward(
        &self,
        out: &mut [f32],
        kv: &[f32],
        gate: &[f32],
        ape: &[f32],
        slots: &Vec<i32>,
        spec: backend::Pooling,
    ) {
        pooling::forward(out, kv, gate, ape, slots, spec);
    }
    fn pool_backward(
        &self,
        dkv: &mut [f32],
        dgate: &mut [f32],
        dape: &mut [f32],
        dout: &[f32],
        kv: &[f32],
        gate: &[f32],
        ape: &[f32],
        slots: &Vec<i32>,
        spec: backend::Pooling,
    ) {
        pooling::backward(dkv, dgate, dape, dout, kv, gate, ape, slots, spec);
    }
    fn hc_weights_forward(
        &self,
        out: &mut [f32],
        mixes: &[f32],
        base: &[f32],
        scale: &[f32],
        spec: backend::HyperConnection,
    ) {
        hyper_connection::forward(out, mixes, base, scale, spec);
    }
    fn hc_weights_backward(
        &self,
        dmixes: &mut [f32],
        dbase: &mut [f32],
        dscale: &mut [f32],
        dout: &[f32],
        mixes: &[f32],
        base: &[f32],
        scale: &[f32],
        spec: backend::HyperConnection,
    ) {
        hyper_connection::backward(dmixes, dbase, dscale, dout, mixes, base, scale, spec);
    }

    fn moe_route_forward(
        &self,
        weights: &mut [f32],
        indices: &mut Vec<i32>,
        scores: &mut [f32],
        logits: &[f32],
        bias: &[f32],
        spec: backend::Routing,
    ) {
        moe_route::forward(weights, indices, scores, logits, bias, spec);
    }
    fn moe_route_backward(
        &self,
        dlogits: &mut [f32],
        dweights: &[f32],
        scores: &[f32],
        indices: &Vec<i32>,
        spec: backend::Routing,
    ) {
        moe_route::backward(dlogits, dweights, scores, indices, spec);
    }
    fn moe_dispatch(
        &self,
        order: &mut Vec<i32>,
        row_weights: &mut [f32],
        slot_rows: &mut Vec<i32>,
        indices: &Vec<i32>,
        weights: &[f32],
        experts: usize,
        top_k: usize,
    ) -> Vec<usize> {
        moe_dispatch::dispatch(order, row_weights, slot_rows, indices, weights, experts, top_k)
    }

    fn adamw(&self, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: backend::AdamW) {
        adamw::step(param, grad, m, v, hp);
    }
}
