// DeepSeek-V4's hyper-connection mixing weights (kiln_core::HyperConnection), one thread per
// token; the math and its backward are in crates/kiln-core/src/cpu/hyper_connection.rs:
//   pre = σ(z) + ε,  post = 2σ(z),  comb = Sinkhorn(softmax_rows(z) + ε),  z = m·s + b
// Backward walks the Sinkhorn normalisations from the last, recomputing each one's input from
// the softmax (cheap for ≤ 8 streams), so a thread keeps four small matrices, not all states.
// The sums over tokens of the bias and scale gradients run one block per column in a fixed
// order (no atomics).

#define HC_MAX_STREAMS 8
#define HC_MAX (HC_MAX_STREAMS * HC_MAX_STREAMS)

#define HC_ARGS long tokens, int n, int iters, float eps, int head

__device__ __forceinline__ int hc_width(int n, int head) { return head ? n : (2 + n) * n; }
// Which scale value `j` of a token's row takes (0: pre, 1: post, 2: comb).
__device__ __forceinline__ int hc_part(int j, int n, int head) { return head ? 0 : min(j / n, 2); }

// p = softmax of each row of z = m·s + b (n × n).
__device__ void hc_softmax(float* p, const float* m, const float* b, float s, int n) {
    for (int i = 0; i < n; i++) {
        float max = NEG_INF;
        for (int j = 0; j < n; j++) {
            p[i * n + j] = m[i * n + j] * s + b[i * n + j];
            max = fmaxf(max, p[i * n + j]);
        }
        float sum = 0.0f;
        for (int j = 0; j < n; j++) {
            p[i * n + j] = expf(p[i * n + j] - max);
            sum += p[i * n + j];
        }
        for (int j = 0; j < n; j++) p[i * n + j] /= sum;
    }
}

// x divided by its column sums (`columns`) or row sums, + ε.
__device__ void hc_normalise(float* x, int n, bool columns, float eps) {
    for (int a = 0; a < n; a++) {
        float sum = eps;
        for (int b = 0; b < n; b++) sum += x[columns ? b * n + a : a * n + b];
        for (int b = 0; b < n; b++) x[columns ? b * n + a : a * n + b] /= sum;
    }
}

// x = P + ε after `steps` normalisations (columns first, then rows and columns in turn).
__device__ void hc_comb_state(float* x, const float* p, int n, int steps, float eps) {
    for (int i = 0; i < n * n; i++) x[i] = p[i] + eps;
    for (int s = 0; s < steps; s++) hc_normalise(x, n, s % 2 == 0, eps);
}

extern "C" __global__ void hc_weights_forward(float* out, const float* mixes, const float* base, const float* scale,
                                              HC_ARGS) {
    FOR_EACH(t, tokens) {
        const int w = hc_width(n, head);
        const float* m = mixes + t * w;
        float* o = out + t * w;
        for (int j = 0; j < (head ? n : 2 * n); j++) {
            const int part = hc_part(j, n, head);
            const float s = sigmoid(m[j] * scale[part] + base[j]);
            o[j] = part == 0 ? s + eps : 2.0f * s;
        }
        if (head) continue;
        float p[HC_MAX], x[HC_MAX];
        hc_softmax(p, m + 2 * n, base + 2 * n, scale[2], n);
        hc_comb_state(x, p, n, 2 * iters - 1, eps);
        for (int i = 0; i < n * n; i++) o[2 * n + i] = x[i];
    }
}

// The gradient of each token's pre-activations z into `dz`.
extern "C" __global__ void hc_weights_backward_z(float* dz, const float* dout, const float* mixes, const float* base,
                                                 const float* scale, HC_ARGS) {
    FOR_EACH(t, tokens) {
        const int w = hc_width(n, head);
        const float* m = mixes + t * w;
        const float* d = dout + t * w;
        float* g = dz + t * w;
        for (int j = 0; j < (head ? n : 2 * n); j++) {
            const int part = hc_part(j, n, head);
            const float s = sigmoid(m[j] * scale[part] + base[j]);
            g[j] = d[j] * (part == 0 ? 1.0f : 2.0f) * s * (1.0f - s);
        }
        if (head) continue;
        float p[HC_MAX], x[HC_MAX], dy[HC_MAX], dx[HC_MAX];
        hc_softmax(p, m + 2 * n, base + 2 * n, scale[2], n);
        for (int i = 0; i < n * n; i++) dy[i] = d[2 * n + i];
        // Normalisation k (0-based) maps state k to state k + 1; walk them from the last.
        for (int k = 2 * iters - 2; k >= 0; k--) {
            hc_comb_state(x, p, n, k, eps);
            const bool columns = k % 2 == 0;
            for (int a = 0; a < n; a++) {
                float sum = eps, dot = 0.0f;
                for (int b = 0; b < n; b++) {
                    const int at = columns ? b * n + a : a * n + b;
                    sum += x[at];
                    dot += dy[at] * x[at];
                }
                for (int b = 0; b < n; b++) {
                    const int at = columns ? b * n + a : a * n + b;
                    dx[at] = dy[at] / sum - dot / (sum * sum);
                }
            }
            for (int i = 0; i < n * n; i++) dy[i] = dx[i];
        }
        for (int i = 0; i < n; i++) {
            float dot = 0.0f;
            for (int j = 0; j < n; j++) dot += dy[i * n + j] * p[i * n + j];
            for (int j = 0; j < n; j++) g[2 * n + i * n + j] = p[i * n + j] * (dy[i * n + j] - dot);
        }
    }
}

// One block per column j: dbase[j] += Σ_t dz[t][j], terms[j] = Σ_t dz[t][j]·m[t][j].
extern "C" __global__ void hc_weights_backward_sums(float* dbase, float* terms, const float* dz, const float* mixes,
                                                    long tokens, int width) {
    const int j = blockIdx.x;
    float db = 0.0f, ds = 0.0f;
    for (long t = threadIdx.x; t < tokens; t += blockDim.x) {
        db += dz[t * width + j];
        ds += dz[t * width + j] * mixes[t * width + j];
    }
    db = block_sum(db);
    ds = block_sum(ds);
    if (threadIdx.x == 0) {
        dbase[j] += db;
        terms[j] = ds;
    }
}

// dscale[part] += Σ_j terms[j] in order (one thread), then dmixes = dz·scale[part] in place.
extern "C" __global__ void hc_weights_backward_scale(float* dscale, const float* terms, int n, int head) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    for (int j = 0; j < hc_width(n, head); j++) dscale[hc_part(j, n, head)] += terms[j];
}

extern "C" __global__ void hc_weights_backward_mixes(float* dz, const float* scale, long tokens, int n, int head) {
    const int w = hc_width(n, head);
    FOR_EACH(i, tokens * w) dz[i] *= scale[hc_part((int)(i % w), n, head)];
}
