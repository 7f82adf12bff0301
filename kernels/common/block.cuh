// Block-wide collectives shared by the list kernels (sparse.cu, kv_select.cu) and decode's merge.
#pragma once
#include "common/types.cuh"

// Inclusive prefix sum of one value per thread over a block of THREADS threads (a multiple of
// 32, at most 1024), in thread order; *total gets the block's sum. `warp_tot` holds THREADS / 32
// values. Two __syncthreads, the second after every read of warp_tot, so calls may follow each
// other on the same buffer.
// Inclusive prefix sum of one value per lane over a full warp, in lane order.
template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const V y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// op(v) over a full warp, returned to every lane.
template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <typename V, int THREADS>
__device__ __forceinline__ V block_inclusive_scan(V v, V* warp_tot, V* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_inclusive_scan(v);
    if (lane == 31) warp_tot[warp] = v;
    __syncthreads();
    V before = V(0), sum = V(0);
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) {
        before += w < warp ? warp_tot[w] : V(0);
        sum += warp_tot[w];
    }
    __syncthreads();
    *total = sum;
    return before + v;
}

// op(v) over a block of THREADS threads (a multiple of 32), returned to every thread; `tmp`
// holds THREADS / 32 floats and is free again on return. Two __syncthreads.
template <int THREADS, class Op>
__device__ __forceinline__ float block_reduce(float v, float* tmp, Op op) {
    v = warp_reduce(v, op);
    if ((threadIdx.x & 31) == 0) tmp[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = tmp[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) m = op(m, tmp[w]);
    __syncthreads();
    return m;
}
