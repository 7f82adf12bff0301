// The attention the last queries of a prefill pay to every key, summed per kv head: what the
// attention-based presses (python/ferrokernels/kv.py: SnapKV, PyramidKV, TOVA, H2O, the
// DuoAttention estimate) score tokens with, without the (heads, queries, keys) matrix:
//
//   out[b, hk, j] = sum over the group's q heads h and window queries i with j <= pos_i of
//                   exp(scale * q[b, i, h] . k[b, j, hk] - lse[b, h, i]),
//
// the w window queries sitting at the last positions pos_i = n - w + i, each query's LSE over
// all its keys given (the prefill's, or one attention pass). kv.py's torch formula is the
// reference.
//
// With `diag` (DIAG kernels, one q head per kv head, w <= WS_DIAG_MAX_W) the same
// probabilities are also summed per diagonal d = pos_i - j (MInference's slash lines,
// sparse.py's vertical_slash calls it once per q head of a group):
//
//   diag[b, h, d] += sum over window queries i with pos_i - j = d,
//
// in shared memory per CTA (its keys and the window span w + KEYS - 1 diagonals), then added to
// `diag`, which starts at zero (neighbouring CTAs share diagonals).
//
// Orientation: keys are the MMA's M side. A warp holds WS_MT 16-key tiles as A fragments for
// the CTA's whole life and streams the group's query rows past them in chunks of 64 (B
// fragments, the rows r = h * w + i over q heads h of the group); each B fragment feeds every
// key tile of the warp (two for D <= 128). The probabilities are summed over rows by a second
// MMA against a matrix of ones, in float16 (all terms positive: the sum's relative error stays
// under 2^-11) with float32 accumulation.
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/softmax.cuh"
#include "common/attention.cuh"

// Mirrors `WindowScoresParams` in src/ops/window_scores.rs field for field. Strides in elements.
struct WindowScoresParams {
    const void* q;        // (batch, w, heads_q, D)
    const void* k;        // (batch, n, heads_kv, D)
    const float* lse;     // (batch, heads_q, w) natural log, contiguous (window_lse: null)
    float* out;           // (batch, heads_kv, n), contiguous
    float* diag;          // DIAG: (batch, heads_kv, n), contiguous, zeroed by the caller
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;
    i32 batch, n, w, heads_kv, group, pad_;
    float scale_log2;     // softmax scale * log2(e)
    float pad2_;
};

constexpr int WS_WARPS = 4;
constexpr int WS_ROWS = 64;  // query rows per chunk
constexpr int WS_COLS = 32;  // query rows per MMA pass (the score registers of one pass)
constexpr int WS_DIAG_MAX_W = 256;  // DIAG: the most window queries (sizes the diagonal sums)

template <int D>
struct WindowScoresSmem {
    static constexpr int MT = D <= 128 ? 2 : 1;  // 16-key tiles per warp (A fragments in registers)
    static constexpr int KEYS = 16 * MT * WS_WARPS;  // keys per CTA
    static constexpr int SROW = D + 8;  // padded rows: ldmatrix rows hit distinct banks
    static constexpr int K_ELEMS = KEYS * SROW;
    static constexpr int Q_ELEMS = WS_ROWS * SROW;
    static constexpr int DIAGS = WS_DIAG_MAX_W + KEYS;  // DIAG: the CTA's diagonal sums
    // Layout: the K tile, two query stages, then per stage the rows' LSE (natural log) and
    // positions, then (DIAG) the diagonal sums; WindowScoresSpec::smem_bytes in
    // src/ops/window_scores.rs sums it.
};

// The first and last query positions among chunk c's rows [64 c, 64 c + 64): a chunk
// spanning two q heads holds every position. A chunk past the last row (padding) reports -1
// as its first, so it takes the masked path, which drops those columns.
__device__ __forceinline__ int2 ws_chunk_positions(const WindowScoresParams& p, int c) {
    const int rows = p.group * p.w;
    const int r0 = c * WS_ROWS, r1 = min(r0 + WS_ROWS, rows) - 1;
    const int first = r0 + WS_ROWS > rows ? -1 : r0 / p.w != r1 / p.w ? p.n - p.w : p.n - p.w + r0 % p.w;
    return make_int2(first, r0 / p.w != r1 / p.w ? p.n - 1 : p.n - p.w + r1 % p.w);
}

// The next chunk from c with a row at or after key j0 (only H2O's w = n skips any).
__device__ __forceinline__ int ws_next_chunk(const WindowScoresParams& p, int c, int chunks, int j0) {
    while (c < chunks && ws_chunk_positions(p, c).y < j0) ++c;
    return c;
}

// Chunk c's query rows and their LSE (natural log) into shared memory by cp.async, nothing
// waited for here (a plain load of the LSE stalled two warps for an L2 round trip per
// chunk); the rows' positions (-1 past the last row) by plain stores.
template <typename T, int D>
__device__ __forceinline__ void ws_load_chunk(const WindowScoresParams& p, T* sQ, float* sL, int* sP, int b, int hk,
                                              int c) {
    constexpr int CH = D / 8, SROW = D + 8, STEP = 32 * WS_WARPS / CH;  // rows per pass
    const int rows = p.group * p.w;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + (i64)hk * p.group * p.q_sh;
    const int col = (threadIdx.x % CH) * 8;
    // This thread's rows r, r + STEP, ...: (q head h, query i) stepped without divisions.
    int r = threadIdx.x / CH, row = c * WS_ROWS + r;
    int h = row / p.w, i = row - h * p.w;
    for (; r < WS_ROWS; r += STEP) {
        const bool ok = row < rows;
        cp_async_16(smem_addr(sQ + r * SROW + col), ok ? qg + i * p.q_ss + h * p.q_sh + col : qg, ok);
        row += STEP, i += STEP;
        while (i >= p.w) i -= p.w, ++h;
    }
    if (threadIdx.x < WS_ROWS) {
        const int row = c * WS_ROWS + threadIdx.x;
        const bool ok = row < rows;
        const int h = ok ? row / p.w : 0, i = ok ? row - h * p.w : 0;
        const float* src = p.lse + ((i64)b * p.heads_kv * p.group + hk * p.group + h) * p.w + i;
        if (p.lse != nullptr) cp_async_4(smem_addr(sL + threadIdx.x), ok ? src : p.lse, ok);  // null: window_lse
        sP[threadIdx.x] = ok ? p.n - p.w + i : -1;
    }
}

// The top of a chunk step: waits for chunk c in `stage` (and, the first time, the keys) to land,
// then -- every warp past the barrier, so done with the other stage (and window_lse's sR) --
// starts chunk `next` there.
template <typename T, int D>
__device__ __forceinline__ void ws_advance(const WindowScoresParams& p, T* sQ, float* sL, int* sP, int b, int hk,
                                           int stage, int next, int chunks) {
    cp_async_wait<0>();
    __syncthreads();
    if (next < chunks) {
        const int o = stage ^ 1;
        ws_load_chunk<T, D>(p, sQ + o * WindowScoresSmem<D>::Q_ELEMS, sL + o * WS_ROWS, sP + o * WS_ROWS, b, hk, next);
    }
    cp_async_commit();
}

// The CTA's KEYS keys from j0 into sK by cp.async (zeros past n), one 16-byte chunk per copy.
template <typename T, int D>
__device__ __forceinline__ void ws_load_keys(const WindowScoresParams& p, T* sK, int b, int hk, int j0) {
    using L = WindowScoresSmem<D>;
    constexpr int CH = D / 8;
    const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    for (int x = threadIdx.x; x < L::KEYS * CH; x += 32 * WS_WARPS) {
        const int r = x / CH, col = (x % CH) * 8, key = j0 + r;
        cp_async_16(smem_addr(sK + r * L::SROW + col), key < p.n ? kg + (i64)key * p.k_ss + col : kg, key < p.n);
    }
}

// The warp's MT 16-key tiles of sK as A fragments, held for the CTA's life.
template <typename T, int D>
__device__ __forceinline__ void ws_key_fragments(u32 (&kf)[WindowScoresSmem<D>::MT][D / 16][4], const T* sK) {
    using L = WindowScoresSmem<D>;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int m = 0; m < L::MT; ++m)
        q_fragments<T, D>(kf[m], sK + (16 * (L::MT * warp + m) + (lane & 15)) * L::SROW + (lane >> 4) * 8);
}

// Raw scores of the warp's keys (M side) against the chunk's query rows c0 .. c0 + WS_COLS - 1
// (N side): s[m][i] is key tile m by the 8 rows c0 + 8 i.
template <typename T, int D>
__device__ __forceinline__ void ws_pass_scores(float (&s)[WindowScoresSmem<D>::MT][WS_COLS / 8][4],
                                               const u32 (&kf)[WindowScoresSmem<D>::MT][D / 16][4], const T* sQc, int c0) {
    using L = WindowScoresSmem<D>;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < L::MT; ++m)
#pragma unroll
        for (int i = 0; i < WS_COLS / 8; ++i) s[m][i][0] = s[m][i][1] = s[m][i][2] = s[m][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int np = 0; np < WS_COLS / 16; ++np) {
            u32 bq[4];
            ldmatrix_x4(bq, smem_addr(sQc + (c0 + np * 16 + (lane & 7) + (lane >> 4) * 8) * L::SROW + kk * 16 +
                                      ((lane >> 3) & 1) * 8));
#pragma unroll
            for (int m = 0; m < L::MT; ++m) {
                mma_16816<T>(s[m][2 * np], kf[m][kk], bq[0], bq[1]);
                mma_16816<T>(s[m][2 * np + 1], kf[m][kk], bq[2], bq[3]);
            }
        }
}

// DIAG: a thread's probabilities of one 32-row pass (rows row0.., of the one q head: group 1)
// added to the CTA's diagonal sums sD (entry x is diagonal d_base + x); masked cells are 0. The
// rows are consecutive positions, so a thread's 4 x 4 x MT cells fall on 2 * U diagonals,
// summed in registers first (14 shared atomics instead of 32 at MT = 2; one per cell made the
// kernel 4.7x slower than without diagonals).
template <int MT>
__device__ __forceinline__ void ws_add_diagonals(const WindowScoresParams& p, const float (&s)[MT][WS_COLS / 8][4],
                                                 float* sD, int key_a, int d_base, int t, int row0) {
    // d = d0 + 8 u + (e & 1) with u = i - 2 m - (e >> 1) in [-(2 MT - 1), WS_COLS / 8 - 1].
    constexpr int U = WS_COLS / 8 + 2 * MT - 1, U0 = 2 * MT - 1;
    float acc[U][2] = {};
#pragma unroll
    for (int i = 0; i < WS_COLS / 8; ++i)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i - 2 * m - (e >> 1) + U0][e & 1] += s[m][i][e];
    const int d0 = p.n - p.w + row0 + 2 * t - key_a;
    // A sum that is not 0 holds a cell of a real row (padding rows are masked), so its diagonal
    // lies inside sD.
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (acc[u][h] != 0.f) atomicAdd(sD + d0 + 8 * (u - U0) + h - d_base, acc[u][h]);
}

template <typename T, int D, bool DIAG>
__device__ __forceinline__ void window_scores(const WindowScoresParams& p, unsigned char* smem_raw) {
    using L = WindowScoresSmem<D>;
    constexpr int MT = L::MT, KEYS = L::KEYS;
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sQ = sK + L::K_ELEMS;
    float* sL = reinterpret_cast<float*>(sQ + 2 * L::Q_ELEMS);
    int* sP = reinterpret_cast<int*>(sL + 2 * WS_ROWS);
    float* sD = reinterpret_cast<float*>(sP + 2 * WS_ROWS);  // DIAG: entry x is diagonal d_base + x

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads_kv, hk = bh - b * p.heads_kv;
    const int j0 = blockIdx.x * KEYS;
    const int chunks = (p.group * p.w + WS_ROWS - 1) / WS_ROWS;

    // The CTA's keys (zeros past n: their sums are never written), with the first chunk.
    ws_load_keys<T, D>(p, sK, b, hk, j0);
    // The CTA's diagonals: pos in [n - w, n - 1], keys in [j0, j0 + KEYS - 1].
    const int d_base = p.n - p.w - (j0 + KEYS - 1);
    if constexpr (DIAG) {
        for (int x = threadIdx.x; x < p.w + KEYS - 1; x += 32 * WS_WARPS) sD[x] = 0.f;  // seen after the loop's barrier
    }
    int c = ws_next_chunk(p, 0, chunks, j0);
    if (c < chunks) ws_load_chunk<T, D>(p, sQ, sL, sP, b, hk, c);
    cp_async_commit();

    // Keys of this warp: rows key_a + 16 m and key_a + 16 m + 8 of the C fragments.
    const int key_a = j0 + 16 * MT * warp + g;
    const int key_last = min(j0 + KEYS, p.n) - 1;
    u32 kf[MT][D / 16][4];
    // Per key tile, the sums over query rows as an m16n8 accumulator: P (keys x 16 rows, in
    // float16) times a 16 x 8 matrix of ones on the tensor cores, so the reduction costs one
    // conversion per two probabilities instead of an add per probability. Every column of
    // the result holds the row sum; a thread's keys g and g + 8 are sums[m][0] and [2].
    float sums[MT][4] = {};
    const u32 ones = 0x3c003c00u;  // float16x2 (1, 1)
    bool k_loaded = false;
    for (int stage = 0; c < chunks; stage ^= 1) {
        const int next = ws_next_chunk(p, c + 1, chunks, j0);
        ws_advance<T, D>(p, sQ, sL, sP, b, hk, stage, next, chunks);
        if (!k_loaded) {
            ws_key_fragments<T, D>(kf, sK);
            k_loaded = true;
        }
        const T* sQc = sQ + stage * L::Q_ELEMS;
        const float* lse = sL + stage * WS_ROWS;
        const int* pos = sP + stage * WS_ROWS;
        // Only chunks holding a row before the CTA's last key (or padding rows) need the causal
        // test; it is a separate pass so the others carry no per-element compare.
        const bool edge = ws_chunk_positions(p, c).x < key_last;
#pragma unroll
        for (int c0 = 0; c0 < WS_ROWS; c0 += WS_COLS) {
            float s[MT][WS_COLS / 8][4];
            ws_pass_scores<T, D>(s, kf, sQc, c0);
#pragma unroll
            for (int i = 0; i < WS_COLS / 8; ++i) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse + c0 + 8 * i + 2 * t);
                const float l[2] = {l2.x * 1.4426950408889634f, l2.y * 1.4426950408889634f};  // log2 units
#pragma unroll
                for (int m = 0; m < MT; ++m)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[m][i][e] = fast_exp2(fmaf(s[m][i][e], p.scale_log2, -l[e & 1]));
            }
            if (edge) {
#pragma unroll
                for (int i = 0; i < WS_COLS / 8; ++i)
#pragma unroll
                    for (int m = 0; m < MT; ++m)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (key_a + 16 * m + 8 * (e >> 1) > pos[c0 + 8 * i + 2 * t + (e & 1)]) s[m][i][e] = 0.f;
            }
            if constexpr (DIAG) ws_add_diagonals<MT>(p, s, sD, key_a, d_base, t, c * WS_ROWS + c0);
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int kc = 0; kc < WS_COLS / 16; ++kc) {
                    const u32 a[4] = {pack2<__half>(s[m][2 * kc][0], s[m][2 * kc][1]),
                                      pack2<__half>(s[m][2 * kc][2], s[m][2 * kc][3]),
                                      pack2<__half>(s[m][2 * kc + 1][0], s[m][2 * kc + 1][1]),
                                      pack2<__half>(s[m][2 * kc + 1][2], s[m][2 * kc + 1][3])};
                    mma_16816<__half>(sums[m], a, ones, ones);
                }
        }
        c = next;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = key_a + 16 * m + 8 * r;
            if (t == 0 && key < p.n) p.out[(i64)bh * p.n + key] = sums[m][2 * r];
        }
    if constexpr (DIAG) {
        __syncthreads();
        // Diagonals below 0 hold only keys past the last query (and past n): never written.
        for (int x = threadIdx.x; x < p.w + KEYS - 1; x += 32 * WS_WARPS) {
            const int d = d_base + x;
            if (d >= 0 && d < p.n && sD[x] != 0.f) atomicAdd(p.diag + (i64)bh * p.n + d, sD[x]);
        }
    }
}

// The window queries' LSE over their keys, for when no prefill kept it: the same tiles as
// window_scores (keys as the MMA's M side, the group's rows streaming past), each CTA reducing
// its keys to a running (max, sum) per row -- over its lanes' keys, the 8 lanes of a column
// (shuffles), then its 4 warps (shared memory) -- written to `part` as (row, CTA) pairs in log2
// units; window_lse_merge combines a row's CTAs. (Our attention kernel gave the LSE too, but with
// one CTA per 128 window rows per head it ran 32 CTAs at (1, 32K): 0.33 ms against ~0.1.)
// part: float2 (batch * heads_kv, rows = group * w, ctas); a row's CTAs past its position (keys
// it does not see) are never written and never read.
template <typename T, int D>
__device__ __forceinline__ void window_lse(const WindowScoresParams& p, float2* part, unsigned char* smem_raw) {
    using L = WindowScoresSmem<D>;
    constexpr int MT = L::MT, KEYS = L::KEYS;
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sQ = sK + L::K_ELEMS;
    float* sL = reinterpret_cast<float*>(sQ + 2 * L::Q_ELEMS);
    int* sP = reinterpret_cast<int*>(sL + 2 * WS_ROWS);
    float2* sR = reinterpret_cast<float2*>(sP + 2 * WS_ROWS);  // (warp, row) partials of a chunk

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads_kv, hk = bh - b * p.heads_kv;
    const int j0 = blockIdx.x * KEYS, ctas = gridDim.x;
    const int rows = p.group * p.w, chunks = (rows + WS_ROWS - 1) / WS_ROWS;

    ws_load_keys<T, D>(p, sK, b, hk, j0);
    int c = ws_next_chunk(p, 0, chunks, j0);
    if (c < chunks) ws_load_chunk<T, D>(p, sQ, sL, sP, b, hk, c);
    cp_async_commit();

    const int key_a = j0 + 16 * MT * warp + g;
    u32 kf[MT][D / 16][4];
    bool k_loaded = false;
    for (int stage = 0; c < chunks; stage ^= 1) {
        const int next = ws_next_chunk(p, c + 1, chunks, j0);
        ws_advance<T, D>(p, sQ, sL, sP, b, hk, stage, next, chunks);
        if (!k_loaded) {
            ws_key_fragments<T, D>(kf, sK);
            k_loaded = true;
        }
        const T* sQc = sQ + stage * L::Q_ELEMS;
        const int* pos = sP + stage * WS_ROWS;
#pragma unroll
        for (int c0 = 0; c0 < WS_ROWS; c0 += WS_COLS) {
            float s[MT][WS_COLS / 8][4];
            ws_pass_scores<T, D>(s, kf, sQc, c0);
            // Per column (query row) of this thread: the max and sum over its keys, then over
            // the 8 lanes g sharing the column. Keys past a row's position (or past n) are -inf.
#pragma unroll
            for (int i = 0; i < WS_COLS / 8; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int pr = pos[c0 + 8 * i + 2 * t + h];
                    float x[2 * MT];
#pragma unroll
                    for (int m = 0; m < MT; ++m)
#pragma unroll
                        for (int eh = 0; eh < 2; ++eh) {
                            const int key = key_a + 16 * m + 8 * eh;
                            x[2 * m + eh] = key <= pr && key < p.n ? s[m][i][2 * eh + h] * p.scale_log2 : neg_inf();
                        }
                    float mx = x[0];
#pragma unroll
                    for (int e = 1; e < 2 * MT; ++e) mx = fmaxf(mx, x[e]);
#pragma unroll
                    for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                    float l = 0.f;
                    if (mx != neg_inf()) {
#pragma unroll
                        for (int e = 0; e < 2 * MT; ++e) l += fast_exp2(x[e] - mx);
                    }
#pragma unroll
                    for (int o = 4; o < 32; o <<= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
                    if (g == 0) sR[warp * WS_ROWS + c0 + 8 * i + 2 * t + h] = make_float2(mx, l);
                }
        }
        __syncthreads();
        // The 4 warps' keys of each row, one thread per row.
        if (threadIdx.x < WS_ROWS) {
            const int row = c * WS_ROWS + threadIdx.x;
            float mx = neg_inf();
#pragma unroll
            for (int w = 0; w < WS_WARPS; ++w) mx = fmaxf(mx, sR[w * WS_ROWS + threadIdx.x].x);
            float l = 0.f;
            if (mx != neg_inf()) {
#pragma unroll
                for (int w = 0; w < WS_WARPS; ++w) {
                    const float2 v = sR[w * WS_ROWS + threadIdx.x];
                    l += v.y * fast_exp2(v.x - mx);
                }
            }
            if (row < rows && j0 <= pos[threadIdx.x]) part[((i64)bh * rows + row) * ctas + blockIdx.x] = make_float2(mx, l);
        }
        c = next;
    }
}

// lse[bh * rows + row] (natural log), i.e. (batch, heads_q, w), from the row's CTAs
// 0 .. pos / keys_per_cta: a warp per row, lanes over CTAs.
__device__ __forceinline__ void window_lse_merge(const WindowScoresParams& p, const float2* part, float* lse, int ctas,
                                                 int keys_per_cta) {
    const int lane = threadIdx.x & 31;
    const i64 rows = (i64)p.group * p.w, row_all = (i64)blockIdx.x * WS_WARPS + (threadIdx.x >> 5);
    if (row_all >= (i64)p.batch * p.heads_kv * rows) return;
    const int i = (int)(row_all % rows) % p.w, last = min((p.n - p.w + i) / keys_per_cta, ctas - 1);
    const float2* src = part + row_all * ctas;
    float mx = neg_inf(), l = 0.f;
    for (int c = lane; c <= last; c += 32) {
        const float2 v = src[c];
        const float m2 = fmaxf(mx, v.x);
        if (m2 != neg_inf()) l = l * fast_exp2(mx - m2) + v.y * fast_exp2(v.x - m2);
        mx = m2;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, mx, o), ol = __shfl_xor_sync(0xffffffffu, l, o);
        const float m2 = fmaxf(mx, om);
        l = m2 == neg_inf() ? 0.f : l * fast_exp2(mx - m2) + ol * fast_exp2(om - m2);
        mx = m2;
    }
    if (lane == 0) lse[row_all] = l > 0.f ? (mx + log2f(l)) * 0.69314718055994531f : neg_inf();
}
