// Weight-only low-bit GEMM: out (M, N) = x (M, K) @ W^T (+ bias), W as 4- or 8-bit codes with
// a scale (and zero point or minimum) per group of input channels. At small M the op streams
// the weights once: its job is to keep HBM busy while tensor cores do the little math there is.
//
// Swapped operands: the MMA computes out^T = W x^T, so 16 weight rows fill the m16 side and
// tokens the n8 side; at M = 1 only 7/8 of the MMA is wasted instead of 15/16.
//
// Packed weights (python/ferrokernels/gemm.py `pack`): tiles of 16 rows x 64 input channels,
// stored [N/16][K/64][lane][bytes], where a lane's 16 bytes (4-bit) or 32 bytes (8-bit) are
// exactly its A fragments of the tile's four 16x16 MMA steps. 4-bit: one u32 per step, nibble
// p (p < 4) the low and nibble p + 4 the high half of fragment register p; 8-bit: two u32 per
// step, bytes (a_p.lo, a_p.hi, a_p+1.lo, a_p+1.hi), codes offset by +128.
// Packed metadata: (G, N) scales, or (G, N, 2) {scale, zero code + magic} / {scale, minimum}.
//
// Dequantization by magic numbers: a code c OR-ed into the mantissa of 1024.0 (f16) or 128.0
// (bf16) reads as magic + c, so (bits - (magic + z)) is the exact integer c - z and one
// multiply (or fma with the minimum) rounds once, as the format's reference does.
//
// Split-K: blockIdx.y takes a share of K; the splits write f32 partials and the last CTA to
// finish a tile (a ticket counter it resets afterwards, so the buffer stays zeroed and CUDA
// graphs can replay) sums them, adds the bias and writes the output.
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/splitk.cuh"

// sm_80: without a minimum of one block ptxas settles on 80 registers and spills 4 bytes in a
// few variants. Not on sm_90: there the bound costs 15% at M = 1 (more registers, measured).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define GEMM_LAUNCH_BOUNDS __launch_bounds__(128, 1)
#else
#define GEMM_LAUNCH_BOUNDS __launch_bounds__(128)
#endif

// Mirrors `GemmParams` in src/ops/gemm.rs field for field.
struct GemmParams {
    const void* x;        // (M, K), rows x_sm elements apart, 16-byte aligned
    const void* w;        // packed codes
    const void* meta;     // packed per-group scales (+ zero codes / minimums)
    const void* bias;     // (N,) or null
    void* out;            // (M, N), rows out_sm elements apart
    float* partial;       // splits > 1: (splits, M, N)
    i32* counters;        // splits > 1: one ticket per (m tile, n tile), zero between launches
    i64 x_sm, out_sm;
    i32 m, n, k, group_size;
    i32 splits, kt_per_split;  // 64-channel tiles of K per split
};

// How a group's codes become weights.
enum GemmZeros { ZK_SYM = 0, ZK_POINTS = 1, ZK_MINS = 2 };

template <typename T> struct Magic;
template <> struct Magic<__half> { static constexpr u32 bits = 0x64006400u; static constexpr float value = 1024.f; };
template <> struct Magic<__nv_bfloat16> { static constexpr u32 bits = 0x43004300u; static constexpr float value = 128.f; };

template <typename T> struct Vec2;
template <> struct Vec2<__half> { typedef __half2 type; };
template <> struct Vec2<__nv_bfloat16> { typedef __nv_bfloat162 type; };

template <typename T2> __device__ __forceinline__ T2 as_t2(u32 v) { return *reinterpret_cast<T2*>(&v); }
template <typename T2> __device__ __forceinline__ u32 as_u32(T2 v) { return *reinterpret_cast<u32*>(&v); }

// One group's arithmetic for one weight row, as T2 pairs: w = (bits - zb) * s + m.
template <typename T, int ZK> struct GroupCoef {
    typedef typename Vec2<T>::type T2;
    T2 s, zb, m;
    __device__ __forceinline__ void load(const T* meta_row) {
        s = T2(meta_row[0], meta_row[0]);
        if constexpr (ZK == ZK_SYM) {
            zb = T2(T(Magic<T>::value + 8.f), T(Magic<T>::value + 8.f));
        } else {
            const T second = meta_row[1];
            if constexpr (ZK == ZK_POINTS) {
                zb = T2(second, second);
            } else {
                zb = T2(T(Magic<T>::value), T(Magic<T>::value));
                m = T2(second, second);
            }
        }
    }
    __device__ __forceinline__ u32 apply(u32 bits) const {
        const T2 q = __hsub2(as_t2<T2>(bits), zb);
        if constexpr (ZK == ZK_MINS) return as_u32(__hfma2(q, s, m));
        else return as_u32(__hmul2(q, s));
    }
};

// 4-bit: one u32 -> the four A registers of one 16x16 step. Rows g use coef[0], g + 8 coef[1].
template <typename T, int ZK>
__device__ __forceinline__ void dequant4(u32 (&a)[4], u32 word, const GroupCoef<T, ZK> (&coef)[2]) {
#pragma unroll
    for (int p = 0; p < 4; ++p) a[p] = coef[p & 1].apply(((word >> (4 * p)) & 0x000F000Fu) | Magic<T>::bits);
}

// 8-bit (symmetric, codes + 128): two u32 -> four A registers.
template <typename T>
__device__ __forceinline__ void dequant8(u32 (&a)[4], u32 w0, u32 w1, const GroupCoef<T, ZK_SYM> (&coef)[2]) {
    typedef typename Vec2<T>::type T2;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const u32 w = p < 2 ? w0 : w1;
        const u32 sel_lo = (p & 1) ? 2u : 0u;
        if constexpr (Magic<T>::bits == 0x64006400u) {
            // f16: 1024 + u is exact for u < 1024.
            const u32 bits = __byte_perm(w, 0x64646464u, 0x4040u | sel_lo | ((sel_lo + 1) << 8));
            const T2 q = __hsub2(as_t2<T2>(bits), T2(T(1152.f), T(1152.f)));
            a[p] = as_u32(__hmul2(q, coef[p & 1].s));
        } else {
            // bf16 has 8 significant bits: go through f32 (2^23 + u), then round once.
            const float lo = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | sel_lo)) - 8388736.f;
            const float hi = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | (sel_lo + 1))) - 8388736.f;
            const float s = to_float(coef[p & 1].s.x);
            a[p] = pack2<T>(lo * s, hi * s);
        }
    }
}

// Group index of the gi-th group of 64-channel tile kt (groups are 32 channels or a multiple
// of 64). 32-bit division: a 64-bit one by a run-time value is a called subroutine.
__device__ __forceinline__ int group_of(const GemmParams& p, int kt, int gi) {
    return p.group_size == 32 ? 2 * kt + gi : kt / (p.group_size >> 6);
}

template <int BITS, int MT, int KTS>
struct GemmSmem {
    static constexpr int BN = 64;                       // weight rows per CTA (4 warps x 16)
    static constexpr int LANE_BYTES = BITS == 4 ? 16 : 32;  // per lane per 16x64 tile
    static constexpr int W_BYTES = 4 * KTS * 32 * LANE_BYTES;
    static constexpr int XROW = KTS * 64 + 8;           // padded: ldmatrix rows on distinct banks
    static constexpr int X_BYTES = MT * 8 * XROW * 2;
    static constexpr int META_BYTES = KTS * 2 * BN * 4; // up to two groups per 64-channel tile
    static constexpr int STAGE_BYTES = W_BYTES + X_BYTES + META_BYTES;
};

// T: activation/output dtype; BITS 4 or 8; ZK a GemmZeros; MT tiles of 8 tokens per CTA;
// KTS 64-channel tiles per pipeline stage.
template <typename T, int BITS, int ZK, int MT, int KTS, int STAGES>
__device__ __forceinline__ void gemm_fwd(const GemmParams& p) {
    using L = GemmSmem<BITS, MT, KTS>;
    constexpr int BN = L::BN, XROW = L::XROW, LB = L::LANE_BYTES;
    constexpr int MB = ZK == ZK_SYM ? 2 : 4;  // metadata bytes per (row, group)
    extern __shared__ __align__(16) unsigned char smem_raw[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * BN, split = blockIdx.y, m0 = blockIdx.z * MT * 8;
    const int kt_total = p.k / 64;
    const int kt_begin = split * p.kt_per_split;
    const int kt_end = min(kt_total, kt_begin + p.kt_per_split);
    const int stages_n = kt_end > kt_begin ? (kt_end - kt_begin + KTS - 1) / KTS : 0;
    const int rows_m = min(MT * 8, p.m - m0);
    // Groups of 32 channels put two groups in each 64-channel tile; larger groups one.
    const int gpt = p.group_size == 32 ? 2 : 1;

    const unsigned char* wg = static_cast<const unsigned char*>(p.w);
    const unsigned char* metag = static_cast<const unsigned char*>(p.meta);
    const T* xg = static_cast<const T*>(p.x) + (i64)m0 * p.x_sm;

    auto stage_base = [&](int slot) { return smem_raw + slot * L::STAGE_BYTES; };
    auto load_stage = [&](int s, int slot) {
        unsigned char* base = stage_base(slot);
        const int kt0 = kt_begin + s * KTS;
        const int nk = min(KTS, kt_end - kt0);
        // Weights: each warp's 16 rows are KTS contiguous tiles in global memory.
        constexpr int W_CHUNKS = KTS * 32 * LB / 16;  // per warp row-tile
        for (int c = threadIdx.x; c < 4 * W_CHUNKS; c += 128) {
            const int wt = c / W_CHUNKS, off = c % W_CHUNKS;
            if (off * 16 >= nk * 32 * LB) continue;
            const i64 tile = (i64)(n0 / 16 + wt) * kt_total + kt0;
            cp_async_16(smem_addr(base + (wt * W_CHUNKS + off) * 16), wg + tile * 32 * LB + off * 16, true);
        }
        // Activations: rows past M are never read back into an output, so they are not loaded.
        unsigned char* sx = base + L::W_BYTES;
        for (int c = threadIdx.x; c < MT * 8 * KTS * 8; c += 128) {
            const int r = c / (KTS * 8), col = (c % (KTS * 8)) * 8;
            if (r >= rows_m || col >= nk * 64) continue;
            cp_async_16(smem_addr(sx + (r * XROW + col) * 2), xg + (i64)r * p.x_sm + kt0 * 64 + col, true);
        }
        // Metadata: for each tile and group, the CTA's 64 rows (contiguous in (G, N[, 2])).
        unsigned char* sm = sx + L::X_BYTES;
        constexpr int M_CHUNKS = BN * MB / 16;
        for (int c = threadIdx.x; c < KTS * 2 * M_CHUNKS; c += 128) {
            const int kt = c / (2 * M_CHUNKS), gi = (c / M_CHUNKS) % 2, off = c % M_CHUNKS;
            if (kt >= nk || gi >= gpt) continue;
            const i64 group = group_of(p, kt0 + kt, gi);
            cp_async_16(smem_addr(sm + ((kt * 2 + gi) * M_CHUNKS + off) * 16),
                        metag + (group * p.n + n0) * MB + off * 16, true);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < stages_n) load_stage(s, s);
        cp_async_commit();
    }

    float acc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    for (int s = 0; s < stages_n; ++s) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage s landed for all; every warp is done with the slot refilled next
        if (s + STAGES - 1 < stages_n) load_stage(s + STAGES - 1, (s + STAGES - 1) % STAGES);
        cp_async_commit();

        const unsigned char* base = stage_base(s % STAGES);
        const int nk = min(KTS, kt_end - (kt_begin + s * KTS));
        const unsigned char* sw = base + warp * (KTS * 32 * LB) + lane * LB;
        const u32 sx = smem_addr(base + L::W_BYTES) + (((lane & 7) * XROW + (lane >> 3) * 8) * 2);
        const T* smeta = reinterpret_cast<const T*>(base + L::W_BYTES + L::X_BYTES);
        // One 16 x 64 tile of this warp's rows against every token tile.
        auto tile = [&](int kt) {
            u32 words[LB / 4];
#pragma unroll
            for (int v = 0; v < LB / 16; ++v) {
                const uint4 q = *reinterpret_cast<const uint4*>(sw + kt * 32 * LB + v * 16);
                words[4 * v] = q.x, words[4 * v + 1] = q.y, words[4 * v + 2] = q.z, words[4 * v + 3] = q.w;
            }
            GroupCoef<T, ZK> coef[2][2];  // [group in tile][row half]
#pragma unroll
            for (int gi = 0; gi < 2; ++gi) {
                if (gi == 1 && p.group_size != 32) {
                    coef[1][0] = coef[0][0], coef[1][1] = coef[0][1];
                    continue;
                }
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    coef[gi][h].load(smeta + ((kt * 2 + gi) * BN + warp * 16 + g + 8 * h) * (MB / 2));
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {  // 32 channels: one ldmatrix.x4 per token tile
                u32 bfr[MT][4];
#pragma unroll
                for (int j = 0; j < MT; ++j)
                    ldmatrix_x4(bfr[j], sx + ((j * 8 * XROW) + kt * 64 + half * 32) * 2);
#pragma unroll
                for (int step = 0; step < 2; ++step) {
                    const int i = 2 * half + step;  // 16-channel step within the tile
                    u32 a[4];
                    if constexpr (BITS == 4) dequant4<T, ZK>(a, words[i], coef[i >> 1]);
                    else dequant8<T>(a, words[2 * i], words[2 * i + 1], coef[i >> 1]);
#pragma unroll
                    for (int j = 0; j < MT; ++j) mma_16816<T>(acc[j], a, bfr[j][2 * step], bfr[j][2 * step + 1]);
                }
            }
        };
        // One call site, so the body is inlined (two made ptxas outline it, with a stack frame).
#pragma unroll
        for (int kt = 0; kt < KTS; ++kt)
            if (kt < nk) tile(kt);
    }
    cp_async_wait<0>();

    // acc[j]: rows g / g + 8 of the warp's 16, tokens 8j + 2t and + 1.
    const int nrow = n0 + warp * 16 + g;
    const T* bias = static_cast<const T*>(p.bias);
    if (p.splits == 1) {
        T* out = static_cast<T*>(p.out);
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = j * 8 + 2 * t + (e & 1), row = nrow + 8 * (e >> 1);
                if (tok >= rows_m) continue;
                const float b = bias != nullptr ? to_float(bias[row]) : 0.f;
                out[(i64)(m0 + tok) * p.out_sm + row] = T(acc[j][e] + b);
            }
        return;
    }
    float* part = p.partial + (i64)split * p.m * p.n;
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int tok = j * 8 + 2 * t + (e & 1), row = nrow + 8 * (e >> 1);
            if (tok < rows_m) part[(i64)(m0 + tok) * p.n + row] = acc[j][e];
        }
    // The last split of this tile to arrive sums every split's partials.
    i32* counter = p.counters + blockIdx.z * gridDim.x + blockIdx.x;
    if (!splitk_arrive_last(counter, p.splits, threadIdx.x == 0, [] { __syncthreads(); })) return;
    splitk_reduce<T, BN, 8>(p.partial, p.splits, p.m, p.n, m0, rows_m, n0, BN, bias, static_cast<T*>(p.out), p.out_sm,
                         threadIdx.x, 128);
}

// The dequantized weight W (N, K) in T, from the packed layout: the path of large M, where a
// dense tensor-core GEMM on W beats re-dequantizing it for every tile of tokens. One warp per
// 16 x 64 tile, grid (K/64 / 4, N/16); p.out is W, rows p.out_sm elements apart. The fragments
// go through shared memory so the stores to W are whole 16-byte rows pieces (4-byte stores
// scattered over 16 rows ran at a third of the bandwidth).
template <typename T, int BITS, int ZK>
__device__ __forceinline__ void gemm_dequant(const GemmParams& p) {
    constexpr int LB = BITS == 4 ? 16 : 32;
    constexpr int MB = ZK == ZK_SYM ? 2 : 4;
    constexpr int SROW = 64 + 8;  // padded row: the fragment writes spread over the banks
    __shared__ __align__(16) T tile[4][16 * SROW];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int kt_total = p.k / 64;
    const int kt = blockIdx.x * 4 + warp, nt = blockIdx.y;
    if (kt >= kt_total) return;  // whole warps only: no block-wide barrier below
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(p.w) +
                                                      ((i64)nt * kt_total + kt) * 32 * LB + lane * LB);
    u32 words[LB / 4];
#pragma unroll
    for (int v = 0; v < LB / 16; ++v) {
        const uint4 q = __ldg(src + v);
        words[4 * v] = q.x, words[4 * v + 1] = q.y, words[4 * v + 2] = q.z, words[4 * v + 3] = q.w;
    }
    const T* meta = static_cast<const T*>(p.meta);
    GroupCoef<T, ZK> coef[2][2];
#pragma unroll
    for (int gi = 0; gi < 2; ++gi) {
        const i64 group = group_of(p, kt, p.group_size == 32 ? gi : 0);
#pragma unroll
        for (int h = 0; h < 2; ++h) coef[gi][h].load(meta + (group * p.n + nt * 16 + g + 8 * h) * (MB / 2));
    }
    T* sw = tile[warp];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 a[4];
        if constexpr (BITS == 4) dequant4<T, ZK>(a, words[i], coef[i >> 1]);
        else dequant8<T>(a, words[2 * i], words[2 * i + 1], coef[i >> 1]);
#pragma unroll
        for (int r = 0; r < 4; ++r)
            *reinterpret_cast<u32*>(sw + (g + 8 * (r & 1)) * SROW + 16 * i + 8 * (r >> 1) + 2 * t) = a[r];
    }
    __syncwarp();
    T* out = static_cast<T*>(p.out) + (i64)nt * 16 * p.out_sm + kt * 64;
#pragma unroll
    for (int c = lane; c < 16 * 8; c += 32) {  // 16 rows x 8 chunks of 8 elements
        const int row = c >> 3, col = (c & 7) * 8;
        *reinterpret_cast<uint4*>(out + row * p.out_sm + col) = *reinterpret_cast<const uint4*>(sw + row * SROW + col);
    }
}
