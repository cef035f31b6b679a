// Row helpers of the attention kernels: a warp holds a row of up to MAX_HEAD_DIM features
// spread over its lanes (lane `l` holds features l, l + 32, ...), and the online softmax.

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
