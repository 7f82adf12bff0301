// estimate_blocks' selection on the GPU (python/ferrokernels/sparse.py holds the torch
// reference it matches): from a row of block scores per (batch, head, 128-row query block),
// the key blocks to keep, written straight as the attention kernel's tile lists, so a mask
// chosen per call costs one launch after the scores instead of dozens of torch ops.
//
// One CTA per row: the visible blocks' scores (softmaxed when they are logits), a bitonic sort
// in shared memory, the blocks whose mass before them is short of the threshold (or the top_k),
// plus the sink, local and diagonal blocks; then the kept blocks compacted in ascending order.
#include "common/types.cuh"
#include "common/block.cuh"

constexpr int SEL_THREADS = 256;
constexpr int SEL_MAX = 2048;  // key blocks per row: 256K keys in tiles of 128
constexpr int SEL_PER = SEL_MAX / SEL_THREADS;

// Mirrors `SelectParams` in src/ops/sparse.rs.
struct SparseSelectParams {
    const float* scores;  // (rows, kb), rows = batch * heads * qb
    i32* count;           // (rows): kept tiles
    i32* index;           // (rows, kb): kept tiles ascending, then zeros
    i32* bitmap;          // (rows, kb): 0 = the causal diagonal tile (bitmap 0), -1 = whole
    int rows, qb, kb;
    int diag;             // the diagonal tile of query block 0: (kv_len - q_len) / 128
    int causal, softmax;  // softmax: the scores are logits (else already a row's probabilities)
    int top_k;            // > 0: keep the top_k; else the threshold
    float threshold;
    int sink_blocks, local_blocks;
};

// Exclusive prefix sums of SEL_PER consecutive values per thread (v in, out in place), the
// block's total returned to every thread. Two __syncthreads.
template <typename V>
__device__ __forceinline__ V block_scan(V (&v)[SEL_PER], V* warp_tot) {
    V run = V(0);
#pragma unroll
    for (int i = 0; i < SEL_PER; ++i) {
        const V x = v[i];
        v[i] = run;
        run += x;
    }
    V total;
    const V base = block_inclusive_scan<V, SEL_THREADS>(run, warp_tot, &total) - run;
#pragma unroll
    for (int i = 0; i < SEL_PER; ++i) v[i] += base;
    return total;
}

// The flagged tiles of the row (thread tid holds tiles tid * SEL_PER + k) written ascending to
// `index`, `bitmap_of(tile)` beside each in `bitmap`; returns how many there are. The lists'
// compaction, shared by both list kernels. Two __syncthreads.
template <class F>
__device__ __forceinline__ int compact_tiles(const int (&flag)[SEL_PER], i32* index, i32* bitmap, int* tmp, F bitmap_of) {
    int pos[SEL_PER];
#pragma unroll
    for (int k = 0; k < SEL_PER; ++k) pos[k] = flag[k];
    const int total = block_scan(pos, tmp);
#pragma unroll
    for (int k = 0; k < SEL_PER; ++k) {
        const int j = threadIdx.x * SEL_PER + k;
        if (flag[k]) index[pos[k]] = j, bitmap[pos[k]] = bitmap_of(j);
    }
    return total;
}

__device__ __forceinline__ void sparse_select(const SparseSelectParams& p) {
    __shared__ float key[SEL_MAX];
    __shared__ short col[SEL_MAX];
    __shared__ unsigned char keep[SEL_MAX];
    __shared__ float ftmp[SEL_THREADS / 32];
    __shared__ int itmp[SEL_THREADS / 32];
    const int row = blockIdx.x, tid = threadIdx.x;
    const int qr = row % p.qb, diag = p.diag + qr;
    int n = 1;
    while (n < p.kb) n <<= 1;
    const float* s = p.scores + (i64)row * p.kb;
    auto visible = [&](int c) { return c < p.kb && (!p.causal || c <= diag); };
    for (int c = tid; c < n; c += SEL_THREADS) {
        key[c] = visible(c) ? s[c] : neg_inf();
        col[c] = (short)c;
        keep[c] = 0;
    }
    __syncthreads();
    if (p.softmax && p.top_k <= 0) {
        float m = neg_inf();
        for (int c = tid; c < n; c += SEL_THREADS) m = fmaxf(m, key[c]);
        m = block_reduce<SEL_THREADS>(m, ftmp, [](float a, float b) { return fmaxf(a, b); });
        float e[SEL_PER], part = 0.f;
#pragma unroll
        for (int i = 0; i < SEL_PER; ++i) {
            const int c = tid * SEL_PER + i;
            e[i] = c < n && key[c] != neg_inf() ? __expf(key[c] - m) : 0.f;
            part += e[i];
        }
        const float sum = block_reduce<SEL_THREADS>(part, ftmp, [](float a, float b) { return a + b; });
#pragma unroll
        for (int i = 0; i < SEL_PER; ++i) {
            const int c = tid * SEL_PER + i;
            if (c < n && key[c] != neg_inf()) key[c] = e[i] / sum;
        }
        __syncthreads();
    }
    // Descending bitonic sort of (key, col); invisible blocks (-inf) sink to the end.
    for (int k = 2; k <= n; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < n; i += SEL_THREADS) {
                const int x = i ^ j;
                if (x > i && ((key[i] < key[x]) == ((i & k) == 0))) {
                    const float t = key[i];
                    key[i] = key[x], key[x] = t;
                    const short c = col[i];
                    col[i] = col[x], col[x] = c;
                }
            }
            __syncthreads();
        }
    // Keep sorted position i while the mass before it is short of the threshold (or i < top_k).
    float before[SEL_PER];
#pragma unroll
    for (int i = 0; i < SEL_PER; ++i) {
        const int c = tid * SEL_PER + i;
        before[i] = c < n && key[c] != neg_inf() ? key[c] : 0.f;
    }
    if (p.top_k <= 0) block_scan(before, ftmp);
#pragma unroll
    for (int i = 0; i < SEL_PER; ++i) {
        const int c = tid * SEL_PER + i;
        if (c >= n || key[c] == neg_inf()) continue;
        const bool chosen = p.top_k > 0 ? c < p.top_k : (before[i] < p.threshold || p.threshold >= 1.f);
        if (chosen) keep[col[c]] = 1;
    }
    __syncthreads();
    // The kept blocks in ascending order: sink, local and diagonal blocks always.
    int flag[SEL_PER];
#pragma unroll
    for (int i = 0; i < SEL_PER; ++i) {
        const int c = tid * SEL_PER + i;
        const bool always = c < p.sink_blocks || c == diag || (diag - c >= 0 && diag - c < p.local_blocks);
        flag[i] = visible(c) && (keep[c] || always) ? 1 : 0;
    }
    i32* index = p.index + (i64)row * p.kb;
    i32* bitmap = p.bitmap + (i64)row * p.kb;
    const int total = compact_tiles(flag, index, bitmap, itmp, [&](int c) { return p.causal && c == diag ? 0 : -1; });
    for (int c = total + tid; c < p.kb; c += SEL_THREADS) index[c] = 0, bitmap[c] = -1;
    if (tid == 0) p.count[row] = total;
}

// Rows of at most SELW_MAX key blocks (up to 32K keys): a warp per row, the row's scores in
// registers (SELW_PER per lane, block lane * SELW_PER + e), sorted by a bitonic network of
// shuffles and register swaps: no block barrier, where the CTA version pays ~45 per row.
// Same choice as sparse_select; ties of equal scores go to the lower block in both.
constexpr int SELW_MAX = 256;
constexpr int SELW_PER = SELW_MAX / 32;
constexpr int SELW_ROWS = SEL_THREADS / 32;  // rows per CTA

// (a, ca) before (b, cb) in the descending order: the larger score, on a tie the lower block.
__device__ __forceinline__ bool sel_before(float a, int ca, float b, int cb) {
    return a > b || (a == b && ca < cb);
}

__device__ __forceinline__ void sparse_select_warp(const SparseSelectParams& p) {
    __shared__ unsigned char keep_all[SELW_ROWS][SELW_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blockIdx.x * SELW_ROWS + warp;
    if (row >= p.rows) return;  // warp-level work only below
    unsigned char* keep = keep_all[warp];
    const int qr = row % p.qb, diag = p.diag + qr;
    auto visible = [&](int c) { return c < p.kb && (!p.causal || c <= diag); };
    const float* s = p.scores + (i64)row * p.kb;
    float key[SELW_PER];
    int col[SELW_PER];
#pragma unroll
    for (int e = 0; e < SELW_PER; ++e) {
        const int c = lane * SELW_PER + e;
        key[e] = visible(c) ? s[c] : neg_inf();
        col[e] = c;
        keep[c] = 0;
    }
    __syncwarp();
    if (p.softmax && p.top_k <= 0) {
        float m = neg_inf();
#pragma unroll
        for (int e = 0; e < SELW_PER; ++e) m = fmaxf(m, key[e]);
        m = warp_reduce(m, [](float a, float b) { return fmaxf(a, b); });
        float part = 0.f;
#pragma unroll
        for (int e = 0; e < SELW_PER; ++e) {
            key[e] = key[e] != neg_inf() ? __expf(key[e] - m) : neg_inf();
            part += key[e] != neg_inf() ? key[e] : 0.f;
        }
        const float sum = warp_reduce(part, [](float a, float b) { return a + b; });
#pragma unroll
        for (int e = 0; e < SELW_PER; ++e)
            if (key[e] != neg_inf()) key[e] /= sum;
    }
    // Bitonic sort, descending; runs of length k alternate direction until the last.
#pragma unroll
    for (int k = 2; k <= SELW_MAX; k <<= 1) {
#pragma unroll
        for (int j = k >> 1; j > 0; j >>= 1) {
            if (j >= SELW_PER) {  // partners in lane ^ (j / SELW_PER), same register
                const int m = j / SELW_PER;
                const bool low = (lane & m) == 0;
#pragma unroll
                for (int e = 0; e < SELW_PER; ++e) {
                    const float ok = __shfl_xor_sync(0xffffffffu, key[e], m);
                    const int oc = __shfl_xor_sync(0xffffffffu, col[e], m);
                    const bool desc = ((lane * SELW_PER + e) & k) == 0;
                    // The lower position takes the element that comes first in its run's order.
                    if (sel_before(ok, oc, key[e], col[e]) == (low == desc)) key[e] = ok, col[e] = oc;
                }
            } else {  // partners in the same lane
#pragma unroll
                for (int e = 0; e < SELW_PER; ++e) {
                    if (e & j) continue;
                    const int x = e | j;
                    const bool desc = ((lane * SELW_PER + e) & k) == 0;
                    if (sel_before(key[x], col[x], key[e], col[e]) == desc) {
                        const float t = key[e];
                        key[e] = key[x], key[x] = t;
                        const int c = col[e];
                        col[e] = col[x], col[x] = c;
                    }
                }
            }
        }
    }
    // Sorted position i kept while the mass before it is short of the threshold (or i < top_k).
    float before[SELW_PER], run = 0.f;
#pragma unroll
    for (int e = 0; e < SELW_PER; ++e) {
        before[e] = run;
        run += key[e] != neg_inf() ? key[e] : 0.f;
    }
    const float lane_before = warp_inclusive_scan(run) - run;
#pragma unroll
    for (int e = 0; e < SELW_PER; ++e) {
        if (key[e] == neg_inf()) continue;
        const int i = lane * SELW_PER + e;
        const bool chosen = p.top_k > 0 ? i < p.top_k : (lane_before + before[e] < p.threshold || p.threshold >= 1.f);
        if (chosen) keep[col[e]] = 1;
    }
    __syncwarp();
    int flag[SELW_PER], n = 0;
#pragma unroll
    for (int e = 0; e < SELW_PER; ++e) {
        const int c = lane * SELW_PER + e;
        const bool always = c < p.sink_blocks || c == diag || (diag - c >= 0 && diag - c < p.local_blocks);
        flag[e] = visible(c) && (keep[c] || always) ? 1 : 0;
        n += flag[e];
    }
    int pos = warp_inclusive_scan(n) - n;
    const int total = __shfl_sync(0xffffffffu, pos + n, 31);
    i32* index = p.index + (i64)row * p.kb;
    i32* bitmap = p.bitmap + (i64)row * p.kb;
#pragma unroll
    for (int e = 0; e < SELW_PER; ++e) {
        const int c = lane * SELW_PER + e;
        if (flag[e]) index[pos] = c, bitmap[pos] = p.causal && c == diag ? 0 : -1, ++pos;
    }
    for (int c = total + lane; c < p.kb; c += 32) index[c] = 0, bitmap[c] = -1;
    if (lane == 0) p.count[row] = total;
}

// vertical_slash's lists on the GPU (VerticalSlashMask._torch_tiles is the reference): per
// (batch, head, 128-row query block) the key tiles crossed by the head's diagonals, then the
// column tiles the block needs, each with the 128-bit row of the columns it takes.
// Mirrors `VsParams` in src/ops/sparse.rs.
struct SparseVsParams {
    const unsigned char* rel;  // (bh, nrel): relative key tile r + r_min crossed by a diagonal
    const i32* cols;           // (bh, ct * 128): sorted column positions, nk past the real ones
    i32* count;                // (rows)
    i32* index;                // (rows, max): tiles ascending, then -1 - t for column tile t
    i32* bitmap;               // (rows, max): -1 whole, 0 / 1 the causal bitmaps, -2 - r column row r
    u32* col_bits;             // (rows * ct, 4)
    int rows, qt, kt, ct, max, nrel, r_min, off;
};

__device__ __forceinline__ void vs_lists(const SparseVsParams& p) {
    __shared__ int itmp[SEL_THREADS / 32];
    const int row = blockIdx.x, tid = threadIdx.x;
    const int bh = row / p.qt, i = row - bh * p.qt;
    const unsigned char* rel = p.rel + (i64)bh * p.nrel;
    const i64 first = (i64)i * 128 + p.off;  // the block's first query position
    // Key tile j is crossed by a diagonal somewhere in this block (and reaches its rows).
    auto listed = [&](int j) {
        const int r = j - i - p.r_min;
        return j < p.kt && (i64)j * 128 <= first + 127 && r >= 0 && r < p.nrel && rel[r];
    };
    int flag[SEL_PER];
#pragma unroll
    for (int k = 0; k < SEL_PER; ++k) flag[k] = listed(tid * SEL_PER + k) ? 1 : 0;
    i32* index = p.index + (i64)row * p.max;
    i32* bitmap = p.bitmap + (i64)row * p.max;
    // Tiles reaching past the first row's position are cut by the causal diagonal: one of the
    // two bitmaps, by where the tile sits from the block's diagonal.
    const int total = compact_tiles(flag, index, bitmap, itmp,
                                    [&](int j) { return (i64)j * 128 + 127 <= first ? -1 : j - i - p.off / 128; });
    // The column tiles whose first column lies before the block (a prefix: columns ascend).
    const i32* cols = p.cols + (i64)bh * p.ct * 128;
    const int n_ct = __syncthreads_count(tid < p.ct && cols[tid * 128] < first);
    for (int t = 0; t < n_ct; ++t) {
        if (tid < 128) {
            // A column joins if no listed tile holds it already (diagonal 0 lists every tile
            // reaching into the block, so what is left lies before every row).
            const int c = cols[t * 128 + tid];
            const bool take = c < first && !listed(c / 128);
            const u32 w = __ballot_sync(0xffffffffu, take);
            if ((tid & 31) == 0) p.col_bits[((i64)row * p.ct + t) * 4 + (tid >> 5)] = w;
        }
        if (tid == 0) {
            index[total + t] = -1 - t;
            bitmap[total + t] = -2 - (row * p.ct + t);
        }
    }
    if (tid == 0) p.count[row] = total + n_ct;
}

// estimate_blocks' pooling (sparse.py: _pool is the torch reference): the mean of each block
// of tokens of x (batch, n, heads, D) as O (float32, or x's type for a 16-bit matmul) (batch,
// heads, blocks, D), times `mul` (the softmax scale folded into q's). One CTA of POOL_THREADS per (block, head, batch): D / 8
// threads share a token (16 bytes each), the others take the next tokens, so x is read once,
// 16 bytes per load with every load of a thread in flight together.
constexpr int POOL_THREADS = 256;

// Mirrors `PoolParams` in src/ops/sparse.rs. Strides in bytes.
struct SparsePoolParams {
    const unsigned char* x;
    unsigned char* out;
    i64 sb, sn, sh;
    int n, heads, blocks, block;
    float mul;
};

__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T, int D, typename O>
__device__ __forceinline__ void sparse_pool(const SparsePoolParams& p) {
    constexpr int LANES = D / 8, GROUPS = POOL_THREADS / LANES, PER = (128 + GROUPS - 1) / GROUPS;
    __shared__ float part[GROUPS][D + 4];  // + 4: the groups' rows on different banks
    const int c = threadIdx.x % LANES, g = threadIdx.x / LANES;
    const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int t0 = blk * p.block, t1 = min(t0 + p.block, p.n);
    const unsigned char* base = p.x + b * p.sb + h * p.sh + c * 16;
    // Every load unconditional (a token past the end reads the last one again, weighted 0), so
    // that a batch of them is in flight before the first add: guarded loads were issued two at
    // a time. Batches of 8 loads (32 registers): D = 256's 16 at once spilled on sm_80.
    constexpr int BATCH = PER < 8 ? PER : 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i0 = 0; i0 < PER; i0 += BATCH) {
        uint4 v[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int t = min(t0 + g + (i0 + i) * GROUPS, t1 - 1);
            v[i] = *reinterpret_cast<const uint4*>(base + t * p.sn);
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const float in = t0 + g + (i0 + i) * GROUPS < t1 ? 1.f : 0.f;  // a multiply, not a branch the loads sink into
            const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = fmaf(in, to_float(e[j]), acc[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) part[g][c * 8 + j] = acc[j];
    __syncthreads();
    const float w = p.mul / (float)(t1 - t0);
    O* out = reinterpret_cast<O*>(p.out) + (((i64)b * p.heads + h) * p.blocks + blk) * D;
    for (int d = threadIdx.x; d < D; d += POOL_THREADS) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < GROUPS; ++k) s += part[k][d];
        store_as(out + d, s * w);
    }
}

// select_pages' bounds on the GPU (sparse.py: _page_bounds_torch is the reference): Quest's
// upper bound of each page's attention score per (sequence, kv head), sum_d max(q_d min_d,
// q_d max_d) summed over the group's query rows = q+ . max + q- . min with q+ / q- the rows'
// sums of their positive / negative parts. Pages holding the new tokens get +inf (always
// kept), pages past the sequence -inf. One CTA per PB_PAGES pages of one (sequence, kv head):
// the group's sums in shared memory, then a warp per page reading its two summary rows.
constexpr int PB_THREADS = 256;
constexpr int PB_PAGES = 64;

// Mirrors `PageBoundsParams` in src/ops/sparse.rs. Strides in elements.
struct SparsePageBoundsParams {
    const unsigned char* q;   // (batch, q_len, heads_q, D), 16-bit
    const unsigned char* pmin;  // (pages, heads_kv, D), q's type (a min / max of the cache's values is exact in it)
    const unsigned char* pmax;
    const i32* table;         // (batch, max_pages)
    const i32* seqlens;       // (batch)
    float* bounds;            // (batch, heads_kv, max_pages)
    i32* new_lens;            // (batch): the selected sequence's length
    i64 q_sb, q_st, q_sh;
    i64 s_sp, s_sh;
    i64 t_sb;
    int q_len, hq, hk, d, mp, page_size, keep, pad_;
};

template <typename T>
__device__ __forceinline__ void sparse_page_bounds(const SparsePageBoundsParams& p) {
    __shared__ float pos[256], neg[256];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int bh = blockIdx.y, bi = bh / p.hk, h = bh % p.hk, g = p.hq / p.hk;
    const int len = p.seqlens[bi];
    const int n_pages = (len + p.page_size - 1) / p.page_size;
    const int first_new = max(len - p.q_len, 0) / p.page_size;
    const T* q = reinterpret_cast<const T*>(p.q);
    for (int c = tid; c < p.d; c += PB_THREADS) {
        float sp = 0.f, sn = 0.f;
        for (int t = 0; t < p.q_len; ++t)
            for (int j = 0; j < g; ++j) {
                const float x = to_float(q[bi * p.q_sb + t * p.q_st + (i64)(h * g + j) * p.q_sh + c]);
                sp += fmaxf(x, 0.f), sn += fminf(x, 0.f);
            }
        pos[c] = sp, neg[c] = sn;
    }
    __syncthreads();
    const int j_end = min((blockIdx.x + 1) * PB_PAGES, p.mp);
    for (int j = blockIdx.x * PB_PAGES + warp; j < j_end; j += PB_THREADS / 32) {
        float bound;
        if (j >= n_pages) {
            bound = neg_inf();
        } else if (j >= first_new) {
            bound = -neg_inf();
        } else {
            const i64 row = (i64)p.table[bi * p.t_sb + j] * p.s_sp + (i64)h * p.s_sh;
            const uint2* mx = reinterpret_cast<const uint2*>(reinterpret_cast<const T*>(p.pmax) + row);
            const uint2* mn = reinterpret_cast<const uint2*>(reinterpret_cast<const T*>(p.pmin) + row);
            float acc = 0.f;
            for (int c4 = lane; c4 < p.d / 4; c4 += 32) {  // four channels (8 bytes) per lane
                const uint2 a = mx[c4], b = mn[c4];
                const T* ea = reinterpret_cast<const T*>(&a);
                const T* eb = reinterpret_cast<const T*>(&b);
#pragma unroll
                for (int e = 0; e < 4; ++e) acc += pos[4 * c4 + e] * to_float(ea[e]) + neg[4 * c4 + e] * to_float(eb[e]);
            }
            bound = warp_reduce(acc, [](float x, float y) { return x + y; });
        }
        if (lane == 0) p.bounds[(i64)bh * p.mp + j] = bound;
    }
    // The selected sequence: `keep` pages, the last one the sequence's own (partial) last page.
    if (blockIdx.x == 0 && h == 0 && tid == 0)
        p.new_lens[bi] = n_pages > p.keep ? (p.keep - 1) * p.page_size + len - (n_pages - 1) * p.page_size : len;
}

// estimate_blocks' antidiagonal scores after the strided matmul (sparse.py: the torch path of
// estimate_blocks is the reference): each antidiagonal row's softmax over its visible columns
// (keys inside the sequence, causal at the stride's granularity: a prefix of the row), summed
// per key block of r columns and over the query block's r rows, divided by r. One CTA per
// query block of one head, a warp per row; the row is read three times (max, sum, sums per
// block), the last two from L1. Rows come in chunks of query blocks (the matmul skips what
// the causal mask hides), `row0` the chunk's first row.
constexpr int AD_THREADS = 256;

// Mirrors `AntidiagParams` in src/ops/sparse.rs.
struct SparseAntidiagParams {
    const unsigned char* s;  // (heads, rows, ld) logits of the chunk, 16-bit, unscaled
    float* out;              // (heads, qb, kb)
    i64 s_sh;                // elements between heads
    int rows, ld, row0, cols_valid, causal, off, stride, r, qb, kb;
    float scale;
    int pad_;
};

template <typename T>
__device__ __forceinline__ void sparse_antidiag(const SparseAntidiagParams& p) {
    __shared__ float acc[SEL_MAX];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int lq = blockIdx.x, bh = blockIdx.y;
    for (int c = tid; c < p.kb; c += AD_THREADS) acc[c] = 0.f;
    __syncthreads();
    const T* base = reinterpret_cast<const T*>(p.s) + bh * p.s_sh;
    // A lane takes 8 consecutive columns (16 bytes) at a time; with r >= 8 they lie in one key
    // block and `group` lanes share it, with r < 8 a lane's 8 columns span 8 / r blocks.
    const int group = min(max(p.r / 8, 1), 32);
    for (int w = warp; w < p.r; w += AD_THREADS / 32) {
        const int li = lq * p.r + w;
        const i64 qi = (i64)(p.row0 + li) * p.stride + p.stride - 1 + p.off;  // the row's last query
        int lim = min(p.ld, p.cols_valid);
        if (p.causal) lim = qi < 0 ? 0 : (int)min((i64)lim, qi / p.stride + 1);
        if (lim <= 0) continue;
        const uint4* row = reinterpret_cast<const uint4*>(base + (i64)li * p.ld);  // ld % 8 == 0
        const int chunks = (lim + 7) / 8;
        float x[8];
        auto load = [&](int c8) {
            const uint4 v = row[c8];
            const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = c8 * 8 + i < lim ? to_float(e[i]) * p.scale : neg_inf();
        };
        // Pass 1: the row's max and sum of exp, online per lane, then across the warp.
        float m = neg_inf(), sum = 0.f;
        for (int c8 = lane; c8 < chunks; c8 += 32) {
            load(c8);
            float cm = x[0];
#pragma unroll
            for (int i = 1; i < 8; ++i) cm = fmaxf(cm, x[i]);
            const float nm = fmaxf(m, cm);
            float cs = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) cs += __expf(x[i] - nm);  // exp(-inf) = 0
            sum = (m == neg_inf() ? 0.f : sum * __expf(m - nm)) + cs;
            m = nm;
        }
        const float rm = warp_reduce(m, [](float a, float b) { return fmaxf(a, b); });
        sum = m == neg_inf() ? 0.f : sum * __expf(m - rm);
        sum = warp_reduce(sum, [](float a, float b) { return a + b; });
        const float norm = 1.f / (sum * (float)p.r);
        // Pass 2 (from L1): the probabilities summed per key block.
        for (int c0 = 0; c0 < chunks; c0 += 32) {
            const int c8 = c0 + lane;
            if (c8 < chunks) load(c8);
            else for (int i = 0; i < 8; ++i) x[i] = neg_inf();
            if (p.r >= 8) {
                float v = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) v += __expf(x[i] - rm);
                for (int o = 1; o < group; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane % group == 0 && c8 < chunks) atomicAdd(&acc[c8 * 8 / p.r], v * norm);
            } else if (c8 < chunks) {
                float v = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    v += __expf(x[i] - rm);
                    if ((i + 1) % p.r == 0) {
                        if (v > 0.f) atomicAdd(&acc[(c8 * 8 + i) / p.r], v * norm);
                        v = 0.f;
                    }
                }
            }
        }
    }
    __syncthreads();
    float* out = p.out + ((i64)bh * p.qb + p.row0 / p.r + lq) * p.kb;
    for (int c = tid; c < p.kb; c += AD_THREADS) out[c] = acc[c];
}

// _strided's copy: x (batch, n, heads, D) -> (batch, heads, rows, stride * D) with row a
// holding tokens a * stride .. a * stride + stride - 1 (in reverse with `reverse`), zeros past
// n. One thread per 16 bytes of the output, so both sides move in whole 16-byte pieces.
struct SparseStridedParams {
    const unsigned char* x;   // 16-bit, strides in elements
    unsigned char* out;
    i64 sb, sn, sh;
    u32 pieces;               // total 16-byte pieces of out
    int n, heads, rows, stride, d8, reverse;
};

__device__ __forceinline__ void sparse_strided(const SparseStridedParams& p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.pieces) return;
    const u32 c = i % p.d8, t0 = i / p.d8;          // piece of D, then (b, h, row, s)
    const u32 s = t0 % p.stride, t1 = t0 / p.stride;
    const u32 row = t1 % p.rows, bh = t1 / p.rows;
    const int h = bh % p.heads, b = bh / p.heads;
    const int tok = row * p.stride + (p.reverse ? p.stride - 1 - s : s);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (tok < p.n) v = *reinterpret_cast<const uint4*>(p.x + 2 * (b * p.sb + tok * p.sn + h * p.sh) + 16 * c);
    reinterpret_cast<uint4*>(p.out)[i] = v;
}
