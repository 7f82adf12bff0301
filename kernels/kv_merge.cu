// KVMerge after its press chose what is kept (python/ferrokernels/kv.py: KVMerge holds the
// torch reference): every evicted token is merged into the kept key of its (batch, kv head)
// it is most similar to, as a score-weighted average of keys and of values.
//
// kv_merge_match: per evicted token, argmax_j k_e . k_j / |k_j| over the kept keys j (cosine
// similarity: |k_e| does not move the argmax). A CTA holds 64 * MT evicted rows as MMA A
// fragments for its life (4 warps, MT m-tiles of 16 each: the m-tiles share every B fragment,
// and B's shared-memory reads are what bounds the loop), the kept keys stream past in 64-key
// tiles gathered by position (cp.async ring), and each lane keeps a running best per row; the
// (evicted x kept) similarity matrix is never stored. Ties go to the earlier kept slot, as
// torch's argmax does.
//
// kv_merge_add: every evicted token's weighted K and V rows added into its slot's float32
// accumulator (atomics: a slot takes any number of them), the weight into the slot's sum;
// kv_merge_finish adds the kept token's own row, divides and writes the merged rows in the
// cache's layout.
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/attention.cuh"

constexpr int KM_BN = 64;      // kept keys per pipeline stage
constexpr int KM_STAGES = 3;

// Mirrors `MatchParams` in src/ops/kv_merge.rs. Strides in elements.
struct KvMatchParams {
    const void* k;          // (batch, n, heads_kv, head_dim)
    const i64* kept;        // (batch * heads_kv, n_kept): positions
    const i64* evicted;     // (batch * heads_kv, n_evicted): positions
    const float* inv_norm;  // (batch * heads_kv, n_kept): 1 / max(|k_j|, eps)
    i64* slot;              // (batch * heads_kv, n_evicted) <- the kept slot j of the best match
    i64 k_sb, k_ss, k_sh;
    i32 heads_kv, n, n_kept, n_evicted, head_dim;
};

// The evicted rows land first and become registers; the ring of kept-key stages then reuses
// their space (one CTA more per SM at D = 128).
template <int D, int MT>
struct KvMatchSmem {
    static constexpr int ROWS = 64 * MT, SROW = D + 8;  // padded rows: ldmatrix rows hit distinct banks
    static constexpr int RING = KM_STAGES * KM_BN;
    static constexpr int ELEMS = (ROWS > RING ? ROWS : RING) * SROW;
};

// `rows` rows of one (batch, kv head) of K at `positions[first..]` into `dst` (SROW apart) by
// cp.async; rows past `count` and channels past head_dim are zero-filled.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void km_load_rows(const KvMatchParams& p, const T* kg, const i64* positions, int first,
                                             int count, T* dst) {
    constexpr int CH = D / 8, SROW = D + 8;
    for (int c = threadIdx.x; c < ROWS * CH; c += 128) {
        const int r = c / CH, col = (c % CH) * 8, row = first + r;
        const bool ok = row < count && col < p.head_dim;
        const i64 pos = ok ? positions[row] : 0;
        cp_async_16(smem_addr(dst + r * SROW + col), ok ? kg + pos * p.k_ss + col : kg, ok);
    }
}

template <typename T, int D, int MT>
__device__ __forceinline__ void kv_merge_match(const KvMatchParams& p, unsigned char* smem_raw) {
    using L = KvMatchSmem<D, MT>;
    constexpr int ROWS = L::ROWS, SROW = L::SROW, BN = KM_BN, STAGES = KM_STAGES;
    T* sA = reinterpret_cast<T*>(smem_raw);
    T* sB = sA;
    const int bh = blockIdx.y, b = bh / p.heads_kv, h = bh % p.heads_kv;
    const int r0 = blockIdx.x * ROWS;
    const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
    const i64* kept = p.kept + (i64)bh * p.n_kept;
    const float* inv_norm = p.inv_norm + (i64)bh * p.n_kept;

    km_load_rows<T, D, ROWS>(p, kg, p.evicted + (i64)bh * p.n_evicted, r0, p.n_evicted, sA);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
    u32 af[MT][D / 16][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
        q_fragments<T, D>(af[m], sA + ((warp * MT + m) * 16 + (lane & 15)) * SROW + (lane >> 4) * 8);
    __syncthreads();  // the rows are in registers: the ring takes their space

    const int tiles = (p.n_kept + BN - 1) / BN;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) km_load_rows<T, D, BN>(p, kg, kept, s * BN, p.n_kept, sB + s * BN * SROW);
        cp_async_commit();
    }
    float best[MT][2];
    int arg[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) best[m][0] = best[m][1] = neg_inf(), arg[m][0] = arg[m][1] = 0;

    for (int j = 0; j < tiles; ++j) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile j landed for everyone; everyone is done with the stage refilled next
        if (j + STAGES - 1 < tiles)
            km_load_rows<T, D, BN>(p, kg, kept, (j + STAGES - 1) * BN, p.n_kept, sB + ((j + STAGES - 1) % STAGES) * BN * SROW);
        cp_async_commit();
        const T* sK = sB + (j % STAGES) * BN * SROW;
        // This lane's keys' 1 / |k| (issued before the MMAs hide their latency); NaN past the
        // last key, which fmaxf and > both pass over.
        float inv[8][2];
#pragma unroll
        for (int q = 0; q < 8; ++q)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = j * BN + q * 8 + 2 * t + e;
                inv[q][e] = key < p.n_kept ? __ldg(inv_norm + key) : __int_as_float(0x7fffffff);
            }
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // 32 keys at a time: half the live accumulators
            float s[MT][4][4];
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int i = 0; i < 4; ++i) s[m][i][0] = s[m][i][1] = s[m][i][2] = s[m][i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    u32 bk[4];
                    ldmatrix_x4(bk, smem_addr(sK + (half * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8) * SROW + kk * 16 +
                                              ((lane >> 3) & 1) * 8));
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        mma_16816<T>(s[m][2 * np], af[m][kk], bk[0], bk[1]);
                        mma_16816<T>(s[m][2 * np + 1], af[m][kk], bk[2], bk[3]);
                    }
                }
            // C fragments: rows g and g + 8 of each m-tile; this lane's 8 keys of a row are
            // i * 8 + 2t + e, ascending in q = 2i + e. Their max first; which key holds it only
            // when it beats the row's best (rarely, once the best has grown).
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float v[8];
#pragma unroll
                    for (int q = 0; q < 8; ++q) v[q] = s[m][q >> 1][2 * r + (q & 1)] * inv[half * 4 + (q >> 1)][q & 1];
                    const float mx = fmaxf(fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])), fmaxf(fmaxf(v[4], v[5]), fmaxf(v[6], v[7])));
                    if (mx > best[m][r]) {  // strict: an equal later key leaves the earlier one
                        int a = 7;
#pragma unroll
                        for (int q = 6; q >= 0; --q) a = v[q] == mx ? q : a;
                        best[m][r] = mx;
                        arg[m][r] = j * BN + half * 32 + (a >> 1) * 8 + 2 * t + (a & 1);
                    }
                }
        }
    }
    cp_async_wait<0>();

    // The four lanes of a row (t) hold interleaved keys: the best of them, ties to the lower key.
    const int g = lane >> 2;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float v = best[m][r];
            int a = arg[m][r];
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, v, o);
                const int oa = __shfl_xor_sync(0xffffffffu, a, o);
                if (ov > v || (ov == v && oa < a)) v = ov, a = oa;
            }
            const int row = r0 + (warp * MT + m) * 16 + g + 8 * r;
            if (t == 0 && row < p.n_evicted) p.slot[(i64)bh * p.n_evicted + row] = a;
        }
}

// Mirrors `MergeParams` in src/ops/kv_merge.rs. Strides in elements.
struct KvMergeParams {
    const void* k;          // (batch, n, heads_kv, dk)
    const void* v;          // (batch, n, heads_kv, dv)
    const i64* slot;        // (batch * heads_kv, n): the kept slot each token merges into
    const i64* kept;        // (batch * heads_kv, n_kept): the kept tokens' positions
    const float* w;         // (batch * heads_kv, n): its weight (> 0)
    float* acc_k;           // (batch * heads_kv, n_kept, dk), zeroed
    float* acc_v;           // (batch * heads_kv, n_kept, dv), zeroed
    float* wsum;            // (batch * heads_kv, n_kept), zeroed
    void* k_out;            // (batch, n_kept, heads_kv, dk)
    void* v_out;            // (batch, n_kept, heads_kv, dv)
    i64 k_sb, k_ss, k_sh, v_sb, v_ss, v_sh;
    i64 ko_sb, ko_ss, ko_sh, vo_sb, vo_ss, vo_sh;
    i32 heads_kv, n, n_kept, dk, dv;
};

// A row of d channels, weighted, into a float32 accumulator row by one warp, each instruction
// on contiguous bytes (eight channels per lane made every atomic touch eight lines): four
// floats per lane and instruction on sm_90 (red.v4.f32), one before.
template <typename T>
__device__ __forceinline__ void km_add_row(float* acc, const T* src, float w, int d, int lane) {
#if __CUDA_ARCH__ >= 900
    for (int c = lane * 4; c < d; c += 128) {  // d % 8 == 0: 8-byte loads, 16-byte aligned adds
        const uint2 raw = *reinterpret_cast<const uint2*>(src + c);
        const T* x = reinterpret_cast<const T*>(&raw);
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(acc + c), "f"(to_float(x[0]) * w),
                     "f"(to_float(x[1]) * w), "f"(to_float(x[2]) * w), "f"(to_float(x[3]) * w)
                     : "memory");
    }
#else
    for (int c = lane; c < d; c += 32) atomicAdd(acc + c, to_float(src[c]) * w);
#endif
}

// A warp per evicted token of one (batch, kv head), 8 tokens per CTA of 256 threads; the kept
// tokens are their slots' first terms, added by kv_merge_finish without atomics.
template <typename T>
__device__ __forceinline__ void kv_merge_add(const KvMergeParams& p) {
    const int bh = blockIdx.y, b = bh / p.heads_kv, h = bh % p.heads_kv;
    const int i = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (i >= p.n) return;
    const i64 s = p.slot[(i64)bh * p.n + i];
    if (s < 0 || s >= p.n_kept) return;  // the host checks; never write outside the accumulators
    const i64 row = (i64)bh * p.n_kept + s;
    if (p.kept[row] == i) return;
    const float w = p.w[(i64)bh * p.n + i];
    const T* k = static_cast<const T*>(p.k) + b * p.k_sb + i * p.k_ss + h * p.k_sh;
    const T* v = static_cast<const T*>(p.v) + b * p.v_sb + i * p.v_ss + h * p.v_sh;
    km_add_row<T>(p.acc_k + row * p.dk, k, w, p.dk, lane);
    km_add_row<T>(p.acc_v + row * p.dv, v, w, p.dv, lane);
    if (lane == 0) atomicAdd(p.wsum + row, w);
}

// A thread per 8 channels of a merged row, K's pieces then V's.
template <typename T>
__device__ __forceinline__ void kv_merge_finish(const KvMergeParams& p) {
    const int bh = blockIdx.y, b = bh / p.heads_kv, h = bh % p.heads_kv;
    const int ck = p.dk / 8, per_row = ck + p.dv / 8;
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= p.n_kept * per_row) return;
    const int r = x / per_row, c = x - r * per_row;
    const i64 row = (i64)bh * p.n_kept + r;
    const i64 self = p.kept[row];
    const float w = p.w[(i64)bh * p.n + self];
    const float inv = 1.f / (p.wsum[row] + w);  // > 0: the kept token's own weight is
    const bool is_k = c < ck;
    const int col = (is_k ? c : c - ck) * 8;
    const float* a = is_k ? p.acc_k + row * p.dk + col : p.acc_v + row * p.dv + col;
    const T* own = is_k ? static_cast<const T*>(p.k) + b * p.k_sb + self * p.k_ss + h * p.k_sh + col
                        : static_cast<const T*>(p.v) + b * p.v_sb + self * p.v_ss + h * p.v_sh + col;
    T* out = is_k ? static_cast<T*>(p.k_out) + b * p.ko_sb + r * p.ko_ss + h * p.ko_sh + col
                  : static_cast<T*>(p.v_out) + b * p.vo_sb + r * p.vo_ss + h * p.vo_sh + col;
    const float4 lo = *reinterpret_cast<const float4*>(a), hi = *reinterpret_cast<const float4*>(a + 4);
    const uint4 raw = *reinterpret_cast<const uint4*>(own);
    const T* mine = reinterpret_cast<const T*>(&raw);
    const float m[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    u32 packed[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
        packed[e] = pack2<T>((m[2 * e] + w * to_float(mine[2 * e])) * inv, (m[2 * e + 1] + w * to_float(mine[2 * e + 1])) * inv);
    *reinterpret_cast<uint4*>(out) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
}
