// Dense attention forward, FlashAttention-2 style, on mma.sync tensor cores (sm_80+).
//
// One CTA owns BM query rows of one (batch, head); each of its BM/16 warps owns 16 rows.
// K/V tiles of BN keys stream through shared memory with cp.async: the next K tile loads
// while P·V runs, the next V tile while Q·K^T runs. Scores stay in registers; the C fragment
// of Q·K^T is reused as the A fragment of P·V without a trip through shared memory.
//
// D (q/k) and DV (v/out) are the head dims rounded up to 16 (the MMA k step); columns past the
// real ones are zero-filled on load and never stored. Only key tiles some row can see are
// visited (window/causal bounds, tiles the dense mask empties skipped); per-element masking and
// biases run only on tiles that need them (common/attention.cuh decides).
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/softmax.cuh"
#include "common/attention.cuh"

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

template <typename T, int D, int DV, int BM, int BN, bool Q_IN_REGS, bool EXTRAS>
__device__ __forceinline__ void attention_fwd(const AttentionParams& p) {
    constexpr int NT = (BM / 16) * 32;
    constexpr int SROW = D + 8;  // one 16-byte pad per row: ldmatrix rows hit distinct banks
    constexpr int SROWV = DV + 8;
    constexpr int CHV = DV / 8;
    static_assert(MASK_TILE % BM == 0 || BM % MASK_TILE == 0, "mask tiles must nest with BM");
    static_assert(MASK_TILE % BN == 0, "mask tiles must nest with BN");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BM * SROW;
    T* sV = sK + BN * SROW;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, b = blockIdx.z;
    const SeqInfo seq = seq_info(p, b);
    // Reversed so the longest causal rows start first and the tail of the grid is short.
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    if (m0 >= seq.nq) return;  // varlen: this sequence is shorter than the longest
    const int hk = h / (p.heads_q / p.heads_kv);

    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + seq.q_row0 * p.q_ss + h * p.q_sh;
    const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + seq.k_row0 * p.k_ss + hk * p.k_sh;
    const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + seq.k_row0 * p.v_ss + hk * p.v_sh;
    T* og = static_cast<T*>(p.o) + b * p.o_sb + seq.q_row0 * p.o_ss + h * p.o_sh;
    const ScoreMod mod = score_mod(p, b, h);

    // Key tiles [j, j_end) hold every key some row of this block can see.
    const int m1 = min(m0 + BM, seq.nq);
    const int n_begin = keys_begin(p, seq, m0), n_end = keys_end(p, seq, m1);
    const int j_end = n_end > n_begin ? (n_end + BN - 1) / BN : 0;
    auto next_tile = [&](int j) {
        if constexpr (EXTRAS)
            while (j < j_end && mask_tile(p, b, h, m0, j * BN) == TILE_EMPTY) ++j;
        return j;
    };
    int j = next_tile(n_begin / BN);

    // Group 0: Q and the first K tile. Group 1: the first V tile.
    load_tile<T, BM, D, SROW, NT>(sQ, qg, p.q_ss, m0, seq.nq, p.head_dim);
    if (j < j_end) load_tile<T, BN, D, SROW, NT>(sK, kg, p.k_ss, j * BN, seq.nk, p.head_dim);
    cp_async_commit();
    if (j < j_end) load_tile<T, BN, DV, SROWV, NT>(sV, vg, p.v_ss, j * BN, seq.nk, p.head_dim_v);
    cp_async_commit();

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_row[2] = {neg_inf(), neg_inf()}, l_row[2] = {0.f, 0.f};
    u32 qf[Q_IN_REGS ? D / 16 : 1][4];
    const int r0 = m0 + warp * 16;  // this warp's first query row
    const int row_a = r0 + g;       // query row of c0/c1; c2/c3 are row_a + 8
    const T* sQw = sQ + (warp * 16 + (lane & 15)) * SROW + (lane >> 4) * 8;
    bool q_loaded = false;

    while (j < j_end) {
        const int n0 = j * BN;
        const int j_next = next_tile(j + 1);
        cp_async_wait<1>();
        __syncthreads();
        if constexpr (Q_IN_REGS) {
            if (!q_loaded) {
                q_fragments<T, D>(qf, sQw);
                q_loaded = true;
            }
        }

        // S = Q K^T for this warp's 16 rows and BN keys.
        float s[BN / 8][4];
        mma_qk<T, D, BN, SROW, Q_IN_REGS>(s, qf, sQw, sK, lane);

        // Scores into log2 units; bounds, bias and mask only where this tile needs them.
        const unsigned char tile = EXTRAS ? mask_tile(p, b, h, m0, n0) : TILE_FULL;
        const bool extra = EXTRAS && (mod.slope_log2 != 0.f || tile != TILE_FULL);
        const bool need_mask = extra || !window_covers(p, seq, r0, r0 + 16, n0, n0 + BN);
        const float factor = scores_to_log2<T, BN, EXTRAS>(s, p, seq, mod, b, h, row_a, n0, t, need_mask, extra);
        softmax_update<BN, DV>(s, o, m_row, l_row, factor);

        cp_async_wait<0>();
        __syncthreads();  // every warp is past Q K^T: sK may be refilled
        if (j_next < j_end) load_tile<T, BN, D, SROW, NT>(sK, kg, p.k_ss, j_next * BN, seq.nk, p.head_dim);
        cp_async_commit();

        // O += P V, with P taken straight from the score registers.
        mma_pv<T, BN, DV, SROWV>(o, s, sV, lane);
        __syncthreads();  // every warp is past P V: sV may be refilled
        if (j_next < j_end) load_tile<T, BN, DV, SROWV, NT>(sV, vg, p.v_ss, j_next * BN, seq.nk, p.head_dim_v);
        cp_async_commit();
        j = j_next;
    }
    cp_async_wait<0>();
    __syncthreads();  // no copy into shared memory may still be in flight when it is reused below

    // Normalise and stage this warp's 16 rows in its own slice of shared memory, then store
    // 16 bytes a lane.
    float inv[2];
    softmax_finish(l_row, inv);
    T* sO = reinterpret_cast<T*>(smem_raw) + warp * 16 * SROWV;
#pragma unroll
    for (int dt = 0; dt < DV / 8; ++dt) {
        *reinterpret_cast<u32*>(sO + g * SROWV + dt * 8 + 2 * t) = pack2<T>(o[dt][0] * inv[0], o[dt][1] * inv[0]);
        *reinterpret_cast<u32*>(sO + (g + 8) * SROWV + dt * 8 + 2 * t) = pack2<T>(o[dt][2] * inv[1], o[dt][3] * inv[1]);
    }
    __syncwarp();
#pragma unroll
    for (int c = lane; c < 16 * CHV; c += 32) {
        const int r = c / CHV, col = (c % CHV) * 8;
        const int row = r0 + r;
        if (row < seq.nq && col < p.head_dim_v)
            *reinterpret_cast<uint4*>(og + (i64)row * p.o_ss + col) = *reinterpret_cast<const uint4*>(sO + r * SROWV + col);
    }
    store_lse(p, seq, b, h, row_a, t, m_row, l_row);
}
