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
