//! `Backend` on one CUDA device: memory through the driver, products through cuBLAS
//! (`blas.rs`), everything else through kiln's kernels (`kernels/`). Work is queued on the
//! device's stream; only reads back to the host wait for it.

use crate::attention_tiling::{MmaLaunch, Tiling, MMA_THREADS};
use crate::compressed_on_host;
use crate::device::{args, Arg, Cuda};
use crate::memory::{Allocation, DeviceBuf, DeviceIndex, DeviceSlice};
use cudarc::driver::result;
use kiln_core::{
    AdamW, Attention, Backend, ColumnCopy, Cpu, DecodeAttention, GroupedMatmul, HyperConnection, Indexer, Matmul,
    Pooling, Precision, Rope, Routing, Scoring, SparseAttention,
};
use std::ops::Range;

/// Blocks of the f64 sum-of-squares partials: fixed, so the sum's order never changes.
const SUM_BLOCKS: usize = 256;

fn same_len(what: &str, a: usize, b: usize) {
    assert_eq!(a, b, "{what}: buffers of {a} and {b} values");
}

impl Cuda {
    fn upload_raw<T: Copy>(&self, ptr: u64, data: &[T]) {
        self.bind();
        // SAFETY: `ptr` holds at least `data.len()` values (checked by the callers); pageable
        // host memory is staged before the call returns.
        unsafe { result::memcpy_htod_async(ptr, data, self.stream().cu_stream()) }
            .unwrap_or_else(|e| panic!("CUDA: upload: {e}"));
    }

    fn download_raw<T: Copy + Default>(&self, ptr: u64, len: usize) -> Vec<T> {
        let mut out = vec![T::default(); len];
        self.bind();
        // SAFETY: `ptr` holds `len` values; the stream is synchronised before `out` is used.
        unsafe { result::memcpy_dtoh_async(&mut out, ptr, self.stream().cu_stream()) }
            .unwrap_or_else(|e| panic!("CUDA: download: {e}"));
        self.synchronize();
        out
    }
}

impl Backend for Cuda {
    type Slice = DeviceSlice;
    type Buf = DeviceBuf;
    type Index = DeviceIndex;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn native_bf16(&self) -> bool {
        true
    }
    fn max_decode_head_dim(&self) -> usize {
        MAX_HEAD_DIM
    }
    fn freeze_weights(&self) {
        crate::frozen_weights::freeze();
    }
    fn thaw_weights(&self) {
        crate::frozen_weights::thaw();
    }
    fn device(&self) -> String {
        self.describe().to_string()
    }
    fn peak_device_memory(&self) -> Option<u64> {
        Some(self.peak_memory())
    }
    fn synchronize(&self) {
        Cuda::synchronize(self);
    }

    // ---- memory -------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> DeviceBuf {
        let mut buf = DeviceBuf::new(self.stream(), len);
        self.fill(&mut buf, 0.0);
        buf
    }
    fn upload(&self, data: &[f32]) -> DeviceBuf {
        let buf = DeviceBuf::new(self.stream(), data.len());
        self.upload_raw(buf.ptr(), data);
        buf
    }
    fn write(&self, dst: &mut DeviceSlice, data: &[f32]) {
        same_len("write", dst.len(), data.len());
        self.upload_raw(dst.ptr(), data);
    }
    fn read(&self, src: &DeviceSlice) -> Vec<f32> {
        self.download_raw(src.ptr(), src.len())
    }
    fn len(&self, buf: &DeviceSlice) -> usize {
        buf.len()
    }
    fn slice<'a>(&self, buf: &'a DeviceSlice, range: Range<usize>) -> &'a DeviceSlice {
        buf.range(range)
    }
    fn slice_mut<'a>(&self, buf: &'a mut DeviceSlice, range: Range<usize>) -> &'a mut DeviceSlice {
        buf.range_mut(range)
    }
    fn split_at_mut<'a>(&self, buf: &'a mut DeviceSlice, mid: usize) -> (&'a mut DeviceSlice, &'a mut DeviceSlice) {
        buf.split_at_mut(mid)
    }
    fn upload_index(&self, data: &[i32]) -> DeviceIndex {
        let index = DeviceIndex::new(self.stream(), data.len());
        self.upload_raw(index.ptr(), data);
        index
    }
    fn write_index(&self, dst: &mut DeviceIndex, data: &[i32]) {
        same_len("write_index", dst.len(), data.len());
        self.upload_raw(dst.ptr(), data);
    }
    fn read_index(&self, src: &DeviceIndex) -> Vec<i32> {
        self.download_raw(src.ptr(), src.len())
    }
    fn fill(&self, dst: &mut DeviceSlice, value: f32) {
        let n = dst.len();
        self.launch_elements("fill", n, &args![dst, value, n]);
    }
    fn copy(&self, dst: &mut DeviceSlice, src: &DeviceSlice) {
        same_len("copy", dst.len(), src.len());
        self.bind();
        // SAFETY: both hold `len` values.
        unsafe { result::memcpy_dtod_async(dst.ptr(), src.ptr(), 4 * src.len(), self.stream().cu_stream()) }
            .unwrap_or_else(|e| panic!("CUDA: copy: {e}"));
    }
    fn copy_columns(&self, dst: &mut DeviceSlice, src: &DeviceSlice, spec: ColumnCopy) {
        let ColumnCopy { rows, cols, src_stride, src_offset, dst_stride, dst_offset, accumulate } = spec;
        assert!(
            src_offset + cols <= src_stride && dst_offset + cols <= dst_stride,
            "copy_columns: {cols} columns at offsets {src_offset}/{dst_offset} exceed strides {src_stride}/{dst_stride}"
        );
        same_len("copy_columns (source)", src.len(), rows * src_stride);
        same_len("copy_columns (destination)", dst.len(), rows * dst_stride);
        let a = args![dst, src, rows, cols, src_stride, src_offset, dst_stride, dst_offset, accumulate];
        self.launch_elements("copy_columns", rows * cols, &a);
    }
    fn add_assign(&self, dst: &mut DeviceSlice, src: &DeviceSlice) {
        same_len("add_assign", dst.len(), src.len());
        let n = dst.len();
        self.launch_elements("add_assign", n, &args![dst, src, n]);
    }
    fn scale(&self, dst: &mut DeviceSlice, s: f32) {
        let n = dst.len();
        self.launch_elements("scale", n, &args![dst, s, n]);
    }
    fn round_to_bf16(&self, x: &mut DeviceSlice) {
        let n = x.len();
        self.launch_elements("round_to_bf16", n, &args![x, n]);
    }
    fn muon_momentum(
        &self,
        update: &mut DeviceSlice,
        buf: &mut DeviceSlice,
        grad: &DeviceSlice,
        momentum: f64,
        nesterov: bool,
    ) {
        let n = grad.len();
        same_len("muon_momentum update", update.len(), n);
        same_len("muon_momentum buffer", buf.len(), n);
        let (rest, momentum) = ((1.0 - momentum) as f32, momentum as f32);
        self.launch_elements("muon_momentum", n, &args![update, buf, grad, n, rest, momentum, nesterov]);
    }
    fn sum_squares(&self, x: &DeviceSlice) -> f64 {
        let partial = Allocation::new(self.stream(), 8 * SUM_BLOCKS);
        self.launch("sum_squares_partial", SUM_BLOCKS, 256, &args![Arg::Ptr(partial.ptr()), x, x.len()]);
        self.download_raw::<f64>(partial.ptr(), SUM_BLOCKS).iter().sum()
    }

    // ---- linear algebra -----------------------------------------------------------------
    fn matmul(&self, c: &mut DeviceSlice, a: &DeviceSlice, b: &DeviceSlice, spec: Matmul) {
        let Matmul { m, n, k, batch, accumulate, .. } = spec;
        same_len("matmul A", a.len(), batch * m * k);
        same_len("matmul B", b.len(), batch * k * n);
        same_len("matmul C", c.len(), batch * m * n);
        if k == 0 && !accumulate {
            return self.fill(c, 0.0);
        }
        self.gemm(spec, a.ptr(), b.ptr(), c.ptr());
    }
    fn add_bias(&self, y: &mut DeviceSlice, bias: &DeviceSlice) {
        let (n, cols) = (y.len(), bias.len());
        assert!(cols > 0 && n.is_multiple_of(cols), "add_bias: {n} is not a multiple of {cols}");
        self.launch_elements("add_bias", n, &args![y, bias, n, cols]);
    }
    fn bias_backward(&self, dbias: &mut DeviceSlice, dy: &DeviceSlice) {
        let cols = dbias.len();
        assert!(cols > 0 && dy.len().is_multiple_of(cols), "bias_backward: {} is not a multiple of {cols}", dy.len());
        let rows = dy.len() / cols;
        self.launch_elements("bias_backward", cols, &args![dbias, dy, rows, cols]);
    }
    fn grouped_matmul(
        &self,
        c: &mut DeviceSlice,
        a: &DeviceSlice,
        b: &DeviceSlice,
        rows: &[usize],
        spec: GroupedMatmul,
    ) {
        let GroupedMatmul { n, k, trans_b, accumulate, precision } = spec;
        let total: usize = rows.iter().sum();
        same_len("grouped_matmul A", a.len(), total * k);
        same_len("grouped_matmul B", b.len(), rows.len() * n * k);
        same_len("grouped_matmul C", c.len(), total * n);
        let mut first = 0;
        for (g, &m) in rows.iter().enumerate() {
            if m > 0 {
                let (a, c) = (a.ptr() + 4 * (first * k) as u64, c.ptr() + 4 * (first * n) as u64);
                let b = b.ptr() + 4 * (g * n * k) as u64;
                let spec =
                    Matmul { m, n, k, trans_a: false, trans_b, batch: 1, accumulate, precision, b_is_weight: false };
                self.gemm(spec, a, b, c);
            }
            first += m;
        }
    }
    fn grouped_matmul_weight_grad(
        &self,
        db: &mut DeviceSlice,
        dc: &DeviceSlice,
        a: &DeviceSlice,
        rows: &[usize],
        spec: GroupedMatmul,
    ) {
        let GroupedMatmul { n, k, trans_b, precision, .. } = spec;
        let total: usize = rows.iter().sum();
        same_len("grouped_matmul_weight_grad A", a.len(), total * k);
        same_len("grouped_matmul_weight_grad dC", dc.len(), total * n);
        same_len("grouped_matmul_weight_grad dB", db.len(), rows.len() * n * k);
        let mut first = 0;
        for (g, &r) in rows.iter().enumerate() {
            if r > 0 {
                let (a, dc) = (a.ptr() + 4 * (first * k) as u64, dc.ptr() + 4 * (first * n) as u64);
                let db = db.ptr() + 4 * (g * n * k) as u64;
                // dB_g [n, k] = dC_gᵀ·A_g when B is stored transposed, else [k, n] = A_gᵀ·dC_g.
                let (m, cols, lhs, rhs) = if trans_b { (n, k, dc, a) } else { (k, n, a, dc) };
                let spec = Matmul {
                    m,
                    n: cols,
                    k: r,
                    trans_a: true,
                    trans_b: false,
                    batch: 1,
                    accumulate: true,
                    precision,
                    b_is_weight: false,
                };
                self.gemm(spec, lhs, rhs, db);
            }
            first += r;
        }
    }
    fn scale_rows(&self, x: &mut DeviceSlice, w: &DeviceSlice) {
        let (n, rows) = (x.len(), w.len());
        assert!(rows > 0 && n.is_multiple_of(rows), "scale_rows: {n} values do not split into {rows} rows");
        self.launch_elements("scale_rows", n, &args![x, w, n, n / rows]);
    }
    fn row_dot(&self, out: &mut DeviceSlice, a: &DeviceSlice, b: &DeviceSlice) {
        let rows = out.len();
        assert!(a.len() == b.len() && rows > 0 && a.len().is_multiple_of(rows), "row_dot: shape mismatch");
        let cols = a.len() / rows;
        self.launch_rows("row_dot", rows, &args![out, a, b, cols]);
    }

    // ---- embedding ----------------------------------------------------------------------
    fn embedding_forward(&self, out: &mut DeviceSlice, table: &DeviceSlice, ids: &DeviceIndex, dim: usize) {
        let tokens = ids.len();
        same_len("embedding_forward", out.len(), tokens * dim);
        let rows = table.len() / dim;
        self.launch_elements("embedding_forward", tokens * dim, &args![out, table, ids, tokens, dim, rows]);
    }
    fn embedding_backward(&self, dtable: &mut DeviceSlice, dout: &DeviceSlice, ids: &DeviceIndex, dim: usize) {
        let tokens = ids.len();
        same_len("embedding_backward", dout.len(), tokens * dim);
        let rows = dtable.len() / dim;
        self.launch_elements("embedding_backward", dim, &args![dtable, dout, ids, tokens, dim, rows]);
    }
    fn scatter_rows(
        &self,
        dst: &mut DeviceSlice,
        src: &DeviceSlice,
        rows: &DeviceIndex,
        dim: usize,
        storage: Precision,
    ) {
        let tokens = rows.len();
        same_len("scatter_rows", src.len(), tokens * dim);
        let kernel = match storage {
            Precision::F32 => "scatter_rows_f32",
            Precision::Bf16 => {
                assert!(dim.is_multiple_of(2), "scatter_rows: bf16 rows of {dim} values do not fill whole words");
                "scatter_rows_bf16"
            }
        };
        let dst_rows = dst.len() / storage.words(dim).max(1);
        self.launch_elements(kernel, tokens * dim, &args![dst, src, rows, tokens, dim, dst_rows]);
    }

    // ---- normalisation ------------------------------------------------------------------
    fn rmsnorm_forward(&self, y: &mut DeviceSlice, rstd: &mut DeviceSlice, x: &DeviceSlice, w: &DeviceSlice, eps: f32) {
        let (d, rows) = (w.len(), rstd.len());
        same_len("rmsnorm_forward", x.len(), rows * d);
        same_len("rmsnorm_forward", y.len(), x.len());
        self.launch_rows("rmsnorm_forward", rows, &args![y, rstd, x, w, d, eps]);
    }
    fn add_rmsnorm_forward(
        &self,
        x: &mut DeviceSlice,
        delta: &DeviceSlice,
        y: &mut DeviceSlice,
        rstd: &mut DeviceSlice,
        w: &DeviceSlice,
        eps: f32,
    ) {
        let (d, rows) = (w.len(), rstd.len());
        same_len("add_rmsnorm_forward", x.len(), rows * d);
        same_len("add_rmsnorm_forward", delta.len(), x.len());
        same_len("add_rmsnorm_forward", y.len(), x.len());
        self.launch_rows("add_rmsnorm_forward", rows, &args![x, delta, y, rstd, w, d, eps]);
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut DeviceSlice,
        dw: &mut DeviceSlice,
        dy: &DeviceSlice,
        x: &DeviceSlice,
        w: &DeviceSlice,
        rstd: &DeviceSlice,
    ) {
        let (d, rows) = (w.len(), rstd.len());
        for (what, len) in [("dx", dx.len()), ("dy", dy.len()), ("x", x.len())] {
            same_len(&format!("rmsnorm_backward {what}"), len, rows * d);
        }
        same_len("rmsnorm_backward dw", dw.len(), d);
        self.launch_rows("rmsnorm_backward_dx", rows, &args![dx, dy, x, w, rstd, d]);
        self.launch_elements("rmsnorm_backward_dw", d, &args![dw, dy, x, rstd, rows, d]);
    }

    // ---- rotary embedding ---------------------------------------------------------------
    fn rope_forward(&self, x: &mut DeviceSlice, table: &DeviceSlice, positions: &DeviceIndex, spec: Rope) {
        self.rope(x, table, positions, spec, 1.0);
    }
    fn rope_backward(&self, dx: &mut DeviceSlice, table: &DeviceSlice, positions: &DeviceIndex, spec: Rope) {
        self.rope(dx, table, positions, spec, -1.0);
    }

    // ---- attention ----------------------------------------------------------------------
    fn attention_forward(
        &self,
        out: &mut DeviceSlice,
        lse: &mut DeviceSlice,
        q: &DeviceSlice,
        k: &DeviceSlice,
        v: &DeviceSlice,
        segments: &DeviceIndex,
        spec: Attention,
    ) {
        check_attention(&spec, q, k, v, out, segments);
        same_len("attention lse", lse.len(), spec.batch * spec.q_heads * spec.seq);
        if self.tensor_core_attention(&spec) {
            let a = [args![out, lse, q, k, v, segments].as_slice(), &attention_shape_args(&spec)].concat();
            self.launch_mma("attention_forward_bf16", MmaLaunch::forward(&spec), &a);
            return;
        }
        let tiling = Tiling::query_rows(&spec, false);
        let a = [args![out, lse, q, k, v, segments].as_slice(), &attention_args(&spec, &tiling)].concat();
        self.launch_tiled("attention_forward", &tiling, &a);
    }
    fn attention_backward(
        &self,
        dq: &mut DeviceSlice,
        dk: &mut DeviceSlice,
        dv: &mut DeviceSlice,
        dout: &DeviceSlice,
        q: &DeviceSlice,
        k: &DeviceSlice,
        v: &DeviceSlice,
        out: &DeviceSlice,
        lse: &DeviceSlice,
        segments: &DeviceIndex,
        spec: Attention,
    ) {
        check_attention(&spec, q, k, v, out, segments);
        same_len("attention dq", dq.len(), q.len());
        same_len("attention dk", dk.len(), k.len());
        same_len("attention dv", dv.len(), v.len());
        same_len("attention dout", dout.len(), out.len());
        let delta = DeviceBuf::new(self.stream(), lse.len());
        if self.tensor_core_attention(&spec) {
            let shape = attention_shape_args(&spec);
            let a = [args![dq, &*delta, dout, q, k, v, out, lse, segments].as_slice(), &shape].concat();
            self.launch_mma("attention_backward_dq_bf16", MmaLaunch::dq(&spec), &a);
            let a = [args![dk, dv, dout, q, k, v, lse, &*delta, segments].as_slice(), &shape].concat();
            self.launch_mma("attention_backward_dkdv_bf16", MmaLaunch::dkdv(&spec), &a);
            return;
        }
        let tiling = Tiling::query_rows(&spec, true);
        let a = [args![dq, &*delta, dout, q, k, v, out, lse, segments].as_slice(), &attention_args(&spec, &tiling)]
            .concat();
        self.launch_tiled("attention_backward_dq", &tiling, &a);
        let tiling = Tiling::key_rows(&spec);
        let a =
            [args![dk, dv, dout, q, k, v, lse, &*delta, segments].as_slice(), &attention_args(&spec, &tiling)].concat();
        self.launch_tiled("attention_backward_dkdv", &tiling, &a);
    }
    fn attention_sinks_forward(
        &self,
        out: &mut DeviceSlice,
        lse: &mut DeviceSlice,
        sinks: &DeviceSlice,
        spec: Attention,
    ) {
        check_sinks(out, lse, sinks, &spec);
        let a = args![out, lse, sinks, spec.tokens(), spec.seq as i32, spec.q_heads as i32, spec.v_head_dim as i32];
        self.launch_elements("attention_sinks_forward", spec.tokens() * spec.q_heads, &a);
    }
    fn attention_sinks_backward(
        &self,
        dsinks: &mut DeviceSlice,
        dout: &DeviceSlice,
        out: &DeviceSlice,
        lse: &DeviceSlice,
        sinks: &DeviceSlice,
        spec: Attention,
    ) {
        check_sinks(out, lse, sinks, &spec);
        same_len("attention_sinks_backward dout", dout.len(), out.len());
        same_len("attention_sinks_backward dsinks", dsinks.len(), sinks.len());
        let (seq, heads, dv) = (spec.seq as i32, spec.q_heads as i32, spec.v_head_dim as i32);
        let a = args![dsinks, dout, out, lse, sinks, spec.tokens(), seq, heads, dv];
        self.launch("attention_sinks_backward", spec.q_heads, 256, &a);
    }
    fn attention_merge(
        &self,
        out: &mut DeviceSlice,
        lse: &mut DeviceSlice,
        other_out: &DeviceSlice,
        other_lse: &DeviceSlice,
        spec: Attention,
    ) {
        same_len("attention_merge out", out.len(), spec.tokens() * spec.q_heads * spec.v_head_dim);
        same_len("attention_merge lse", lse.len(), spec.tokens() * spec.q_heads);
        same_len("attention_merge other_out", other_out.len(), out.len());
        same_len("attention_merge other_lse", other_lse.len(), lse.len());
        let a = args![
            out,
            lse,
            other_out,
            other_lse,
            spec.tokens(),
            spec.seq as i32,
            spec.q_heads as i32,
            spec.v_head_dim as i32
        ];
        self.launch_elements("attention_merge", spec.tokens() * spec.q_heads, &a);
    }
    fn sparse_attention_forward(
        &self,
        out: &mut DeviceSlice,
        lse: &mut DeviceSlice,
        q: &DeviceSlice,
        entries: &DeviceSlice,
        chosen: &DeviceIndex,
        spec: SparseAttention,
    ) {
        compressed_on_host::sparse_attention_forward(self, out, lse, q, entries, chosen, spec);
    }
    fn sparse_attention_backward(
        &self,
        dq: &mut DeviceSlice,
        dentries: &mut DeviceSlice,
        dout: &DeviceSlice,
        q: &DeviceSlice,
        entries: &DeviceSlice,
        chosen: &DeviceIndex,
        out: &DeviceSlice,
        lse: &DeviceSlice,
        spec: SparseAttention,
    ) {
        compressed_on_host::sparse_attention_backward(self, dq, dentries, dout, q, entries, chosen, out, lse, spec);
    }
    fn indexer_topk(
        &self,
        chosen: &mut DeviceIndex,
        q: &DeviceSlice,
        keys: &DeviceSlice,
        weights: &DeviceSlice,
        visible: &DeviceIndex,
        spec: Indexer,
    ) {
        compressed_on_host::indexer_topk(self, chosen, q, keys, weights, visible, spec);
    }
    fn pool_forward(
        &self,
        out: &mut DeviceSlice,
        kv: &DeviceSlice,
        gate: &DeviceSlice,
        ape: &DeviceSlice,
        slots: &DeviceIndex,
        spec: Pooling,
    ) {
        compressed_on_host::pool_forward(self, out, kv, gate, ape, slots, spec);
    }
    fn pool_backward(
        &self,
        dkv: &mut DeviceSlice,
        dgate: &mut DeviceSlice,
        dape: &mut DeviceSlice,
        dout: &DeviceSlice,
        kv: &DeviceSlice,
        gate: &DeviceSlice,
        ape: &DeviceSlice,
        slots: &DeviceIndex,
        spec: Pooling,
    ) {
        compressed_on_host::pool_backward(self, dkv, dgate, dape, dout, kv, gate, ape, slots, spec);
    }
    fn attention_decode(
        &self,
        out: &mut DeviceSlice,
        q: &DeviceSlice,
        k_cache: &DeviceSlice,
        v_cache: &DeviceSlice,
        starts: &DeviceIndex,
        lengths: &DeviceIndex,
        spec: DecodeAttention,
    ) {
        let DecodeAttention { queries, q_heads, kv_heads, head_dim, v_head_dim, scale, window, cache } = spec;
        assert!(
            kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
            "attention_decode: q heads must be a multiple of kv heads"
        );
        assert!(head_dim.max(v_head_dim) <= MAX_HEAD_DIM, "attention_decode: head dim above {MAX_HEAD_DIM}");
        same_len("attention_decode q", q.len(), queries * q_heads * head_dim);
        same_len("attention_decode out", out.len(), queries * q_heads * v_head_dim);
        assert!(
            starts.len() == 2 * queries && lengths.len() == 2 * queries,
            "attention_decode: two starts and lengths per query"
        );
        let kernel = match cache {
            Precision::F32 => "attention_decode_f32",
            Precision::Bf16 => "attention_decode_bf16",
        };
        let a = args![
            out,
            q,
            k_cache,
            v_cache,
            starts,
            lengths,
            queries,
            q_heads as i32,
            kv_heads as i32,
            head_dim as i32,
            v_head_dim as i32,
            scale,
            window.unwrap_or(0)
        ];
        self.launch_warps(kernel, queries * q_heads, &a);
    }

    // ---- feed-forward -------------------------------------------------------------------
    fn swiglu_forward(&self, h: &mut DeviceSlice, gate: &DeviceSlice, up: &DeviceSlice, limit: f32) {
        same_len("swiglu_forward", h.len(), gate.len());
        same_len("swiglu_forward", h.len(), up.len());
        let n = h.len();
        self.launch_elements("swiglu_forward", n, &args![h, gate, up, n, limit]);
    }
    fn swiglu_backward(
        &self,
        dgate: &mut DeviceSlice,
        dup: &mut DeviceSlice,
        dh: &DeviceSlice,
        gate: &DeviceSlice,
        up: &DeviceSlice,
        limit: f32,
    ) {
        let n = dh.len();
        for len in [dgate.len(), dup.len(), gate.len(), up.len()] {
            same_len("swiglu_backward", len, n);
        }
        self.launch_elements("swiglu_backward", n, &args![dgate, dup, dh, gate, up, n, limit]);
    }

    // ---- loss ---------------------------------------------------------------------------
    fn cross_entropy_forward(
        &self,
        nll: &mut DeviceSlice,
        correct: &mut DeviceSlice,
        logits: &DeviceSlice,
        targets: &DeviceIndex,
        vocab: usize,
    ) {
        let rows = nll.len();
        assert!(
            logits.len() == rows * vocab && targets.len() == rows && correct.len() == rows,
            "cross_entropy_forward: shape mismatch"
        );
        self.launch("cross_entropy_forward", rows, 1024, &args![nll, correct, logits, targets, vocab]);
    }
    fn cross_entropy_backward(
        &self,
        logits: &mut DeviceSlice,
        nll: &mut DeviceSlice,
        correct: &mut DeviceSlice,
        targets: &DeviceIndex,
        weights: &DeviceSlice,
        vocab: usize,
    ) {
        let rows = nll.len();
        assert!(
            logits.len() == rows * vocab && targets.len() == rows && weights.len() == rows && correct.len() == rows,
            "cross_entropy_backward: shape mismatch"
        );
        self.launch("cross_entropy_backward", rows, 1024, &args![logits, nll, correct, targets, weights, vocab]);
    }
    fn reverse_kl_backward(
        &self,
        logits: &mut DeviceSlice,
        kl: &mut DeviceSlice,
        teacher: &DeviceSlice,
        weights: &DeviceSlice,
        vocab: usize,
    ) {
        let rows = kl.len();
        assert!(
            logits.len() == rows * vocab && teacher.len() == rows * vocab && weights.len() == rows,
            "reverse_kl_backward: shape mismatch"
        );
        self.launch("reverse_kl_backward", rows, 1024, &args![logits, kl, teacher, weights, vocab]);
    }
    fn vocab_block_stats(
        &self,
        stats: &mut DeviceSlice,
        logits: &DeviceSlice,
        targets: &DeviceIndex,
        vocab: usize,
        first: usize,
    ) {
        let rows = targets.len();
        assert!(logits.len() == rows * vocab && stats.len() == rows * 3, "vocab_block_stats: shape mismatch");
        self.launch("vocab_block_stats", rows, 1024, &args![stats, logits, targets, vocab, first]);
    }
    fn cross_entropy_block_backward(
        &self,
        logits: &mut DeviceSlice,
        lse: &DeviceSlice,
        targets: &DeviceIndex,
        weights: &DeviceSlice,
        vocab: usize,
        first: usize,
    ) {
        let rows = targets.len();
        assert!(
            logits.len() == rows * vocab && lse.len() == rows * 2 && weights.len() == rows,
            "cross_entropy_block_backward: shape mismatch"
        );
        self.launch("cross_entropy_block_backward", rows, 1024, &args![logits, lse, targets, weights, vocab, first]);
    }
    fn reverse_kl_block_forward(
        &self,
        kl: &mut DeviceSlice,
        logits: &DeviceSlice,
        teacher: &DeviceSlice,
        lse: &DeviceSlice,
        vocab: usize,
    ) {
        let rows = kl.len();
        assert!(
            logits.len() == rows * vocab && teacher.len() == rows * vocab && lse.len() == rows * 4,
            "reverse_kl_block_forward: shape mismatch"
        );
        self.launch("reverse_kl_block_forward", rows, 1024, &args![kl, logits, teacher, lse, vocab]);
    }
    fn reverse_kl_block_backward(
        &self,
        logits: &mut DeviceSlice,
        teacher: &DeviceSlice,
        lse: &DeviceSlice,
        kl: &DeviceSlice,
        weights: &DeviceSlice,
        vocab: usize,
    ) {
        let rows = kl.len();
        assert!(
            logits.len() == rows * vocab
                && teacher.len() == rows * vocab
                && lse.len() == rows * 4
                && weights.len() == rows,
            "reverse_kl_block_backward: shape mismatch"
        );
        self.launch("reverse_kl_block_backward", rows, 1024, &args![logits, teacher, lse, kl, weights, vocab]);
    }

    // ---- mixture of experts -------------------------------------------------------------
    fn hc_weights_forward(
        &self,
        out: &mut DeviceSlice,
        mixes: &DeviceSlice,
        base: &DeviceSlice,
        scale: &DeviceSlice,
        spec: HyperConnection,
    ) {
        check_hyper_connection(&spec, out, mixes, base, scale);
        let a = [args![out, mixes, base, scale].as_slice(), &hc_args(&spec)].concat();
        self.launch_elements("hc_weights_forward", spec.tokens, &a);
    }
    fn hc_weights_backward(
        &self,
        dmixes: &mut DeviceSlice,
        dbase: &mut DeviceSlice,
        dscale: &mut DeviceSlice,
        dout: &DeviceSlice,
        mixes: &DeviceSlice,
        base: &DeviceSlice,
        scale: &DeviceSlice,
        spec: HyperConnection,
    ) {
        check_hyper_connection(&spec, dout, mixes, base, scale);
        same_len("hc_weights dmixes", dmixes.len(), mixes.len());
        same_len("hc_weights dbase", dbase.len(), base.len());
        same_len("hc_weights dscale", dscale.len(), scale.len());
        let (width, head) = (spec.width(), spec.head);
        let a = [args![&*dmixes, dout, mixes, base, scale].as_slice(), &hc_args(&spec)].concat();
        self.launch_elements("hc_weights_backward_z", spec.tokens, &a);
        let terms = DeviceBuf::new(self.stream(), width);
        self.launch(
            "hc_weights_backward_sums",
            width,
            256,
            &args![dbase, &*terms, &*dmixes, mixes, spec.tokens, width as i32],
        );
        self.launch("hc_weights_backward_scale", 1, 32, &args![dscale, &*terms, spec.streams as i32, head]);
        let a = args![dmixes, scale, spec.tokens, spec.streams as i32, head];
        self.launch_elements("hc_weights_backward_mixes", spec.tokens * width, &a);
    }

    fn moe_route_forward(
        &self,
        weights: &mut DeviceSlice,
        indices: &mut DeviceIndex,
        scores: &mut DeviceSlice,
        logits: &DeviceSlice,
        bias: &DeviceSlice,
        spec: Routing,
    ) {
        let Routing { scoring, fixed, tokens, experts, top_k, groups, top_groups, normalize, scale } = spec;
        check_routing(&spec);
        assert!(logits.len() == tokens * experts && scores.len() == logits.len() && (fixed || bias.len() == experts));
        assert!(
            weights.len() == tokens * top_k && indices.len() == tokens * top_k,
            "moe_route: outputs must be [tokens, top_k]"
        );
        let a = args![
            weights,
            indices,
            scores,
            logits,
            bias,
            tokens,
            experts as i32,
            top_k as i32,
            groups as i32,
            top_groups as i32,
            normalize,
            scale,
            scoring_code(scoring),
            fixed
        ];
        self.launch_elements("moe_route_forward", tokens, &a);
    }
    fn moe_route_backward(
        &self,
        dlogits: &mut DeviceSlice,
        dweights: &DeviceSlice,
        scores: &DeviceSlice,
        indices: &DeviceIndex,
        spec: Routing,
    ) {
        let Routing { scoring, tokens, experts, top_k, normalize, scale, .. } = spec;
        assert!(dlogits.len() == tokens * experts && scores.len() == dlogits.len());
        assert!(
            dweights.len() == tokens * top_k && indices.len() == tokens * top_k,
            "moe_route_backward: [tokens, top_k] expected"
        );
        let a = args![
            dlogits,
            dweights,
            scores,
            indices,
            tokens,
            experts as i32,
            top_k as i32,
            normalize,
            scale,
            scoring_code(scoring)
        ];
        self.launch_elements("moe_route_backward", tokens, &a);
    }
    /// The counting sort runs on the host (the slots are a few bytes per token and the group
    /// sizes must come back anyway); a device sort is left for when profiles ask for it.
    fn moe_dispatch(
        &self,
        order: &mut DeviceIndex,
        row_weights: &mut DeviceSlice,
        slot_rows: &mut DeviceIndex,
        indices: &DeviceIndex,
        weights: &DeviceSlice,
        experts: usize,
        top_k: usize,
    ) -> Vec<usize> {
        let (host_indices, host_weights) = (self.read_index(indices), self.read(weights));
        let slots = host_indices.len();
        let (mut o, mut w, mut s) = (vec![0i32; slots], vec![0f32; slots], vec![0i32; slots]);
        let rows = Cpu.moe_dispatch(&mut o, &mut w, &mut s, &host_indices, &host_weights, experts, top_k);
        self.write_index(order, &o);
        self.write(row_weights, &w);
        self.write_index(slot_rows, &s);
        rows
    }

    // ---- optimiser ----------------------------------------------------------------------
    fn adamw(&self, param: &mut DeviceSlice, grad: &DeviceSlice, m: &mut DeviceSlice, v: &mut DeviceSlice, hp: AdamW) {
        let n = param.len();
        for len in [grad.len(), m.len(), v.len()] {
            same_len("adamw", len, n);
        }
        assert!(hp.step >= 1, "adamw: step counts from 1");
        let t = hp.step as i32;
        let step_size = hp.lr / (1.0 - hp.beta1.powi(t));
        let bc2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let a = args![param, grad, m, v, n, hp.beta1, hp.beta2, hp.eps, step_size, bc2_sqrt, decay];
        self.launch_elements("adamw", n, &a);
    }
}

/// The largest head dimension the attention kernels hold in registers.
const MAX_HEAD_DIM: usize = 256;

fn check_attention(
    spec: &Attention,
    q: &DeviceSlice,
    k: &DeviceSlice,
    v: &DeviceSlice,
    out: &DeviceSlice,
    segments: &DeviceIndex,
) {
    let Attention { q_heads, kv_heads, head_dim, v_head_dim, .. } = *spec;
    let t = spec.tokens();
    assert!(kv_heads > 0 && q_heads.is_multiple_of(kv_heads), "attention: q heads must be a multiple of kv heads");
    assert!(head_dim.max(v_head_dim) <= MAX_HEAD_DIM, "attention: head dim above {MAX_HEAD_DIM}");
    same_len("attention q", q.len(), t * q_heads * head_dim);
    same_len("attention k", k.len(), t * kv_heads * head_dim);
    same_len("attention v", v.len(), t * kv_heads * v_head_dim);
    same_len("attention out", out.len(), t * q_heads * v_head_dim);
    same_len("attention segments", segments.len(), t);
}

/// The most streams hyper_connection.cu holds per thread.
const HC_MAX_STREAMS: usize = 8;

fn check_hyper_connection(
    spec: &HyperConnection,
    out: &DeviceSlice,
    mixes: &DeviceSlice,
    base: &DeviceSlice,
    scale: &DeviceSlice,
) {
    assert!(
        (1..=HC_MAX_STREAMS).contains(&spec.streams) && spec.iters >= 1,
        "hc_weights: {spec:?} (at most {HC_MAX_STREAMS} streams on CUDA)"
    );
    same_len("hc_weights out", out.len(), spec.tokens * spec.width());
    same_len("hc_weights mixes", mixes.len(), spec.tokens * spec.width());
    same_len("hc_weights base", base.len(), spec.width());
    same_len("hc_weights scale", scale.len(), spec.scales());
}

/// The `HC_ARGS` of hyper_connection.cu.
fn hc_args(spec: &HyperConnection) -> [Arg; 5] {
    args![spec.tokens, spec.streams as i32, spec.iters as i32, spec.eps, spec.head]
}

/// The shape arguments both attention kernel files take: attention_mma.cu's
/// `MMA_ATTENTION_ARGS`, and the first part of attention.cu's `ATTENTION_ARGS`.
fn attention_shape_args(spec: &Attention) -> [Arg; 8] {
    args![
        spec.batch,
        spec.seq,
        spec.q_heads as i32,
        spec.kv_heads as i32,
        spec.head_dim as i32,
        spec.v_head_dim as i32,
        spec.scale,
        spec.window.unwrap_or(0)
    ]
}

/// attention.cu's `ATTENTION_ARGS`: the shape, then the tiling.
fn attention_args(spec: &Attention, tiling: &Tiling) -> Vec<Arg> {
    let tiling = args![tiling.positions as i32, tiling.heads as i32, tiling.tile as i32];
    [attention_shape_args(spec).as_slice(), &tiling].concat()
}

fn check_sinks(out: &DeviceSlice, lse: &DeviceSlice, sinks: &DeviceSlice, spec: &Attention) {
    same_len("attention_sinks out", out.len(), spec.tokens() * spec.q_heads * spec.v_head_dim);
    same_len("attention_sinks lse", lse.len(), spec.tokens() * spec.q_heads);
    same_len("attention_sinks sinks", sinks.len(), spec.q_heads);
}

/// `moe_route.cu`'s code of a scoring function.
fn scoring_code(scoring: Scoring) -> i32 {
    match scoring {
        Scoring::Sigmoid => 0,
        Scoring::SqrtSoftplus => 1,
    }
}

fn check_routing(spec: &Routing) {
    let Routing { experts, top_k, groups, top_groups, .. } = *spec;
    assert!(
        groups > 0 && experts.is_multiple_of(groups),
        "moe_route: {experts} experts do not split into {groups} groups"
    );
    assert!(top_groups <= groups && top_groups > 0, "moe_route: top_groups {top_groups} of {groups} groups");
    assert!(experts / groups >= 2, "moe_route: groups need at least two experts (their score sums the best two)");
    assert!(
        top_k <= top_groups * (experts / groups),
        "moe_route: top_k {top_k} exceeds the experts of the kept groups"
    );
    assert!(experts <= 512 && groups <= 64, "moe_route: at most 512 experts in 64 groups on CUDA");
}

impl Cuda {
    /// Whether `spec` runs on attention_mma.cu's tensor-core kernels (else attention.cu's).
    fn tensor_core_attention(&self, spec: &Attention) -> bool {
        self.bf16_tensor_cores() && MmaLaunch::applies(spec)
    }

    fn launch_mma(&self, name: &str, launch: MmaLaunch, args: &[crate::device::Arg]) {
        self.launch_shared(name, launch.blocks, MMA_THREADS, launch.shared_bytes, args);
    }

    fn rope(&self, x: &mut DeviceSlice, table: &DeviceSlice, positions: &DeviceIndex, spec: Rope, sign: f32) {
        let Rope { x: heads, rot_dim, offset, interleaved } = spec;
        assert!(
            offset + rot_dim <= heads.head_dim && rot_dim.is_multiple_of(2),
            "rope: rot_dim {rot_dim} at offset {offset} invalid for head_dim {}",
            heads.head_dim
        );
        same_len("rope", x.len(), heads.tokens * heads.heads * heads.head_dim);
        same_len("rope positions", positions.len(), heads.tokens);
        let table_rows = table.len() / rot_dim.max(1);
        let a = args![
            x,
            table,
            positions,
            heads.tokens,
            heads.heads,
            heads.head_dim,
            rot_dim,
            offset,
            interleaved,
            table_rows,
            sign
        ];
        self.launch_elements("rope", heads.tokens * heads.heads * rot_dim / 2, &a);
    }
}
