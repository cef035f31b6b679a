//! DeepSeek-V4's compressed-attention operations (compressor pooling, the lightning indexer and
//! attention over chosen entries) run on the host: the device buffers are copied over, the CPU
//! backend computes, the results are copied back. Correct on CUDA today; device kernels replace
//! these when a GPU profile says they matter (the merge of two attentions has one already).

use crate::device::Cuda;
use crate::memory::{DeviceIndex, DeviceSlice};
use kiln_core::{Backend, Cpu, Indexer, Pooling, SparseAttention};

pub(crate) fn sparse_attention_forward(
    c: &Cuda,
    out: &mut DeviceSlice,
    lse: &mut DeviceSlice,
    q: &DeviceSlice,
    entries: &DeviceSlice,
    chosen: &DeviceIndex,
    spec: SparseAttention,
) {
    let (mut o, mut l) = (vec![0.0; c.len(out)], vec![0.0; c.len(lse)]);
    Cpu.sparse_attention_forward(&mut o, &mut l, &c.read(q), &c.read(entries), &c.read_index(chosen), spec);
    c.write(out, &o);
    c.write(lse, &l);
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_attention_backward(
    c: &Cuda,
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
    let (mut g_q, mut g_e) = (vec![0.0; c.len(dq)], vec![0.0; c.len(dentries)]);
    let (dout, q, entries, chosen) = (c.read(dout), c.read(q), c.read(entries), c.read_index(chosen));
    Cpu.sparse_attention_backward(&mut g_q, &mut g_e, &dout, &q, &entries, &chosen, &c.read(out), &c.read(lse), spec);
    c.write(dq, &g_q);
    c.write(dentries, &g_e);
}

pub(crate) fn indexer_topk(
    c: &Cuda,
    chosen: &mut DeviceIndex,
    q: &DeviceSlice,
    keys: &DeviceSlice,
    weights: &DeviceSlice,
    visible: &DeviceIndex,
    spec: Indexer,
) {
    let mut picks = vec![0; spec.tokens * spec.top_k];
    Cpu.indexer_topk(&mut picks, &c.read(q), &c.read(keys), &c.read(weights), &c.read_index(visible), spec);
    c.write_index(chosen, &picks);
}

pub(crate) fn pool_forward(
    c: &Cuda,
    out: &mut DeviceSlice,
    kv: &DeviceSlice,
    gate: &DeviceSlice,
    ape: &DeviceSlice,
    slots: &DeviceIndex,
    spec: Pooling,
) {
    let mut o = vec![0.0; c.len(out)];
    Cpu.pool_forward(&mut o, &c.read(kv), &c.read(gate), &c.read(ape), &c.read_index(slots), spec);
    c.write(out, &o);
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_backward(
    c: &Cuda,
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
    let (mut g_kv, mut g_gate, mut g_ape) = (vec![0.0; c.len(dkv)], vec![0.0; c.len(dgate)], c.read(dape));
    let (kv, gate, ape, slots) = (c.read(kv), c.read(gate), c.read(ape), c.read_index(slots));
    Cpu.pool_backward(&mut g_kv, &mut g_gate, &mut g_ape, &c.read(dout), &kv, &gate, &ape, &slots, spec);
    c.write(dkv, &g_kv);
    c.write(dgate, &g_gate);
    c.write(dape, &g_ape);
}
