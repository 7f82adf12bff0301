// Quantization steps shared by the pre-passes that turn activations into 8-bit codes
// (gemm_w8a8.cu, quant_attention.cu).
#pragma once
#include "common/types.cuh"

// Max of v over the block's THREADS threads (a multiple of 32); every thread gets it. Contains a
// __syncthreads: call it from all threads or none.
template <int THREADS>
__device__ __forceinline__ float block_max(float v) {
    __shared__ float warp_max[THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = v;
    __syncthreads();
    v = warp_max[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) v = fmaxf(v, warp_max[w]);
    return v;
}

// An INT8 code: round to nearest even (as torch.round), clamped to the symmetric [-127, 127].
__device__ __forceinline__ int int8_code(float x) { return max(-127, min(127, __float2int_rn(x))); }

// Two e4m3 codes (round to nearest even, saturating), lo in the low byte.
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
    unsigned short r;
    // The first source lands in the upper byte.
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// The value of an e4m3 code (the low byte of `code`).
__device__ __forceinline__ float e4m3_value(unsigned short code) {
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(code));
    return __half2float(__ushort_as_half((unsigned short)(h2 & 0xffff)));
}
