// Causal grouped-query attention with segment masks and an optional sliding window, and
// decode attention over a key/value cache. One warp per (query token, query head); memory is
// linear in sequence length: only each score row's log-sum-exp is kept for backward.
//
// Forward, per query row i over its allowed keys j (j ≤ i, same segment, i − j < window):
//   s_ij = scale·q_i·k_j,  lse_i = log Σ_j exp(s_ij),  p_ij = exp(s_ij − lse_i)
//   o_i = Σ_j p_ij v_j    (an online softmax over blocks of 32 keys)
// Backward, with D_i = do_i·o_i:
//   dv_j = Σ_i p_ij do_i,  dp_ij = do_i·v_j,  ds_ij = p_ij (dp_ij − D_i)
//   dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i
// dq is summed by one warp per query, dk and dv by one warp per key: every sum has a single
// owner and a fixed order, so results repeat bit for bit.
//
// Head dimensions up to MAX_HEAD_DIM: lane `l` holds features l, l + 32, ...

#define MAX_HEAD_DIM 256
#define LANE_FEATURES (MAX_HEAD_DIM / 32)

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(bf16_bits x) { return bf16_widen(x); }

// This lane's features of a row of `n` values.
template <typename T>
__device__ __forceinline__ void load_lane(float* out, const T* row, int n, int lane) {
#pragma unroll
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        out[r] = d < n ? widen(row[d]) : 0.0f;
    }
}

// Σ_d a[d]·row[d] over the warp, `a` held as lane features.
template <typename T>
__device__ __forceinline__ float dot_lane(const float* a, const T* row, int n, int lane) {
    float acc = 0.0f;
#pragma unroll
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < n) acc += a[r] * widen(row[d]);
    }
    return warp_sum(acc);
}

// acc[d] += p · row[d] for this lane's features.
template <typename T>
__device__ __forceinline__ void axpy_lane(float* acc, float p, const T* row, int n, int lane) {
#pragma unroll
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < n) acc[r] += p * widen(row[d]);
    }
}

// One block of `n` ≤ 32 keys of the online softmax: lane jj holds key jj's score (−∞ when
// masked); key jj's values start at `v + jj·v_row`. Updates the running max `m`, the sum `l`
// of exp(s − m) and the output accumulator.
template <typename T>
__device__ void online_block(float& m, float& l, float* acc, float s_mine, int n, const T* v, long v_row,
                             int v_head_dim, int lane) {
    const float m_new = fmaxf(m, warp_max(s_mine));
    if (m_new == NEG_INF) return;  // every key so far masked
    const float correction = expf(m - m_new);
    const float p_mine = expf(s_mine - m_new);
    l = l * correction + warp_sum(p_mine);
#pragma unroll
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] *= correction;
    for (int jj = 0; jj < n; jj++) {
        const float p = __shfl_sync(0xffffffffu, p_mine, jj);
        if (p != 0.0f) axpy_lane(acc, p, v + jj * v_row, v_head_dim, lane);
    }
    m = m_new;
}

// Writes o = acc / l (and returns lse = m + log l).
__device__ float online_finish(float* o, const float* acc, float m, float l, int v_head_dim, int lane) {
#pragma unroll
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < v_head_dim) o[d] = acc[r] / l;
    }
    return m + logf(l);
}

// The first key a query at `i` may see under a window of `window` keys (0: no window).
__device__ __forceinline__ long first_key(long i, long window) { return window > 0 && i + 1 > window ? i + 1 - window : 0; }

#define ATTENTION_ARGS                                                                                     \
    long batch, long seq, int q_heads, int kv_heads, int head_dim, int v_head_dim, float scale, long window
#define WARP_OF_THREAD (((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5)

extern "C" __global__ void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                             const int* segments, ATTENTION_ARGS) {
    const int lane = threadIdx.x & 31;
    const long warp = WARP_OF_THREAD;
    if (warp >= batch * seq * q_heads) return;
    const int h = warp % q_heads, kvh = h / (q_heads / kv_heads);
    const long t = warp / q_heads, b = t / seq, i = t % seq, row0 = b * seq;
    const long k_row = (long)kv_heads * head_dim, v_row = (long)kv_heads * v_head_dim;
    float qr[LANE_FEATURES], acc[LANE_FEATURES];
    load_lane(qr, q + (t * q_heads + h) * head_dim, head_dim, lane);
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    const int segment = segments[t];
    for (long j0 = first_key(i, window); j0 <= i; j0 += 32) {
        const int n = i + 1 - j0 < 32 ? (int)(i + 1 - j0) : 32;
        float s_mine = NEG_INF;
        for (int jj = 0; jj < n; jj++) {
            const long j = row0 + j0 + jj;
            const float s = dot_lane(qr, k + j * k_row + kvh * head_dim, head_dim, lane) * scale;
            if (lane == jj && segments[j] == segment) s_mine = s;
        }
        online_block(m, l, acc, s_mine, n, v + (row0 + j0) * v_row + kvh * v_head_dim, v_row, v_head_dim, lane);
    }
    const float row_lse = online_finish(out + (t * q_heads + h) * v_head_dim, acc, m, l, v_head_dim, lane);
    if (lane == 0) lse[(b * q_heads + h) * seq + i] = row_lse;
}

// dq (overwritten) and D_i = do_i·o_i (into `delta`, `[batch, q_heads, seq]` as lse), one warp
// per (query, head).
extern "C" __global__ void attention_backward_dq(float* dq, float* delta, const float* dout, const float* q,
                                                 const float* k, const float* v, const float* out, const float* lse,
                                                 const int* segments, ATTENTION_ARGS) {
    const int lane = threadIdx.x & 31;
    const long warp = WARP_OF_THREAD;
    if (warp >= batch * seq * q_heads) return;
    const int h = warp % q_heads, kvh = h / (q_heads / kv_heads);
    const long t = warp / q_heads, b = t / seq, i = t % seq, row0 = b * seq;
    const long k_row = (long)kv_heads * head_dim, v_row = (long)kv_heads * v_head_dim;
    float qr[LANE_FEATURES], dor[LANE_FEATURES], acc[LANE_FEATURES];
    load_lane(qr, q + (t * q_heads + h) * head_dim, head_dim, lane);
    load_lane(dor, dout + (t * q_heads + h) * v_head_dim, v_head_dim, lane);
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] = 0.0f;
    const float d_i = dot_lane(dor, out + (t * q_heads + h) * v_head_dim, v_head_dim, lane);
    const long stat = (b * q_heads + h) * seq + i;
    const float lse_i = lse[stat];
    const int segment = segments[t];
    for (long j = row0 + first_key(i, window); j <= t; j++) {
        if (segments[j] != segment) continue;
        const float* kj = k + j * k_row + kvh * head_dim;
        const float p = expf(dot_lane(qr, kj, head_dim, lane) * scale - lse_i);
        const float dp = dot_lane(dor, v + j * v_row + kvh * v_head_dim, v_head_dim, lane);
        axpy_lane(acc, p * (dp - d_i), kj, head_dim, lane);
    }
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < head_dim) dq[(t * q_heads + h) * head_dim + d] = scale * acc[r];
    }
    if (lane == 0) delta[stat] = d_i;
}

// dk and dv (overwritten), one warp per (key, kv head), over the queries of every query head
// that reads this kv head; runs after attention_backward_dq, which wrote `delta`.
extern "C" __global__ void attention_backward_dkdv(float* dk, float* dv, const float* dout, const float* q,
                                                   const float* k, const float* v, const float* lse,
                                                   const float* delta, const int* segments, ATTENTION_ARGS) {
    const int lane = threadIdx.x & 31;
    const long warp = WARP_OF_THREAD;
    if (warp >= batch * seq * kv_heads) return;
    const int kvh = warp % kv_heads, group = q_heads / kv_heads;
    const long t = warp / kv_heads, b = t / seq, j = t % seq, row0 = b * seq;
    float kr[LANE_FEATURES], vr[LANE_FEATURES], dk_acc[LANE_FEATURES], dv_acc[LANE_FEATURES];
    load_lane(kr, k + (t * kv_heads + kvh) * head_dim, head_dim, lane);
    load_lane(vr, v + (t * kv_heads + kvh) * v_head_dim, v_head_dim, lane);
    for (int r = 0; r < LANE_FEATURES; r++) dk_acc[r] = dv_acc[r] = 0.0f;
    const long last = window > 0 && j + window - 1 < seq - 1 ? j + window - 1 : seq - 1;
    const int segment = segments[t];
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (long i = j; i <= last; i++) {
            const long ti = row0 + i;
            if (segments[ti] != segment) continue;
            const float* qi = q + (ti * q_heads + h) * head_dim;
            const float* doi = dout + (ti * q_heads + h) * v_head_dim;
            const long stat = (b * q_heads + h) * seq + i;
            const float p = expf(dot_lane(kr, qi, head_dim, lane) * scale - lse[stat]);
            const float dp = dot_lane(vr, doi, v_head_dim, lane);
            axpy_lane(dv_acc, p, doi, v_head_dim, lane);
            axpy_lane(dk_acc, p * (dp - delta[stat]), qi, head_dim, lane);
        }
    }
    for (int r = 0; r < LANE_FEATURES; r++) {
        const int d = lane + 32 * r;
        if (d < head_dim) dk[(t * kv_heads + kvh) * head_dim + d] = scale * dk_acc[r];
        if (d < v_head_dim) dv[(t * kv_heads + kvh) * v_head_dim + d] = dv_acc[r];
    }
}

// Decode: query i (head h) attends the cache rows starts[i] .. starts[i] + lengths[i], the last
// `window` of them with a window (0: none). Cache rows hold [kv_heads, head_dim] keys and
// [kv_heads, v_head_dim] values, stored as T (f32, or bf16 two to a word).
template <typename T>
__device__ void attention_decode(float* out, const float* q, const T* k_cache, const T* v_cache, const int* starts,
                                 const int* lengths, long queries, int q_heads, int kv_heads, int head_dim,
                                 int v_head_dim, float scale, long window) {
    const int lane = threadIdx.x & 31;
    const long warp = WARP_OF_THREAD;
    if (warp >= queries * q_heads) return;
    const int h = warp % q_heads, kvh = h / (q_heads / kv_heads);
    const long i = warp / q_heads;
    const long k_row = (long)kv_heads * head_dim, v_row = (long)kv_heads * v_head_dim;
    const long len = lengths[i], start = starts[i];
    float qr[LANE_FEATURES], acc[LANE_FEATURES];
    load_lane(qr, q + (i * q_heads + h) * head_dim, head_dim, lane);
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (long j0 = start + first_key(len - 1, window); j0 < start + len; j0 += 32) {
        const int n = start + len - j0 < 32 ? (int)(start + len - j0) : 32;
        float s_mine = NEG_INF;
        for (int jj = 0; jj < n; jj++) {
            const float s = dot_lane(qr, k_cache + (j0 + jj) * k_row + kvh * head_dim, head_dim, lane) * scale;
            if (lane == jj) s_mine = s;
        }
        online_block(m, l, acc, s_mine, n, v_cache + j0 * v_row + kvh * v_head_dim, v_row, v_head_dim, lane);
    }
    online_finish(out + (i * q_heads + h) * v_head_dim, acc, m, l, v_head_dim, lane);
}

#define DECODE_KERNEL(name, T)                                                                                     \
    extern "C" __global__ void name(float* out, const float* q, const T* k_cache, const T* v_cache,                \
                                    const int* starts, const int* lengths, long queries, int q_heads, int kv_heads, \
                                    int head_dim, int v_head_dim, float scale, long window) {                      \
        attention_decode(out, q, k_cache, v_cache, starts, lengths, queries, q_heads, kv_heads, head_dim,          \
                         v_head_dim, scale, window);                                                               \
    }
DECODE_KERNEL(attention_decode_f32, float)
DECODE_KERNEL(attention_decode_bf16, bf16_bits)
