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

// The scaled (and capped) score in log2 units: the value every tile computes.
__device__ __forceinline__ float score_scaled(const ScoreMod& m, float acc) {
    return m.softcap ? m.cap_out * tanh_approx(acc * m.cap_in) : acc * m.scale_log2;
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
