// Split-K epilogue shared by the GEMM kernels: each split stores f32 partials (splits, M, N);
// the last CTA of an output tile to take its ticket sums them. The ticket counter is reset by
// that CTA, so the counters stay zero between launches (no memset; CUDA graphs replay).
#pragma once
#include "common/types.cuh"

// True in the CTA that arrives last at `counter`. `sync` is a barrier over every thread that
// calls this (all of them must); `leader` is one of them. Partials stored before the call are
// visible to the last CTA after it returns.
template <typename Sync>
__device__ __forceinline__ bool splitk_arrive_last(i32* counter, int splits, bool leader, Sync sync) {
    __shared__ int is_last;
    __threadfence();
    sync();
    if (leader) {
        const int ticket = atomicAdd(counter, 1);
        is_last = ticket == splits - 1;
        if (is_last) *counter = 0;  // ready for the next launch
    }
    sync();
    const bool last = is_last;
    if (last) __threadfence();
    return last;
}

// out[m0 + tok][n0 + col] = bias + sum over splits, for tok < rows_m, col < cols, by
// `threads` threads (this one is `tid`). R outputs per thread per round keep R * splits loads
// in flight: one at a time, a 64 x 128 tile took 32 serial L2 round trips (16 us). Not inlined:
// it runs once per tile, in one CTA of `splits`, and inlined its registers made ptxas spill in
// the main loop of some sm_90a weight-only variants.
template <typename T, int COLS, int R>
__device__ __noinline__ void splitk_reduce(const float* partial, int splits, int m, int n, int m0, int rows_m,
                                              int n0, int cols, const T* bias, T* out, i64 out_sm, int tid,
                                              int threads) {
    const int total = rows_m * COLS;
    for (int base = tid; base < total; base += threads * R) {
        float sum[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int col = (base + r * threads) % COLS;
            sum[r] = bias != nullptr && col < cols ? to_float(bias[n0 + col]) : 0.f;
        }
        for (int s = 0; s < splits; ++s) {
            const float* ps = partial + ((i64)s * m + m0) * n + n0;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int idx = base + r * threads, tok = idx / COLS, col = idx % COLS;
                if (idx < total && col < cols) sum[r] += __ldcg(ps + (i64)tok * n + col);
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int idx = base + r * threads, tok = idx / COLS, col = idx % COLS;
            if (idx < total && col < cols) out[(i64)(m0 + tok) * out_sm + n0 + col] = T(sum[r]);
        }
    }
}
