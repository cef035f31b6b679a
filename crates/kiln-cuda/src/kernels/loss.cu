// Losses over the vocabulary, one block per row of logits.

// Softmax cross-entropy with a per-token loss weight, and the token accuracy. Per row with
// target t:  lse = log Σ_j exp(z_j),  nll = lse − z_t,  correct = [z_t = max z].
// Loss = Σ_rows weight·nll, so  dz_j = weight·(softmax(z)_j − [j = t]) (`backward`: written
// over the logits, as llm.c's fused classifier). A negative target contributes nothing; a
// target beyond the vocabulary gives NaN.
__device__ void cross_entropy_row(float* z, float* nll, float* correct, int target, float weight, long vocab,
                                  bool backward) {
    if (target < 0) {
        if (threadIdx.x == 0) {
            *nll = 0.0f;
            *correct = 0.0f;
        }
        if (backward)
            for (long j = threadIdx.x; j < vocab; j += blockDim.x) z[j] = 0.0f;
        return;
    }
    const float zt = target < vocab ? z[target] : QNAN;
    float max = NEG_INF;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, z[j]);
    max = block_max(max);
    float sum = 0.0f;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(z[j] - max);
    const float lse = max + logf(block_sum(sum));
    if (threadIdx.x == 0) {
        *nll = lse - zt;
        *correct = zt >= max ? 1.0f : 0.0f;
    }
    if (backward)
        for (long j = threadIdx.x; j < vocab; j += blockDim.x)
            z[j] = weight * expf(z[j] - lse) - (j == target ? weight : 0.0f);
}

extern "C" __global__ void cross_entropy_forward(float* nll, float* correct, const float* logits, const int* targets,
                                                 long vocab) {
    const long row = blockIdx.x;
    cross_entropy_row((float*)logits + row * vocab, nll + row, correct + row, targets[row], 0.0f, vocab, false);
}

extern "C" __global__ void cross_entropy_backward(float* logits, float* nll, float* correct, const int* targets,
                                                  const float* weights, long vocab) {
    const long row = blockIdx.x;
    cross_entropy_row(logits + row * vocab, nll + row, correct + row, targets[row], weights[row], vocab, true);
}

// log Σ exp(x) of one row, in f64.
__device__ double log_sum_exp_f64(const float* x, long vocab) {
    float max = NEG_INF;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, x[j]);
    max = block_max(max);
    double sum = 0.0;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp((double)x[j] - (double)max);
    return (double)max + log(block_sum_f64(sum));
}

// Reverse KL of distillation, fused with its gradient. Per row with student logits z and
// teacher logits y:
//   log p = z − lse(z),  log q = y − lse(y),  KL = Σ_v p_v (log p_v − log q_v)
//   ∂KL/∂z_v = p_v (log p_v − log q_v − KL)
// Loss = Σ_rows weight·KL: the logits are overwritten with weight·∂KL/∂z. Sums in f64.
extern "C" __global__ void reverse_kl_backward(float* logits, float* kl, const float* teacher, const float* weights,
                                               long vocab) {
    const long row = blockIdx.x;
    float* z = logits + row * vocab;
    const float* y = teacher + row * vocab;
    const double lse_z = log_sum_exp_f64(z, vocab), lse_y = log_sum_exp_f64(y, vocab);
    double acc = 0.0;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double lp = (double)z[j] - lse_z, lq = (double)y[j] - lse_y;
        acc += exp(lp) * (lp - lq);
    }
    const double divergence = block_sum_f64(acc);
    if (threadIdx.x == 0) kl[row] = (float)divergence;
    const double w = (double)weights[row];
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double lp = (double)z[j] - lse_z, lq = (double)y[j] - lse_y;
        z[j] = (float)(w * exp(lp) * (lp - lq - divergence));
    }
}

// The losses over one block of the vocabulary (vocabulary parallel: `vocab` columns of every
// row, from the vocabulary's `first`). The blocks' statistics (max m, log Σ exp(z − m)) give
// the whole row's lse, handed back as two floats (lse[0] + lse[1], f64's precision):
//   cross-entropy, target t:  dz_j = w·(exp(z_j − lse) − [first + j = t])
//   reverse KL, teacher y:    log p = z − lse_z,  log q = y − lse_y,
//                             KL = Σ_blocks Σ_v p_v (log p_v − log q_v),
//                             dz_v = w·p_v (log p_v − log q_v − KL)

// The block's column of target t, or −1.
__device__ long block_column(int target, long vocab, long first) {
    const long j = (long)target - first;
    return target >= 0 && j >= 0 && j < vocab ? j : -1;
}

// stats[row] = (max z, log Σ exp(z − max), z_t where the block holds t, else 0).
extern "C" __global__ void vocab_block_stats(float* stats, const float* logits, const int* targets, long vocab,
                                             long first) {
    const long row = blockIdx.x;
    const float* z = logits + row * vocab;
    float max = NEG_INF;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, z[j]);
    max = block_max(max);
    float sum = 0.0f;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(z[j] - max);
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const long t = block_column(targets[row], vocab, first);
        stats[row * 3] = max;
        stats[row * 3 + 1] = logf(sum);
        stats[row * 3 + 2] = t >= 0 ? z[t] : 0.0f;
    }
}

extern "C" __global__ void cross_entropy_block_backward(float* logits, const float* lse, const int* targets,
                                                        const float* weights, long vocab, long first) {
    const long row = blockIdx.x;
    float* z = logits + row * vocab;
    const int target = targets[row];
    const double l = (double)lse[row * 2] + (double)lse[row * 2 + 1];
    const float w = target < 0 ? 0.0f : weights[row];
    const long t = block_column(target, vocab, first);
    for (long j = threadIdx.x; j < vocab; j += blockDim.x)
        z[j] = w * expf((float)((double)z[j] - l)) - (j == t ? w : 0.0f);
}

extern "C" __global__ void reverse_kl_block_forward(float* kl, const float* logits, const float* teacher,
                                                    const float* lse, long vocab) {
    const long row = blockIdx.x;
    const float *z = logits + row * vocab, *y = teacher + row * vocab;
    const double lse_z = (double)lse[row * 4] + (double)lse[row * 4 + 1];
    const double lse_y = (double)lse[row * 4 + 2] + (double)lse[row * 4 + 3];
    double acc = 0.0;
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double lp = (double)z[j] - lse_z, lq = (double)y[j] - lse_y;
        acc += exp(lp) * (lp - lq);
    }
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) kl[row] = (float)acc;
}

extern "C" __global__ void reverse_kl_block_backward(float* logits, const float* teacher, const float* lse,
                                                     const float* kl, const float* weights, long vocab) {
    const long row = blockIdx.x;
    float* z = logits + row * vocab;
    const float* y = teacher + row * vocab;
    const double lse_z = (double)lse[row * 4] + (double)lse[row * 4 + 1];
    const double lse_y = (double)lse[row * 4 + 2] + (double)lse[row * 4 + 3];
    const double w = (double)weights[row], divergence = (double)kl[row];
    for (long j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double lp = (double)z[j] - lse_z, lq = (double)y[j] - lse_y;
        z[j] = (float)(w * exp(lp) * (lp - lq - divergence));
    }
}
