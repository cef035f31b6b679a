//! The narrow interface between model code and a compute device.
//!
//! Model code calls only this trait. A backend owns its memory (`Buf` for f32 tensors, which
//! operations see as `Slice`s, whole or ranges of one; `Index` for i32 token ids, positions,
//! segment ids and targets); every operation reads and writes whole slices whose shapes are
//! given by the arguments. Row-major throughout: a `[rows, cols]` tensor stores row `r` at
//! `r * cols .. (r + 1) * cols`.
//!
//! Gradient outputs named `d*` with "accumulate" in their doc are added into (`+=`), so a
//! parameter shared by two uses (tied embeddings) or a residual stream collects every
//! contribution without extra buffers; all other outputs are overwritten.

use std::ops::{DerefMut, Range};

/// The precision of a matrix product's inputs. Sums are f32 in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 inputs.
    #[default]
    F32,
    /// Inputs rounded to bfloat16 (to nearest, ties to even), products exact, f32 sums and
    /// result: the matrix products of mixed precision (PyTorch autocast, Megatron). Each
    /// element of C may differ from the sum of the rounded inputs' products (and C's old
    /// value, when accumulating) only by f32 summation error: `|error| ≤ γ_k Σ |terms|`,
    /// `γ_k = k·u / (1 − k·u)` with u = 2⁻²⁴ for sums rounded to nearest (2⁻²³ for accumulators
    /// that truncate, as some tensor cores do; the conformance suite allows those).
    Bf16,
}

impl Precision {
    /// The f32 words of a buffer that stores `values` values in this precision: one per word
    /// for f32; two per word for bf16, value `2i` in the low and `2i + 1` in the high 16 bits
    /// of word `i` (a key/value cache in bf16, see [`Backend::scatter_rows`]).
    pub fn words(self, values: usize) -> usize {
        match self {
            Precision::F32 => values,
            Precision::Bf16 => values.div_ceil(2),
        }
    }
}

/// `C (+)= op(A) · op(B)`, repeated `batch` times over contiguous matrices.
///
/// `op(A)` is `[m, k]`: A is stored `[m, k]`, or `[k, m]` when `trans_a`.
/// `op(B)` is `[k, n]`: B is stored `[k, n]`, or `[n, k]` when `trans_b`.
/// C is `[m, n]`. Batch `i` uses A at `i*m*k`, B at `i*k*n`, C at `i*m*n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch: usize,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
    pub precision: Precision,
    /// B is a model weight: while weights are frozen ([`Backend::freeze_weights`]) a backend
    /// may reuse its packed or converted form from an earlier product.
    pub b_is_weight: bool,
}

impl Matmul {
    /// `Y[rows, out] = X[rows, in] · W[out, in]ᵀ`: a linear layer with a PyTorch-layout weight.
    pub fn linear(rows: usize, d_in: usize, d_out: usize) -> Self {
        Self {
            m: rows,
            n: d_out,
            k: d_in,
            trans_a: false,
            trans_b: true,
            batch: 1,
            accumulate: false,
            precision: Precision::F32,
            b_is_weight: false,
        }
    }
    /// `dX[rows, in] (+)= dY[rows, out] · W[out, in]`.
    pub fn linear_dx(rows: usize, d_in: usize, d_out: usize, accumulate: bool) -> Self {
        Self {
            m: rows,
            n: d_in,
            k: d_out,
            trans_a: false,
            trans_b: false,
            batch: 1,
            accumulate,
            precision: Precision::F32,
            b_is_weight: false,
        }
    }
    /// `dW[out, in] += dY[rows, out]ᵀ · X[rows, in]`.
    pub fn linear_dw(rows: usize, d_in: usize, d_out: usize) -> Self {
        Self {
            m: d_out,
            n: d_in,
            k: rows,
            trans_a: true,
            trans_b: false,
            batch: 1,
            accumulate: true,
            precision: Precision::F32,
            b_is_weight: false,
        }
    }
    /// The same product with inputs in `precision`.
    pub fn in_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }
    /// The same product, its B a model weight (see [`Matmul::b_is_weight`]).
    pub fn of_weight(self) -> Self {
        Self { b_is_weight: true, ..self }
    }
}

/// Per-group matrix products for mixture-of-experts layers: rows of `A` are grouped
/// contiguously (group `g` has `rows[g]` rows, possibly none) and group `g` multiplies its
/// own matrix `B_g`, stored one after another: `[n, k]` each when `trans_b`, else `[k, n]`.
/// `C_g (+)= A_g · op(B_g)`, with `A` `[Σ rows, k]` and `C` `[Σ rows, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedMatmul {
    pub n: usize,
    pub k: usize,
    pub trans_b: bool,
    pub accumulate: bool,
    pub precision: Precision,
}

/// Layout of a tensor of attention heads: `[tokens, heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Rotary position embedding applied to features `offset .. offset + rot_dim` of every head
/// (`offset` 0 for Llama; multi-head latent attention ropes the last features of a head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rope {
    pub x: Heads,
    pub rot_dim: usize,
    pub offset: usize,
    /// Pairs `(2i, 2i+1)` (DeepSeek, GPT-J) instead of `(i, i + rot_dim/2)` (Llama).
    pub interleaved: bool,
}

/// A block of `cols` columns copied between two row-major matrices of `rows` rows:
/// `dst[r, dst_offset + c] (+)= src[r, src_offset + c]`, rows `src_stride` and `dst_stride`
/// wide. It splits fused projections (`[c_kv ; k_pe]`, `[k_nope ; v]` per head) and builds
/// concatenations (`[k_nope ; k_pe]`) without host round trips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnCopy {
    pub rows: usize,
    pub cols: usize,
    pub src_stride: usize,
    pub src_offset: usize,
    pub dst_stride: usize,
    pub dst_offset: usize,
    /// Add into `dst` instead of overwriting it.
    pub accumulate: bool,
}

impl ColumnCopy {
    /// Columns `offset .. offset + cols` of `rows` rows `stride` wide, into a `[rows, cols]`
    /// matrix.
    pub fn take_block(rows: usize, cols: usize, (stride, offset): (usize, usize)) -> Self {
        Self { rows, cols, src_stride: stride, src_offset: offset, dst_stride: cols, dst_offset: 0, accumulate: false }
    }
    /// A `[rows, cols]` matrix into columns `offset .. offset + cols` of rows `stride` wide.
    pub fn put_block(rows: usize, cols: usize, (stride, offset): (usize, usize)) -> Self {
        Self { rows, cols, src_stride: cols, src_offset: 0, dst_stride: stride, dst_offset: offset, accumulate: false }
    }
}

/// A segment id is `group << 16 | member`, both non-negative (negative ids are padding, which
/// sees nothing and is seen by nothing). Member [`PREFIX_MEMBER`] of a group is its shared
/// prefix: every later token of the same group sees it, as each of a prompt's completions,
/// laid out one after another behind a single copy of the prompt, sees that prompt and itself;
/// several prompts and their completions can share a row as groups. Packed sequences without a
/// prefix are members 0, 1, … of group 0.
pub const PREFIX_MEMBER: i32 = 0xffff;

/// The segment id of member `member` of `group` (a packed sequence, or one of a group's
/// completions).
pub fn group_segment(group: usize, member: usize) -> i32 {
    assert!(member < PREFIX_MEMBER as usize, "segment: member {member} beyond the {PREFIX_MEMBER} a group holds");
    shared_prefix(group) - PREFIX_MEMBER + member as i32
}

/// The segment id of `group`'s shared prefix.
pub fn shared_prefix(group: usize) -> i32 {
    assert!(group < 1 << 15, "segment: group {group} beyond the {} a row holds", 1 << 15);
    (group << 16) as i32 | PREFIX_MEMBER
}

/// Whether a token of segment `query` may see an earlier token of segment `key`: the same
/// segment, or its group's shared prefix.
#[inline(always)]
pub fn segment_sees(query: i32, key: i32) -> bool {
    query == key || (query >= 0 && key & PREFIX_MEMBER == PREFIX_MEMBER && query >> 16 == key >> 16)
}

/// Causal self-attention over `batch` rows of `seq` tokens each.
///
/// Token `i` attends to token `j` of the same row iff `j <= i`, [`segment_sees`]`(segment[i],
/// segment[j])` (packed sequences never see each other; a group's tokens see its shared
/// prefix) and, with a window `w`, `i - j < w`.
/// Query heads `h` share key/value head `h / (q_heads / kv_heads)` (grouped-query attention).
/// Queries and keys have `head_dim` features per head, values (and so the output)
/// `v_head_dim` (they differ in multi-head latent attention).
///
/// `precision` is that of the products' inputs: with `Bf16` a backend may round q, k, v, the
/// probabilities and their gradients to bf16 for its products (f32 accumulation, f32 softmax
/// statistics), as mixed precision's attention does; the CPU computes in f32 either way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    pub precision: Precision,
}

impl Attention {
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// Attention of new tokens over a key/value cache, for decoding: query `i` attends its
/// sequence so far as two ranges of cache rows, its prompt's `starts[2i] .. starts[2i] +
/// lengths[2i]` (rows that the other sequences of the same prompt read too: a GRPO group's
/// prompt is cached once) then its own `starts[2i + 1] .. starts[2i + 1] + lengths[2i + 1]`
/// (itself last); either may be empty. With a sliding window only the last `window` rows of
/// the two together. Cache rows hold `[kv_heads, head_dim]` keys and
/// `[kv_heads, v_head_dim]` values; queries are `[queries, q_heads, head_dim]` and the output
/// `[queries, q_heads, v_head_dim]`; query head `h` reads kv head `h / (q_heads / kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeAttention {
    pub queries: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// How the cache stores its keys and values ([`Precision::words`]): bf16 in mixed
    /// precision, as a bf16 model's cache does in transformers, halving the memory decode
    /// reads for every new token.
    pub cache: Precision,
}

/// DeepSeek-V4's compressor pooling: each of `entries` compressed entries is a softmax-gated
/// sum over its slots, per feature f:
///
///   out[e, f] = Σ_s p_s·kv[t_s, o_s + f],   p = softmax_s(gate[t_s, o_s + f] + ape[s mod rate, o_s + f])
///
/// `slots` (`[entries, c·rate]`) names each slot's token t_s (−1: absent, weight 0); `kv` and
/// `gate` are `[tokens, c·width]`, `ape` `[rate, c·width]`, `out` `[entries, width]`. Windows
/// of heavily compressed attention have `rate` slots (c = 1, o_s = 0); with `overlap`
/// (compressed sparse attention, c = 2) the first `rate` slots take the previous window's first
/// `width` features (o_s = 0) and the last `rate` the entry's own window's second ones
/// (o_s = width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pooling {
    pub entries: usize,
    pub rate: usize,
    pub width: usize,
    pub overlap: bool,
}

impl Pooling {
    /// Series per token: 2 with overlapping windows, else 1.
    pub fn series(&self) -> usize {
        if self.overlap {
            2
        } else {
            1
        }
    }
}

/// Attention of each of `batch · seq` queries (`q_heads` heads) over chosen entries of a
/// table shared by all heads (DeepSeek-V4's compressed entries, one key-and-value head):
/// `chosen` (`[tokens, top_k]`) lists each query's entries (−1: none), `entries` is
/// `[entries, head_dim]`, both keys and values. `lse` is laid out as `attention_forward`'s
/// (`[batch, q_heads, seq]`), −∞ for a query with no entry (its output is then 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseAttention {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub head_dim: usize,
    pub entries: usize,
    pub top_k: usize,
    pub scale: f32,
}

impl SparseAttention {
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// DeepSeek-V4's lightning indexer: query t scores entry e as
/// `Σ_h w[t, h]·relu(q[t, h]·k[e])·scale`, and keeps its `top_k` best among the entries it may
/// see (`visible`, `[tokens, 2]`: first entry and count), best first, ties to the lower index;
/// −1 fills what remains when fewer are visible.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Indexer {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub entries: usize,
    pub top_k: usize,
    pub scale: f32,
}

/// The mixing weights of DeepSeek-V4's manifold-constrained hyper-connections, per token from
/// `mixes`, its `streams` residual streams' projection (their unweighted RMSNorm times the
/// layer's `fn`ᵀ), with the layer's `base` and `scale` (transformers' `DeepseekV4HyperConnection`):
///
///   pre  = σ(m_pre·s₀ + b_pre) + ε            (streams values: collapse the streams)
///   post = 2·σ(m_post·s₁ + b_post)            (streams values: expand a block's output)
///   comb = Sinkhorn(softmax_rows(m_comb·s₂ + b_comb) + ε)   (streams × streams: mix them)
///
/// Sinkhorn divides the columns by their sums (+ ε), then `iters − 1` times the rows and the
/// columns. Out per token: pre, post, comb (row-major). With `head` (`DeepseekV4HyperHead`):
/// `pre` alone, from `streams` mixes, `streams` biases and one scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HyperConnection {
    pub tokens: usize,
    pub streams: usize,
    pub iters: usize,
    pub eps: f32,
    pub head: bool,
}

impl HyperConnection {
    /// Values per token of `mixes`, `base` and the output.
    pub fn width(&self) -> usize {
        if self.head {
            self.streams
        } else {
            (2 + self.streams) * self.streams
        }
    }

    /// Values of `scale`.
    pub fn scales(&self) -> usize {
        if self.head {
            1
        } else {
            3
        }
    }
}

/// How a router turns a logit z into an expert's score (`scoring_func`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// σ(z) (DeepSeek-V3).
    Sigmoid,
    /// √softplus(z), softplus as PyTorch's (z itself above 20) (DeepSeek-V4).
    SqrtSoftplus,
}

/// DeepSeek's mixture-of-experts router over `experts` experts split into `groups` groups.
///
/// Per token with router logits z: scores s = score(z); selection uses s + bias (the
/// aux-loss-free balancing bias, which gets no gradient): the `top_groups` groups with the
/// largest sum of their two best biased scores are kept, and the `top_k` best biased scores
/// among them are chosen. With `fixed`, the chosen experts are given instead (DeepSeek-V4's
/// hash layers, from a frozen token-to-expert table) and the bias is not read. Weights are the
/// unbiased scores of the chosen experts, divided by their sum (+ 1e-20) when `normalize`,
/// times `scale` (`routed_scaling_factor`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    pub scoring: Scoring,
    pub fixed: bool,
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub groups: usize,
    pub top_groups: usize,
    pub normalize: bool,
    pub scale: f32,
}

/// Decoupled weight decay Adam (Loshchilov & Hutter), PyTorch's `torch.optim.AdamW`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
}

/// Weights frozen for as long as this lives ([`Backend::freeze_weights`]).
pub struct FrozenWeights<'a, B: Backend>(&'a B);

impl<'a, B: Backend> FrozenWeights<'a, B> {
    pub fn new(b: &'a B) -> Self {
        b.freeze_weights();
        Self(b)
    }
}

impl<B: Backend> Drop for FrozenWeights<'_, B> {
    fn drop(&mut self) {
        self.0.thaw_weights();
    }
}

pub trait Backend: Send + Sync {
    /// f32 values in the backend's memory: a whole buffer, or a range of one (`slice`,
    /// `split_at_mut`). Operations take slices, so one flat buffer can hold every parameter
    /// (or gradient, or optimizer moment) with a view per tensor, as llm.c lays them out.
    type Slice: ?Sized + Send + Sync + 'static;
    /// A buffer the backend allocated: it dereferences to the slice of all its values.
    type Buf: DerefMut<Target = Self::Slice> + Send + Sync + 'static;
    type Index: Send + Sync;

    fn name(&self) -> &'static str;
    /// The device it computes on, for startup lines ("cuda:0 NVIDIA H200 (sm_90, 139.8 GiB)").
    fn device(&self) -> String {
        self.name().to_string()
    }
    /// The most bytes of device memory held at once so far, for backends with memory of their
    /// own (None on the host, whose peak is the process's resident set).
    fn peak_device_memory(&self) -> Option<u64> {
        None
    }
    /// Waits until the work queued so far has finished (timing on asynchronous devices).
    fn synchronize(&self) {}
    /// Whether bf16 matrix products run on hardware made for them (faster than f32), not
    /// emulated.
    fn native_bf16(&self) -> bool {
        false
    }
    /// The widest key or value row per head that [`Backend::attention_decode`] takes.
    fn max_decode_head_dim(&self) -> usize {
        usize::MAX
    }
    /// A promise by the calling thread that no weight its products read changes, in value or
    /// storage, until the matching [`Backend::thaw_weights`] (calls nest): the products it
    /// calls whose B is a weight ([`Matmul::of_weight`]) may keep that weight in the form
    /// they compute with, as generation's decode does, where packing a weight for a handful
    /// of rows costs more than the product. Prefer [`FrozenWeights`], which thaws on drop.
    fn freeze_weights(&self) {}
    /// Ends a [`Backend::freeze_weights`]; after the last, kept forms are dropped.
    fn thaw_weights(&self) {}

    // ---- memory -------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Self::Buf;
    fn upload(&self, data: &[f32]) -> Self::Buf;
    fn write(&self, dst: &mut Self::Slice, data: &[f32]);
    fn read(&self, src: &Self::Slice) -> Vec<f32>;
    fn len(&self, buf: &Self::Slice) -> usize;
    /// Values `range` of `buf`.
    fn slice<'a>(&self, buf: &'a Self::Slice, range: Range<usize>) -> &'a Self::Slice;
    fn slice_mut<'a>(&self, buf: &'a mut Self::Slice, range: Range<usize>) -> &'a mut Self::Slice;
    /// `buf` as the two disjoint slices `..mid` and `mid..`.
    fn split_at_mut<'a>(&self, buf: &'a mut Self::Slice, mid: usize) -> (&'a mut Self::Slice, &'a mut Self::Slice);
    fn upload_index(&self, data: &[i32]) -> Self::Index;
    fn write_index(&self, dst: &mut Self::Index, data: &[i32]);
    fn read_index(&self, src: &Self::Index) -> Vec<i32>;
    fn fill(&self, dst: &mut Self::Slice, value: f32);
    /// `dst = src` (same length).
    fn copy(&self, dst: &mut Self::Slice, src: &Self::Slice);
    /// Copies (or adds) a block of columns, see [`ColumnCopy`].
    fn copy_columns(&self, dst: &mut Self::Slice, src: &Self::Slice, spec: ColumnCopy);
    /// `dst += src`.
    fn add_assign(&self, dst: &mut Self::Slice, src: &Self::Slice);
    /// `dst *= s`.
    fn scale(&self, dst: &mut Self::Slice, s: f32);
    /// `Σ x²`, accumulated in f64.
    fn sum_squares(&self, x: &Self::Slice) -> f64;
    /// `x = bf16(x)`: each value rounded to the nearest bf16 (ties to even), kept in f32 — what
    /// a bf16 tensor holds (Muon's Newton–Schulz iteration runs in bf16, as PyTorch's does).
    fn round_to_bf16(&self, x: &mut Self::Slice);
    /// Muon's momentum, as torch.optim.Muon computes it: `buf = lerp(buf, grad, 1 − μ)`, then
    /// `update = lerp(grad, buf, μ)` with Nesterov, else `update = buf`. `lerp(a, b, w)` is
    /// PyTorch's: `a + w·(b − a)` for |w| < 0.5, else `b − (1 − w)·(b − a)`, in f32 with the
    /// weights `1 − μ` and `μ` rounded from f64 (as Python's floats reach the kernels).
    fn muon_momentum(
        &self,
        update: &mut Self::Slice,
        buf: &mut Self::Slice,
        grad: &Self::Slice,
        momentum: f64,
        nesterov: bool,
    );

    // ---- linear algebra -----------------------------------------------------------------
    fn matmul(&self, c: &mut Self::Slice, a: &Self::Slice, b: &Self::Slice, spec: Matmul);
    /// `y[r, :] += bias` for a `[rows, bias.len()]` tensor.
    fn add_bias(&self, y: &mut Self::Slice, bias: &Self::Slice);
    /// `dbias += Σ_r dy[r, :]` (accumulate).
    fn bias_backward(&self, dbias: &mut Self::Slice, dy: &Self::Slice);

    /// `C_g (+)= A_g · op(B_g)` for every group (see [`GroupedMatmul`]).
    fn grouped_matmul(
        &self,
        c: &mut Self::Slice,
        a: &Self::Slice,
        b: &Self::Slice,
        rows: &[usize],
        spec: GroupedMatmul,
    );
    /// The weight gradient of `grouped_matmul`: `dB_g += op⁻¹(A_gᵀ · dC_g)`, i.e.
    /// `dC_gᵀ · A_g` (`[n, k]`) when `trans_b`, else `A_gᵀ · dC_g` (`[k, n]`); accumulates.
    fn grouped_matmul_weight_grad(
        &self,
        db: &mut Self::Slice,
        dc: &Self::Slice,
        a: &Self::Slice,
        rows: &[usize],
        spec: GroupedMatmul,
    );
    /// `x[r, :] *= w[r]` for a `[w.len(), cols]` tensor.
    fn scale_rows(&self, x: &mut Self::Slice, w: &Self::Slice);
    /// `out[r] = Σ_c a[r, c] · b[r, c]` (the gradient of `scale_rows` with respect to `w`).
    fn row_dot(&self, out: &mut Self::Slice, a: &Self::Slice, b: &Self::Slice);

    // ---- embedding ----------------------------------------------------------------------
    /// `out[t, :] = table[ids[t], :]`, rows of width `dim`; a negative id gives a row of zeros
    /// (a token whose row another rank holds, under vocabulary parallel).
    fn embedding_forward(&self, out: &mut Self::Slice, table: &Self::Slice, ids: &Self::Index, dim: usize);
    /// `dtable[ids[t], :] += dout[t, :]` (accumulate); a negative id adds nothing.
    fn embedding_backward(&self, dtable: &mut Self::Slice, dout: &Self::Slice, ids: &Self::Index, dim: usize);
    /// `dst[rows[t], :] = src[t, :]` for rows of width `dim`; a negative row skips `t`
    /// (writes a batch's keys and values into a cache). `dst` stores its values in `storage`
    /// ([`Precision::words`]; bf16 rounds to nearest, ties to even); `dim` is even for bf16.
    fn scatter_rows(
        &self,
        dst: &mut Self::Slice,
        src: &Self::Slice,
        rows: &Self::Index,
        dim: usize,
        storage: Precision,
    );

    // ---- normalisation ------------------------------------------------------------------
    /// `y = x · rstd · w` per row of width `w.len()`, `rstd = 1/sqrt(mean(x²) + eps)` saved.
    fn rmsnorm_forward(&self, y: &mut Self::Slice, rstd: &mut Self::Slice, x: &Self::Slice, w: &Self::Slice, eps: f32);
    /// Fused residual add then RMSNorm: `x += delta; y = rmsnorm(x)`.
    fn add_rmsnorm_forward(
        &self,
        x: &mut Self::Slice,
        delta: &Self::Slice,
        y: &mut Self::Slice,
        rstd: &mut Self::Slice,
        w: &Self::Slice,
        eps: f32,
    );
    /// Backward of `rmsnorm_forward`; `dx` and `dw` accumulate.
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Slice,
        dw: &mut Self::Slice,
        dy: &Self::Slice,
        x: &Self::Slice,
        w: &Self::Slice,
        rstd: &Self::Slice,
    );

    // ---- rotary embedding ---------------------------------------------------------------
    /// Rotates `x` in place. `table` is `[positions, rot_dim]`: `rot_dim/2` cosines then
    /// `rot_dim/2` sines per position (scaling already folded in); `positions[t]` picks the row.
    fn rope_forward(&self, x: &mut Self::Slice, table: &Self::Slice, positions: &Self::Index, spec: Rope);
    /// The inverse rotation, applied in place to the gradient.
    fn rope_backward(&self, dx: &mut Self::Slice, table: &Self::Slice, positions: &Self::Index, spec: Rope);

    // ---- attention ----------------------------------------------------------------------
    /// `out = softmax(q kᵀ · scale + mask) v`, with `lse` (`[batch, q_heads, seq]`) the
    /// log-sum-exp of each score row, kept for backward. `q`: `[tokens, q_heads, head_dim]`,
    /// `k`: `[tokens, kv_heads, head_dim]`, `v`: `[tokens, kv_heads, v_head_dim]`, `out`:
    /// `[tokens, q_heads, v_head_dim]`. Memory is linear in `seq`: no score matrix is kept.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Slice,
        lse: &mut Self::Slice,
        q: &Self::Slice,
        k: &Self::Slice,
        v: &Self::Slice,
        segments: &Self::Index,
        spec: Attention,
    );
    /// Gradients of `attention_forward`; `dq`, `dk`, `dv` are overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Slice,
        dk: &mut Self::Slice,
        dv: &mut Self::Slice,
        dout: &Self::Slice,
        q: &Self::Slice,
        k: &Self::Slice,
        v: &Self::Slice,
        out: &Self::Slice,
        lse: &Self::Slice,
        segments: &Self::Index,
        spec: Attention,
    );

    /// Attention sinks (gpt-oss, DeepSeek-V4): head `h` has a logit `sinks[h]` that joins every
    /// query's softmax with a value of zero. From `attention_forward`'s `out` and `lse` over the
    /// keys: `lse' = log(e^lse + e^sink)`, `out *= e^(lse − lse')`, `lse = lse'`. Gradients
    /// of q, k and v then come from `attention_backward` given the new `out` and `lse`.
    fn attention_sinks_forward(
        &self,
        out: &mut Self::Slice,
        lse: &mut Self::Slice,
        sinks: &Self::Slice,
        spec: Attention,
    );
    /// `dsinks[h] += −Σ_t e^(sink_h − lse_t,h) · (dout_t,h · out_t,h)` from the forward's
    /// new `out` and `lse` (accumulate, summed over the tokens in order).
    fn attention_sinks_backward(
        &self,
        dsinks: &mut Self::Slice,
        dout: &Self::Slice,
        out: &Self::Slice,
        lse: &Self::Slice,
        sinks: &Self::Slice,
        spec: Attention,
    );

    /// Two attentions of the same queries over disjoint keys, as one: `out = (e^lse·out +
    /// e^other_lse·other_out) / (e^lse + e^other_lse)`, `lse = log(e^lse + e^other_lse)` (shapes
    /// of `attention_forward`'s). Backward: each part's `attention_backward` given the merged
    /// `out` and `lse` gives its keys' gradients and its share of the queries'.
    fn attention_merge(
        &self,
        out: &mut Self::Slice,
        lse: &mut Self::Slice,
        other_out: &Self::Slice,
        other_lse: &Self::Slice,
        spec: Attention,
    );
    /// See [`SparseAttention`]; `out` `[tokens, q_heads, head_dim]` and `lse` overwritten.
    fn sparse_attention_forward(
        &self,
        out: &mut Self::Slice,
        lse: &mut Self::Slice,
        q: &Self::Slice,
        entries: &Self::Slice,
        chosen: &Self::Index,
        spec: SparseAttention,
    );
    /// Gradients of `sparse_attention_forward` given `out` and `lse` (its own, or merged ones,
    /// see `attention_merge`); `dq` and `dentries` are overwritten.
    #[allow(clippy::too_many_arguments)]
    fn sparse_attention_backward(
        &self,
        dq: &mut Self::Slice,
        dentries: &mut Self::Slice,
        dout: &Self::Slice,
        q: &Self::Slice,
        entries: &Self::Slice,
        chosen: &Self::Index,
        out: &Self::Slice,
        lse: &Self::Slice,
        spec: SparseAttention,
    );
    /// The entries each query keeps (see [`Indexer`]); no gradient flows through a choice.
    fn indexer_topk(
        &self,
        chosen: &mut Self::Index,
        q: &Self::Slice,
        keys: &Self::Slice,
        weights: &Self::Slice,
        visible: &Self::Index,
        spec: Indexer,
    );
    /// The compressed entries (see [`Pooling`]), overwritten.
    fn pool_forward(
        &self,
        out: &mut Self::Slice,
        kv: &Self::Slice,
        gate: &Self::Slice,
        ape: &Self::Slice,
        slots: &Self::Index,
        spec: Pooling,
    );
    /// Gradients of `pool_forward`: `dkv` and `dgate` overwritten (0 for tokens in no slot),
    /// `dape` accumulated (summed over the entries in order).
    #[allow(clippy::too_many_arguments)]
    fn pool_backward(
        &self,
        dkv: &mut Self::Slice,
        dgate: &mut Self::Slice,
        dape: &mut Self::Slice,
        dout: &Self::Slice,
        kv: &Self::Slice,
        gate: &Self::Slice,
        ape: &Self::Slice,
        slots: &Self::Index,
        spec: Pooling,
    );

    /// `out = softmax(q kᵀ · scale) v` of each new token over its cached rows (see
    /// [`DecodeAttention`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut Self::Slice,
        q: &Self::Slice,
        k_cache: &Self::Slice,
        v_cache: &Self::Slice,
        starts: &Self::Index,
        lengths: &Self::Index,
        spec: DecodeAttention,
    );

    // ---- feed-forward -------------------------------------------------------------------
    /// `h = silu(min(gate, limit)) ⊙ clamp(up, −limit, limit)` (DeepSeek-V4 clamps; `limit`
    /// is infinite for a plain SwiGLU).
    fn swiglu_forward(&self, h: &mut Self::Slice, gate: &Self::Slice, up: &Self::Slice, limit: f32);
    /// Gradients of `swiglu_forward` with respect to the unclamped `gate` and `up` (none where
    /// a clamp held them, as autograd gives); `dgate`, `dup` are overwritten.
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Slice,
        dup: &mut Self::Slice,
        dh: &Self::Slice,
        gate: &Self::Slice,
        up: &Self::Slice,
        limit: f32,
    );

    // ---- loss ---------------------------------------------------------------------------
    /// Per-row negative log-likelihood of `targets` under `softmax(logits)` (rows of width
    /// `vocab`), and `correct[t]`, 1 where the target has the row's largest logit (the model's
    /// token accuracy), else 0; a negative target gives 0 for both.
    fn cross_entropy_forward(
        &self,
        nll: &mut Self::Slice,
        correct: &mut Self::Slice,
        logits: &Self::Slice,
        targets: &Self::Index,
        vocab: usize,
    );
    /// Fused forward and backward of `loss = Σ_t weight[t] · nll[t]`: writes `nll` and
    /// `correct` as `cross_entropy_forward` does, and overwrites `logits` with
    /// `dloss/dlogits = weight[t] · (softmax − onehot)`.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward(
        &self,
        logits: &mut Self::Slice,
        nll: &mut Self::Slice,
        correct: &mut Self::Slice,
        targets: &Self::Index,
        weights: &Self::Slice,
        vocab: usize,
    );
    /// Fused forward and backward of `loss = Σ_t weight[t] · KL(p_t ‖ q_t)`, the reverse KL of
    /// on-policy distillation, with `p = softmax(logits)` (the student) and `q =
    /// softmax(teacher)`: writes `kl[t] = Σ_v p(v) (log p(v) − log q(v))` and overwrites `logits`
    /// with `dloss/dlogits = weight[t] · p(v) (log p(v) − log q(v) − kl[t])`.
    fn reverse_kl_backward(
        &self,
        logits: &mut Self::Slice,
        kl: &mut Self::Slice,
        teacher: &Self::Slice,
        weights: &Self::Slice,
        vocab: usize,
    );

    /// Statistics of each row of `logits`, a block of `vocab` columns of a wider row whose
    /// first column is the vocabulary's `first` (vocabulary parallel: one rank's block):
    /// `stats[r] = (max_j z_j, log Σ_j exp(z_j − max), z_t)`, with `z_t` the logit of the
    /// row's target `t` where `first ≤ t < first + vocab`, else 0. Every row's first two are
    /// written whatever its target.
    fn vocab_block_stats(
        &self,
        stats: &mut Self::Slice,
        logits: &Self::Slice,
        targets: &Self::Index,
        vocab: usize,
        first: usize,
    );
    /// Backward of `loss = Σ_t weight[t] · nll[t]` over a block of the vocabulary as in
    /// `vocab_block_stats`, given each whole row's `lse = lse[r, 0] + lse[r, 1]` (a sum of two,
    /// so that f32 carries it to f64's precision): overwrites `logits` with `weight[t] ·
    /// (exp(z_j − lse) − [first + j = t])`, and a row with a negative target with zeros.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_block_backward(
        &self,
        logits: &mut Self::Slice,
        lse: &Self::Slice,
        targets: &Self::Index,
        weights: &Self::Slice,
        vocab: usize,
        first: usize,
    );
    /// The part of `reverse_kl_backward`'s KL that a block of the vocabulary holds: `kl[t] =
    /// Σ_v p(v) (log p(v) − log q(v))` over the block's `vocab` columns, with `log p = z −
    /// lse_z`, `log q = y − lse_y` and the whole rows' `lse[t] = (lse_z as two, lse_y as two)`
    /// (see `cross_entropy_block_backward`); sums in f64.
    fn reverse_kl_block_forward(
        &self,
        kl: &mut Self::Slice,
        logits: &Self::Slice,
        teacher: &Self::Slice,
        lse: &Self::Slice,
        vocab: usize,
    );
    /// Backward of `loss = Σ_t weight[t] · KL_t` over a block of the vocabulary, given the
    /// whole rows' `lse` (as in `reverse_kl_block_forward`) and `kl`: overwrites `logits` with
    /// `weight[t] · p(v) (log p(v) − log q(v) − kl[t])`.
    #[allow(clippy::too_many_arguments)]
    fn reverse_kl_block_backward(
        &self,
        logits: &mut Self::Slice,
        teacher: &Self::Slice,
        lse: &Self::Slice,
        kl: &Self::Slice,
        weights: &Self::Slice,
        vocab: usize,
    );

    // ---- hyper-connections --------------------------------------------------------------
    /// The mixing weights `out` (`[tokens, width]`) from `mixes`, see [`HyperConnection`].
    fn hc_weights_forward(
        &self,
        out: &mut Self::Slice,
        mixes: &Self::Slice,
        base: &Self::Slice,
        scale: &Self::Slice,
        spec: HyperConnection,
    );
    /// Backward of `hc_weights_forward` from `dout`: `dmixes` overwritten, `dbase` and
    /// `dscale` accumulated (summed over the tokens in order).
    #[allow(clippy::too_many_arguments)]
    fn hc_weights_backward(
        &self,
        dmixes: &mut Self::Slice,
        dbase: &mut Self::Slice,
        dscale: &mut Self::Slice,
        dout: &Self::Slice,
        mixes: &Self::Slice,
        base: &Self::Slice,
        scale: &Self::Slice,
        spec: HyperConnection,
    );

    // ---- mixture of experts -------------------------------------------------------------
    /// Routes every token: writes `indices` and `weights` (`[tokens, top_k]`, in descending
    /// order of biased score) and keeps the sigmoid `scores` (`[tokens, experts]`) for backward.
    #[allow(clippy::too_many_arguments)]
    fn moe_route_forward(
        &self,
        weights: &mut Self::Slice,
        indices: &mut Self::Index,
        scores: &mut Self::Slice,
        logits: &Self::Slice,
        bias: &Self::Slice,
        spec: Routing,
    );
    /// Gradient of the router logits from the gradient of the routing weights; overwritten.
    fn moe_route_backward(
        &self,
        dlogits: &mut Self::Slice,
        dweights: &Self::Slice,
        scores: &Self::Slice,
        indices: &Self::Index,
        spec: Routing,
    );
    /// Sorts the `[tokens, top_k]` (token, choice) slots of a routing by expert, stably (by
    /// token within an expert), so that each expert's rows are contiguous: `order[row]` is the
    /// token of dispatched row `row`, `row_weights[row]` its routing weight, and `slot_rows[slot]`
    /// the row of slot `slot`. Returns the rows of each of the `experts` experts: the only
    /// values a host reads back, as the grouped products' group sizes.
    #[allow(clippy::too_many_arguments)]
    fn moe_dispatch(
        &self,
        order: &mut Self::Index,
        row_weights: &mut Self::Slice,
        slot_rows: &mut Self::Index,
        indices: &Self::Index,
        weights: &Self::Slice,
        experts: usize,
        top_k: usize,
    ) -> Vec<usize>;

    // ---- optimiser ----------------------------------------------------------------------
    /// One AdamW step on `param` from `grad`, updating the moments `m` and `v` in place.
    fn adamw(&self, param: &mut Self::Slice, grad: &Self::Slice, m: &mut Self::Slice, v: &mut Self::Slice, hp: AdamW);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_sees_its_own_prefix_and_packed_sequences_see_only_themselves() {
        let (prefix, first, second) = (shared_prefix(3), group_segment(3, 0), group_segment(3, 1));
        assert!(segment_sees(first, prefix) && segment_sees(second, prefix) && segment_sees(first, first));
        assert!(!segment_sees(second, first), "a group's completions do not see each other");
        assert!(!segment_sees(group_segment(2, 0), prefix), "another group does not see the prefix");
        assert!(!segment_sees(-1, prefix) && !segment_sees(first, -1), "padding sees and is seen by nothing");
        // Packed sequences are members of group 0, which has no prefix among them.
        assert_eq!((group_segment(0, 0), group_segment(0, 7)), (0, 7));
        assert!(!segment_sees(group_segment(0, 7), group_segment(0, 6)));
    }

    #[test]
    #[should_panic(expected = "beyond the 65535 a group holds")]
    fn a_group_holds_fewer_members_than_its_prefix_id() {
        group_segment(0, PREFIX_MEMBER as usize);
    }
}
