// What every attention kernel shares: the parameter block, per-sequence bounds (dense or
// varlen), and the score modifiers (scale, softcap, ALiBi, window/causal, dense masks), so the
// sm_80 and sm_90 paths mask identically.
//
// Visibility: key j is visible to query i of a sequence when
//     i + off - window_left <= j <= i + off + window_right,   0 <= j < seqlen_k,
// with off = seqlen_k - seqlen_q (bottom-right alignment) or 0 (top-left). Causal is
// window_right = 0; "no window" is WINDOW_NONE, larger than any sequence.
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/softmax.cuh"

#define WINDOW_NONE 0x3fffffff

// Dense mask element types (`mask_kind`).
#define MASK_NONE 0
#define MASK_BOOL 1      // uint8/bool, nonzero = attend (torch semantics)
#define MASK_ADD_T 2     // additive, the input dtype
#define MASK_ADD_F32 3   // additive, float32

// Per-tile summary of the dense mask, one byte per MASK_TILE x MASK_TILE block.
#define MASK_TILE 64
#define TILE_EMPTY 0     // every element masked: the tile is skipped
#define TILE_PARTIAL 1   // read the mask element-wise
#define TILE_FULL 2      // nothing masked and additive values all zero: mask not read

// Mirrors `AttentionParams` in src/ops/attention.rs field for field. Strides in elements.
struct AttentionParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;                        // natural-log LSE, or null
    const i32* cu_seqlens_q;           // varlen: (batch + 1) offsets into the packed rows, or null
    const i32* cu_seqlens_k;
    const float* alibi;                // slopes, [b * alibi_sb + h], or null
    const void* mask;                  // dense mask, or null
    const unsigned char* mask_tiles;   // TILE_* per (b, h, q tile, k tile), or null
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    i64 lse_sb, lse_sh, lse_ss;
    i64 alibi_sb;
    i64 mask_sb, mask_sh, mask_sq, mask_sk;
    i64 mt_sb, mt_sh, mt_sq, mt_sk;
    i32 heads_q, heads_kv;
    i32 seqlen_q, seqlen_k;            // per sequence; for varlen the maxima
    i32 head_dim, head_dim_v;
    i32 window_left, window_right;
    i32 bottom_right;
    i32 mask_kind;
    float scale;                       // softmax scale
    float softcap;                     // tanh cap on scaled scores, 0 = none
};

// Where one (batch) sequence lives and how long it is.
struct SeqInfo {
    i64 q_row0, k_row0;  // first row in the (packed) tensors
    int nq, nk;
    int off;             // diagonal offset: key j aligns with query j - off
};

__device__ __forceinline__ SeqInfo seq_info(const AttentionParams& p, int b) {
    SeqInfo s;
    if (p.cu_seqlens_q != nullptr) {
        const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
        s.q_row0 = q0, s.k_row0 = k0;
        s.nq = min(p.cu_seqlens_q[b + 1] - q0, p.seqlen_q);
        s.nk = min(p.cu_seqlens_k[b + 1] - k0, p.seqlen_k);
    } else {
        s.q_row0 = s.k_row0 = 0;
        s.nq = p.seqlen_q, s.nk = p.seqlen_k;
    }
    s.off = p.bottom_right ? s.nk - s.nq : 0;
    return s;
}

// Visible keys of query row i: [lo, hi], before clipping to [0, nk). 64-bit: no overflow for
// WINDOW_NONE.
__device__ __forceinline__ i64 key_lo(const AttentionParams& p, const SeqInfo& s, int i) {
    return (i64)i + s.off - p.window_left;
}
__device__ __forceinline__ i64 key_hi(const AttentionParams& p, const SeqInfo& s, int i) {
    return (i64)i + s.off + p.window_right;
}

// Keys [begin, end) that rows [m0, m1) can see at all.
__device__ __forceinline__ int keys_begin(const AttentionParams& p, const SeqInfo& s, int m0) {
    return (int)max((i64)0, key_lo(p, s, m0));
}
__device__ __forceinline__ int keys_end(const AttentionParams& p, const SeqInfo& s, int m1) {
    return (int)min((i64)s.nk, key_hi(p, s, m1 - 1) + 1);
}

// True when every key of [n0, n1) is visible to every row of [r0, r1) by the window and
// sequence bounds (the dense mask is judged separately by its tile summary).
__device__ __forceinline__ bool window_covers(const AttentionParams& p, const SeqInfo& s, int r0, int r1, int n0, int n1) {
    return n1 <= s.nk && n0 >= key_lo(p, s, r1 - 1) && n1 - 1 <= key_hi(p, s, r0);
}

__device__ __forceinline__ unsigned char mask_tile(const AttentionParams& p, int b, int h, int m0, int n0) {
    if (p.mask_tiles == nullptr) return p.mask == nullptr ? TILE_FULL : TILE_PARTIAL;
    return p.mask_tiles[b * p.mt_sb + h * p.mt_sh + (m0 / MASK_TILE) * p.mt_sq + (n0 / MASK_TILE) * p.mt_sk];
}

// The class of the block rows [m0, m1) x keys [n0, n1) (multiples of MASK_TILE at the start):
// EMPTY only if every mask tile in it is, FULL only if every one is.
__device__ __forceinline__ unsigned char mask_span(const AttentionParams& p, int b, int h, int m0, int m1, int n0, int n1) {
    if (p.mask_tiles == nullptr) return mask_tile(p, b, h, m0, n0);
    bool any_kept = false, all_full = true;
    for (int m = m0; m < m1; m += MASK_TILE)
        for (int n = n0; n < n1; n += MASK_TILE) {
            const unsigned char c = mask_tile(p, b, h, m, n);
            any_kept |= c != TILE_EMPTY;
            all_full &= c == TILE_FULL;
        }
    return all_full ? TILE_FULL : (any_kept ? TILE_PARTIAL : TILE_EMPTY);
}

__device__ __forceinline__ float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Per-head constants of the score modifiers.
struct ScoreMod {
    float scale_log2;   // scale * log2(e) when there is no softcap
    float cap_in;       // scale / softcap
    float cap_out;      // softcap * log2(e)
    float slope_log2;   // ALiBi slope * log2(e), 0 = none
    bool softcap;
};

__device__ __forceinline__ ScoreMod score_mod(const AttentionParams& p, int b, int h) {
    constexpr float LOG2E = 1.4426950408889634f;
    ScoreMod m;
    m.softcap = p.softcap > 0.f;
    m.scale_log2 = p.scale * LOG2E;
    m.cap_in = m.softcap ? p.scale / p.softcap : 0.f;
    m.cap_out = p.softcap * LOG2E;
    m.slope_log2 = p.alibi != nullptr ? p.alibi[b * p.alibi_sb + h] * LOG2E : 0.f;
    return m;
}

// Visible keys [lo, hi] of one query row, clipped to the sequence: the bounds a partial tile
// compares each key against.
struct RowBounds {
    int lo, hi;
};

__device__ __forceinline__ RowBounds row_bounds(const AttentionParams& p, const SeqInfo& s, int row) {
    RowBounds r;
    r.lo = (int)max((i64)0, key_lo(p, s, row));
    r.hi = (int)min((i64)s.nk - 1, key_hi(p, s, row));
    return r;
}

// ALiBi bias and dense mask for one visible element (x in log2 units); -inf if masked. Out of
// line: only tiles with a bias or a partial mask tile call it, and inlining it into every
// unrolled score element costs registers on the fast path.
template <typename T>
__device__ __noinline__ float score_extra(const AttentionParams& p, const SeqInfo& s, float slope_log2,
                                          int b, int h, int row, int key, float x) {
    constexpr float LOG2E = 1.4426950408889634f;
    x -= slope_log2 * fabsf((float)(row + s.off - key));
    if (p.mask_kind != MASK_NONE) {
        const i64 at = b * p.mask_sb + h * p.mask_sh + row * p.mask_sq + key * p.mask_sk;
        if (p.mask_kind == MASK_BOOL) {
            if (static_cast<const unsigned char*>(p.mask)[at] == 0) return neg_inf();
        } else if (p.mask_kind == MASK_ADD_F32) {
            x += static_cast<const float*>(p.mask)[at] * LOG2E;
        } else {
            x += to_float(static_cast<const T*>(p.mask)[at]) * LOG2E;
        }
    }
    return x;
}

// --- per-tile steps shared by the sm_80 and sm_90 kernels ---------------------------------------
// Both keep a warp's scores in the m16n8 C-fragment layout: s[i][0..1] are keys n0 + 8i + 2t,
// + 1 of row `row_a`, s[i][2..3] the same keys of row `row_a + 8`; o likewise over DV columns.

// Scores into log2 units, then bounds, bias and mask where this tile needs them.
// EXTRAS = false compiles out softcap, ALiBi and dense masks: the kernel variant for plain,
// causal and windowed attention, with fewer registers and no out-of-line calls.
//
// Returns the factor softmax_p must still apply: plain variants with a positive scale leave the
// scores raw and fold the scale into the exp2 argument (one FFMA instead of FMUL + FADD).
template <typename T, int BN, bool EXTRAS>
__device__ __forceinline__ float scores_to_log2(float (&s)[BN / 8][4], const AttentionParams& p, const SeqInfo& seq,
                                               const ScoreMod& mod, int b, int h, int row_a, int n0, int t,
                                               bool need_mask, bool extra) {
    // One branch per tile, not per element: the capped and plain loops are separate.
    float factor = 1.f;
    if (EXTRAS && mod.softcap) {
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = mod.cap_out * tanh_approx(s[i][e] * mod.cap_in);
    } else if (!EXTRAS && mod.scale_log2 > 0.f) {
        factor = mod.scale_log2;  // masking below only writes -inf, which the scale keeps
    } else {
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] *= mod.scale_log2;
    }
    if (!need_mask) return factor;
    const RowBounds rb[2] = {row_bounds(p, seq, row_a), row_bounds(p, seq, row_a + 8)};
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = n0 + i * 8 + 2 * t + (e & 1), row = row_a + (e >> 1) * 8;
            if (key < rb[e >> 1].lo || key > rb[e >> 1].hi) s[i][e] = neg_inf();
            else if (EXTRAS && extra) s[i][e] = score_extra<T>(p, seq, mod.slope_log2, b, h, row, key, s[i][e]);
        }
    }
    return factor;
}

// Online softmax, first half: turns S into P (unnormalised) against the new running max and
// returns per row the factor alpha = exp2(m_old - m_new) the running output must be scaled by.
// l_row stays a per-lane partial sum until softmax_finish.
// `factor` (> 0) is what scores_to_log2 left unapplied: log2-unit score = s * factor.
template <int BN>
__device__ __forceinline__ void softmax_p(float (&s)[BN / 8][4], float (&m_row)[2], float (&l_row)[2], float (&alpha)[2],
                                          float factor) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float raw = neg_inf();
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) raw = fmaxf(raw, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
        const float mx = fmaxf(m_row[r], quad_max(raw) * factor);
        const float base = mx == neg_inf() ? 0.f : mx;  // a row with no key yet stays at 0
        alpha[r] = fast_exp2(m_row[r] - base);
        m_row[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            s[i][2 * r] = fast_exp2(fmaf(s[i][2 * r], factor, -base));
            s[i][2 * r + 1] = fast_exp2(fmaf(s[i][2 * r + 1], factor, -base));
            sum += s[i][2 * r] + s[i][2 * r + 1];
        }
        l_row[r] = l_row[r] * alpha[r] + sum;
    }
}

// softmax_p for scores whose two halves of keys carry their own factor and offset (8-bit
// scores: one K scale per 64 keys, and the integer accumulators still biased): log2-unit score
// = s * f + off, with f and off of the half. The offset rides in the exp2's FFMA, so a score
// costs no instruction before it. Masked scores are -inf. SUM false leaves l_row to the caller
// (the 8-bit kernel sums the rounded P̃ on the tensor cores).
template <int BN, bool SUM = true>
__device__ __forceinline__ void softmax_p_halves(float (&s)[BN / 8][4], float (&m_row)[2], float (&l_row)[2],
                                                 float (&alpha)[2], const float (&f)[2], const float (&off)[2],
                                                 float p_log2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float raw[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) raw[i >= BN / 16] = fmaxf(raw[i >= BN / 16], fmaxf(s[i][2 * r], s[i][2 * r + 1]));
        const float mx = fmaxf(m_row[r], fmaxf(fmaf(quad_max(raw[0]), f[0], off[0]), fmaf(quad_max(raw[1]), f[1], off[1])));
        const float base = mx == neg_inf() ? 0.f : mx;
        alpha[r] = fast_exp2(m_row[r] - base);
        m_row[r] = mx;
        const float shift[2] = {off[0] + (p_log2 - base), off[1] + (p_log2 - base)};
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            const int hf = i >= BN / 16;
            s[i][2 * r] = fast_exp2(fmaf(s[i][2 * r], f[hf], shift[hf]));
            s[i][2 * r + 1] = fast_exp2(fmaf(s[i][2 * r + 1], f[hf], shift[hf]));
            if constexpr (SUM) sum += s[i][2 * r] + s[i][2 * r + 1];
        }
        if constexpr (SUM) l_row[r] = l_row[r] * alpha[r] + sum;
    }
}

// Online softmax, second half: O *= alpha per row.
template <int DV>
__device__ __forceinline__ void rescale_o(float (&o)[DV / 8][4], const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) {
        o[i][0] *= alpha[0];
        o[i][1] *= alpha[0];
        o[i][2] *= alpha[1];
        o[i][3] *= alpha[1];
    }
}

template <int BN, int DV>
__device__ __forceinline__ void softmax_update(float (&s)[BN / 8][4], float (&o)[DV / 8][4], float (&m_row)[2],
                                               float (&l_row)[2], float factor) {
    float alpha[2];
    softmax_p<BN>(s, m_row, l_row, alpha, factor);
    rescale_o<DV>(o, alpha);
}

// The A fragment of P V for keys 16kk..16kk+15, straight from the score registers.
template <typename T, int BN>
__device__ __forceinline__ void p_fragment(const float (&s)[BN / 8][4], int kk, u32 (&a)[4]) {
    a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// All of P as A fragments, ready before the P V MMAs are issued back to back.
template <typename T, int BN>
__device__ __forceinline__ void p_fragments(const float (&s)[BN / 8][4], u32 (&a)[BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) p_fragment<T, BN>(s, kk, a[kk]);
}

// --- the two mma.sync GEMMs of a warp's 16 query rows (sm_80 prefill and decode) ----------------
// Shared-memory tiles are row-major with row strides SROW / SROWV elements (padded so ldmatrix
// rows hit distinct banks).

// Q's A fragments for all of D from the warp's rows in shared memory, kept in registers.
template <typename T, int D>
__device__ __forceinline__ void q_fragments(u32 (&qf)[D / 16][4], const T* sQw) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], smem_addr(sQw + kk * 16));
}

// S = Q K^T for N keys over D: Q's A fragments from registers (qf) or from the warp's rows in
// shared memory (sQw: this lane's ldmatrix row), K rows from sK.
template <typename T, int D, int N, int SROW, bool Q_IN_REGS>
__device__ __forceinline__ void mma_qk(float (&s)[N / 8][4], const u32 (&qf)[Q_IN_REGS ? D / 16 : 1][4],
                                       const T* sQw, const T* sK, int lane) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        u32 a[4];
        if constexpr (Q_IN_REGS) {
            a[0] = qf[kk][0], a[1] = qf[kk][1], a[2] = qf[kk][2], a[3] = qf[kk][3];
        } else {
            ldmatrix_x4(a, smem_addr(sQw + kk * 16));
        }
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            u32 bk[4];
            ldmatrix_x4(bk, smem_addr(sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SROW + kk * 16 + ((lane >> 3) & 1) * 8));
            mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
            mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
        }
    }
}

// O += P V for N keys, P taken straight from the score registers, V rows from sV.
template <typename T, int N, int DV, int SROWV>
__device__ __forceinline__ void mma_pv(float (&o)[DV / 8][4], const float (&s)[N / 8][4], const T* sV, int lane) {
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
        u32 a[4];
        p_fragment<T, N>(s, kk, a);
#pragma unroll
        for (int dp = 0; dp < DV / 16; ++dp) {
            u32 bv[4];
            ldmatrix_x4_trans(bv, smem_addr(sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROWV + dp * 16 + (lane >> 4) * 8));
            mma_16816<T>(o[2 * dp], a, bv[0], bv[1]);
            mma_16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
        }
    }
}

// Completes the row sums over the quad; returns 1 / l per row (0 for rows that saw no key).
// QUAD: each lane of a quad holds part of its rows' sums (false: each holds the whole sum).
template <bool QUAD = true>
__device__ __forceinline__ void softmax_finish(float (&l_row)[2], float (&inv)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if constexpr (QUAD) l_row[r] = quad_sum(l_row[r]);
        inv[r] = l_row[r] > 0.f ? 1.f / l_row[r] : 0.f;
    }
}

// Natural-log LSE of rows row_a and row_a + 8, written by lane t == 0 of each quad.
__device__ __forceinline__ void store_lse(const AttentionParams& p, const SeqInfo& seq, int b, int h, int row_a, int t,
                                         const float (&m_row)[2], const float (&l_row)[2]) {
    if (p.lse == nullptr || t != 0) return;
    float* lse = p.lse + b * p.lse_sb + h * p.lse_sh + seq.q_row0 * p.lse_ss;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row_a + r * 8;
        if (row < seq.nq)
            lse[row * p.lse_ss] = l_row[r] > 0.f ? (m_row[r] + log2f(l_row[r])) * 0.69314718055994531f : neg_inf();
    }
}
