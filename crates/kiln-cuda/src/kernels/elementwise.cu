// Element-wise kernels: residual adds, scaling, reductions, column blocks, bias, SwiGLU,
// bf16 conversion, AdamW.

extern "C" __global__ void add_assign(float* dst, const float* src, long n) {
    FOR_EACH(i, n) dst[i] += src[i];
}

extern "C" __global__ void scale(float* dst, float s, long n) {
    FOR_EACH(i, n) dst[i] *= s;
}

// partial[block] = Σ x² over the block's grid-stride elements, in f64; the host adds the
// partials in order (a fixed grid makes the sum the same run to run).
extern "C" __global__ void sum_squares_partial(double* partial, const float* x, long n) {
    double acc = 0.0;
    FOR_EACH(i, n) acc += (double)x[i] * (double)x[i];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// dst[r, dst_offset + c] (+)= src[r, src_offset + c] for c < cols.
extern "C" __global__ void copy_columns(float* dst, const float* src, long rows, long cols, long src_stride,
                                        long src_offset, long dst_stride, long dst_offset, int accumulate) {
    FOR_EACH(i, rows * cols) {
        const long r = i / cols, c = i % cols;
        const float v = src[r * src_stride + src_offset + c];
        float* d = dst + r * dst_stride + dst_offset + c;
        *d = accumulate ? *d + v : v;
    }
}

// y[r, c] += bias[c]
extern "C" __global__ void add_bias(float* y, const float* bias, long n, long cols) {
    FOR_EACH(i, n) y[i] += bias[i % cols];
}

// dbias[c] += Σ_r dy[r, c]: one thread per column, rows in order.
extern "C" __global__ void bias_backward(float* dbias, const float* dy, long rows, long cols) {
    FOR_EACH(c, cols) {
        float acc = 0.0f;
        for (long r = 0; r < rows; r++) acc += dy[r * cols + c];
        dbias[c] += acc;
    }
}

// x[r, c] *= w[r]
extern "C" __global__ void scale_rows(float* x, const float* w, long n, long cols) {
    FOR_EACH(i, n) x[i] *= w[i / cols];
}

// out[r] = Σ_c a[r, c]·b[r, c]: one block per row.
extern "C" __global__ void row_dot(float* out, const float* a, const float* b, long cols) {
    const long r = blockIdx.x;
    float acc = 0.0f;
    for (long c = threadIdx.x; c < cols; c += blockDim.x) acc += a[r * cols + c] * b[r * cols + c];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[r] = acc;
}

// SwiGLU:  h = silu(g)·u,  silu(g) = g·σ(g),  g = min(gate, L),  u = clamp(up, −L, L)
//   dh/du = silu(g),  dh/dg = u·σ(g)·(1 + g·(1 − σ(g)))
extern "C" __global__ void swiglu_forward(float* h, const float* gate, const float* up, long n, float limit) {
    FOR_EACH(i, n) {
        const float g = fminf(gate[i], limit), u = fminf(fmaxf(up[i], -limit), limit);
        h[i] = g * sigmoid(g) * u;
    }
}

// A clamp passes the gradient where it let the value through (bounds included, as autograd).
extern "C" __global__ void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate,
                                           const float* up, long n, float limit) {
    FOR_EACH(i, n) {
        const float g = fminf(gate[i], limit), u = fminf(fmaxf(up[i], -limit), limit), s = sigmoid(g);
        dup[i] = fabsf(up[i]) <= limit ? dh[i] * g * s : 0.0f;
        dgate[i] = gate[i] <= limit ? dh[i] * u * s * (1.0f + g * (1.0f - s)) : 0.0f;
    }
}

// The bf16 inputs of a mixed-precision matrix product.
extern "C" __global__ void round_bf16(bf16_bits* dst, const float* src, long n) {
    FOR_EACH(i, n) dst[i] = bf16_round(src[i]);
}

// x = bf16(x), kept in f32.
extern "C" __global__ void round_to_bf16(float* x, long n) {
    FOR_EACH(i, n) x[i] = bf16_widen(bf16_round(x[i]));
}

// PyTorch's lerp(a, b, w): a + w·(b − a) for |w| < 0.5, else b − (1 − w)·(b − a).
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
    return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// Muon's momentum (torch.optim.Muon): buf ← lerp(buf, g, 1 − μ); update ← lerp(g, buf, μ)
// with Nesterov, else buf. The host passes rest = 1 − μ (computed in double, as Python does).
extern "C" __global__ void muon_momentum(float* update, float* buf, const float* grad, long n, float rest,
                                         float momentum, int nesterov) {
    FOR_EACH(i, n) {
        const float g = grad[i];
        const float m = torch_lerp(buf[i], g, rest);
        buf[i] = m;
        update[i] = nesterov ? torch_lerp(g, m, momentum) : m;
    }
}

// AdamW, step for step as torch.optim.AdamW (non-fused, non-amsgrad):
//   p ← p·(1 − lr·λ)
//   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²
//   p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)
// The host passes step_size = lr/(1−β₁ᵗ), bc2_sqrt = √(1−β₂ᵗ) and decay = 1 − lr·λ.
extern "C" __global__ void adamw(float* param, const float* grad, float* m, float* v, long n, float beta1,
                                 float beta2, float eps, float step_size, float bc2_sqrt, float decay) {
    FOR_EACH(i, n) {
        const float g = grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

extern "C" __global__ void fill(float* dst, float value, long n) {
    FOR_EACH(i, n) dst[i] = value;
}
