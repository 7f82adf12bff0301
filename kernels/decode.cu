// Decode attention: a few new query tokens per sequence against a long KV cache, contiguous
// (batch, capacity, heads_kv, D) or paged (pages, page_size, heads_kv, D) through a block table.
// Memory-bound: the kernel's job is to stream K and V once at full bandwidth.
//
// GQA packing: a CTA serves one kv head, and its query rows are every (new token, q head of
// that kv head) pair -- row r = token r / group, q head hk * group + r % group -- so the cache
// is read once for the whole group. Rows fill m16n8k16 MMAs (tensor cores do the little math
// there is); WR warps split the rows in 16s, and the other 4 / WR warps split each 64-key
// tile, so a lone 16-row group still has four warps on the bandwidth.
//
// Split-KV (FlashDecoding): blockIdx.x takes one of `splits` equal shares of the sequence's
// visible keys, so a single long sequence fills the GPU; each split writes its normalised
// output and LSE, and decode_merge combines them. With one split the CTA writes the result.
//
// Visibility: new token i sits at position pos = len - q_len + i and sees keys in
// [pos - window_left, pos + window_right] intersected with [start, len); causal_q is
// window_right = 0; WINDOW_NONE is unbounded. `start` is the cache's left padding of the
// (sequence, kv head), 0 without one (e.g. a cache that keeps a different number of tokens per
// head can right-align them and append at the sequence's one length).
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"
#include "common/softmax.cuh"
#include "common/attention.cuh"
#include "common/block.cuh"

// Mirrors `DecodeParams` in src/ops/decode.rs field for field. Strides in elements.
struct DecodeParams {
    const void* q;            // (batch, q_len, heads_q, D)
    const void* k;            // cache
    const void* v;
    void* o;                  // like q
    float* lse;               // (batch, heads_q, q_len) natural log, or null
    const i32* seqlens;       // (batch,) keys in the cache, new tokens included
    const i32* block_table;   // (batch, max_pages) or per kv head (batch, heads_kv, max_pages); null: contiguous
    float* part_o;            // splits > 1: (splits, batch, heads_q, q_len, D)
    float* part_lse;          // splits > 1: (splits, batch, heads_q, q_len), log2 units
    const i32* leftpad;       // (batch,) or (batch, heads_kv): keys before it are not the sequence's; null: 0
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;     // k_sb: per page (paged) or per sequence (contiguous)
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    i64 lse_sb, lse_sh, lse_ss;
    i64 bt_sb, bt_sh;         // bt_sh 0: one table for every kv head
    i64 lp_sb, lp_sh;         // leftpad strides; lp_sh 0: one start for every kv head
    i32 batch, q_len, heads_q, heads_kv, group, head_dim;
    i32 page_shift;           // log2(page size); unused when contiguous
    i32 capacity;             // keys one sequence can hold
    i32 num_pages;            // paged: pages in the pool (entries outside are skipped)
    i32 splits;
    i32 window_left, window_right;
    i32 heads_fast;           // grid x = kv head x row group, y = split (else the reverse)
    i32 pad_;
    float scale_log2;         // softmax scale * log2(e)
    float softcap;            // tanh cap on scaled scores, 0 = none
};

template <int D, int STAGES_>
struct DecodeSmem {
    static constexpr int BN = 64;             // keys per pipeline stage
    static constexpr int STAGES = STAGES_;
    static constexpr int SROW = D + 8;        // padded rows: ldmatrix rows hit distinct banks
    static constexpr int STAGE_ELEMS = 2 * BN * SROW;  // K then V
};

// Visible keys [lo, hi] of new token i of a sequence of `len` keys from `start` (may be empty: lo > hi).
__device__ __forceinline__ void decode_bounds(const DecodeParams& p, int len, int start, int i, int& lo, int& hi) {
    const int pos = len - p.q_len + i;
    lo = max(start, pos - p.window_left);
    hi = min(len - 1, (int)min((i64)pos + p.window_right, (i64)WINDOW_NONE));
}

// Element offsets of key `key` of kv head `hk` in K and V; false where the block table points
// outside the pool (such rows load as zeros; the Python layer rejects those tables up front).
__device__ __forceinline__ bool decode_row(const DecodeParams& p, int b, int hk, int key, i64& ko, i64& vo) {
    i64 page, slot;
    if (p.block_table != nullptr) {
        page = p.block_table[b * p.bt_sb + hk * p.bt_sh + (key >> p.page_shift)];
        slot = key & ((1 << p.page_shift) - 1);
        if (page < 0 || page >= p.num_pages) return false;
    } else {
        page = b, slot = key;
    }
    ko = page * p.k_sb + slot * p.k_ss + hk * p.k_sh;
    vo = page * p.v_sb + slot * p.v_ss + hk * p.v_sh;
    return true;
}

// The keys of a tile are split among the WK = 4 / WR key groups of a CTA: group wk is the WR
// warps (one per row group) that read keys [wk * KT, (wk + 1) * KT) of every tile, KT = 64 / WK.
// Each group loads (and, quantized, dequantizes) its own rows, so the per-tile waits are the
// group's barrier -- the warp's own __syncwarp when WR = 1 -- not the CTA's: a warp runs ahead
// of the others by up to the ring's depth instead of meeting them at every tile.
template <int WR>
struct KeyGroup {
    static constexpr int WK = 4 / WR, KT = 64 / WK, THREADS = 32 * WR;
    int wk, tid;  // the group, and this thread's index in it
    __device__ __forceinline__ KeyGroup() {
        const int warp = threadIdx.x >> 5;
        wk = warp % WK;
        tid = (warp / WK) * 32 + (threadIdx.x & 31);
    }
    __device__ __forceinline__ int row0() const { return wk * KT; }  // first row of the tile
    // Orders the group's shared-memory writes before its reads (and the reverse).
    __device__ __forceinline__ void sync() const {
        if constexpr (WR == 1) __syncwarp();
        else if constexpr (WR == 4) __syncthreads();
        else asm volatile("bar.sync %0, %1;\n" ::"r"(1 + wk), "n"(THREADS) : "memory");
    }
};

// Where a CTA's K/V tiles come from (the quantized cache supplies its own, kv_quant.cu). A tile
// source owns the shared memory after the Q rows and provides, per key group (KeyGroup):
//   MT            the element type the MMAs read (K and V tiles of BN rows, SROW apart)
//   STAGES        tiles in flight
//   load(j, s)    issue the copies of the group's rows of 64-key tile j into stage s (one
//                 commit group per call)
//   ready(j, s)   tile j's K rows (V rows follow BN * SROW later), once its copies landed and
//                 the group passed its barrier; may itself end with the group's barrier (every
//                 warp calls it, before deciding to skip the tile)
//   scale_scores<N>(s, stage, k0, t)   per-key factors on the scores of the warp's keys k0.. of
//                 the tile in `stage` (C fragments; a no-op for a plain cache)
//   scratch()     float area of at least (4 * 16 * D + 2 * 4 * 16) floats for the warp merge

// The plain cache: tiles land by cp.async in a ring of stages and are read where they land.
template <typename T, int D, int STAGES_, int WR>
struct CacheTiles {
    using L = DecodeSmem<D, STAGES_>;
    using MT = T;
    using KG = KeyGroup<WR>;
    static constexpr int BN = L::BN, STAGES = L::STAGES, SROW = L::SROW, CH = D / 8;
    // Thread t of the group copies 16-byte column chunk t % CH of its rows t / CH + RSTEP * i.
    // A group's rows (64-aligned tile, KT-aligned rows) lie inside one sequence (contiguous) or
    // one page (pages of >= 64 keys), so they have one base address and the per-row cost is an
    // add; smaller pages look up each row.
    static constexpr int RSTEP = KG::THREADS / CH, PASSES = KG::KT / RSTEP;
    static_assert(PASSES * RSTEP == KG::KT, "a group's rows split evenly into passes");

    const DecodeParams& p;
    T* sKV;
    const T* kg;
    const T* vg;
    KG grp;
    int b, hk, k_begin, k_end, my_col, my_row;
    bool col_ok, tile_in_page;

    __device__ CacheTiles(const DecodeParams& p_, unsigned char* stages, int b_, int hk_, int kb, int ke)
        : p(p_), sKV(reinterpret_cast<T*>(stages)), kg(static_cast<const T*>(p_.k)), vg(static_cast<const T*>(p_.v)),
          b(b_), hk(hk_), k_begin(kb), k_end(ke) {
        my_col = (grp.tid % CH) * 8;
        my_row = grp.row0() + grp.tid / CH;
        col_ok = my_col < p.head_dim;
        tile_in_page = p.block_table == nullptr || p.page_shift >= 6;  // 2^6 = BN
    }

    // Pages smaller than a tile: every row looks up its own page.
    __device__ void load_rows_looked_up(int j, int stage) {
        T* sK = sKV + stage * L::STAGE_ELEMS;
        T* sV = sK + BN * SROW;
#pragma unroll
        for (int i = 0; i < PASSES; ++i) {
            const int r = my_row + RSTEP * i, key = j * BN + r;
            i64 ko = 0, vo = 0;
            const bool ok = col_ok && key >= k_begin && key < k_end && decode_row(p, b, hk, key, ko, vo);
            cp_async_16(smem_addr(sK + r * SROW + my_col), ok ? kg + ko + my_col : kg, ok);
            cp_async_16(smem_addr(sV + r * SROW + my_col), ok ? vg + vo + my_col : vg, ok);
        }
    }

    // One base per group's rows, then pointer steps; only a range's first and last tiles test
    // keys. (Re-deriving each row's 64-bit offset cost ~110 instructions per pass of 16 rows.)
    __device__ void load_rows_stepped(int j, int stage) {
        const u32 sk = smem_addr(sKV + stage * L::STAGE_ELEMS + my_row * SROW + my_col);
        const u32 sv = sk + BN * SROW * (u32)sizeof(T);
        const int key0 = j * BN + grp.row0();
        i64 kb = 0, vb = 0;
        const bool base_ok = col_ok && decode_row(p, b, hk, key0, kb, vb);
        const int r0 = my_row - grp.row0();
        const T* kp = kg + kb + (i64)r0 * p.k_ss + my_col;
        const T* vp = vg + vb + (i64)r0 * p.v_ss + my_col;
        const i64 kstep = (i64)RSTEP * p.k_ss, vstep = (i64)RSTEP * p.v_ss;
        const bool full = key0 >= k_begin && key0 + KG::KT <= k_end;
#pragma unroll
        for (int i = 0; i < PASSES; ++i) {
            const int key = key0 + r0 + RSTEP * i;
            const bool ok = base_ok && (full || (key >= k_begin && key < k_end));
            // With ok false nothing is read (src-size 0) and the slot is zero-filled.
            cp_async_16(sk + i * RSTEP * SROW * (u32)sizeof(T), ok ? kp : kg, ok);
            cp_async_16(sv + i * RSTEP * SROW * (u32)sizeof(T), ok ? vp : vg, ok);
            kp += kstep;
            vp += vstep;
        }
    }

    __device__ void load(int j, int stage) {
        if (tile_in_page) load_rows_stepped(j, stage);
        else load_rows_looked_up(j, stage);
    }

    __device__ void sync() const { grp.sync(); }
    __device__ const T* ready(int, int stage) const { return sKV + stage * L::STAGE_ELEMS; }
    template <int N>
    __device__ __forceinline__ void scale_scores(float (&)[N / 8][4], int, int, int) const {}
    __device__ float* scratch() const { return reinterpret_cast<float*>(sKV); }
};

// The CTA's query rows into shared memory as MT: by cp.async when the types agree (landing with
// the first tile's group), else converted on the way (visible after the first tile's barrier).
template <typename T, typename MT, int D, int ROWS>
__device__ __forceinline__ void decode_load_q(const DecodeParams& p, MT* sQ, int b, int hk, int row0) {
    constexpr int CH = D / 8, SROW = D + 8;
    const int rows = p.q_len * p.group;
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb;
    for (int c = threadIdx.x; c < ROWS * CH; c += 128) {
        const int r = c / CH, col = (c % CH) * 8, row = row0 + r;
        const bool ok = row < rows && col < p.head_dim;
        const T* src = ok ? qg + (row / p.group) * p.q_ss + (hk * p.group + row % p.group) * p.q_sh + col : qg;
        if constexpr (SameType<T, MT>::value) {
            cp_async_16(smem_addr(sQ + r * SROW + col), src, ok);
        } else {
            const uint4 raw = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(sQ + r * SROW + col) = convert8<T, MT>(raw);
        }
    }
}

// The CTA's place in the grid: batch b, split, kv head hk, first row row0, the sequence length,
// its first key `start` (the left padding), and the split's 64-key tiles [j_begin, j_end) of
// the keys its rows see, [k_begin, k_end).
struct DecodeWork {
    int b, split, hk, row0, len, start, k_begin, k_end, j_begin, j_end;
};

// The visible keys of a warp's two rows (row_a, row_a + 8) of a CTA's work: per lane [lo, hi]
// per row; whether a tile is skipped is decided per warp (the MMAs and shuffles need every
// lane), whether it needs masking per lane.
struct RowKeys {
    int lo[2], hi[2], w_lo, w_hi, lo_max, hi_min;

    __device__ __forceinline__ RowKeys(const DecodeParams& p, const DecodeWork& w, int row_a) {
        const int rows = p.q_len * p.group;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row_a + 8 * r;
            if (row < rows) decode_bounds(p, w.len, w.start, row / p.group, lo[r], hi[r]);
            else lo[r] = 1, hi[r] = 0;
        }
        w_lo = __reduce_min_sync(0xffffffffu, min(lo[0], lo[1]));
        w_hi = __reduce_max_sync(0xffffffffu, max(hi[0], hi[1]));
        lo_max = max(lo[0], lo[1]), hi_min = min(hi[0], hi[1]);
    }

    // No row of the warp sees keys [n0, n0 + n).
    __device__ __forceinline__ bool skip(int n0, int n) const { return n0 > w_hi || n0 + n <= w_lo; }
};

// A warp's raw scores of keys n0.. (C fragments of N / 8 key columns) made ready for softmax_p:
// the softcap applied, invisible keys -inf. Returns the factor softmax_p still applies.
template <int N>
__device__ __forceinline__ float decode_scores(const DecodeParams& p, float (&s)[N / 8][4], const RowKeys& rk, int n0, int t) {
    float factor = p.scale_log2;
    if (p.softcap > 0.f) {
        // softcap * tanh(scale * s / softcap), in log2 units.
        const float cin = p.scale_log2 * 0.69314718055994531f / p.softcap;
        const float cout = p.softcap * 1.4426950408889634f;
#pragma unroll
        for (int i = 0; i < N / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = cout * tanh_approx(s[i][e] * cin);
        factor = 1.f;
    }
    if (n0 < rk.lo_max || n0 + N - 1 > rk.hi_min) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + 8 * i + 2 * t + (e & 1), r = e >> 1;
                if (key < rk.lo[r] || key > rk.hi[r]) s[i][e] = neg_inf();
            }
    }
    return factor;
}

// The end of a CTA: merges the WK = 4 / WR warps of each row group through `scratch` (at least
// (4 * 16 * D + 2 * 4 * 16) floats, free once every warp passed the barrier before this) and
// writes its rows: the output and LSE with one split, else the split's partials.
template <typename T, int D, int WR>
__device__ __forceinline__ void decode_store(const DecodeParams& p, float* scratch, float (&o)[D / 8][4],
                                             float (&m_row)[2], float (&l_row)[2], const DecodeWork& w) {
    constexpr int WK = 4 / WR, ROWS = 16 * WR;
    const int b = w.b, split = w.split, hk = w.hk, row0 = w.row0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int rows = p.q_len * p.group;

    // Per warp: m (log2 units) and l per row, and O (unnormalised) in f32.
    float* sM = scratch;
    float* sL = sM + 4 * 16;
    float* sO = sL + 4 * 16;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_row[r] = quad_sum(l_row[r]);
        if (t == 0) {
            sM[warp * 16 + g + 8 * r] = m_row[r];
            sL[warp * 16 + g + 8 * r] = l_row[r];
        }
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        const int col = 8 * i + 2 * t;
        float* o0 = sO + (warp * 16 + g) * D + col;
        o0[0] = o[i][0], o0[1] = o[i][1];
        o0[8 * D] = o[i][2], o0[8 * D + 1] = o[i][3];
    }
    __syncthreads();

    // Combine: thread handles (row, 4-column group) pairs of the CTA's ROWS rows.
    const bool final = p.splits == 1;
    for (int idx = threadIdx.x; idx < ROWS * (D / 4); idx += 128) {
        const int lr = idx / (D / 4), col = (idx % (D / 4)) * 4;
        const int row = row0 + lr;
        if (row >= rows) continue;
        const int grp = lr / 16, rr = lr % 16;
        float m = neg_inf();
#pragma unroll
        for (int w = 0; w < WK; ++w) m = fmaxf(m, sM[(grp * WK + w) * 16 + rr]);
        const float base = m == neg_inf() ? 0.f : m;
        float l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < WK; ++w) {
            const int ww = grp * WK + w;
            const float f = fast_exp2(sM[ww * 16 + rr] - base);
            l += sL[ww * 16 + rr] * f;
            const float* src = sO + (ww * 16 + rr) * D + col;
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[e] += src[e] * f;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse2 = l > 0.f ? m + log2f(l) : neg_inf();
        const int i = row / p.group, hq = hk * p.group + row % p.group;
        if (final) {
            if (col < p.head_dim) {
                T* og = static_cast<T*>(p.o) + b * p.o_sb + i * p.o_ss + hq * p.o_sh + col;
                *reinterpret_cast<uint2*>(og) = make_uint2(pack2<T>(acc[0] * inv, acc[1] * inv), pack2<T>(acc[2] * inv, acc[3] * inv));
            }
            if (col == 0 && p.lse != nullptr)
                p.lse[b * p.lse_sb + hq * p.lse_sh + i * p.lse_ss] = lse2 * 0.69314718055994531f;
        } else {
            const i64 prow = (((i64)split * p.batch + b) * p.heads_q + hq) * p.q_len + i;
            *reinterpret_cast<float4*>(p.part_o + prow * D + col) = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
            if (col == 0) p.part_lse[prow] = lse2;
        }
    }
}

// One CTA of decode over the tiles `Tiles` supplies: the rows of one kv head (every new token x
// q head of its group, ROWS at a time), the keys of one split.
template <typename T, int D, int WR, typename Tiles>
__device__ __forceinline__ void decode_attend(const DecodeParams& p, unsigned char* smem_raw, Tiles& tiles,
                                              const DecodeWork& w) {
    const int b = w.b, hk = w.hk, row0 = w.row0, j_begin = w.j_begin, j_end = w.j_end;
    using MT = typename Tiles::MT;
    constexpr int BN = Tiles::BN, STAGES = Tiles::STAGES, SROW = Tiles::SROW;
    constexpr int WK = 4 / WR;       // warps per row group, splitting each tile's keys
    constexpr int KT = BN / WK;      // keys per warp per tile
    constexpr int ROWS = 16 * WR;    // query rows per CTA
    MT* sQ = reinterpret_cast<MT*>(smem_raw);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wr = warp / WK, wk = warp % WK;

    // Q rows of this CTA, then the first STAGES - 1 tiles, one commit group each.
    decode_load_q<T, MT, D, ROWS>(p, sQ, b, hk, row0);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (j_begin + s < j_end) tiles.load(j_begin + s, s);
        cp_async_commit();
    }

    const RowKeys rk(p, w, row0 + 16 * wr + g);

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_row[2] = {neg_inf(), neg_inf()}, l_row[2] = {0.f, 0.f};
    const MT* sQw = sQ + (16 * wr + (lane & 15)) * SROW + (lane >> 4) * 8;
    // Q's A fragments stay in registers where they fit beside O (D <= 128).
    constexpr bool Q_IN_REGS = D <= 128;
    u32 qf[Q_IN_REGS ? D / 16 : 1][4];
    bool q_loaded = false;

    for (int j = j_begin; j < j_end; ++j) {
        const int stage = (j - j_begin) % STAGES;
        cp_async_wait<STAGES - 2>();
        // Tile j's rows landed for the key group, which is done with the stage refilled next; the
        // first time, every thread's Q rows (older copies, or plain stores) for the whole CTA.
        if (j == j_begin) __syncthreads();
        else tiles.sync();
        if (j + STAGES - 1 < j_end) tiles.load(j + STAGES - 1, (j - j_begin + STAGES - 1) % STAGES);
        cp_async_commit();

        const MT* sK = tiles.ready(j, stage) + wk * KT * SROW;
        const MT* sV = sK + BN * SROW;
        const int n0 = j * BN + wk * KT;  // this warp's first key
        if (rk.skip(n0, KT)) continue;
        if constexpr (Q_IN_REGS) {
            if (!q_loaded) {  // Q landed with the first tile's group
                q_fragments<MT, D>(qf, sQw);
                q_loaded = true;
            }
        }

        float s[KT / 8][4];
        mma_qk<MT, D, KT, SROW, Q_IN_REGS>(s, qf, sQw, sK, lane);
        tiles.template scale_scores<KT>(s, stage, wk * KT, t);

        const float factor = decode_scores<KT>(p, s, rk, n0, t);
        float alpha[2];
        softmax_p<KT>(s, m_row, l_row, alpha, factor);
        rescale_o<D>(o, alpha);

        mma_pv<MT, KT, D, SROW>(o, s, sV, lane);
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free: reuse them to merge the WK warps of each row group
    decode_store<T, D, WR>(p, tiles.scratch(), o, m_row, l_row, w);
}

template <int ROWS>
__device__ __forceinline__ DecodeWork decode_work(const DecodeParams& p, int len_cap) {
    constexpr int BN = 64;
    DecodeWork w;
    // With heads_fast the CTAs of one key range over all kv heads are launched together: in a
    // (batch, len, heads_kv, D) cache they read the same DRAM pages at the same time.
    w.b = blockIdx.z;
    w.split = p.heads_fast ? blockIdx.y : blockIdx.x;
    const int hg = p.heads_fast ? blockIdx.x : blockIdx.y;
    w.hk = hg % p.heads_kv;
    w.row0 = (hg / p.heads_kv) * ROWS;
    const int rows = p.q_len * p.group;
    w.len = min(p.seqlens[w.b], len_cap);
    w.start = p.leftpad == nullptr ? 0 : min(max(p.leftpad[w.b * p.lp_sb + w.hk * p.lp_sh], 0), w.len);

    // Keys some row of this CTA sees: tokens i_first..i_last.
    const int i_first = w.row0 / p.group, i_last = (min(w.row0 + ROWS, rows) - 1) / p.group;
    int lo_first, hi_first, lo_last, hi_last;
    decode_bounds(p, w.len, w.start, i_first, lo_first, hi_first);
    decode_bounds(p, w.len, w.start, i_last, lo_last, hi_last);
    w.k_begin = lo_first, w.k_end = hi_last + 1;  // bounds grow with the token
    // This split's tiles (64-key aligned) of [k_begin, k_end).
    const int tile0 = w.k_begin / BN;
    const int tiles = w.k_end > w.k_begin ? (w.k_end + BN - 1) / BN - tile0 : 0;
    const int per_split = (tiles + p.splits - 1) / p.splits;
    w.j_begin = tile0 + w.split * per_split;
    w.j_end = tile0 + min(tiles, (w.split + 1) * per_split);
    return w;
}

template <typename T, int D, int WR, int STAGES_>
__device__ __forceinline__ void decode_fwd(const DecodeParams& p) {
    constexpr int ROWS = 16 * WR;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const DecodeWork w = decode_work<ROWS>(p, p.capacity);
    CacheTiles<T, D, STAGES_, WR> tiles(p, smem_raw + ROWS * (D + 8) * sizeof(T), w.b, w.hk, w.k_begin, w.k_end);
    decode_attend<T, D, WR>(p, smem_raw, tiles, w);
}

// Most splits a launch may have (MAX_SPLITS in src/ops/decode.rs): one per merge thread.
constexpr int DECODE_MAX_SPLITS = 128;

// Combines the splits of every (batch, q head, token) row, a CTA of 128 threads per row:
// thread s weighs split s (out = sum_s 2^(lse_s - lse) o_s with lse = log2 sum_s 2^lse_s),
// then SL = 512 / D lanes of D / 4 threads (a float4 of columns each) take every SL-th split,
// several loads in flight per thread. (One warp per row walking the splits one at a time was a
// chain of L2 round trips: 11-14 us at 43 splits, a fifth of a (1, 32K) decode.)
template <typename T, int D>
__device__ __forceinline__ void decode_merge(const DecodeParams& p) {
    constexpr int CG = D / 4, SL = 128 / CG;
    __shared__ float s_w[DECODE_MAX_SPLITS], red[4];
    __shared__ float4 s_acc[SL][CG];
    const int tid = threadIdx.x;
    const i64 row = blockIdx.x;
    const i64 rows = (i64)p.batch * p.heads_q * p.q_len;  // the stride between splits
    const float lse_s = tid < p.splits ? __ldcg(p.part_lse + tid * rows + row) : neg_inf();
    const float m = block_reduce<128>(lse_s, red, [](float a, float b) { return fmaxf(a, b); });
    // Empty splits carry -inf and, for safety, unwritten outputs: weight 0, never read.
    const float w = fast_exp2(lse_s - (m == neg_inf() ? 0.f : m));
    s_w[tid] = w;
    const float l = block_reduce<128>(w, red, [](float a, float b) { return a + b; });  // its barrier publishes s_w

    const int lane = tid / CG, cg = tid % CG;
    const float* src = p.part_o + row * D + cg * 4;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = lane; s < p.splits; s += SL) {
        const float f = s_w[s];
        if (f != 0.f) {
            const float4 o = __ldcg(reinterpret_cast<const float4*>(src + s * rows * D));
            acc.x += o.x * f, acc.y += o.y * f, acc.z += o.z * f, acc.w += o.w * f;
        }
    }
    s_acc[lane][cg] = acc;
    __syncthreads();
    if (lane != 0) return;
#pragma unroll
    for (int i = 1; i < SL; ++i) {
        const float4 o = s_acc[i][cg];
        acc.x += o.x, acc.y += o.y, acc.z += o.z, acc.w += o.w;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int i = row % p.q_len, hq = (row / p.q_len) % p.heads_q, b = row / ((i64)p.q_len * p.heads_q);
    T* og = static_cast<T*>(p.o) + b * p.o_sb + i * p.o_ss + hq * p.o_sh;
    const int col = cg * 4;
    if (col < p.head_dim) {  // head_dim is a multiple of 8: all four columns or none
        reinterpret_cast<u32*>(og + col)[0] = pack2<T>(acc.x * inv, acc.y * inv);
        reinterpret_cast<u32*>(og + col)[1] = pack2<T>(acc.z * inv, acc.w * inv);
    }
    if (col == 0 && p.lse != nullptr)
        p.lse[b * p.lse_sb + hq * p.lse_sh + i * p.lse_ss] = l > 0.f ? (m + log2f(l)) * 0.69314718055994531f : neg_inf();
}
