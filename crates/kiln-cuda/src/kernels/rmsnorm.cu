// RMSNorm, optionally fused with the residual add that precedes it; one block per row.
//
// Forward:  r = 1/√(mean(x²) + ε),  y = x·r·w
// Backward: with g = dy·w,
//   dx = r·g − x·r³·(Σ g·x)/D
//   dw = Σ_rows dy·x·r

__device__ void rmsnorm_row(float* y, float* rstd, const float* x, const float* w, long d, float eps) {
    float ss = 0.0f;
    for (long c = threadIdx.x; c < d; c += blockDim.x) ss += x[c] * x[c];
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (long c = threadIdx.x; c < d; c += blockDim.x) y[c] = x[c] * r * w[c];
    if (threadIdx.x == 0) *rstd = r;
}

extern "C" __global__ void rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, long d, float eps) {
    const long row = blockIdx.x;
    rmsnorm_row(y + row * d, rstd + row, x + row * d, w, d, eps);
}

// x += delta; y = rmsnorm(x)
extern "C" __global__ void add_rmsnorm_forward(float* x, const float* delta, float* y, float* rstd, const float* w,
                                               long d, float eps) {
    const long row = blockIdx.x;
    float* xr = x + row * d;
    for (long c = threadIdx.x; c < d; c += blockDim.x) xr[c] += delta[row * d + c];
    __syncthreads();
    rmsnorm_row(y + row * d, rstd + row, xr, w, d, eps);
}

// dx += r·dy·w − x·r³·(Σ dy·w·x)/D, one block per row.
extern "C" __global__ void rmsnorm_backward_dx(float* dx, const float* dy, const float* x, const float* w,
                                               const float* rstd, long d) {
    const long row = blockIdx.x;
    const float* dyr = dy + row * d;
    const float* xr = x + row * d;
    float dot = 0.0f;
    for (long c = threadIdx.x; c < d; c += blockDim.x) dot += dyr[c] * w[c] * xr[c];
    dot = block_sum(dot);
    const float r = rstd[row];
    const float k = r * r * r * dot / (float)d;
    for (long c = threadIdx.x; c < d; c += blockDim.x) dx[row * d + c] += r * dyr[c] * w[c] - k * xr[c];
}

// dw[c] += Σ_rows dy·x·r: one thread per column, rows in order.
extern "C" __global__ void rmsnorm_backward_dw(float* dw, const float* dy, const float* x, const float* rstd, long rows,
                                               long d) {
    FOR_EACH(c, d) {
        float acc = 0.0f;
        for (long r = 0; r < rows; r++) acc += dy[r * d + c] * x[r * d + c] * rstd[r];
        dw[c] += acc;
    }
}
