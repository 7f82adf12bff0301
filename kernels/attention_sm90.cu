// Dense attention forward for Hopper (sm_90a): TMA loads on mbarriers, wgmma with operands in
// shared memory, warp specialisation.
//
// The grid is persistent: one CTA per SM walks work tiles of 128 query rows of one
// (batch, head) in the order of TileSched (heads in groups whose K/V fit in L2, longest causal
// rows first). Where tile costs differ the CTAs take tiles from an atomic counter as they free
// up (greedy, like the hardware's own block scheduler); otherwise in fixed rounds. The producer
// fetches the next tile and passes its index to the consumers in shared memory with Q.
// A CTA has three warpgroups:
//   warpgroup 0, the producer: one thread issues TMA loads of Q once and of K/V tiles into a
//     ring of STAGES slots (full/empty mbarriers per slot), skipping tiles no row can see;
//     it gives most of its registers to the consumers (setmaxnreg). It runs ahead into the next
//     work tile: K/V of tile i + 1 stream in while the consumers finish tile i.
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
//
// What the operands are is a policy (OPS): Sm90Dense below for f16/bf16 Q, K, V; the quantized
// kernel (quant_attention.cu) supplies INT8 Q/K and FP8 V through the same interface, so the
// pipeline, scheduling, masking and softmax are this one kernel's.
#pragma once
#include "common/types.cuh"
#include "common/softmax.cuh"
#include "common/attention.cuh"
#include "common/hopper.cuh"
#include "common/wgmma.cuh"

// Work tiles in order: groups of `group` (batch, head) pairs, and within a group the query
// blocks from the last (longest under a causal mask) to the first, heads innermost.
struct TileSched {
    int m_blocks;  // query blocks per sequence (of the longest sequence, for varlen)
    int heads;     // query heads
    int pairs;     // batch * heads
    int group;     // (batch, head) pairs per group: their K/V fit in L2 together
};

struct TileCoord {
    int m0, h, b;
};

__device__ __forceinline__ TileCoord tile_coord(const TileSched& s, int w, int bm) {
    const int per_group = s.group * s.m_blocks;
    const int g = w / per_group, r = w - g * per_group;
    const int first = g * s.group;
    const int size = min(s.group, s.pairs - first);
    const int pair = first + r % size;
    TileCoord c;
    c.m0 = (s.m_blocks - 1 - r / size) * bm;
    c.b = pair / s.heads;
    c.h = pair - c.b * s.heads;
    return c;
}

// sparse_attention's key tiles: per (batch, head, query block of 128 rows) a list of key tiles
// in ascending order, each either whole (every key visible to every row, as far as the
// sequence reaches) or partial, with a bitmap (python/ferrokernels/sparse.py builds the list
// from a BlockMask). Null `count`: dense attention.
// A negative entry -1 - t is tile t of the head's gathered key columns (vertical_slash: the
// tensor maps tkc / tvc), masked by the one 128-bit row `cols[-2 - bitmap]` for all rows.
struct TileList {
    const i32* count;   // [b * sb + h * sh + qb]
    const i32* index;   // [(b * sb + h * sh + qb) * max + i]: key tile numbers
    const i32* bitmap;  // same place: -1 = whole, >= 0 the partial tile's bitmap in `bits`, <= -2 a column row
    const u32* bits;    // (bitmaps, 128 rows, BN / 32 words): bit c of word w = key 32 w + c
    const u32* cols;    // (column rows, BN / 32 words), the same bit order
    i64 sb, sh;         // (batch, head) strides of count, 0 where the mask is shared
    int max;            // list capacity per query block
};

// Mirrors `Sm90Params` in src/ops/attention.rs: the tensor maps, then the shared parameters.
struct AttentionSm90Params {
    TmaDesc tq, tk, tv;  // 4-D (head_dim, heads, seqlen, batch), boxes of 64 columns
    AttentionParams p;
    TileSched sched;
    int tiles;     // m_blocks * pairs
    int* counter;  // zeroed before launch: tiles handed out past the first round; null = static
    TileList list;
    TmaDesc tkc, tvc;  // gathered key columns (batch, columns, heads_q, head_dim), or unused
};

// Masks the keys of a partial sparse tile by the bitmap rows of this thread's two rows, `ra`
// and `rb` (8 rows below): s[i][e] is key 8i + 2t + (e & 1).
template <int BN>
__device__ __forceinline__ void mask_bitmap(float (&s)[BN / 8][4], const u32* ra, const u32* rb, int t) {
    static_assert(BN == 128, "a bitmap row is one 16-byte load");
    const uint4 a = *reinterpret_cast<const uint4*>(ra), c = *reinterpret_cast<const uint4*>(rb);
    const u32 w[2][4] = {{a.x, a.y, a.z, a.w}, {c.x, c.y, c.z, c.w}};
#pragma unroll
    for (int i = 0; i < BN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (!((w[e >> 1][i >> 2] >> (8 * (i & 3) + 2 * t + (e & 1))) & 1u)) s[i][e] = neg_inf();
}

// The operand policy of the 16-bit kernel: Q, K and V in T, both GEMMs on f16/bf16 wgmma.
// A policy gives the tile sizes, the TMA loads, the two GEMMs, the scores in log2 units and
// the output's last step; quant_attention.cu's Sm90Quant is the other one.
template <typename T, int D_, int DV_, int BN_>
struct Sm90Dense {
    using Params = AttentionSm90Params;
    using Out = T;
    using Acc = float;  // S accumulator element
    static constexpr int D = D_, DV = DV_, BN = BN_, BM = 128;
    static constexpr int Q_BYTES = BM * D * 2, K_BYTES = BN * D * 2, V_BYTES = BN * DV * 2, V_SLOT = V_BYTES;
    static constexpr int PK = 16;          // keys per P V instruction
    static constexpr float P_LOG2 = 0.f;   // log2 of the factor P is scaled by before rounding
    static constexpr bool PINGPONG = true; // the consumers take turns issuing GEMMs
    static constexpr bool BATCHED = false;  // operands of packed sequences are packed too
    struct Row {                           // per consumer and work tile
        ScoreMod mod;
    };
    struct Keys {};                        // per key tile
    // Where P V accumulates before it joins O: straight into O here (f32 accumulation).
    struct Pv {
        __device__ __forceinline__ void fence() {}
    };
    static __device__ __forceinline__ void init_slots(unsigned char*, int) {}
    static constexpr bool L_WHOLE = false;  // l_row: per-lane parts of the row sums

    static __device__ __forceinline__ void load_q(const Params& P, u32 sQ, int h, int row, int b, u32 bar) {
#pragma unroll
        for (int c = 0; c < D / 64; ++c) tma_load_4d(sQ + c * BM * 128, &P.tq, c * 64, h, row, b, bar);
    }
    static __device__ __forceinline__ void load_k(const Params& P, u32 sK, int hk, int row, int b, u32 bar) {
        load_tile<D>(&P.tk, sK, hk, row, b, bar);
    }
    static __device__ __forceinline__ void load_v(const Params& P, u32 sV, int hk, int row, int b, u32 bar) {
        load_tile<DV>(&P.tv, sV, hk, row, b, bar);
    }
    // BN rows of `map` (K, V or their gathered columns) in 64-column swizzled boxes.
    template <int W>
    static __device__ __forceinline__ void load_tile(const TmaDesc* map, u32 dst, int h, int row, int b, u32 bar) {
#pragma unroll
        for (int c = 0; c < W / 64; ++c) tma_load_4d(dst + c * BN * 128, map, c * 64, h, row, b, bar);
    }
    static __device__ __forceinline__ Row row(const Params& P, int b, int h, int, int, const SeqInfo&) {
        return Row{score_mod(P.p, b, h)};
    }
    // S = Q K^T for consumer c's 64 rows of Q.
    static __device__ __forceinline__ void issue_s(Acc (&s)[BN / 8][4], u32 sQ, int c, u32 sK) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32 qa = sQ + (kk / 4) * BM * 128 + c * 64 * 128 + (kk % 4) * 32;
            const u32 kb = sK + (kk / 4) * BN * 128 + (kk % 4) * 32;
            Wgmma<T, BN>::ss(s, smem_desc_sw128(qa, 16, 1024), smem_desc_sw128(kb, 16, 1024), kk > 0);
        }
    }
    static __device__ __forceinline__ Keys keys(const Params&, const Row&, int, int) { return Keys{}; }
    static __device__ __forceinline__ void scores(const Acc (&a)[BN / 8][4], float (&s)[BN / 8][4], const Keys&) {
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = a[i][e];
    }
    // P from log2-unit scores (scores_to_log2 left `factor` to apply).
    static __device__ __forceinline__ void softmax(float (&s)[BN / 8][4], float (&m_row)[2], float (&l_row)[2],
                                                   float (&alpha)[2], float factor, const Keys&) {
        softmax_p<BN>(s, m_row, l_row, alpha, factor);
    }
    static __device__ __forceinline__ void pack_p(const float (&s)[BN / 8][4], u32 (&pf)[BN / PK][4]) {
        p_fragments<T, BN>(s, pf);
    }
    // O += P V, V read N-major.
    static __device__ __forceinline__ void issue_pv(float (&o)[DV / 8][4], Pv&, const u32 (&pf)[BN / PK][4], u32 sV) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            Wgmma<T, DV>::template rs<1>(o, pf[kk], smem_desc_sw128(sV + kk * 16 * 128, BN * 128, 1024), 1);
    }
    // Once the P V of the previous tile is done: O *= alpha (the new running max).
    static __device__ __forceinline__ void merge_pv(float (&o)[DV / 8][4], float (&)[2], Pv&, const float (&alpha)[2]) {
        rescale_o<DV>(o, alpha);
    }
    static __device__ __forceinline__ void merge_last(float (&)[DV / 8][4], float (&)[2], const Pv&) {}
    // The output before it is rounded to T: O / l.
    static __device__ __forceinline__ void finish(float (&o)[DV / 8][4], const float (&inv)[2], const Params&, int, int,
                                                  int) {
        rescale_o<DV>(o, inv);
    }
};

template <class OPS, int DV, int STAGES>
struct Sm90Smem {
    static constexpr int BM = 128;
    static constexpr int Q_BYTES = OPS::Q_BYTES;
    static constexpr int K_BYTES = OPS::K_BYTES;
    static constexpr int V_BYTES = OPS::V_BYTES;  // what TMA writes into a V slot
    static constexpr int V_SLOT = OPS::V_SLOT;    // a slot's size: V_BYTES and what the policy keeps beside it
    static constexpr int BAR_BYTES = 8 * (3 + 4 * STAGES);  // + the next tile's index
    static constexpr int SLACK = 1024;  // to align the base to 1024 bytes
    static constexpr int TILES = Q_BYTES + STAGES * (K_BYTES + V_SLOT);
    // The output gets its own staging area where it fits, so the next tile's Q can load while
    // this one's output is written; otherwise it is staged over Q's rows (each consumer over
    // its own, where Q is large enough) and Q is released after the epilogue.
    static constexpr bool O_OWN = TILES + BM * DV * 2 + BAR_BYTES + SLACK <= 227 * 1024 || BM * DV * 2 > Q_BYTES;
    static constexpr int O_BYTES = O_OWN ? BM * DV * 2 : 0;
    static constexpr int Q = 0;
    static constexpr int K = Q + Q_BYTES;
    static constexpr int V = K + STAGES * K_BYTES;
    static constexpr int O = O_OWN ? V + STAGES * V_SLOT : Q;
    static constexpr int BAR = TILES + O_BYTES;
    // q_full, q_empty, k_full[S], k_empty[S], v_full[S], v_empty[S], tile index
    static constexpr int BYTES = BAR + BAR_BYTES + SLACK;
};

// SPARSE: the key tiles come from P.list (sparse_attention) instead of the causal/window range.
template <class OPS, int STAGES, bool EXTRAS, bool SPARSE = false>
__device__ __forceinline__ void attention_fwd_sm90(const typename OPS::Params& P) {
    using T = typename OPS::Out;
    constexpr int DV = OPS::DV, BN = OPS::BN;
    using L = Sm90Smem<OPS, DV, STAGES>;
    constexpr int BM = L::BM;
    const AttentionParams& p = P.p;
    extern __shared__ unsigned char smem_raw[];
    // Swizzled tiles need 1024-byte alignment; the dynamic base only promises 16.
    const u32 base = (smem_addr(smem_raw) + 1023) & ~1023u;
    unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
    const u32 sQ = base + L::Q, sK = base + L::K, sV = base + L::V;
    const u32 bar = base + L::BAR;
    const u32 q_full = bar, q_empty = bar + 8;
    auto k_full = [&](int s) { return bar + 8 * (2 + s); };
    auto k_empty = [&](int s) { return bar + 8 * (2 + STAGES + s); };
    auto v_full = [&](int s) { return bar + 8 * (2 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return bar + 8 * (2 + 3 * STAGES + s); };
    volatile int* tile_slot = reinterpret_cast<volatile int*>(smem + L::BAR + 8 * (2 + 4 * STAGES));
    // The K/V ring position n (counted over all of this CTA's key tiles) is slot n % STAGES
    // in phase (n / STAGES) & 1.
    auto slot_of = [](int n) { return n % STAGES; };
    auto phase_of = [](int n) { return (u32)(n / STAGES) & 1; };

    const int wg = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 8);  // one arrival per consumer warp
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), 8);
            mbar_init(v_empty(s), 8);
        }
        mbar_init_fence();
    }
    // Constant operand data the policy keeps in the V slots (TMA never writes there), visible to
    // the tensor cores (async proxy) before the first GEMM.
    if constexpr (L::V_SLOT != L::V_BYTES) {
        OPS::init_slots(smem + L::V, STAGES);
        fence_proxy_async();
    }
    __syncthreads();

    // Every role walks the same work tiles and, per tile, the same key tiles: positions
    // j_first..j_end - 1 of the list (SPARSE), or those key tiles themselves.
    struct Work {
        int m0, m1, h, b, hk, j_first, j_end;
        SeqInfo seq;
        int list;  // SPARSE: where this query block's list starts, in units of P.list.max
    };
    // (Offsets rather than pointers: the kernel parameters stay in the constant bank, and the
    // consumers, at their register ceiling, keep one 32-bit value instead of two pointers.)
    auto key_tile = [&](const Work& w, int j) {
        if constexpr (SPARSE) return P.list.index[(i64)w.list * P.list.max + j];
        else return j;
    };
    auto next_tile = [&](const Work& w, int j) {
        if constexpr (EXTRAS)
            while (j < w.j_end && mask_span(p, w.b, w.h, w.m0, w.m1, j * BN, min(j * BN + BN, w.seq.nk)) == TILE_EMPTY) ++j;
        return j;
    };
    auto work = [&](int idx, Work& w) {
        const TileCoord tc = tile_coord(P.sched, idx, BM);
        w.m0 = tc.m0, w.h = tc.h, w.b = tc.b;
        w.seq = seq_info(p, w.b);
        if (w.m0 >= w.seq.nq) return false;
        w.hk = w.h / (p.heads_q / p.heads_kv);
        w.m1 = min(w.m0 + BM, w.seq.nq);
        if constexpr (SPARSE) {
            w.list = (int)(w.b * P.list.sb + w.h * P.list.sh + w.m0 / BM);
            w.j_first = 0;
            w.j_end = P.list.count[w.list];
            return true;
        }
        const int n_begin = keys_begin(p, w.seq, w.m0), n_end = keys_end(p, w.seq, w.m1);
        w.j_end = n_end > n_begin ? (n_end + BN - 1) / BN : 0;
        w.j_first = next_tile(w, n_begin / BN);
        return true;
    };

    if (wg == 0) {
        // ---- producer ----
        setmaxnreg_dec<24>();
        if (threadIdx.x != 0) return;
        int n = 0, q_uses = 0;
        Work w;
        // Hands tile `idx` (or -1: no more) to the consumers once they are done with Q.
        auto publish = [&](int idx) {
            mbar_wait(q_empty, (q_uses++ & 1) ^ 1);
            *tile_slot = idx;
            if (idx < 0) mbar_arrive(q_full);
            else mbar_arrive_expect_tx(q_full, L::Q_BYTES);
        };
        for (int r = 0;; ++r) {
            const int idx = r == 0 ? blockIdx.x
                          : P.counter != nullptr ? gridDim.x + atomicAdd(P.counter, 1)
                                                 : blockIdx.x + r * gridDim.x;
            if (idx >= P.tiles) break;
            if (!work(idx, w)) continue;
            // Packed sequences are loaded from their rows, unless the policy's operands are laid
            // out per sequence anyway (the 8-bit codes: a batch of the longest length).
            const bool packed = p.cu_seqlens_q != nullptr && !OPS::BATCHED;
            const int bq = packed ? 0 : w.b;
            const int q_row = (packed ? (int)w.seq.q_row0 : 0) + w.m0, k_row0 = packed ? (int)w.seq.k_row0 : 0;
            publish(idx);
            OPS::load_q(P, sQ, w.h, q_row, bq, q_full);
            // key_tile's address computed once per work tile: recomputing it per key tile made
            // the 24-register producer spill 96 / 140 bytes instead of 68 / 92 (NOTES, sparse v1).
            const i32* tiles = SPARSE ? P.list.index + (i64)w.list * P.list.max : nullptr;
            for (int j = w.j_first; j < w.j_end; j = next_tile(w, j + 1), ++n) {
                const int s = slot_of(n);
                mbar_wait(k_empty(s), phase_of(n) ^ 1);
                mbar_arrive_expect_tx(k_full(s), L::K_BYTES);
                const int kt = SPARSE ? tiles[j] : j;
                if constexpr (SPARSE) {
                    // Gathered columns are per query head, in their own (unpacked) tensors.
                    const bool col = kt < 0;
                    const int hh = col ? w.h : w.hk, row = col ? (-1 - kt) * BN : k_row0 + kt * BN;
                    OPS::template load_tile<OPS::D>(col ? &P.tkc : &P.tk, sK + s * L::K_BYTES, hh, row, w.b, k_full(s));
                    mbar_wait(v_empty(s), phase_of(n) ^ 1);
                    mbar_arrive_expect_tx(v_full(s), L::V_BYTES);
                    OPS::template load_tile<DV>(col ? &P.tvc : &P.tv, sV + s * L::V_SLOT, hh, row, w.b, v_full(s));
                    continue;
                }
                OPS::load_k(P, sK + s * L::K_BYTES, w.hk, k_row0 + kt * BN, bq, k_full(s));
                mbar_wait(v_empty(s), phase_of(n) ^ 1);
                mbar_arrive_expect_tx(v_full(s), L::V_BYTES);
                OPS::load_v(P, sV + s * L::V_SLOT, w.hk, k_row0 + kt * BN, bq, v_full(s));
            }
        }
        publish(-1);
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<240>();
    const int c = wg - 1;                 // consumer index: rows [m0 + 64c, m0 + 64c + 64)
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    using Acc = typename OPS::Acc;
    auto issue_s = [&](Acc (&acc)[BN / 8][4], int slot) {
        OPS::issue_s(acc, sQ, c, sK + slot * L::K_BYTES);
        wgmma_commit();
    };
    auto release = [&](u32 empty_bar) {
        __syncwarp();
        if (lane == 0) mbar_arrive(empty_bar);
    };
    // Ping-pong: the consumers take turns to issue their GEMMs (hardware barriers 3 and 4), so
    // one's GEMMs run on the tensor cores while the other is in its softmax. Per work tile each
    // issues tiles + 1 batches (S_0; S_j with PV_{j-1}; PV_last); consumer 0 goes first and
    // consumer 1 skips its last hand-over, so no arrival is left pending between work tiles.
    // A policy whose softmax outweighs its GEMMs (PINGPONG false) lets both consumers run at
    // once instead, so two warps per scheduler hide each other's latencies.
    auto wait_turn = [&]() {
        if constexpr (OPS::PINGPONG) named_barrier(3 + c, 256);
    };
    auto pass_turn = [&](bool last) {
        if (OPS::PINGPONG && !(last && c == 1)) named_barrier_arrive(3 + (1 - c), 256);
    };

    int n = 0, q_uses = 0;
    Work w;
    for (;;) {
        mbar_wait(q_full, q_uses & 1);
        const int idx = *tile_slot;
        if (idx < 0) break;
        work(idx, w);  // the producer skipped tiles with no rows
        const int b = w.b, h = w.h, m0 = w.m0, m1 = w.m1;
        const SeqInfo& seq = w.seq;
        const int r0 = m0 + 64 * c + 16 * warp;  // this warp's first row
        const int row_a = r0 + g;
        const int w0 = m0 + 64 * c;
        const typename OPS::Row rc = OPS::row(P, b, h, w.hk, m0 + 64 * c, seq);
        const ScoreMod& mod = rc.mod;

        float o[DV / 8][4];
#pragma unroll
        for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
        float m_row[2] = {neg_inf(), neg_inf()}, l_row[2] = {0.f, 0.f};

        typename OPS::Pv pv;
        auto issue_pv = [&](u32 (&pf)[BN / OPS::PK][4], int slot) {
            OPS::issue_pv(o, pv, pf, sV + slot * L::V_SLOT);
            wgmma_commit();
        };
        // Scale and mask S of list position j (key tile kt), then P and the rescale factor of O.
        auto softmax_tile = [&](float (&s)[BN / 8][4], int j, int kt, float (&alpha)[2], const typename OPS::Keys& ks) {
            // A column tile's keys all lie before this query block (its bitmap row says which).
            const int n0 = SPARSE && kt < 0 ? 0 : kt * BN;
            const unsigned char tile = EXTRAS ? mask_span(p, b, h, m0, m1, n0, min(n0 + BN, seq.nk)) : TILE_FULL;
            const bool extra = EXTRAS && (mod.slope_log2 != 0.f || tile != TILE_FULL);
            const int bitmap = SPARSE ? P.list.bitmap[(i64)w.list * P.list.max + j] : -1;
            const bool need_mask = extra || bitmap != -1 || !window_covers(p, seq, w0, w0 + 64, n0, n0 + BN);
            const float factor = scores_to_log2<T, BN, EXTRAS>(s, p, seq, mod, b, h, row_a, n0, t, need_mask, extra);
            if constexpr (SPARSE) {
                if (bitmap >= 0) {
                    const u32* ra = P.list.bits + ((i64)bitmap * BM + row_a - m0) * (BN / 32);
                    mask_bitmap<BN>(s, ra, ra + 8 * (BN / 32), t);
                } else if (bitmap < -1) {
                    const u32* r = P.list.cols + (i64)(-2 - bitmap) * (BN / 32);
                    mask_bitmap<BN>(s, r, r, t);
                }
            }
            OPS::softmax(s, m_row, l_row, alpha, factor, ks);
        };

        // Per key tile j the GEMMs are issued so that the softmax of S_j overlaps
        // P_{j-1} V_{j-1} on the tensor cores: issue S_j, issue PV_{j-1}, wait for S_j only,
        // softmax, then wait for PV_{j-1} before O is rescaled.
        int j = w.j_first;
        if (j < w.j_end) {
            if (OPS::PINGPONG && c == 1) named_barrier_arrive(3, 256);
            Acc acc[BN / 8][4];
            float s[BN / 8][4];
            u32 pf[BN / OPS::PK][4];
            float alpha[2];
            mbar_wait(k_full(slot_of(n)), phase_of(n));
            wait_turn();
            wgmma_fence();
            issue_s(acc, slot_of(n));
            pass_turn(false);
            const int kt0 = key_tile(w, j);
            const typename OPS::Keys ks0 = OPS::keys(P, rc, kt0, seq.nk);
            wgmma_wait<0>();
            fence_regs(acc);
            release(k_empty(slot_of(n)));
            OPS::scores(acc, s, ks0);
            softmax_tile(s, j, kt0, alpha, ks0);  // O is still 0: no rescale
            OPS::pack_p(s, pf);
            // Ring position n holds the tile whose V is still to be used.
            for (j = next_tile(w, j + 1); j < w.j_end; j = next_tile(w, j + 1), ++n) {
                const int slot = slot_of(n + 1), prev = slot_of(n);
                mbar_wait(k_full(slot), phase_of(n + 1));
                mbar_wait(v_full(prev), phase_of(n));
                wait_turn();
                wgmma_fence();
                issue_s(acc, slot);
                issue_pv(pf, prev);
                pass_turn(false);
                const int kt = key_tile(w, j);
                const typename OPS::Keys ks = OPS::keys(P, rc, kt, seq.nk);
                wgmma_wait<1>();  // S_j is done; PV_{j-1} may still run
                fence_regs(acc);
                release(k_empty(slot));
                OPS::scores(acc, s, ks);
                softmax_tile(s, j, kt, alpha, ks);
                wgmma_wait<0>();
                fence_regs(o);
                pv.fence();
                fence_regs(pf);
                release(v_empty(prev));
                OPS::merge_pv(o, l_row, pv, alpha);
                OPS::pack_p(s, pf);
            }
            mbar_wait(v_full(slot_of(n)), phase_of(n));
            wait_turn();
            wgmma_fence();
            issue_pv(pf, slot_of(n));
            pass_turn(true);
            wgmma_wait<0>();
            fence_regs(o);
            pv.fence();
            fence_regs(pf);
            release(v_empty(slot_of(n)));
            OPS::merge_last(o, l_row, pv);
            ++n;
        }
        // Every S GEMM of this consumer has read its Q rows.
        if constexpr (L::O_OWN) release(q_empty);
        ++q_uses;

        // Normalise, stage this consumer's 64 rows in shared memory (swizzled), then store 16
        // bytes per thread, coalesced.
        float inv[2];
        softmax_finish<!OPS::L_WHOLE>(l_row, inv);
        OPS::finish(o, inv, P, b, w.hk, t);
        named_barrier(1 + c, 128);  // the last tile's stores (and S GEMMs) are done with sO
        unsigned char* sO = smem + L::O;
#pragma unroll
        for (int i = 0; i < DV / 8; ++i) {
            const int col = i * 8 + 2 * t, lr = 64 * c + 16 * warp + g;
            *reinterpret_cast<u32*>(sO + sw128_offset(lr, col, BM)) = pack2<T>(o[i][0], o[i][1]);
            *reinterpret_cast<u32*>(sO + sw128_offset(lr + 8, col, BM)) = pack2<T>(o[i][2], o[i][3]);
        }
        named_barrier(1 + c, 128);
        T* og = static_cast<T*>(p.o) + b * p.o_sb + seq.q_row0 * p.o_ss + h * p.o_sh;
        constexpr int CHV = DV / 8;
        for (int idx2 = tid; idx2 < 64 * CHV; idx2 += 128) {
            const int lr = idx2 / CHV, col = (idx2 % CHV) * 8;
            const int row = m0 + 64 * c + lr;
            if (row < seq.nq && col < p.head_dim_v)
                *reinterpret_cast<uint4*>(og + (i64)row * p.o_ss + col) =
                    *reinterpret_cast<const uint4*>(sO + sw128_offset(64 * c + lr, col, BM));
        }
        if constexpr (!L::O_OWN) {
            // The next Q lands (through TMA, the async proxy) where the output was staged.
            fence_proxy_async();
            release(q_empty);
        }
        // P was scaled by 2^P_LOG2 before rounding, so l was too.
        m_row[0] -= OPS::P_LOG2, m_row[1] -= OPS::P_LOG2;
        store_lse(p, seq, b, h, row_a, t, m_row, l_row);
    }
}
