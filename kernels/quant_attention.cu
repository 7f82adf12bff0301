// The quantization pre-pass of quant_attention. python/ferrokernels/quant_attention.py has the
// scheme and its reference; every step here rounds as that reference does.
//   1. qa_stats: per-channel sum / max / min of Q, K or V over blocks of QA_SPLIT_ROWS tokens
//      (partials, summed later in a fixed order: the result does not depend on scheduling).
//   2. qa_finalize: per (batch, kv head, channel) K's mean, the Q/K balance factor s_c, V's mean
//      and FP8 scale. amax |x - mean| over tokens is max(max - mean, mean - min) exactly, since
//      rounding is monotonic: one read of K and V gives both.
//   3. qa_quant_rows: INT8 codes of Q or K per block of 64 rows of one head, with its scale.
//   4. qa_quant_v: FP8 e4m3 codes of V, written transposed (batch, kv head, channel, token): the
//      FP8 tensor-core instructions take both operands K-major, and P̃·V's K is the token. Tokens
//      are permuted within each group of 16 (see V_ORDER in quant_attention.py).
#include "common/types.cuh"
#include "common/quant.cuh"

constexpr int QA_BLOCK = 64;          // rows per Q/K scale (quant_attention.py: BLOCK)
constexpr int QA_SPLIT_ROWS = 1024;   // tokens per statistics CTA
constexpr int QA_THREADS = 256;

// Rows of one (batch, head): element (b, r, h, c) at b * sb + r * sn + h * sh + c.
struct QaRows {
    const void* x;
    i64 sb, sn, sh;
    int n, h;
};

struct QaStatsParams {
    QaRows x;
    float* stats;  // (splits, batch, h, 3, d): sum, max, min
    int batch, d;
};

// Each thread owns 8 consecutive channels (one 16-byte load per row) and walks rows with a
// stride of the rows in flight, 4 loads in the air.
template <typename T>
__device__ __forceinline__ void qa_stats(const QaStatsParams& p) {
    __shared__ float red[3][QA_THREADS * 8];
    const int bh = blockIdx.x, split = blockIdx.y;
    const int b = bh / p.x.h, h = bh % p.x.h;
    const int cols = p.d / 8, lanes = QA_THREADS / cols;
    const int c0 = (threadIdx.x % cols) * 8, lane = threadIdx.x / cols;
    const T* x = static_cast<const T*>(p.x.x) + b * p.x.sb + h * p.x.sh + c0;
    const int lo = split * QA_SPLIT_ROWS, hi = min(p.x.n, lo + QA_SPLIT_ROWS);
    float s[8], mx[8], mn[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j] = 0.f, mx[j] = neg_inf(), mn[j] = -neg_inf();
    auto take = [&](uint4 raw) {
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float v = to_float(e[j]);
            s[j] += v;
            mx[j] = fmaxf(mx[j], v);
            mn[j] = fminf(mn[j], v);
        }
    };
    int r = lo + lane;
    for (; r + 3 * lanes < hi; r += 4 * lanes) {
        uint4 raw[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) raw[u] = *reinterpret_cast<const uint4*>(x + (i64)(r + u * lanes) * p.x.sn);
#pragma unroll
        for (int u = 0; u < 4; ++u) take(raw[u]);
    }
    for (; r < hi; r += lanes) take(*reinterpret_cast<const uint4*>(x + (i64)r * p.x.sn));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        red[0][threadIdx.x * 8 + j] = s[j];
        red[1][threadIdx.x * 8 + j] = mx[j];
        red[2][threadIdx.x * 8 + j] = mn[j];
    }
    __syncthreads();
    // One thread per channel sums the row lanes in lane order.
    for (int c = threadIdx.x; c < p.d; c += QA_THREADS) {
        const int owner = c / 8, j = c % 8;
        float ss = 0.f, mmx = neg_inf(), mmn = -neg_inf();
        for (int l = 0; l < lanes; ++l) {
            const int t = (l * cols + owner) * 8 + j;
            ss += red[0][t];
            mmx = fmaxf(mmx, red[1][t]);
            mmn = fminf(mmn, red[2][t]);
        }
        float* out = p.stats + (((i64)split * p.batch + b) * p.x.h + h) * 3 * p.d + c;
        out[0] = ss;
        out[p.d] = mmx;
        out[2 * p.d] = mmn;
    }
}

struct QaFinalizeParams {
    const float* q_stats;  // (splits_q, batch, hq, 3, d)
    const float* k_stats;  // (splits_k, batch, hk, 3, d)
    const float* v_stats;
    float* k_mean;         // (batch, hk, d) each
    float* s;              // Q/K balance factor (1 without balancing)
    float* v_mean;
    float* v_scale;
    int batch, hq, hk, d, nq, nk, splits_q, splits_k;
    int smooth_k, smooth_v, balance;
};

// (sum, max, min) of channel c of one (batch, head) over every split, in split order.
__device__ __forceinline__ void qa_combine(const float* stats, int splits, int batch, int heads, int b, int h, int d,
                                           int c, float& s, float& mx, float& mn) {
    s = 0.f;
    mx = neg_inf();
    mn = -neg_inf();
    for (int i = 0; i < splits; ++i) {
        const float* st = stats + (((i64)i * batch + b) * heads + h) * 3 * d + c;
        s += st[0];
        mx = fmaxf(mx, st[d]);
        mn = fminf(mn, st[2 * d]);
    }
}

__device__ __forceinline__ void qa_finalize_channels(const QaFinalizeParams& p) {
    const int b = blockIdx.x / p.hk, h = blockIdx.x % p.hk, c = threadIdx.x;
    if (c >= p.d) return;
    const i64 o = ((i64)b * p.hk + h) * p.d + c;
    float s, mx, mn;
    qa_combine(p.k_stats, p.splits_k, p.batch, p.hk, b, h, p.d, c, s, mx, mn);
    const float km = p.smooth_k ? __fdiv_rn(s, (float)p.nk) : 0.f;
    const float k_amax = p.smooth_k ? fmaxf(__fsub_rn(mx, km), __fsub_rn(km, mn)) : fmaxf(fabsf(mx), fabsf(mn));
    p.k_mean[o] = km;
    float factor = 1.f;
    if (p.balance) {
        const int group = p.hq / p.hk;
        float q_amax = 0.f;
        for (int g = 0; g < group; ++g) {
            qa_combine(p.q_stats, p.splits_q, p.batch, p.hq, b, h * group + g, p.d, c, s, mx, mn);
            q_amax = fmaxf(q_amax, fmaxf(fabsf(mx), fabsf(mn)));
        }
        factor = __fsqrt_rn(__fdiv_rn(fmaxf(k_amax, 1e-6f), fmaxf(q_amax, 1e-6f)));
    }
    p.s[o] = factor;
    qa_combine(p.v_stats, p.splits_k, p.batch, p.hk, b, h, p.d, c, s, mx, mn);
    const float vm = p.smooth_v ? __fdiv_rn(s, (float)p.nk) : 0.f;
    const float v_amax = p.smooth_v ? fmaxf(__fsub_rn(mx, vm), __fsub_rn(vm, mn)) : fmaxf(fabsf(mx), fabsf(mn));
    p.v_mean[o] = vm;
    p.v_scale[o] = fmaxf(__fdiv_rn(v_amax, 448.f), 1e-12f);
}

struct QaQuantRowsParams {
    QaRows x;
    const float* mean;   // (batch, hk, d): subtracted first (K), or null (Q)
    const float* s;      // (batch, hk, d): K is divided by it, Q multiplied
    signed char* codes;  // (batch, n, h, d) contiguous
    float* scales;       // (batch, h, ceil(n / 64))
    float post;          // Q: softmax scale * log2(e) after the balance factor; K: 1
    int batch, hk, d, is_q;
};

// One CTA per (64-row block, head, batch). Each thread loads 8 channels of a row at a time
// (16 bytes) and keeps its 64 * D / 256 values in registers between the block's amax and the
// codes. Divisions are by reciprocal, as the reference computes them.
template <typename T, int D>
__device__ __forceinline__ void qa_quant_rows(const QaQuantRowsParams& p) {
    constexpr int COLS = D / 8, LANES = QA_THREADS / COLS, VECS = QA_BLOCK / LANES;
    const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int group = p.x.h / p.hk, kvh = h / group;
    const int c0 = (threadIdx.x % COLS) * 8, lane = threadIdx.x / COLS;
    const T* x = static_cast<const T*>(p.x.x) + b * p.x.sb + h * p.x.sh + c0;
    const i64 o = ((i64)b * p.hk + kvh) * D + c0;
    float f[8], mean[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        // K: (x - mean) * (1 / s); Q: (x * s) * post.
        f[j] = p.is_q ? p.s[o + j] : __fdiv_rn(1.f, p.s[o + j]);
        mean[j] = p.mean != nullptr ? p.mean[o + j] : 0.f;
    }
    float y[VECS][8];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
        const int r = blk * QA_BLOCK + lane + i * LANES;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (r < p.x.n) raw = *reinterpret_cast<const uint4*>(x + (i64)r * p.x.sn);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float v = to_float(e[j]);
            y[i][j] = r >= p.x.n ? 0.f : p.is_q ? __fmul_rn(__fmul_rn(v, f[j]), p.post) : __fmul_rn(__fsub_rn(v, mean[j]), f[j]);
            amax = fmaxf(amax, fabsf(y[i][j]));
        }
    }
    amax = block_max<QA_THREADS>(amax);
    const float scale = fmaxf(__fdiv_rn(amax, 127.f), 1e-12f), inv = __fdiv_rn(1.f, scale);
    const int nblocks = (p.x.n + QA_BLOCK - 1) / QA_BLOCK;
    if (threadIdx.x == 0) p.scales[((i64)b * p.x.h + h) * nblocks + blk] = scale;
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
        const int r = blk * QA_BLOCK + lane + i * LANES;
        if (r >= p.x.n) continue;
        u32 w[2] = {0, 0};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int q = int8_code(__fmul_rn(y[i][j], inv));
            w[j / 4] |= (u32)(q & 0xff) << (8 * (j % 4));
        }
        *reinterpret_cast<uint2*>(p.codes + (((i64)b * p.x.n + r) * p.x.h + h) * D + c0) = make_uint2(w[0], w[1]);
    }
}

struct QaQuantVParams {
    QaRows x;
    const float* mean;     // (batch, hk, d)
    const float* scale;    // (batch, hk, d)
    unsigned char* codes;  // (batch, hk, d, n_pad) e4m3, tokens past n zero
    int batch, d, n_pad;
};

template <typename T, int D>
__device__ __forceinline__ void qa_quant_v(const QaQuantVParams& p) {
    constexpr int COLS = D / 8, LANES = QA_THREADS / COLS, VECS = QA_BLOCK / LANES;
    __shared__ unsigned char tile[D][QA_BLOCK + 4];
    const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int c0 = (threadIdx.x % COLS) * 8, lane = threadIdx.x / COLS;
    const T* x = static_cast<const T*>(p.x.x) + b * p.x.sb + h * p.x.sh + c0;
    const i64 o = ((i64)b * p.x.h + h) * D + c0;
    float mean[8], inv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) mean[j] = p.mean[o + j], inv[j] = __fdiv_rn(1.f, p.scale[o + j]);
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
        const int t = lane + i * LANES, r = blk * QA_BLOCK + t;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (r < p.x.n) raw = *reinterpret_cast<const uint4*>(x + (i64)r * p.x.sn);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            unsigned char code = 0;
            if (r < p.x.n) {
                code = (unsigned char)(e4m3x2(__fmul_rn(__fsub_rn(to_float(e[j]), mean[j]), inv[j]), 0.f) & 0xff);
            }
            tile[c0 + j][t] = code;
        }
    }
    __syncthreads();
    // Each thread writes 4 output columns of one channel. Within every 16 tokens, column
    // 4t + e holds token 8 * (e >> 1) + 2t + (e & 1): the order in which the attention kernel's
    // S accumulators hand P̃ to the 8-bit wgmma A operand (scripts/probe-wgmma8-a.cu), so P̃·V
    // pairs them without shuffles.
    for (int e = threadIdx.x; e < D * QA_BLOCK / 4; e += QA_THREADS) {
        const int ch = e / (QA_BLOCK / 4), col = (e % (QA_BLOCK / 4)) * 4;
        const int base = (col & ~15) + 2 * ((col & 15) >> 2);
        const u32 w = (u32)tile[ch][base] | ((u32)tile[ch][base + 1] << 8) | ((u32)tile[ch][base + 8] << 16) |
                      ((u32)tile[ch][base + 9] << 24);
        *reinterpret_cast<u32*>(p.codes + (((i64)b * p.x.h + h) * D + ch) * p.n_pad + blk * QA_BLOCK + col) = w;
    }
}
