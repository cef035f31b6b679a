// Causal grouped-query attention for training, with segment masks (packing) and an optional
// sliding window, tiled as FlashAttention-2: memory is linear in sequence length, only each
// score row's log-sum-exp is kept for backward, which recomputes the probabilities.
//
// Forward, per query row i over its allowed keys j (j ≤ i, same segment, i − j < window):
//   s_ij = scale·q_i·k_j,  lse_i = log Σ_j exp(s_ij),  p_ij = exp(s_ij − lse_i)
//   o_i = Σ_j p_ij v_j    (an online softmax over tiles of keys)
// Backward, with D_i = do_i·o_i:
//   dv_j = Σ_i p_ij do_i,  dp_ij = do_i·v_j,  ds_ij = p_ij (dp_ij − D_i)
//   dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i
//
// Tiling. Forward and dq: a block holds `positions` consecutive query positions × `heads`
// query heads that read one kv head, one warp per query row, and walks the keys those rows
// may see in tiles of `tile` ≤ 32 rows of k and v staged in shared memory, so each key is read
// from global memory once per block rather than once per query row. Lane jj scores key jj of
// the tile against the warp's query (kept in shared memory); the output's features are spread
// over the lanes. dk and dv: a block holds `positions` consecutive keys of one kv head, one warp
// each, and walks the query rows that may see them, head by head, in tiles of q and do.
// Shared rows are padded by one float so that lanes reading a column of rows hit distinct
// banks. Every sum has a single owner and a fixed order (no atomics): results repeat bit for bit.

#define ATTENTION_ARGS                                                                                     \
    long batch, long seq, int q_heads, int kv_heads, int head_dim, int v_head_dim, float scale, long window, \
        int positions, int heads, int tile

// Σ_d a[d]·b[d], by one thread.
__device__ __forceinline__ float dot_rows(const float* a, const float* b, int n) {
    float acc = 0.0f;
    for (int d = 0; d < n; d++) acc += a[d] * b[d];
    return acc;
}

// Rows first .. first + n − 1 (n ≤ tile) of head `head` of a [tokens, heads, dim] tensor into
// `dst`, row stride dim + 1; rows n .. tile − 1 are zero. The whole block takes part.
__device__ void load_tile(float* dst, const float* src, long first, int n, int tile, int heads, int head, int dim) {
    for (int idx = threadIdx.x; idx < tile * dim; idx += blockDim.x) {
        const int r = idx / dim, d = idx % dim;
        dst[r * (dim + 1) + d] = r < n ? src[((first + r) * heads + head) * dim + d] : 0.0f;
    }
}

// A block's query rows: positions p0 .. p0 + positions − 1 of sequence b, query heads
// h0 .. h0 + heads − 1 (all reading kv head kvh). Warp w takes position p0 + w / heads and
// head h0 + w % heads. Blocks run over [batch, kv_heads, group / heads, position tiles].
struct QueryRows {
    long b, p0;
    int kvh, h0;
};

__device__ QueryRows query_rows(long seq, int q_heads, int kv_heads, int positions, int heads) {
    const int group = q_heads / kv_heads, chunks = group / heads;
    const long position_tiles = (seq + positions - 1) / positions;
    long id = blockIdx.x;
    QueryRows rows;
    rows.p0 = (id % position_tiles) * positions;
    id /= position_tiles;
    const int chunk = (int)(id % chunks);
    id /= chunks;
    rows.kvh = (int)(id % kv_heads);
    rows.b = id / kv_heads;
    rows.h0 = rows.kvh * group + chunk * heads;
    return rows;
}

// kiln_core::PREFIX_MEMBER: segment ids are group << 16 | member, and this member of a group is
// its shared prefix (a prompt that its completions, laid out after it, all see).
#define PREFIX_MEMBER 0xffff

// Whether query position i may see key position j of its row (segment ids of both given):
// kiln_core::segment_sees, causal and windowed.
__device__ __forceinline__ bool sees(long i, long j, long window, int segment_i, int segment_j) {
    const bool same = segment_i == segment_j ||
                      (segment_i >= 0 && (segment_j & PREFIX_MEMBER) == PREFIX_MEMBER && segment_i >> 16 == segment_j >> 16);
    return j <= i && j >= first_key(i, window) && same;
}

// Shared memory: k tile, v tile, then each warp's query row.
extern "C" __global__ void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                             const int* segments, ATTENTION_ARGS) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const QueryRows rows = query_rows(seq, q_heads, kv_heads, positions, heads);
    const long i = rows.p0 + w / heads, row0 = rows.b * seq, t = row0 + i;
    const int h = rows.h0 + w % heads;
    const bool valid = i < seq;
    float* ks = shared;
    float* vs = ks + tile * (head_dim + 1);
    float* qs = vs + tile * (v_head_dim + 1) + w * head_dim;
    int segment = 0;
    if (valid) {
        for (int d = lane; d < head_dim; d += 32) qs[d] = q[(t * q_heads + h) * head_dim + d];
        segment = segments[t];
    }
    float acc[LANE_FEATURES];
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    const long last = rows.p0 + positions - 1 < seq - 1 ? rows.p0 + positions - 1 : seq - 1;
    for (long j0 = first_key(rows.p0, window); j0 <= last; j0 += tile) {
        const int n = last + 1 - j0 < tile ? (int)(last + 1 - j0) : tile;
        __syncthreads();  // the previous tile's readers are done (and the query rows are written)
        load_tile(ks, k, row0 + j0, n, tile, kv_heads, rows.kvh, head_dim);
        load_tile(vs, v, row0 + j0, n, tile, kv_heads, rows.kvh, v_head_dim);
        __syncthreads();
        if (!valid) continue;
        const long j = j0 + lane;
        float s_mine = NEG_INF;
        if (lane < n && sees(i, j, window, segment, segments[row0 + j]))
            s_mine = scale * dot_rows(qs, ks + lane * (head_dim + 1), head_dim);
        online_block(m, l, acc, s_mine, n, vs, v_head_dim + 1, v_head_dim, lane);
    }
    if (!valid) return;
    const float row_lse = online_finish(out + (t * q_heads + h) * v_head_dim, acc, m, l, v_head_dim, lane);
    if (lane == 0) lse[(rows.b * q_heads + h) * seq + i] = row_lse;
}

// dq (overwritten) and D_i = do_i·o_i (into `delta`, `[batch, q_heads, seq]` as lse). Shared
// memory: k tile, v tile, each warp's query row, each warp's do row.
extern "C" __global__ void attention_backward_dq(float* dq, float* delta, const float* dout, const float* q,
                                                 const float* k, const float* v, const float* out, const float* lse,
                                                 const int* segments, ATTENTION_ARGS) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const QueryRows rows = query_rows(seq, q_heads, kv_heads, positions, heads);
    const long i = rows.p0 + w / heads, row0 = rows.b * seq, t = row0 + i;
    const int h = rows.h0 + w % heads;
    const bool valid = i < seq;
    float* ks = shared;
    float* vs = ks + tile * (head_dim + 1);
    float* qs = vs + tile * (v_head_dim + 1) + w * head_dim;
    float* dos = vs + tile * (v_head_dim + 1) + warps * head_dim + w * v_head_dim;
    const long stat = (rows.b * q_heads + h) * seq + i;
    int segment = 0;
    float d_i = 0.0f, lse_i = 0.0f;
    if (valid) {
        for (int d = lane; d < head_dim; d += 32) qs[d] = q[(t * q_heads + h) * head_dim + d];
        for (int d = lane; d < v_head_dim; d += 32) dos[d] = dout[(t * q_heads + h) * v_head_dim + d];
        float dor[LANE_FEATURES];
        load_lane(dor, dout + (t * q_heads + h) * v_head_dim, v_head_dim, lane);
        d_i = dot_lane(dor, out + (t * q_heads + h) * v_head_dim, v_head_dim, lane);
        lse_i = lse[stat];
        segment = segments[t];
    }
    float acc[LANE_FEATURES];
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] = 0.0f;
    const long last = rows.p0 + positions - 1 < seq - 1 ? rows.p0 + positions - 1 : seq - 1;
    for (long j0 = first_key(rows.p0, window); j0 <= last; j0 += tile) {
        const int n = last + 1 - j0 < tile ? (int)(last + 1 - j0) : tile;
        __syncthreads();
        load_tile(ks, k, row0 + j0, n, tile, kv_heads, rows.kvh, head_dim);
        load_tile(vs, v, row0 + j0, n, tile, kv_heads, rows.kvh, v_head_dim);
        __syncthreads();
        if (!valid) continue;
        const long j = j0 + lane;
        float ds_mine = 0.0f;
        if (lane < n && sees(i, j, window, segment, segments[row0 + j])) {
            const float p = expf(scale * dot_rows(qs, ks + lane * (head_dim + 1), head_dim) - lse_i);
            const float dp = dot_rows(dos, vs + lane * (v_head_dim + 1), v_head_dim);
            ds_mine = p * (dp - d_i);
        }
        for (int jj = 0; jj < n; jj++) {
            const float ds = __shfl_sync(0xffffffffu, ds_mine, jj);
            if (ds != 0.0f) axpy_lane(acc, ds, ks + jj * (head_dim + 1), head_dim, lane);
        }
    }
    if (!valid) return;
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < head_dim) dq[(t * q_heads + h) * head_dim + d] = scale * acc[r];
    }
    if (lane == 0) delta[stat] = d_i;
}

// dk and dv (overwritten); runs after attention_backward_dq, which wrote `delta`. A block holds
// keys p0 .. p0 + positions − 1 of sequence b for kv head kvh (blocks over [batch, kv_heads,
// key tiles]); `heads` is unused. Shared memory: q tile, do tile, the tile's lse and D, then
// each warp's k row and v row.
extern "C" __global__ void attention_backward_dkdv(float* dk, float* dv, const float* dout, const float* q,
                                                   const float* k, const float* v, const float* lse,
                                                   const float* delta, const int* segments, ATTENTION_ARGS) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const long key_tiles = (seq + positions - 1) / positions;
    const long p0 = (blockIdx.x % key_tiles) * positions;
    const int kvh = (int)((blockIdx.x / key_tiles) % kv_heads);
    const long b = blockIdx.x / key_tiles / kv_heads;
    const int group = q_heads / kv_heads;
    const long row0 = b * seq, j = p0 + w, t = row0 + j;
    const bool valid = j < seq;
    float* qs = shared;
    float* dos = qs + tile * (head_dim + 1);
    float* lse_s = dos + tile * (v_head_dim + 1);
    float* delta_s = lse_s + tile;
    float* ks = delta_s + tile + w * head_dim;
    float* vs = delta_s + tile + warps * head_dim + w * v_head_dim;
    int segment = 0;
    if (valid) {
        for (int d = lane; d < head_dim; d += 32) ks[d] = k[(t * kv_heads + kvh) * head_dim + d];
        for (int d = lane; d < v_head_dim; d += 32) vs[d] = v[(t * kv_heads + kvh) * v_head_dim + d];
        segment = segments[t];
    }
    float dk_acc[LANE_FEATURES], dv_acc[LANE_FEATURES];
    for (int r = 0; r < LANE_FEATURES; r++) dk_acc[r] = dv_acc[r] = 0.0f;
    // The last query that sees this block's last key, and this warp's key.
    const long block_last = p0 + positions - 1 < seq - 1 ? p0 + positions - 1 : seq - 1;
    const long last = window > 0 && block_last + window - 1 < seq - 1 ? block_last + window - 1 : seq - 1;
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (long i0 = p0; i0 <= last; i0 += tile) {
            const int n = last + 1 - i0 < tile ? (int)(last + 1 - i0) : tile;
            __syncthreads();  // the previous tile's readers are done (and the key rows are written)
            load_tile(qs, q, row0 + i0, n, tile, q_heads, h, head_dim);
            load_tile(dos, dout, row0 + i0, n, tile, q_heads, h, v_head_dim);
            for (int r = threadIdx.x; r < tile; r += blockDim.x) {
                const long stat = (b * q_heads + h) * seq + i0 + r;
                lse_s[r] = r < n ? lse[stat] : 0.0f;
                delta_s[r] = r < n ? delta[stat] : 0.0f;
            }
            __syncthreads();
            if (!valid) continue;
            const long i = i0 + lane;
            float p_mine = 0.0f, ds_mine = 0.0f;
            if (lane < n && sees(i, j, window, segments[row0 + i], segment)) {
                p_mine = expf(scale * dot_rows(ks, qs + lane * (head_dim + 1), head_dim) - lse_s[lane]);
                ds_mine = p_mine * (dot_rows(vs, dos + lane * (v_head_dim + 1), v_head_dim) - delta_s[lane]);
            }
            for (int ii = 0; ii < n; ii++) {
                const float p = __shfl_sync(0xffffffffu, p_mine, ii);
                const float ds = __shfl_sync(0xffffffffu, ds_mine, ii);
                if (p != 0.0f) axpy_lane(dv_acc, p, dos + ii * (v_head_dim + 1), v_head_dim, lane);
                if (ds != 0.0f) axpy_lane(dk_acc, ds, qs + ii * (head_dim + 1), head_dim, lane);
            }
        }
    }
    if (!valid) return;
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < head_dim) dk[(t * kv_heads + kvh) * head_dim + d] = scale * dk_acc[r];
        if (d < v_head_dim) dv[(t * kv_heads + kvh) * v_head_dim + d] = dv_acc[r];
    }
}
