// DeepSeek's group-limited top-k router, one thread per token (see backend::Routing).
//
// Forward per token: s = score(z); pick groups, then experts, on s + bias (or take the given
// experts when `fixed`); w = s_sel · scale, divided by (Σ s_sel + 1e-20) when normalising.
// Backward: with S = Σ_sel s + 1e-20 and g = dw · scale,
//   normalised:  ds_m = g_m / S − (Σ_j g_j s_j) / S²   for selected m, 0 elsewhere
//   plain:       ds_m = g_m
//   dz = ds · s'(z):  σ: s(1 − s);  √softplus: σ(z) / 2s = (1 − e^(−s²)) / 2s
//   (1/2s above softplus's threshold 20, where s² = z).
// Selections take the largest value first, the lower index on ties (the CPU's stable sort).

#define MAX_EXPERTS 512
#define MAX_GROUPS 64
#define SCORING_SIGMOID 0
#define SOFTPLUS_THRESHOLD 20.0f

__device__ float route_score(int scoring, float z) {
    if (scoring == SCORING_SIGMOID) return sigmoid(z);
    return z > SOFTPLUS_THRESHOLD ? sqrtf(z) : sqrtf(log1pf(expf(z)));
}

__device__ float route_score_grad(int scoring, float s) {
    if (scoring == SCORING_SIGMOID) return s * (1.0f - s);
    if (s == 0.0f) return 0.0f;
    if (s * s > SOFTPLUS_THRESHOLD) return 0.5f / s;
    return -expm1f(-s * s) / (2.0f * s);
}

// Index of the largest of the `n` values `v` not yet `taken` (-1 when all are).
__device__ int arg_best(const float* v, int n, const bool* taken) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

extern "C" __global__ void moe_route_forward(float* weights, int* indices, float* scores, const float* logits,
                                             const float* bias, long tokens, int experts, int top_k, int groups,
                                             int top_groups, int normalize, float scale, int scoring, int fixed) {
    FOR_EACH(t, tokens) {
        const int per_group = experts / groups;
        float biased[MAX_EXPERTS];
        bool taken[MAX_EXPERTS];
        float* s = scores + t * experts;
        int* idx = indices + t * top_k;
        for (int e = 0; e < experts; e++) s[e] = route_score(scoring, logits[t * experts + e]);
        if (fixed) {
            float sum = 0.0f;
            for (int j = 0; j < top_k; j++) sum += s[idx[j]];
            sum += 1e-20f;
            for (int j = 0; j < top_k; j++)
                weights[t * top_k + j] = (normalize ? s[idx[j]] / sum : s[idx[j]]) * scale;
            continue;
        }
        for (int e = 0; e < experts; e++) {
            biased[e] = s[e] + bias[e];
            taken[e] = false;
        }
        // A group's score is the sum of its two best biased scores.
        float group_score[MAX_GROUPS];
        bool group_taken[MAX_GROUPS];
        for (int g = 0; g < groups; g++) {
            const int a = arg_best(biased + g * per_group, per_group, taken + g * per_group);
            taken[g * per_group + a] = true;
            const int b = arg_best(biased + g * per_group, per_group, taken + g * per_group);
            taken[g * per_group + a] = false;
            group_score[g] = biased[g * per_group + a] + biased[g * per_group + b];
            group_taken[g] = false;
        }
        // Experts of groups left out are taken away; the kept groups' experts compete.
        bool kept[MAX_GROUPS];
        for (int g = 0; g < groups; g++) kept[g] = false;
        for (int i = 0; i < top_groups; i++) {
            const int g = arg_best(group_score, groups, group_taken);
            group_taken[g] = true;
            kept[g] = true;
        }
        for (int e = 0; e < experts; e++) taken[e] = !kept[e / per_group];
        for (int j = 0; j < top_k; j++) {
            const int e = arg_best(biased, experts, taken);
            taken[e] = true;
            idx[j] = e;
        }
        float sum = 0.0f;
        for (int j = 0; j < top_k; j++) sum += s[idx[j]];
        sum += 1e-20f;
        for (int j = 0; j < top_k; j++)
            weights[t * top_k + j] = (normalize ? s[idx[j]] / sum : s[idx[j]]) * scale;
    }
}

extern "C" __global__ void moe_route_backward(float* dlogits, const float* dweights, const float* scores,
                                              const int* indices, long tokens, int experts, int top_k, int normalize,
                                              float scale, int scoring) {
    FOR_EACH(t, tokens) {
        float* dz = dlogits + t * experts;
        const float* s = scores + t * experts;
        const int* idx = indices + t * top_k;
        const float* dw = dweights + t * top_k;
        for (int e = 0; e < experts; e++) dz[e] = 0.0f;
        float sum = 0.0f, dot = 0.0f;
        for (int j = 0; j < top_k; j++) sum += s[idx[j]];
        sum += 1e-20f;
        for (int j = 0; j < top_k; j++) dot += dw[j] * scale * s[idx[j]];
        for (int j = 0; j < top_k; j++) {
            const int e = idx[j];
            const float ds = normalize ? dw[j] * scale / sum - dot / (sum * sum) : dw[j] * scale;
            dz[e] += ds * route_score_grad(scoring, s[e]);  // a table may give one expert twice
        }
    }
}
