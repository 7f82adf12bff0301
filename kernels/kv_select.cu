// What a scorer press does after scoring (python/ferrokernels/kv.py: _top and _gather hold the
// torch reference): per (batch, kv head) the positions of the k best scores in ascending order,
// then those rows of K and V copied out. torch needs a top-k, a sort of its indices and two
// gathers over index tensors expanded to every element; here it is two launches.
//
// kv_select_topk: one CTA per row. A radix select over the scores' order-preserving bit
// patterns (four 8-bit digits, a shared-memory histogram per digit) finds the k-th best value
// t and how many of the values equal to t are taken; then one ordered pass writes every
// position above t, and the first of those equal to t, at its rank among the kept (a block
// scan of warp counts, then ballots), so the list comes out ascending without a sort. Ties go
// to the earlier position.
//
// kv_select_gather: one thread per 16-byte piece of a kept row, K and V alike; a negative
// index (past a head's length) writes zeros.
#pragma once
#include "common/types.cuh"

constexpr int KS_THREADS = 1024;

// Mirrors `TopkParams` in src/ops/kv_select.rs.
struct KvTopkParams {
    const float* scores;  // (rows, n), contiguous
    i64* index;           // (rows, k), contiguous: the k best positions, ascending
    const i32* lookup;    // or, when set, (rows / group, n) with rows `lookup_stride` apart:
    i32* mapped;          // (rows, k) int32 <- lookup[row / group][position] (sparse decode's pages)
    i64 lookup_stride;
    i32 rows, n, k, group;
};

// Float order as unsigned order (NaN above +inf for positive NaNs; scores have none).
__device__ __forceinline__ u32 ks_order(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ void kv_select_topk(const KvTopkParams& p) {
    __shared__ int hist[256];
    __shared__ u32 s_prefix, s_want;
    __shared__ u32 s_gt[KS_THREADS / 32], s_eq[KS_THREADS / 32];
    const int tid = threadIdx.x;
    const float* s = p.scores + (i64)blockIdx.x * p.n;
    // The k-th best key: fixed digit by digit from the top, `want` its rank among the keys
    // sharing the fixed digits.
    u32 prefix = 0, mask = 0, want = (u32)p.k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (tid < 256) hist[tid] = 0;
        __syncthreads();
        for (int i = tid; i < p.n; i += KS_THREADS) {
            const u32 key = ks_order(s[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1);
        }
        __syncthreads();
        if (tid < 32) {
            // Buckets from the top: lane l sums digits 255 - 8 l - 7 .. 255 - 8 l.
            int c[8], run = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) run += (c[j] = hist[255 - 8 * tid - j]);
            int incl = run;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, incl, o);
                if (tid >= o) incl += y;
            }
            int above = incl - run;  // keys in higher buckets than this lane's
            if (above < (int)want && incl >= (int)want) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (above < (int)want && above + c[j] >= (int)want) {
                        s_prefix = prefix | ((u32)(255 - 8 * tid - j) << shift);
                        s_want = want - above;
                    }
                    above += c[j];
                }
            }
        }
        __syncthreads();
        prefix = s_prefix, want = s_want, mask |= 255u << shift;
    }
    // prefix is the k-th best key; `want` of the keys equal to it are kept. Warp w walks
    // positions [w * seg, (w + 1) * seg) 32 at a time, coalesced; a key's rank among the kept
    // is the kept keys of the warps before (a scan of the warps' counts) plus ballots of its own
    // warp's earlier lanes. (A thread per contiguous range made every load instruction of a
    // warp touch 32 lines: ~100 us for one CTA over 64K scores.)
    constexpr int WARPS = KS_THREADS / 32;
    const int warp = tid >> 5, lane = tid & 31;
    const int seg = ((p.n + WARPS - 1) / WARPS + 31) & ~31;
    const int lo = min(p.n, warp * seg), hi = min(p.n, lo + seg);
    u32 gt = 0, eq = 0;
    for (int i = lo + lane; i < hi; i += 32) {
        const u32 key = ks_order(s[i]);
        gt += key > prefix;
        eq += key == prefix;
    }
    gt = __reduce_add_sync(0xffffffffu, gt);
    eq = __reduce_add_sync(0xffffffffu, eq);
    if (lane == 0) s_gt[warp] = gt, s_eq[warp] = eq;
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the warps' counts
        u32 g = s_gt[lane], e = s_eq[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 yg = __shfl_up_sync(0xffffffffu, g, o), ye = __shfl_up_sync(0xffffffffu, e, o);
            if (lane >= o) g += yg, e += ye;
        }
        s_gt[lane] = g - s_gt[lane], s_eq[lane] = e - s_eq[lane];
    }
    __syncthreads();
    u32 g_run = s_gt[warp], e_run = s_eq[warp];
    const i64 at = (i64)blockIdx.x * p.k;
    const i32* lookup = p.lookup ? p.lookup + (i64)(blockIdx.x / p.group) * p.lookup_stride : nullptr;
    auto put = [&](u32 r, int i) {
        if (lookup) p.mapped[at + r] = lookup[i];
        else p.index[at + r] = i;
    };
    const u32 earlier = (1u << lane) - 1;
    for (int base = lo; base < hi; base += 32) {  // warp-uniform trips: the ballots need every lane
        const int i = base + lane;
        const u32 key = i < hi ? ks_order(s[i]) : 0u;
        const bool is_gt = i < hi && key > prefix, is_eq = i < hi && key == prefix;
        const u32 bg = __ballot_sync(0xffffffffu, is_gt), be = __ballot_sync(0xffffffffu, is_eq);
        const u32 my_g = g_run + __popc(bg & earlier), my_e = e_run + __popc(be & earlier);
        if (is_gt) put(my_g + min(my_e, want), i);
        else if (is_eq && my_e < want) put(my_g + my_e, i);
        g_run += __popc(bg);
        e_run += __popc(be);
    }
}

// Mirrors `GatherParams` in src/ops/kv_select.rs. Strides in bytes.
struct KvGatherParams {
    const unsigned char* k;   // (batch, n, heads_kv, row) rows of row_k / row_v bytes
    const unsigned char* v;
    const i64* index;         // (batch, heads_kv, kept), contiguous; < 0: a zero row
    unsigned char* k_out;     // (batch, kept, heads_kv, row)
    unsigned char* v_out;
    i64 k_sb, k_ss, k_sh, v_sb, v_ss, v_sh;
    i64 ko_sb, ko_ss, ko_sh, vo_sb, vo_ss, vo_sh;
    i32 batch, heads_kv, kept, n;
    i32 chunks_k, chunks_v;   // 16-byte pieces per row
};

__device__ __forceinline__ void kv_select_gather(const KvGatherParams& p) {
    // 32-bit index arithmetic (the host checks kept * per_row fits): a 64-bit division here
    // is a long emulated sequence per 16 bytes moved.
    const u32 per_row = p.chunks_k + p.chunks_v;
    const u32 x = blockIdx.x * blockDim.x + threadIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    if (x >= (u32)p.kept * per_row) return;
    const int r = (int)(x / per_row), c = (int)(x - r * per_row);
    const i64 src = p.index[((i64)b * p.heads_kv + h) * p.kept + r];
    const bool is_k = c < p.chunks_k;
    const int piece = is_k ? c : c - p.chunks_k;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (src >= 0 && src < p.n) {
        const unsigned char* from = is_k ? p.k + b * p.k_sb + src * p.k_ss + h * p.k_sh
                                         : p.v + b * p.v_sb + src * p.v_ss + h * p.v_sh;
        val = *reinterpret_cast<const uint4*>(from + 16 * piece);
    }
    unsigned char* to = is_k ? p.k_out + b * p.ko_sb + r * p.ko_ss + h * p.ko_sh
                             : p.v_out + b * p.vo_sb + r * p.vo_ss + h * p.vo_sh;
    *reinterpret_cast<uint4*>(to + 16 * piece) = val;
}
