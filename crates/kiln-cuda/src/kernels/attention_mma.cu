// Causal grouped-query attention for bf16 mixed precision on tensor cores: FlashAttention-2
// with the products of mma.cuh (inputs rounded to bf16, f32 accumulation), the same masks,
// outputs and math as attention.cu (see there), for head dimensions that are multiples of 16
// up to MMA_MAX_DIM.
//
// Forward: a block of 4 warps holds 64 query rows of one (sequence, head), 16 per warp; the
// warp keeps its queries as A fragments, stages keys in tiles of 64 (k row-major, v transposed)
// and per tile computes S = scale·Q Kᵀ (16 × 64, in registers), the online softmax over its
// rows, and O += P V with P going straight from S's fragments into the next product.
// dq: the same rows; per tile of 32 keys, S and dP = dO Vᵀ, dS = P ∘ (dP − D), dQ += dS K.
// dk, dv: a block holds 64 keys of one kv head, 16 per warp, and walks the query rows that see
// them (every head of the group, tiles of 32 queries): Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, then
// dV += Pᵀ dO and dK += dSᵀ Q. Probabilities and dS are rounded to bf16 for the products
// that take them, as FlashAttention does; row sums, maxima and D stay f32. No atomics.

#define MMA_ROWS 64
#define MMA_MAX_DIM 128
#define MMA_KEYS 64
#define MMA_TILE 32

#define MMA_ATTENTION_ARGS \
    long batch, long seq, int q_heads, int kv_heads, int head_dim, int v_head_dim, float scale, long window

// A block's 64 query rows p0 .. p0 + 63 of sequence b, query head h (kv head kvh); blocks run
// over [batch, q_heads, row tiles].
struct MmaRows {
    long b, p0;
    int h, kvh;
};

__device__ MmaRows mma_rows(long seq, int q_heads, int kv_heads) {
    const long tiles = (seq + MMA_ROWS - 1) / MMA_ROWS;
    MmaRows rows;
    rows.p0 = (blockIdx.x % tiles) * MMA_ROWS;
    rows.h = (int)((blockIdx.x / tiles) % q_heads);
    rows.b = blockIdx.x / tiles / q_heads;
    rows.kvh = rows.h / (q_heads / kv_heads);
    return rows;
}

// Max and sum over the 4 lanes that hold one row of a D fragment.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Shared memory: the k tile (row-major), the v tile (transposed).
extern "C" __global__ void __launch_bounds__(128)
    attention_forward_bf16(float* out, float* lse, const float* q, const float* k, const float* v,
                           const int* segments, MMA_ATTENTION_ARGS) {
    extern __shared__ float shared[];
    bf16_bits* ks = (bf16_bits*)shared;
    bf16_bits* v_t = ks + MMA_KEYS * (head_dim + 8);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const MmaRows blk = mma_rows(seq, q_heads, kv_heads);
    const long row0 = blk.b * seq, r0 = blk.p0 + 16 * w;
    const int k_steps = head_dim / 16, v_tiles = v_head_dim / 8;
    unsigned qf[MMA_MAX_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++)
        if (kk < k_steps)
            load_a_global(qf[kk], q + (row0 * q_heads + blk.h) * head_dim, (long)q_heads * head_dim, r0, seq, 16 * kk,
                          lane);
    float o[MMA_MAX_DIM / 8][4];
#pragma unroll
    for (int vt = 0; vt < MMA_MAX_DIM / 8; vt++) o[vt][0] = o[vt][1] = o[vt][2] = o[vt][3] = 0.0f;
    // This lane's rows g and g + 8: position, segment, running max and (partial) sum.
    const long row[2] = {r0 + g, r0 + g + 8};
    int segment[2];
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int x = 0; x < 2; x++) segment[x] = row[x] < seq ? segments[row0 + row[x]] : -1;
    const long last = blk.p0 + MMA_ROWS - 1 < seq - 1 ? blk.p0 + MMA_ROWS - 1 : seq - 1;
    for (long j0 = first_key(blk.p0, window); j0 <= last; j0 += MMA_KEYS) {
        const int n = last + 1 - j0 < MMA_KEYS ? (int)(last + 1 - j0) : MMA_KEYS;
        __syncthreads();  // the previous tile's readers are done
        stage_bf16(ks, nullptr, k, row0 + j0, n, MMA_KEYS, kv_heads, blk.kvh, head_dim);
        stage_bf16(nullptr, v_t, v, row0 + j0, n, MMA_KEYS, kv_heads, blk.kvh, v_head_dim);
        __syncthreads();
        float s[MMA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < MMA_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
                if (kk >= k_steps) break;
                unsigned b[2];
                load_b_rows(b, ks, head_dim + 8, 8 * nt, 16 * kk, lane);
                mma_bf16(s[nt], qf[kk], b);
            }
        }
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < MMA_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int x = e >> 1;
                const long j = j0 + 8 * nt + 2 * c + (e & 1);
                const bool ok = j <= last && row[x] < seq && sees(row[x], j, window, segment[x], segments[row0 + j]);
                s[nt][e] = ok ? scale * s[nt][e] : NEG_INF;
                mx[x] = fmaxf(mx[x], s[nt][e]);
            }
        float base[2], correction[2];
#pragma unroll
        for (int x = 0; x < 2; x++) {
            const float m_new = fmaxf(m[x], quad_max(mx[x]));
            base[x] = m_new == NEG_INF ? 0.0f : m_new;  // every key so far masked: p = 0
            correction[x] = expf(m[x] - base[x]);
            m[x] = m_new;
            l[x] *= correction[x];
        }
#pragma unroll
        for (int nt = 0; nt < MMA_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nt][e] = expf(s[nt][e] - base[e >> 1]);
                l[e >> 1] += s[nt][e];
            }
#pragma unroll
        for (int vt = 0; vt < MMA_MAX_DIM / 8; vt++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[vt][e] *= correction[e >> 1];
#pragma unroll
        for (int kk = 0; kk < MMA_KEYS / 16; kk++) {
            unsigned p[4];
            a_from_d(p, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int vt = 0; vt < MMA_MAX_DIM / 8; vt++) {
                if (vt >= v_tiles) break;
                unsigned b[2];
                load_b_rows(b, v_t, MMA_KEYS + 8, 8 * vt, 16 * kk, lane);
                mma_bf16(o[vt], p, b);
            }
        }
    }
#pragma unroll
    for (int x = 0; x < 2; x++) {
        const float sum = quad_sum(l[x]);
        if (row[x] >= seq) continue;
        float* out_row = out + ((row0 + row[x]) * q_heads + blk.h) * v_head_dim + 2 * c;
#pragma unroll
        for (int vt = 0; vt < MMA_MAX_DIM / 8; vt++) {
            if (vt >= v_tiles) break;
            out_row[8 * vt] = o[vt][2 * x] / sum;
            out_row[8 * vt + 1] = o[vt][2 * x + 1] / sum;
        }
        if (c == 0) lse[(blk.b * q_heads + blk.h) * seq + row[x]] = m[x] + logf(sum);
    }
}

// dq (overwritten) and D = rowsum(dO ∘ O) (into `delta`, as lse). Shared memory: the k tile
// row-major and transposed, the v tile row-major.
extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_bf16(float* dq, float* delta, const float* dout, const float* q, const float* k,
                               const float* v, const float* out, const float* lse, const int* segments,
                               MMA_ATTENTION_ARGS) {
    extern __shared__ float shared[];
    bf16_bits* ks = (bf16_bits*)shared;
    bf16_bits* k_t = ks + MMA_TILE * (head_dim + 8);
    bf16_bits* vs = k_t + head_dim * (MMA_TILE + 8);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const MmaRows blk = mma_rows(seq, q_heads, kv_heads);
    const long row0 = blk.b * seq, r0 = blk.p0 + 16 * w;
    const int k_steps = head_dim / 16, v_steps = v_head_dim / 16, h_tiles = head_dim / 8;
    unsigned qf[MMA_MAX_DIM / 16][4], df[MMA_MAX_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
        if (kk < k_steps)
            load_a_global(qf[kk], q + (row0 * q_heads + blk.h) * head_dim, (long)q_heads * head_dim, r0, seq, 16 * kk,
                          lane);
        if (kk < v_steps)
            load_a_global(df[kk], dout + (row0 * q_heads + blk.h) * v_head_dim, (long)q_heads * v_head_dim, r0, seq,
                          16 * kk, lane);
    }
    const long row[2] = {r0 + g, r0 + g + 8};
    int segment[2];
    float d_row[2], lse_row[2];
#pragma unroll
    for (int x = 0; x < 2; x++) {
        const long stat = (blk.b * q_heads + blk.h) * seq + row[x];
        float acc = 0.0f;
        if (row[x] < seq) {
            const long at = ((row0 + row[x]) * q_heads + blk.h) * v_head_dim;
            for (int d = c; d < v_head_dim; d += 4) acc += dout[at + d] * out[at + d];
        }
        d_row[x] = quad_sum(acc);
        segment[x] = row[x] < seq ? segments[row0 + row[x]] : -1;
        lse_row[x] = row[x] < seq ? lse[stat] : 0.0f;
        if (row[x] < seq && c == 0) delta[stat] = d_row[x];
    }
    float acc[MMA_MAX_DIM / 8][4];
#pragma unroll
    for (int ht = 0; ht < MMA_MAX_DIM / 8; ht++) acc[ht][0] = acc[ht][1] = acc[ht][2] = acc[ht][3] = 0.0f;
    const long last = blk.p0 + MMA_ROWS - 1 < seq - 1 ? blk.p0 + MMA_ROWS - 1 : seq - 1;
    for (long j0 = first_key(blk.p0, window); j0 <= last; j0 += MMA_TILE) {
        const int n = last + 1 - j0 < MMA_TILE ? (int)(last + 1 - j0) : MMA_TILE;
        __syncthreads();
        stage_bf16(ks, k_t, k, row0 + j0, n, MMA_TILE, kv_heads, blk.kvh, head_dim);
        stage_bf16(vs, nullptr, v, row0 + j0, n, MMA_TILE, kv_heads, blk.kvh, v_head_dim);
        __syncthreads();
        float s[MMA_TILE / 8][4], dp[MMA_TILE / 8][4];
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
                unsigned b[2];
                if (kk < k_steps) {
                    load_b_rows(b, ks, head_dim + 8, 8 * nt, 16 * kk, lane);
                    mma_bf16(s[nt], qf[kk], b);
                }
                if (kk < v_steps) {
                    load_b_rows(b, vs, v_head_dim + 8, 8 * nt, 16 * kk, lane);
                    mma_bf16(dp[nt], df[kk], b);
                }
            }
        }
        // dS into s.
#pragma unroll
        for (int nt = 0; nt < MMA_TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int x = e >> 1;
                const long j = j0 + 8 * nt + 2 * c + (e & 1);
                const bool ok = j <= last && row[x] < seq && sees(row[x], j, window, segment[x], segments[row0 + j]);
                const float p = ok ? expf(scale * s[nt][e] - lse_row[x]) : 0.0f;
                s[nt][e] = p * (dp[nt][e] - d_row[x]);
            }
#pragma unroll
        for (int kk = 0; kk < MMA_TILE / 16; kk++) {
            unsigned ds[4];
            a_from_d(ds, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int ht = 0; ht < MMA_MAX_DIM / 8; ht++) {
                if (ht >= h_tiles) break;
                unsigned b[2];
                load_b_rows(b, k_t, MMA_TILE + 8, 8 * ht, 16 * kk, lane);
                mma_bf16(acc[ht], ds, b);
            }
        }
    }
#pragma unroll
    for (int x = 0; x < 2; x++) {
        if (row[x] >= seq) continue;
        float* dq_row = dq + ((row0 + row[x]) * q_heads + blk.h) * head_dim + 2 * c;
#pragma unroll
        for (int ht = 0; ht < MMA_MAX_DIM / 8; ht++) {
            if (ht >= h_tiles) break;
            dq_row[8 * ht] = scale * acc[ht][2 * x];
            dq_row[8 * ht + 1] = scale * acc[ht][2 * x + 1];
        }
    }
}

// dk and dv (overwritten); runs after attention_backward_dq_bf16, which wrote `delta`. Blocks
// run over [batch, kv_heads, key tiles of 64]. Shared memory: the query tile's lse and D, then
// q and do tiles, each row-major and transposed.
extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dkdv_bf16(float* dk, float* dv, const float* dout, const float* q, const float* k,
                                 const float* v, const float* lse, const float* delta, const int* segments,
                                 MMA_ATTENTION_ARGS) {
    extern __shared__ float shared[];
    float* lse_s = shared;
    float* delta_s = lse_s + MMA_TILE;
    bf16_bits* qs = (bf16_bits*)(delta_s + MMA_TILE);
    bf16_bits* q_t = qs + MMA_TILE * (head_dim + 8);
    bf16_bits* dos = q_t + head_dim * (MMA_TILE + 8);
    bf16_bits* do_t = dos + MMA_TILE * (v_head_dim + 8);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const long tiles = (seq + MMA_ROWS - 1) / MMA_ROWS;
    const long p0 = (blockIdx.x % tiles) * MMA_ROWS;
    const int kvh = (int)((blockIdx.x / tiles) % kv_heads);
    const long b = blockIdx.x / tiles / kv_heads;
    const int group = q_heads / kv_heads;
    const long row0 = b * seq, k0 = p0 + 16 * w;
    const int k_steps = head_dim / 16, v_steps = v_head_dim / 16, h_tiles = head_dim / 8, v_tiles = v_head_dim / 8;
    unsigned kf[MMA_MAX_DIM / 16][4], vf[MMA_MAX_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
        if (kk < k_steps)
            load_a_global(kf[kk], k + (row0 * kv_heads + kvh) * head_dim, (long)kv_heads * head_dim, k0, seq, 16 * kk,
                          lane);
        if (kk < v_steps)
            load_a_global(vf[kk], v + (row0 * kv_heads + kvh) * v_head_dim, (long)kv_heads * v_head_dim, k0, seq,
                          16 * kk, lane);
    }
    // This lane's keys g and g + 8.
    const long key[2] = {k0 + g, k0 + g + 8};
    int segment[2];
#pragma unroll
    for (int x = 0; x < 2; x++) segment[x] = key[x] < seq ? segments[row0 + key[x]] : -1;
    float dk_acc[MMA_MAX_DIM / 8][4], dv_acc[MMA_MAX_DIM / 8][4];
#pragma unroll
    for (int t = 0; t < MMA_MAX_DIM / 8; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk_acc[t][e] = dv_acc[t][e] = 0.0f;
    // The last query that sees the block's last key.
    const long block_last = p0 + MMA_ROWS - 1 < seq - 1 ? p0 + MMA_ROWS - 1 : seq - 1;
    const long last = window > 0 && block_last + window - 1 < seq - 1 ? block_last + window - 1 : seq - 1;
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (long i0 = p0; i0 <= last; i0 += MMA_TILE) {
            const int n = last + 1 - i0 < MMA_TILE ? (int)(last + 1 - i0) : MMA_TILE;
            __syncthreads();
            stage_bf16(qs, q_t, q, row0 + i0, n, MMA_TILE, q_heads, h, head_dim);
            stage_bf16(dos, do_t, dout, row0 + i0, n, MMA_TILE, q_heads, h, v_head_dim);
            for (int r = threadIdx.x; r < MMA_TILE; r += blockDim.x) {
                const long stat = (b * q_heads + h) * seq + i0 + r;
                lse_s[r] = r < n ? lse[stat] : 0.0f;
                delta_s[r] = r < n ? delta[stat] : 0.0f;
            }
            __syncthreads();
            // Sᵀ (then Pᵀ) and dPᵀ (then dSᵀ): rows this warp's keys, columns the tile's queries.
            float st[MMA_TILE / 8][4], dpt[MMA_TILE / 8][4];
#pragma unroll
            for (int nt = 0; nt < MMA_TILE / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) st[nt][e] = dpt[nt][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
                    unsigned bb[2];
                    if (kk < k_steps) {
                        load_b_rows(bb, qs, head_dim + 8, 8 * nt, 16 * kk, lane);
                        mma_bf16(st[nt], kf[kk], bb);
                    }
                    if (kk < v_steps) {
                        load_b_rows(bb, dos, v_head_dim + 8, 8 * nt, 16 * kk, lane);
                        mma_bf16(dpt[nt], vf[kk], bb);
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < MMA_TILE / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int x = e >> 1, col = 8 * nt + 2 * c + (e & 1);
                    const long i = i0 + col;
                    const bool ok =
                        col < n && key[x] < seq && sees(i, key[x], window, segments[row0 + i], segment[x]);
                    const float p = ok ? expf(scale * st[nt][e] - lse_s[col]) : 0.0f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - delta_s[col]);
                }
#pragma unroll
            for (int kk = 0; kk < MMA_TILE / 16; kk++) {
                unsigned p[4], ds[4];
                a_from_d(p, st[2 * kk], st[2 * kk + 1]);
                a_from_d(ds, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
                for (int t = 0; t < MMA_MAX_DIM / 8; t++) {
                    unsigned bb[2];
                    if (t < v_tiles) {
                        load_b_rows(bb, do_t, MMA_TILE + 8, 8 * t, 16 * kk, lane);
                        mma_bf16(dv_acc[t], p, bb);
                    }
                    if (t < h_tiles) {
                        load_b_rows(bb, q_t, MMA_TILE + 8, 8 * t, 16 * kk, lane);
                        mma_bf16(dk_acc[t], ds, bb);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int x = 0; x < 2; x++) {
        if (key[x] >= seq) continue;
        const long t_key = (row0 + key[x]) * kv_heads + kvh;
#pragma unroll
        for (int t = 0; t < MMA_MAX_DIM / 8; t++) {
            if (t < h_tiles) {
                dk[t_key * head_dim + 8 * t + 2 * c] = scale * dk_acc[t][2 * x];
                dk[t_key * head_dim + 8 * t + 2 * c + 1] = scale * dk_acc[t][2 * x + 1];
            }
            if (t < v_tiles) {
                dv[t_key * v_head_dim + 8 * t + 2 * c] = dv_acc[t][2 * x];
                dv[t_key * v_head_dim + 8 * t + 2 * c + 1] = dv_acc[t][2 * x + 1];
            }
        }
    }
}
