// Dense attention forward for Hopper (sm_90a): TMA loads on mbarriers, wgmma with operands in
// shared memory, warp specialisation.
//
// A CTA owns 128 query rows of one (batch, head) and has three warpgroups:
//   warpgroup 0, the producer: one thread issues TMA loads of Q once and of K/V tiles into a
//     ring of STAGES slots (full/empty mbarriers per slot), skipping tiles no row can see;
//     it gives most of its registers to the consumers (setmaxnreg).
//   warpgroups 1 and 2, the consumers: 64 query rows each. Per key tile:
//     S = Q K^T (wgmma, both operands in shared memory), scale/mask/online softmax in registers
//     (common/attention.cuh, shared with the sm_80 kernel), O += P V (wgmma, P from registers,
//     V read N-major from shared memory). Within a consumer the softmax of tile j runs while
//     the tensor cores do P V of tile j - 1, and the two consumers take turns issuing their
//     GEMMs (ping-pong) so one's softmax runs under the other's matrix work.
// Tiles in shared memory are 64-column blocks of 128-byte rows in TMA's 128-byte swizzle, which
// is the layout wgmma's descriptors read (common/hopper.cuh).
//
// D and DV are the head dims rounded up to 64; TMA zero-fills columns past the real head dims
// and rows past the tensor, and masking removes keys past each sequence.
#pragma once
#include "common/types.cuh"
#include "common/softmax.cuh"
#include "common/attention.cuh"
#include "common/hopper.cuh"
#include "common/wgmma.cuh"

// Mirrors `Sm90Params` in src/ops/attention.rs: the tensor maps, then the shared parameters.
struct AttentionSm90Params {
    TmaDesc tq, tk, tv;  // 4-D (head_dim, heads, seqlen, batch), boxes of 64 columns
    AttentionParams p;
};

template <int D, int DV, int BN, int STAGES>
struct Sm90Smem {
    static constexpr int BM = 128;
    static constexpr int Q_BYTES = BM * D * 2;
    static constexpr int K_BYTES = BN * D * 2;
    static constexpr int V_BYTES = BN * DV * 2;
    // The output is staged over Q's rows (each consumer over its own) unless it is wider.
    static constexpr int O_BYTES = DV <= D ? 0 : BM * DV * 2;
    static constexpr int Q = 0;
    static constexpr int K = Q + Q_BYTES;
    static constexpr int V = K + STAGES * K_BYTES;
    static constexpr int O = DV <= D ? Q : V + STAGES * V_BYTES;
    static constexpr int BAR = V + STAGES * V_BYTES + O_BYTES;
    // q_full, k_full[S], k_empty[S], v_full[S], v_empty[S]
    static constexpr int BYTES = BAR + 8 * (1 + 4 * STAGES) + 1024;  // + alignment slack
};

template <typename T, int D, int DV, int BN, int STAGES, bool EXTRAS>
__device__ __forceinline__ void attention_fwd_sm90(const AttentionSm90Params& P) {
    using L = Sm90Smem<D, DV, BN, STAGES>;
    constexpr int BM = L::BM;
    const AttentionParams& p = P.p;
    extern __shared__ unsigned char smem_raw[];
    // Swizzled tiles need 1024-byte alignment; the dynamic base only promises 16.
    const u32 base = (smem_addr(smem_raw) + 1023) & ~1023u;
    unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
    const u32 sQ = base + L::Q, sK = base + L::K, sV = base + L::V;
    const u32 bar = base + L::BAR;
    const u32 q_full = bar;
    auto k_full = [&](int s) { return bar + 8 * (1 + s); };
    auto k_empty = [&](int s) { return bar + 8 * (1 + STAGES + s); };
    auto v_full = [&](int s) { return bar + 8 * (1 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return bar + 8 * (1 + 3 * STAGES + s); };

    const int h = blockIdx.y, b = blockIdx.z;
    const SeqInfo seq = seq_info(p, b);
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest causal rows first
    if (m0 >= seq.nq) return;
    const int hk = h / (p.heads_q / p.heads_kv);
    const int m1 = min(m0 + BM, seq.nq);
    const int n_begin = keys_begin(p, seq, m0), n_end = keys_end(p, seq, m1);
    const int j_end = n_end > n_begin ? (n_end + BN - 1) / BN : 0;
    auto next_tile = [&](int j) {
        if constexpr (EXTRAS)
            while (j < j_end && mask_span(p, b, h, m0, m1, j * BN, min(j * BN + BN, seq.nk)) == TILE_EMPTY) ++j;
        return j;
    };
    const int j_first = next_tile(n_begin / BN);

    const int wg = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), 8);  // one arrival per consumer warp
            mbar_init(v_empty(s), 8);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        setmaxnreg_dec<24>();
        if (threadIdx.x == 0) {
            const int bq = p.cu_seqlens_q != nullptr ? 0 : b;
            const int q_row = (int)seq.q_row0 + m0, k_row0 = (int)seq.k_row0;
            mbar_arrive_expect_tx(q_full, L::Q_BYTES);
#pragma unroll
            for (int c = 0; c < D / 64; ++c) tma_load_4d(sQ + c * BM * 128, &P.tq, c * 64, h, q_row, bq, q_full);
            int it = 0;
            for (int j = j_first; j < j_end; j = next_tile(j + 1), ++it) {
                const int s = it % STAGES;
                const u32 ph = (it / STAGES) & 1;
                mbar_wait(k_empty(s), ph ^ 1);
                mbar_arrive_expect_tx(k_full(s), L::K_BYTES);
#pragma unroll
                for (int c = 0; c < D / 64; ++c)
                    tma_load_4d(sK + s * L::K_BYTES + c * BN * 128, &P.tk, c * 64, hk, k_row0 + j * BN, bq, k_full(s));
                mbar_wait(v_empty(s), ph ^ 1);
                mbar_arrive_expect_tx(v_full(s), L::V_BYTES);
#pragma unroll
                for (int c = 0; c < DV / 64; ++c)
                    tma_load_4d(sV + s * L::V_BYTES + c * BN * 128, &P.tv, c * 64, hk, k_row0 + j * BN, bq, v_full(s));
            }
        }
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<240>();
    const int c = wg - 1;                 // consumer index: rows [m0 + 64c, m0 + 64c + 64)
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = m0 + 64 * c + 16 * warp;  // this warp's first row
    const int row_a = r0 + g;
    const ScoreMod mod = score_mod(p, b, h);

    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_row[2] = {neg_inf(), neg_inf()}, l_row[2] = {0.f, 0.f};

    // Per tile j the GEMMs are issued so that the softmax of S_j overlaps P_{j-1} V_{j-1} on the
    // tensor cores: issue S_j, issue PV_{j-1}, wait for S_j only, softmax, then wait for PV_{j-1}
    // before O is rescaled.
    const int w0 = m0 + 64 * c;
    auto issue_s = [&](float (&s)[BN / 8][4], int slot) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32 qa = sQ + (kk / 4) * BM * 128 + c * 64 * 128 + (kk % 4) * 32;
            const u32 kb = sK + slot * L::K_BYTES + (kk / 4) * BN * 128 + (kk % 4) * 32;
            Wgmma<T, BN>::ss(s, smem_desc_sw128(qa, 16, 1024), smem_desc_sw128(kb, 16, 1024), kk > 0);
        }
        wgmma_commit();
    };
    auto issue_pv = [&](u32 (&pf)[BN / 16][4], int slot) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const u32 vb = sV + slot * L::V_BYTES + kk * 16 * 128;
            Wgmma<T, DV>::template rs<1>(o, pf[kk], smem_desc_sw128(vb, BN * 128, 1024), 1);
        }
        wgmma_commit();
    };
    auto release = [&](u32 empty_bar) {
        __syncwarp();
        if (lane == 0) mbar_arrive(empty_bar);
    };
    // Scale and mask S_j, then P_j and the rescale factor of O.
    auto softmax_tile = [&](float (&s)[BN / 8][4], int n0, float (&alpha)[2]) {
        const unsigned char tile = EXTRAS ? mask_span(p, b, h, m0, m1, n0, min(n0 + BN, seq.nk)) : TILE_FULL;
        const bool extra = EXTRAS && (mod.slope_log2 != 0.f || tile != TILE_FULL);
        const bool need_mask = extra || !window_covers(p, seq, w0, w0 + 64, n0, n0 + BN);
        const float factor = scores_to_log2<T, BN, EXTRAS>(s, p, seq, mod, b, h, row_a, n0, t, need_mask, extra);
        softmax_p<BN>(s, m_row, l_row, alpha, factor);
    };

    // Ping-pong: the consumers take turns to issue their GEMMs (hardware barriers 3 and 4), so
    // one's GEMMs run on the tensor cores while the other is in its softmax. Each issues
    // tiles + 1 batches (S_0; S_j with PV_{j-1}; PV_last); consumer 0 goes first and consumer 1
    // skips its last hand-over, so no arrival is left pending at exit.
    auto wait_turn = [&]() { named_barrier(3 + c, 256); };
    auto pass_turn = [&](bool last) {
        if (!(last && c == 1)) named_barrier_arrive(3 + (1 - c), 256);
    };

    mbar_wait(q_full, 0);
    int j = j_first;
    if (j < j_end) {
        if (c == 1) named_barrier_arrive(3, 256);
        float s[BN / 8][4];
        u32 pf[BN / 16][4];
        float alpha[2];
        mbar_wait(k_full(0), 0);
        wait_turn();
        wgmma_fence();
        issue_s(s, 0);
        pass_turn(false);
        wgmma_wait<0>();
        fence_regs(s);
        release(k_empty(0));
        softmax_tile(s, j * BN, alpha);  // O is still 0: no rescale
        p_fragments<T, BN>(s, pf);
        int it = 1;  // tiles issued so far; tile it - 1's V is still to be used
        for (j = next_tile(j + 1); j < j_end; j = next_tile(j + 1), ++it) {
            const int slot = it % STAGES, prev = (it - 1) % STAGES;
            const u32 ph = (it / STAGES) & 1, prev_ph = ((it - 1) / STAGES) & 1;
            mbar_wait(k_full(slot), ph);
            mbar_wait(v_full(prev), prev_ph);
            wait_turn();
            wgmma_fence();
            issue_s(s, slot);
            issue_pv(pf, prev);
            pass_turn(false);
            wgmma_wait<1>();  // S_j is done; PV_{j-1} may still run
            fence_regs(s);
            release(k_empty(slot));
            softmax_tile(s, j * BN, alpha);
            wgmma_wait<0>();
            fence_regs(o);
            fence_regs(pf);
            release(v_empty(prev));
            rescale_o<DV>(o, alpha);
            p_fragments<T, BN>(s, pf);
        }
        const int prev = (it - 1) % STAGES;
        const u32 prev_ph = ((it - 1) / STAGES) & 1;
        mbar_wait(v_full(prev), prev_ph);
        wait_turn();
        wgmma_fence();
        issue_pv(pf, prev);
        pass_turn(true);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pf);
        release(v_empty(prev));
    }

    // Normalise, stage this consumer's 64 rows in shared memory (swizzled, over its own Q rows
    // once every S GEMM is done), then store 16 bytes per thread, coalesced.
    float inv[2];
    softmax_finish(l_row, inv);
    named_barrier(1 + c, 128);  // the consumer's last S GEMM has read its Q rows
    unsigned char* sO = smem + L::O;
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) {
        const int col = i * 8 + 2 * t, lr = 64 * c + 16 * warp + g;
        *reinterpret_cast<u32*>(sO + sw128_offset(lr, col, BM)) = pack2<T>(o[i][0] * inv[0], o[i][1] * inv[0]);
        *reinterpret_cast<u32*>(sO + sw128_offset(lr + 8, col, BM)) = pack2<T>(o[i][2] * inv[1], o[i][3] * inv[1]);
    }
    named_barrier(1 + c, 128);
    T* og = static_cast<T*>(p.o) + b * p.o_sb + seq.q_row0 * p.o_ss + h * p.o_sh;
    constexpr int CHV = DV / 8;
    for (int idx = tid; idx < 64 * CHV; idx += 128) {
        const int lr = idx / CHV, col = (idx % CHV) * 8;
        const int row = m0 + 64 * c + lr;
        if (row < seq.nq && col < p.head_dim_v)
            *reinterpret_cast<uint4*>(og + (i64)row * p.o_ss + col) =
                *reinterpret_cast<const uint4*>(sO + sw128_offset(64 * c + lr, col, BM));
    }
    store_lse(p, seq, b, h, row_a, t, m_row, l_row);
}
