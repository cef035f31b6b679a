// bf16 tensor-core products of one warp: D (16×8, f32) += A (16×16, bf16) · B (16×8, bf16),
// PTX's mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (sm_80 and later).
//
// Fragments, for lane l with g = l / 4 and c = l % 4; each 32-bit register holds two bf16,
// the lower column (or row of B) in its low half:
//   A: a[0] = A[g][2c, 2c+1]    a[1] = A[g+8][2c, 2c+1]
//      a[2] = A[g][2c+8, 2c+9]  a[3] = A[g+8][2c+8, 2c+9]
//   B: b[0] = B[2c, 2c+1][g]    b[1] = B[2c+8, 2c+9][g]
//   D: d[0], d[1] = D[g][2c, 2c+1]    d[2], d[3] = D[g+8][2c, 2c+1]
// So a D fragment of two adjacent 16×8 tiles, packed to bf16, is the A fragment of a 16×16
// tile: the probabilities of attention go from one product into the next without shared memory.
// tools/gpu/emulate/cuda_on_cpu.h defines mma_bf16 for checking kernels on the CPU.

// Two floats as bf16 in one register, `lo` in the low half.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)bf16_round(lo) | ((unsigned)bf16_round(hi) << 16);
}

// Two adjacent bf16 of shared memory (the first at an even index) as one register.
__device__ __forceinline__ unsigned pair_bf16(const bf16_bits* p) {
    return (unsigned)p[0] | ((unsigned)p[1] << 16);
}

#ifndef CUDA_ON_CPU
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ < 800
    __trap();  // the host launches the bf16 attention kernels on sm_80 and later only
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

// The A fragment of rows r0 .. r0 + 15, columns k0 .. k0 + 15 of a row-major f32 matrix in
// global memory (row stride `stride`), rounded to bf16; rows at or past `rows` read as zero.
__device__ __forceinline__ void load_a_global(unsigned* a, const float* m, long stride, long r0, long rows, int k0,
                                              int lane) {
    const int g = lane >> 2, c = lane & 3;
    const long top = r0 + g, bottom = r0 + g + 8;
    const float* rt = m + top * stride + k0 + 2 * c;
    const float* rb = m + bottom * stride + k0 + 2 * c;
    a[0] = top < rows ? pack_bf16(rt[0], rt[1]) : 0u;
    a[1] = bottom < rows ? pack_bf16(rb[0], rb[1]) : 0u;
    a[2] = top < rows ? pack_bf16(rt[8], rt[9]) : 0u;
    a[3] = bottom < rows ? pack_bf16(rb[8], rb[9]) : 0u;
}

// The B fragment of B = Mᵀ for a row-major bf16 matrix M in shared memory (row stride
// `stride`): B[k][n] = M[n0 + n][k0 + k], so columns n of B are rows of M.
__device__ __forceinline__ void load_b_rows(unsigned* b, const bf16_bits* m, int stride, int n0, int k0, int lane) {
    const int g = lane >> 2, c = lane & 3;
    const bf16_bits* row = m + (n0 + g) * stride + k0 + 2 * c;
    b[0] = pair_bf16(row);
    b[1] = pair_bf16(row + 8);
}

// The A fragment of a 16×16 tile whose values are two adjacent D fragments (columns 0..7 in
// `left`, 8..15 in `right`), rounded to bf16.
__device__ __forceinline__ void a_from_d(unsigned* a, const float* left, const float* right) {
    a[0] = pack_bf16(left[0], left[1]);
    a[1] = pack_bf16(left[2], left[3]);
    a[2] = pack_bf16(right[0], right[1]);
    a[3] = pack_bf16(right[2], right[3]);
}

// Stages rows first .. first + n − 1 (n ≤ rows) of head `head` of a [tokens, heads, dim] f32
// tensor into shared memory as bf16, row-major (`dst[r·(dim + 8) + d]`) and/or transposed
// (`dst_t[d·(rows + 8) + r]`), each unless null; rows n .. rows − 1 are zero. The padding
// of 8 keeps a warp's fragment loads on distinct banks. The whole block takes part.
__device__ void stage_bf16(bf16_bits* dst, bf16_bits* dst_t, const float* src, long first, int n, int rows,
                           int heads, int head, int dim) {
    for (int idx = threadIdx.x; idx < rows * dim; idx += blockDim.x) {
        const int r = idx / dim, d = idx % dim;
        const bf16_bits x = r < n ? bf16_round(src[((first + r) * heads + head) * dim + d]) : (bf16_bits)0;
        if (dst) dst[r * (dim + 8) + d] = x;
        if (dst_t) dst_t[d * (rows + 8) + r] = x;
    }
}
