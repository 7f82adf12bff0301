// W8A8 GEMM for Hopper (sm_90a): out (M, N) = diag(xs) (xq wq^T) diag(ws) (+ bias), where
// xq (M, K) are the activations quantized per token (scale xs[m]) by `w8a8_quantize_act`
// below, and wq (N, K) the weights quantized per output channel (scale ws[n]). Codes are int8
// (products summed exactly in int32) or float8 e4m3 (summed in f32 by the tensor cores).
//
// Swapped operands, as in the weight-only kernel (gemm.cu): wgmma's 64-row A side takes weight
// rows and its N side (8..256) the tokens, so one token wastes 7/8 of an m64n8 instruction
// rather than 63/64 of an m64 row block. A CTA owns 128 weight rows x BT tokens:
//   warpgroup 0, the producer: one thread streams 128-channel blocks of both operands into a
//     ring of STAGES slots with TMA (128-byte swizzle, the layout wgmma's descriptors read);
//     out-of-range rows and channels arrive as zeros, which add nothing;
//   warpgroups 1 and 2, the consumers: 64 weight rows each, four k32 wgmmas per block, one
//     block left in flight while the next is issued.
// Split-K (blockIdx.y) fills the GPU at small M exactly as in gemm.cu (common/splitk.cuh).
// The GEMM is launched as a programmatic dependent of the pre-pass: its first ring of weight
// loads overlaps the pre-pass and the launch gap.
#pragma once
#include "common/types.cuh"
#include "common/hopper.cuh"
#include "common/wgmma.cuh"
#include "common/splitk.cuh"
#include "common/quant.cuh"

// Mirrors `W8A8Params` in src/ops/gemm_w8a8.rs field for field.
struct W8A8Params {
    TmaDesc tw;            // wq: 2-D (K bytes, N rows), boxes of 128 x 128
    TmaDesc tx;            // xq: 2-D (K bytes, M rows), boxes of 128 x BT
    const float* x_scale;  // (M,)
    const float* w_scale;  // (N,)
    const void* bias;      // (N,) or null
    void* out;             // (M, N), rows out_sm elements apart
    float* partial;        // splits > 1: (splits, M, N)
    i32* counters;         // splits > 1: one ticket per (token tile, weight tile)
    i64 out_sm;
    i32 m, n, k;
    i32 splits, kb_per_split;  // 128-channel blocks of K per split
};

// The accumulator type of a kind: int32 sums of int8 products are exact.
template <int KIND> struct W8Acc { typedef float type; };
template <> struct W8Acc<W8_INT8> { typedef int type; };

template <int BT, int STAGES> struct W8A8Smem {
    static constexpr int BW = 128;  // weight rows per CTA
    static constexpr int W_BYTES = BW * 128;
    static constexpr int X_BYTES = BT * 128;  // a multiple of 1024: slots stay swizzle-aligned
    static constexpr int STAGE = W_BYTES + X_BYTES;
    static constexpr int BAR = STAGES * STAGE;  // full[STAGES], empty[STAGES]
    static constexpr int BYTES = BAR + 16 * STAGES + 1024;  // + slack to align the base
};

template <typename T, int KIND, int BT, int STAGES>
__device__ __forceinline__ void gemm_w8a8_sm90(const W8A8Params& P) {
    using L = W8A8Smem<BT, STAGES>;
    typedef typename W8Acc<KIND>::type Acc;
    extern __shared__ unsigned char smem_raw[];
    const u32 base = (smem_addr(smem_raw) + 1023) & ~1023u;
    auto slot_w = [&](int s) { return base + s * L::STAGE; };
    auto slot_x = [&](int s) { return base + s * L::STAGE + L::W_BYTES; };
    auto full = [&](int s) { return base + L::BAR + 8 * s; };
    auto empty = [&](int s) { return base + L::BAR + 8 * (STAGES + s); };

    const int m0 = blockIdx.x * BT, split = blockIdx.y, n0 = blockIdx.z * L::BW;
    const int kb_total = (P.k + 127) / 128;
    const int kb0 = split * P.kb_per_split;
    const int nkb = min(P.kb_per_split, kb_total - kb0);  // >= 1: the plan gives every split work

    const int wg = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), 8);  // one arrival per consumer warp
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        setmaxnreg_dec<24>();
        if (threadIdx.x != 0) return;
        tma_prefetch_desc(&P.tw);
        tma_prefetch_desc(&P.tx);
        // The first ring of weights does not depend on the pre-pass: it streams in while the
        // pre-pass finishes (programmatic dependent launch); the activations wait for it.
        const int first = min(STAGES, nkb);
        for (int i = 0; i < first; ++i) {
            mbar_arrive_expect_tx(full(i), L::STAGE);
            tma_load_2d(slot_w(i), &P.tw, (kb0 + i) * 128, n0, full(i));
        }
        pdl_wait();
        for (int i = 0; i < first; ++i) tma_load_2d(slot_x(i), &P.tx, (kb0 + i) * 128, m0, full(i));
        for (int i = first; i < nkb; ++i) {
            const int s = i % STAGES;
            mbar_wait(empty(s), ((i / STAGES) & 1) ^ 1);
            mbar_arrive_expect_tx(full(s), L::STAGE);
            const int kc = (kb0 + i) * 128;
            tma_load_2d(slot_w(s), &P.tw, kc, n0, full(s));
            tma_load_2d(slot_x(s), &P.tx, kc, m0, full(s));
        }
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<240>();
    const int c = wg - 1;  // weight rows [n0 + 64c, n0 + 64c + 64)
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    auto release = [&](int s) {
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(s));
    };

    Acc acc[BT / 8][4];
#pragma unroll
    for (int i = 0; i < BT / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0;

    for (int i = 0; i < nkb; ++i) {
        const int s = i % STAGES;
        mbar_wait(full(s), (i / STAGES) & 1);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {  // 32 channels (bytes) per instruction
            const u64 da = smem_desc_sw128(slot_w(s) + c * 64 * 128 + kk * 32, 16, 1024);
            const u64 db = smem_desc_sw128(slot_x(s) + kk * 32, 16, 1024);
            Wgmma8<KIND, BT>::ss(acc, da, db, 1);
        }
        wgmma_commit();
        wgmma_wait<1>();  // block i - 1 is done with its slot
        if (i > 0) release((i - 1) % STAGES);
    }
    wgmma_wait<0>();
    fence_regs(acc);
    release((nkb - 1) % STAGES);
    pdl_wait();  // the token scales are the pre-pass's

    // acc[i]: weight rows g / g + 8 of this warp's 16, tokens 8i + 2t and + 1.
    const int row0 = n0 + 64 * c + 16 * warp + g;
    float ws[2], bias[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = min(row0 + 8 * h, P.n - 1);
        ws[h] = P.w_scale[row];
        bias[h] = P.bias != nullptr ? to_float(static_cast<const T*>(P.bias)[row]) : 0.f;
    }
    const int rows_m = min(BT, P.m - m0);
    // One pass over this thread's outputs: straight to `out` without split-K, else partials.
    // (One loop with a branch, not a generic lambda: the device's NVRTC treats an `auto`
    // parameter lambda as a host function.)
    const bool direct = P.splits == 1;
    T* out = static_cast<T*>(P.out);
    float* part = P.partial + (i64)split * P.m * P.n;
#pragma unroll
    for (int i = 0; i < BT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int tok = 8 * i + 2 * t + e;
            if (tok >= rows_m) continue;
            const float xs = P.x_scale[m0 + tok];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = row0 + 8 * h;
                if (row >= P.n) continue;
                const float v = (float)acc[i][2 * h + e] * xs * ws[h];
                if (direct) out[(i64)(m0 + tok) * P.out_sm + row] = T(v + bias[h]);
                else part[(i64)(m0 + tok) * P.n + row] = v;
            }
        }
    if (direct) return;
    // The last split of this tile to arrive sums every split's partials (consumers only: the
    // producer warpgroup has left, so the barrier is the named one over 256 threads).
    i32* counter = P.counters + blockIdx.z * gridDim.x + blockIdx.x;
    if (!splitk_arrive_last(counter, P.splits, tid == 0 && c == 0, [] { named_barrier(1, 256); })) return;
    splitk_reduce<T, L::BW, 8>(P.partial, P.splits, P.m, P.n, m0, rows_m, n0, min(L::BW, P.n - n0),
                            static_cast<const T*>(P.bias), static_cast<T*>(P.out), P.out_sm, tid + 128 * c, 256);
}

// ---------------------------------------------------------------------------------------------
// Per-token activation quantization, the GEMM's pre-pass: xs[m] = max|x_m| / qmax (at least
// 1e-12) or the static scale, codes = x * (1 / xs) rounded to nearest even (int8: clamped to
// +-127; e4m3: saturated to +-448). The arithmetic is the reference's (ferrokernels.gemm), so the
// codes agree bit for bit. One CTA of 256 threads per row (a warp per row left M = 1 with 32
// dependent loads: 13 us); rows up to 16K elements are read once and held in registers.

// Mirrors `QuantActParams` in src/ops/gemm_w8a8.rs.
struct QuantActParams {
    const void* x;               // (M, K), rows x_sm elements apart, 16-byte aligned
    unsigned char* xq;           // (M, K) codes, contiguous
    float* x_scale;              // (M,)
    const float* static_scale;   // one value, or null for per-token scales
    i64 x_sm;
    i32 m, k;
};

template <int KIND> __device__ __forceinline__ u32 quant_pair(float a, float b);

template <> __device__ __forceinline__ u32 quant_pair<W8_INT8>(float a, float b) {
    return (u32)(int8_code(a) & 0xff) | ((u32)(int8_code(b) & 0xff) << 8);
}

template <> __device__ __forceinline__ u32 quant_pair<W8_FP8>(float a, float b) { return e4m3x2(a, b); }

template <typename T, int KIND>
__device__ __forceinline__ void w8a8_quantize_act(const QuantActParams& p) {
    constexpr int THREADS = 256, R = 8;  // 8 x 8 elements per thread per piece: 46 registers
    constexpr int PIECE = THREADS * 8 * R;
    pdl_launch_dependents();  // the GEMM may start loading weights now
    const int row = blockIdx.x;
    const T* x = static_cast<const T*>(p.x) + (i64)row * p.x_sm;
    const int pieces = (p.k + PIECE - 1) / PIECE;
    uint4 v[R];
    auto load_piece = [&](int piece) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int c = piece * PIECE + (r * THREADS + threadIdx.x) * 8;
            if (c < p.k) v[r] = *reinterpret_cast<const uint4*>(x + c);
        }
    };
    float scale;
    if (p.static_scale != nullptr) {
        scale = *p.static_scale;
    } else {
        float amax = 0.f;
        for (int piece = 0; piece < pieces; ++piece) {
            load_piece(piece);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (piece * PIECE + (r * THREADS + threadIdx.x) * 8 >= p.k) continue;
                const T* e = reinterpret_cast<const T*>(&v[r]);
#pragma unroll
                for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_float(e[j])));
            }
        }
        amax = block_max<THREADS>(amax);
        scale = fmaxf(__fdiv_rn(amax, KIND == W8_INT8 ? 127.f : 448.f), 1e-12f);
    }
    if (threadIdx.x == 0) p.x_scale[row] = scale;
    const float inv = __fdiv_rn(1.f, scale);
    unsigned char* q = p.xq + (i64)row * p.k;
    for (int piece = 0; piece < pieces; ++piece) {
        // A single piece is still in registers from the scan (unless the scale was static).
        if (pieces > 1 || p.static_scale != nullptr) load_piece(piece);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int c = piece * PIECE + (r * THREADS + threadIdx.x) * 8;
            if (c >= p.k) continue;
            const T* e = reinterpret_cast<const T*>(&v[r]);
            u32 w[2];
#pragma unroll
            for (int j = 0; j < 2; ++j)
                w[j] = quant_pair<KIND>(__fmul_rn(to_float(e[4 * j]), inv), __fmul_rn(to_float(e[4 * j + 1]), inv)) |
                       (quant_pair<KIND>(__fmul_rn(to_float(e[4 * j + 2]), inv), __fmul_rn(to_float(e[4 * j + 3]), inv)) << 16);
            *reinterpret_cast<uint2*>(q + c) = make_uint2(w[0], w[1]);
        }
    }
}
