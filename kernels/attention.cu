// Dense attention forward, FlashAttention-2 style, on mma.sync tensor cores (sm_80+).
//
// One CTA owns BM query rows of one (batch, head); each of its BM/16 warps owns 16 rows.
// K/V tiles of BN keys stream through shared memory with cp.async: the next K tile loads
// while P·V runs, the next V tile while Q·K^T runs. Scores stay in registers; the C fragment
// of Q·K^T is reused as the A fragment of P·V without a trip through shared memory.
//
// D is the head dim rounded up to 16 (the MMA k step); columns past the real head_dim are
// zero-filled on load and never stored. Causal masking keeps key j for query i when
// j <= i + causal_offset (offset = Nk - Nq aligns the diagonal bottom-right, 0 top-left).
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/softmax.cuh"

// Mirrors `AttentionParams` in src/ops/attention.rs field for field. Strides in elements.
struct AttentionParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;  // (batch, heads_q, seqlen_q) natural-log LSE, or null
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    i64 lse_sb, lse_sh;
    i32 heads_q, heads_kv, seqlen_q, seqlen_k;
    i32 head_dim, causal, causal_offset;
    float scale_log2;  // softmax scale * log2(e)
};

// Copies rows [row0, row0 + ROWS) of a (seqlen, head_dim) slice into a padded smem tile.
template <typename T, int ROWS, int D, int SROW, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, i64 row_stride, int row0, int nrows, int head_dim) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CH; c += NT) {
        const int r = c / CH, col = (c % CH) * 8;
        const bool pred = (row0 + r < nrows) && (col < head_dim);
        const T* src = pred ? g + (i64)(row0 + r) * row_stride + col : g;
        cp_async_16(smem_addr(s + r * SROW + col), src, pred);
    }
}

template <typename T, int D, int BM, int BN, bool Q_IN_REGS>
__device__ __forceinline__ void attention_fwd(const AttentionParams& p) {
    constexpr int NT = (BM / 16) * 32;
    constexpr int SROW = D + 8;  // one 16-byte pad per row: ldmatrix rows hit distinct banks
    constexpr int CH = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BM * SROW;
    T* sV = sK + BN * SROW;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // Reversed so the longest causal rows start first and the tail of the grid is short.
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.heads_q / p.heads_kv);

    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;

    int n_end = p.seqlen_k;
    if (p.causal) n_end = min(n_end, min(m0 + BM, p.seqlen_q) + p.causal_offset);
    const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;

    // Group 0: Q and the first K tile. Group 1: the first V tile.
    load_tile<T, BM, D, SROW, NT>(sQ, qg, p.q_ss, m0, p.seqlen_q, p.head_dim);
    if (n_tiles > 0) load_tile<T, BN, D, SROW, NT>(sK, kg, p.k_ss, 0, p.seqlen_k, p.head_dim);
    cp_async_commit();
    if (n_tiles > 0) load_tile<T, BN, D, SROW, NT>(sV, vg, p.v_ss, 0, p.seqlen_k, p.head_dim);
    cp_async_commit();

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_row[2] = {neg_inf(), neg_inf()}, l_row[2] = {0.f, 0.f};
    u32 qf[Q_IN_REGS ? D / 16 : 1][4];
    const int row_a = m0 + warp * 16 + g;  // query row of c0/c1; c2/c3 are row_a + 8
    const T* sQw = sQ + (warp * 16 + (lane & 15)) * SROW + (lane >> 4) * 8;

    for (int j = 0; j < n_tiles; ++j) {
        const int n0 = j * BN;
        cp_async_wait<1>();
        __syncthreads();
        if constexpr (Q_IN_REGS) {
            if (j == 0) {
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], smem_addr(sQw + kk * 16));
            }
        }

        // S = Q K^T for this warp's 16 rows and BN keys.
        float s[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 a[4];
            if constexpr (Q_IN_REGS) {
                a[0] = qf[kk][0], a[1] = qf[kk][1], a[2] = qf[kk][2], a[3] = qf[kk][3];
            } else {
                ldmatrix_x4(a, smem_addr(sQw + kk * 16));
            }
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 bk[4];
                ldmatrix_x4(bk, smem_addr(sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SROW + kk * 16 + ((lane >> 3) & 1) * 8));
                mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
                mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
            }
        }

        // Scale into log2 units, mask the tile if it crosses the sequence end or the diagonal.
        const bool need_mask = (n0 + BN > p.seqlen_k) || (p.causal && n0 + BN - 1 > m0 + warp * 16 + p.causal_offset);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * p.scale_log2;
                if (need_mask) {
                    const int key = n0 + nt * 8 + 2 * t + (e & 1);
                    const int row = row_a + (e >> 1) * 8;
                    if (key >= p.seqlen_k || (p.causal && key > row + p.causal_offset)) x = neg_inf();
                }
                s[nt][e] = x;
            }
        }

        // Online softmax: rescale the running output by exp2(m_old - m_new), turn S into P.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_row[r];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = quad_max(mx);
            const float base = mx == neg_inf() ? 0.f : mx;  // a row with no key yet stays at 0
            const float alpha = fast_exp2(m_row[r] - base);
            m_row[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                s[nt][2 * r] = fast_exp2(s[nt][2 * r] - base);
                s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - base);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            l_row[r] = l_row[r] * alpha + sum;  // per-lane partial; reduced over the quad at the end
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // every warp is past Q K^T: sK may be refilled
        if (j + 1 < n_tiles) load_tile<T, BN, D, SROW, NT>(sK, kg, p.k_ss, n0 + BN, p.seqlen_k, p.head_dim);
        cp_async_commit();

        // O += P V, with P taken straight from the score registers.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const u32 a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 bv[4];
                ldmatrix_x4_trans(bv, smem_addr(sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + dp * 16 + (lane >> 4) * 8));
                mma_16816<T>(o[2 * dp], a, bv[0], bv[1]);
                mma_16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
            }
        }
        __syncthreads();  // every warp is past P V: sV may be refilled
        if (j + 1 < n_tiles) load_tile<T, BN, D, SROW, NT>(sV, vg, p.v_ss, n0 + BN, p.seqlen_k, p.head_dim);
        cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();  // no copy into sQ may still be in flight when it is reused below

    // Normalise and stage this warp's 16 rows in its own rows of sQ, then store 16 bytes a lane.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_row[r] = quad_sum(l_row[r]);
        inv[r] = l_row[r] > 0.f ? 1.f / l_row[r] : 0.f;
    }
    T* sO = sQ + warp * 16 * SROW;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<u32*>(sO + g * SROW + dt * 8 + 2 * t) = pack2<T>(o[dt][0] * inv[0], o[dt][1] * inv[0]);
        *reinterpret_cast<u32*>(sO + (g + 8) * SROW + dt * 8 + 2 * t) = pack2<T>(o[dt][2] * inv[1], o[dt][3] * inv[1]);
    }
    __syncwarp();
#pragma unroll
    for (int c = lane; c < 16 * CH; c += 32) {
        const int r = c / CH, col = (c % CH) * 8;
        const int row = m0 + warp * 16 + r;
        if (row < p.seqlen_q && col < p.head_dim)
            *reinterpret_cast<uint4*>(og + (i64)row * p.o_ss + col) = *reinterpret_cast<const uint4*>(sO + r * SROW + col);
    }
    if (p.lse != nullptr && t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row_a + r * 8;
            if (row < p.seqlen_q)
                p.lse[b * p.lse_sb + h * p.lse_sh + row] =
                    l_row[r] > 0.f ? (m_row[r] + log2f(l_row[r])) * 0.69314718055994531f : neg_inf();
        }
    }
}
