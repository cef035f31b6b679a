// Attention sinks (kiln_core::Backend::attention_sinks_forward); the math is in
// crates/kiln-core/src/cpu/attention_sinks.rs:
//   l' = log(e^l + e^σ),  o' = o · e^(l − l');   dσ = −Σ_t e^(σ − l') (do·o')
// Forward: one thread per (token, head). Backward: one block per head summing its tokens in a
// fixed order (no atomics).
// And the merge of two attentions of the same queries by their log-sum-exps
// (Backend::attention_merge, crates/kiln-core/src/cpu/sparse_attention.rs):
//   l = log(e^l₁ + e^l₂),  o = e^(l₁ − l)·o₁ + e^(l₂ − l)·o₂   (unchanged where both are −∞)

// log(e^a + e^b), exact where one is −∞.
__device__ float log_add_exp(float a, float b) {
    const float hi = fmaxf(a, b), lo = fminf(a, b);
    return lo == NEG_INF ? hi : hi + log1pf(expf(lo - hi));
}

extern "C" __global__ void attention_sinks_forward(float* out, float* lse, const float* sinks, long tokens, int seq,
                                                   int heads, int dv) {
    FOR_EACH(i, tokens * heads) {
        const long t = i / heads;
        const int h = i % heads;
        const long row = t / seq, pos = t % seq;
        float* l = lse + (row * heads + h) * seq + pos;
        const float merged = log_add_exp(*l, sinks[h]);
        const float keep = *l == NEG_INF ? 0.0f : expf(*l - merged);
        float* o = out + i * dv;
        for (int d = 0; d < dv; d++) o[d] *= keep;
        *l = merged;
    }
}

extern "C" __global__ void attention_sinks_backward(float* dsinks, const float* dout, const float* out,
                                                    const float* lse, const float* sinks, long tokens, int seq,
                                                    int heads, int dv) {
    __shared__ float partial[256];
    const int h = blockIdx.x;
    float sum = 0.0f;
    for (long t = threadIdx.x; t < tokens; t += blockDim.x) {
        const long row = t / seq, pos = t % seq;
        const float* o = out + (t * heads + h) * dv;
        const float* g = dout + (t * heads + h) * dv;
        float d = 0.0f;
        for (int k = 0; k < dv; k++) d += g[k] * o[k];
        sum -= expf(sinks[h] - lse[(row * heads + h) * seq + pos]) * d;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) dsinks[h] += partial[0];
}

extern "C" __global__ void attention_merge(float* out, float* lse, const float* other_out, const float* other_lse,
                                           long tokens, int seq, int heads, int dv) {
    FOR_EACH(i, tokens * heads) {
        const long t = i / heads;
        const int h = i % heads;
        const long at = ((t / seq) * heads + h) * seq + t % seq;
        const float merged = log_add_exp(lse[at], other_lse[at]);
        if (merged == NEG_INF) continue;
        const float w1 = expf(lse[at] - merged), w2 = expf(other_lse[at] - merged);
        float* o = out + i * dv;
        const float* o2 = other_out + i * dv;
        for (int d = 0; d < dv; d++) o[d] = w1 * o[d] + w2 * o2[d];
        lse[at] = merged;
    }
}
