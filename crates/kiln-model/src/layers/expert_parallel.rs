//! Expert parallel: each of the `K` ranks of an expert group holds `experts / K` of every MoE
//! layer's routed experts, a contiguous range. A layer's dispatched rows are sorted by expert,
//! so the rows for rank r's experts are one contiguous block: one all-to-all sends each block
//! to its rank, the experts run there, and a second all-to-all brings their outputs back in the
//! sender's order. Backward moves the output gradients the same way out and the input
//! gradients back.
//!
//!   sent to rank r:     rows of experts [r·E/K, (r+1)·E/K)
//!   received:           source-major (rank 0's rows, rank 1's, ...), each source expert-sorted
//!   computed:           expert-major (each local expert's rows from every source together),
//!                       so each expert is still one matrix product

use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::sync::Arc;

/// The group of ranks that share out the routed experts; its collectives move the backend's
/// buffers directly.
pub struct ExpertParallel<B: Backend> {
    pub group: Arc<dyn Comm<B::Slice>>,
}

impl<B: Backend> Clone for ExpertParallel<B> {
    fn clone(&self) -> Self {
        Self { group: Arc::clone(&self.group) }
    }
}

impl<B: Backend> ExpertParallel<B> {
    /// The routed experts (of `experts`) this rank holds.
    pub fn local(&self, experts: usize) -> Range<usize> {
        kiln_dist::shard(experts, self.group.rank(), self.group.size())
    }
}

/// One layer's exchange for one batch: how many rows went to and came from each rank, and
/// the regrouping between source-major and expert-major order.
pub struct Exchange<B: Backend> {
    group: Arc<dyn Comm<B::Slice>>,
    layer: usize,
    send_rows: Vec<usize>,
    recv_rows: Vec<usize>,
    /// Rows per local expert, from every source together.
    pub local_rows: Vec<usize>,
    /// Expert-major row → source-major row, and the inverse.
    to_experts: B::Index,
    to_sources: B::Index,
}

fn times(counts: &[usize], width: usize) -> Vec<usize> {
    counts.iter().map(|&c| c * width).collect()
}

fn must<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("expert parallel: {e:#}"))
}

impl<B: Backend> Exchange<B> {
    /// Agrees with the group on the rows of layer `layer`: `rows[e]` of this rank's dispatched
    /// rows go to expert `e` (every expert of the layer).
    pub fn new(b: &B, ep: &ExpertParallel<B>, layer: usize, rows: &[usize]) -> Self {
        let k = ep.group.size();
        let per = rows.len() / k;
        // Row counts per expert, to the rank holding it.
        let send: Vec<u64> = rows.iter().map(|&r| r as u64).collect();
        let mut recv = vec![0u64; per * k];
        must(ep.group.all_to_all_u64(&send, &mut recv, &format!("MoE layer {layer}: expert row counts")));
        let counts: Vec<usize> = recv.iter().map(|&c| c as usize).collect();
        let send_rows = rows.chunks(per).map(|c| c.iter().sum()).collect();
        let recv_rows: Vec<usize> = counts.chunks(per).map(|c| c.iter().sum()).collect();
        let local_rows = (0..per).map(|e| (0..k).map(|s| counts[s * per + e]).sum()).collect();

        // Where each (source, expert) block starts in source-major order.
        let mut start = vec![0usize; k * per];
        let mut at = 0;
        for (i, c) in counts.iter().enumerate() {
            start[i] = at;
            at += c;
        }
        let mut to_experts = Vec::with_capacity(at);
        for e in 0..per {
            for s in 0..k {
                let first = start[s * per + e];
                to_experts.extend((first..first + counts[s * per + e]).map(|r| r as i32));
            }
        }
        let mut to_sources = vec![0i32; at];
        for (expert_row, &source_row) in to_experts.iter().enumerate() {
            to_sources[source_row as usize] = expert_row as i32;
        }
        Self {
            group: Arc::clone(&ep.group),
            layer,
            send_rows,
            recv_rows,
            local_rows,
            to_experts: b.upload_index(&to_experts),
            to_sources: b.upload_index(&to_sources),
        }
    }

    /// Rows this rank's experts compute.
    pub fn rows(&self) -> usize {
        self.recv_rows.iter().sum()
    }

    /// This rank's dispatched rows `x` (`[Σ sent, width]`, expert-sorted) → the rows of its own
    /// experts from every rank, expert-major (`[rows(), width]`).
    pub fn to_experts(&self, b: &B, x: &B::Slice, width: usize, what: &str) -> B::Buf {
        let mut source_major = b.zeros(self.rows() * width);
        let (sc, rc) = (times(&self.send_rows, width), times(&self.recv_rows, width));
        let what = format!("MoE layer {}: {what}", self.layer);
        must(self.group.all_to_allv(x, &sc, &mut source_major, &rc, &what));
        let mut out = b.zeros(self.rows() * width);
        b.embedding_forward(&mut out, &source_major, &self.to_experts, width);
        out
    }

    /// The inverse of `to_experts`: expert-major rows `y` → each rank's own dispatched rows,
    /// written into `out` (`[Σ sent, width]`).
    pub fn to_sources(&self, b: &B, y: &B::Slice, out: &mut B::Slice, width: usize, what: &str) {
        let mut source_major = b.zeros(self.rows() * width);
        b.embedding_forward(&mut source_major, y, &self.to_sources, width);
        let (sc, rc) = (times(&self.recv_rows, width), times(&self.send_rows, width));
        let what = format!("MoE layer {}: {what}", self.layer);
        must(self.group.all_to_allv(&source_major, &sc, out, &rc, &what));
    }
}
