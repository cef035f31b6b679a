// Decode: query i (head h) attends two ranges of cache rows, its prompt's starts[2i] ..
// starts[2i] + lengths[2i] (rows the other sequences of the same prompt read too) then its own
// starts[2i+1] .. starts[2i+1] + lengths[2i+1] (itself last), and of those only the last `window`
// with a window (0: none); either range may be empty. Cache rows hold [kv_heads, head_dim] keys and
// [kv_heads, v_head_dim] values, stored as T (f32, or bf16 two to a word). One warp per
// (query, head), an online softmax over blocks of 32 cache rows:
//   s_j = scale·q·k_j,  o = Σ_j exp(s_j − lse) v_j,  lse = log Σ_j exp(s_j)

#define WARP_OF_THREAD (((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5)

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
    const long len = (long)lengths[2 * i] + lengths[2 * i + 1];
    float qr[LANE_FEATURES], acc[LANE_FEATURES];
    load_lane(qr, q + (i * q_heads + h) * head_dim, head_dim, lane);
    for (int r = 0; r < LANE_FEATURES; r++) acc[r] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    long skip = first_key(len - 1, window);
    for (int range = 0; range < 2; range++) {
        const long start = starts[2 * i + range], rows = lengths[2 * i + range];
        const long first = skip < rows ? skip : rows;
        skip -= first;
        for (long j0 = start + first; j0 < start + rows; j0 += 32) {
            const int n = start + rows - j0 < 32 ? (int)(start + rows - j0) : 32;
            float s_mine = NEG_INF;
            for (int jj = 0; jj < n; jj++) {
                const float s = dot_lane(qr, k_cache + (j0 + jj) * k_row + kvh * head_dim, head_dim, lane) * scale;
                if (lane == jj) s_mine = s;
            }
            online_block(m, l, acc, s_mine, n, v_cache + j0 * v_row + kvh * v_head_dim, v_row, v_head_dim, lane);
        }
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
