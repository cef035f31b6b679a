// Runs CUDA C kernels on the CPU for checking them without a GPU: every thread of a block is an
// OS thread; __syncthreads and warp shuffles are barriers; blocks run one after another, so
// `__shared__` (made `static`) is the block's shared memory.
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

#define CUDA_ON_CPU
#define __global__
#define __launch_bounds__(n)
#define __device__
#define __forceinline__ inline
#define __shared__ static

static std::unique_ptr<std::barrier<>> emu_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
static double emu_exchange[64][32];
alignas(16) static float emu_dynamic_shared[48 * 1024 / 4 + 64];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

template <typename T> T emu_shuffle(T v, int src) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(&emu_exchange[w][lane], &v, sizeof(T));
    __syncwarp();
    T r;
    std::memcpy(&r, &emu_exchange[w][src & 31], sizeof(T));
    __syncwarp();
    return r;
}
template <typename T> T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, src); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu_shuffle(v, (int)(threadIdx.x % 32) ^ mask); }

inline void __trap() { abort(); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// mma.sync m16n8k16 (bf16 in, f32 accumulate) over the warp, with the fragment layout of
// kernels/mma.cuh: every lane posts its fragments, then computes its own part of D.
static unsigned emu_mma_a[64][32][4], emu_mma_b[64][32][2];
inline float emu_bf16(unsigned bits16) { unsigned u = bits16 << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(emu_mma_a[w][lane], a, 16);
    std::memcpy(emu_mma_b[w][lane], b, 8);
    __syncwarp();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, c = l % 4;
        const unsigned* la = emu_mma_a[w][l];
        const unsigned* lb = emu_mma_b[w][l];
        for (int h = 0; h < 2; h++) {
            A[g][2 * c + h] = emu_bf16((la[0] >> (16 * h)) & 0xffff);
            A[g + 8][2 * c + h] = emu_bf16((la[1] >> (16 * h)) & 0xffff);
            A[g][2 * c + 8 + h] = emu_bf16((la[2] >> (16 * h)) & 0xffff);
            A[g + 8][2 * c + 8 + h] = emu_bf16((la[3] >> (16 * h)) & 0xffff);
            B[2 * c + h][g] = emu_bf16((lb[0] >> (16 * h)) & 0xffff);
            B[2 * c + 8 + h][g] = emu_bf16((lb[1] >> (16 * h)) & 0xffff);
        }
    }
    __syncwarp();
    const int g = lane / 4, c = lane % 4;
    for (int e = 0; e < 4; e++) {
        const int r = g + 8 * (e / 2), col = 2 * c + e % 2;
        float acc = d[e];
        for (int kk = 0; kk < 16; kk++) acc += A[r][kk] * B[kk][col];
        d[e] = acc;
    }
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
#include <math.h>

// Runs `kernel` over `grid` blocks of `block` threads.
inline void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; b++) {
        emu_block_barrier = std::make_unique<std::barrier<>>(block);
        emu_warp_barriers.clear();
        for (unsigned w = 0; w < block / 32; w++) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++)
            threads.emplace_back([&, b, t] {
                blockIdx.x = b; threadIdx.x = t;
                kernel();
                // An exited thread no longer holds up its block or warp.
                emu_warp_barriers[t / 32]->arrive_and_drop();
                emu_block_barrier->arrive_and_drop();
            });
        for (auto& th : threads) th.join();
    }
}
