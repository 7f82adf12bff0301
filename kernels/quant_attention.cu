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
//      are permuted within each group of 16 (see V_ORDER in quant_attention.py). With
//      pv="fp8x2" a second tensor holds the codes of the residual (x - code).
#include "common/types.cuh"
#include "common/quant.cuh"

constexpr int QA_BLOCK = 64;          // rows per Q/K scale (quant_attention.py: BLOCK)
constexpr int QA_SPLIT_ROWS = 1024;   // tokens per statistics CTA
constexpr int QA_THREADS = 256;

// Rows of one (batch, head): element (b, r, h, c) at b * sb + r * sn + h * sh + c; for packed
// sequences (cu != null, varlen) at (cu[b] + r) * sn + h * sh + c, cu[b + 1] - cu[b] rows of
// them. n is the row count (the longest sequence's for varlen), which the outputs are laid out by.
struct QaRows {
    const void* x;
    i64 sb, sn, sh;
    int n, h;
    const i32* cu;
};

__device__ __forceinline__ i64 qa_first(const QaRows& r, int b) { return r.cu ? (i64)r.cu[b] * r.sn : b * r.sb; }
__device__ __forceinline__ int qa_len(const QaRows& r, int b) { return r.cu ? r.cu[b + 1] - r.cu[b] : r.n; }

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
    const T* x = static_cast<const T*>(p.x.x) + qa_first(p.x, b) + h * p.x.sh + c0;
    const int lo = split * QA_SPLIT_ROWS, hi = min(qa_len(p.x, b), lo + QA_SPLIT_ROWS);
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
    const i32* cu_k;       // varlen: the keys' offsets (means per sequence), or null
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
    const int nk = p.cu_k ? max(1, p.cu_k[b + 1] - p.cu_k[b]) : p.nk;
    const i64 o = ((i64)b * p.hk + h) * p.d + c;
    float s, mx, mn;
    qa_combine(p.k_stats, p.splits_k, p.batch, p.hk, b, h, p.d, c, s, mx, mn);
    const float km = p.smooth_k ? __fdiv_rn(s, (float)nk) : 0.f;
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
    const float vm = p.smooth_v ? __fdiv_rn(s, (float)nk) : 0.f;
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
    const T* x = static_cast<const T*>(p.x.x) + qa_first(p.x, b) + h * p.x.sh + c0;
    const int n = qa_len(p.x, b);
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
        if (r < n) raw = *reinterpret_cast<const uint4*>(x + (i64)r * p.x.sn);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float v = to_float(e[j]);
            y[i][j] = r >= n ? 0.f : p.is_q ? __fmul_rn(__fmul_rn(v, f[j]), p.post) : __fmul_rn(__fsub_rn(v, mean[j]), f[j]);
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
        if (r >= n) continue;
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
    unsigned char* lo;     // the same for the residual x - codes, or null (one e4m3 term)
    int batch, d, n_pad;
};

template <typename T, int D>
__device__ __forceinline__ void qa_quant_v(const QaQuantVParams& p) {
    constexpr int COLS = D / 8, LANES = QA_THREADS / COLS, VECS = QA_BLOCK / LANES;
    __shared__ unsigned char tile[2][D][QA_BLOCK + 4];  // the codes, the residual's codes
    const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int c0 = (threadIdx.x % COLS) * 8, lane = threadIdx.x / COLS;
    const T* x = static_cast<const T*>(p.x.x) + qa_first(p.x, b) + h * p.x.sh + c0;
    const int n = qa_len(p.x, b);
    const i64 o = ((i64)b * p.x.h + h) * D + c0;
    float mean[8], inv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) mean[j] = p.mean[o + j], inv[j] = __fdiv_rn(1.f, p.scale[o + j]);
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
        const int t = lane + i * LANES, r = blk * QA_BLOCK + t;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (r < n) raw = *reinterpret_cast<const uint4*>(x + (i64)r * p.x.sn);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            unsigned short code = 0, lo = 0;
            if (r < n) {
                const float x = __fmul_rn(__fsub_rn(to_float(e[j]), mean[j]), inv[j]);
                code = e4m3x2(x, 0.f) & 0xff;
                if (p.lo != nullptr) lo = e4m3x2(__fsub_rn(x, e4m3_value(code)), 0.f) & 0xff;
            }
            tile[0][c0 + j][t] = (unsigned char)code;
            tile[1][c0 + j][t] = (unsigned char)lo;
        }
    }
    __syncthreads();
    // Each thread writes 4 output columns of one channel. Within every 16 tokens, column
    // 4t + e holds token 8 * (e >> 1) + 2t + (e & 1): the order in which the attention kernel's
    // S accumulators hand P̃ to the 8-bit wgmma A operand (scripts/probe-wgmma8-a.cu), so P̃·V
    // pairs them without shuffles.
    for (int k = 0; k < (p.lo != nullptr ? 2 : 1); ++k) {
        unsigned char* out = k == 0 ? p.codes : p.lo;
        for (int e = threadIdx.x; e < D * QA_BLOCK / 4; e += QA_THREADS) {
            const int ch = e / (QA_BLOCK / 4), col = (e % (QA_BLOCK / 4)) * 4;
            const int base = (col & ~15) + 2 * ((col & 15) >> 2);
            const u32 w = (u32)tile[k][ch][base] | ((u32)tile[k][ch][base + 1] << 8) | ((u32)tile[k][ch][base + 8] << 16) |
                          ((u32)tile[k][ch][base + 9] << 24);
            *reinterpret_cast<u32*>(out + (((i64)b * p.x.h + h) * D + ch) * p.n_pad + blk * QA_BLOCK + col) = w;
        }
    }
}

// --- the attention kernel --------------------------------------------------------------------
// attention_sm90.cu's kernel with 8-bit operands (Sm90Quant): S = Q K^T on s8 wgmma from the
// pre-pass's codes, scaled per 64-row Q block and 64-key K block (Q's scale carries the softmax
// scale and log2(e)); the online softmax as for 16-bit; P̃ = 448 exp2(S - m) rounded to e4m3 in
// registers and fed as the A operand of e4m3 wgmma against V^T. The pre-pass wrote V^T's tokens
// in the order the accumulators hold P̃ (V_ORDER), so packing P̃ is four cvt per register.
// The output is O / l times V's channel scale, plus V's mean.
#include "attention_sm90.cu"

// Mirrors `QuantSm90Params` in src/ops/quant_attention.rs: the dense kernel's block (tensor maps
// of the codes, output, LSE, causal bounds, schedule), then the scales.
struct QuantSm90Params : AttentionSm90Params {
    TmaDesc tv_lo;         // V^T's residual codes (pv="fp8x2")
    const float* q_scale;  // (batch, heads_q, q_blocks)
    const float* k_scale;  // (batch, heads_kv, k_blocks)
    const float* v_scale;  // (batch, heads_kv, head_dim)
    const float* v_mean;   // (batch, heads_kv, head_dim); zeros without smooth_v
    int q_blocks, k_blocks;
};

// QK = W8_INT8: quant_attention's INT8 Q·Kᵀ. QK = W8_FP8: fp8_attention's e4m3 Q·Kᵀ, whose
// per-head descales arrive as the same per-block scale arrays (every block of a head alike).
// VRES: V is two e4m3 terms, codes + residual codes (pv="fp8x2"), each multiplied by the same
// P̃: a second P̃·V GEMM in the same accumulator, for 3 more bits of V.
// MMA_SUM: P̃'s row sums come from the P̃·V GEMM, as 8 more columns of V^T that hold 1.0 (in
// every ring slot, after the codes; written once per CTA). That takes 64 FADD per thread and
// tile off the softmax's dependency chain, for 6% more P̃·V MMA work, and the sums are of the
// rounded P̃ the numerator used (the reference sums the same).
template <typename T, int D_, int QK = W8_INT8, bool PINGPONG_ = true, bool VRES = false, bool MMA_SUM = true>
struct Sm90Quant {
    using Params = QuantSm90Params;
    using Out = T;
    using Acc = typename Select<QK == W8_INT8, int, float>::type;
    static constexpr int D = D_, DV = D_, BN = 128, BM = 128;
    // A Q or K row is D bytes: one 128-byte swizzled row at D = 128, a 64-byte one at D = 64.
    static constexpr int Q_BYTES = BM * D, K_BYTES = BN * D, V_BYTES = DV * BN * (VRES ? 2 : 1);
    // A V slot: the codes (DV rows of BN tokens), the rows of ones, the residual codes.
    static constexpr int ONES = MMA_SUM ? 8 * BN : 0, V_SLOT = V_BYTES + ONES;
    static constexpr int NV = DV + (MMA_SUM ? 8 : 0);  // P̃·V's columns
    static constexpr bool L_WHOLE = MMA_SUM;            // every lane gets its rows' whole sums
    static constexpr int PK = 32;
    static constexpr float P_LOG2 = 8.80735492205760f;  // log2(448): P̃ fills e4m3's range
    static constexpr bool PINGPONG = PINGPONG_;
    // Codes and scales are laid out as a batch of the longest sequence, also for varlen (the
    // pre-pass writes them so): loads and scale indices are per (sequence, row).
    static constexpr bool BATCHED = true;
    static_assert(BN == 2 * QA_BLOCK, "a key tile holds two K scale blocks");
    struct Row {
        ScoreMod mod;  // scale_log2 = this consumer's Q block scale
        const float* k_scale;
        int k_blocks;
    };
    struct Keys {
        float lo, hi;  // scales of the tile's two 64-key blocks
    };
    // e4m3 wgmma accumulates in reduced precision (about 13 mantissa bits, not f32's 23): a
    // whole row's P̃·V summed in the tensor core drifts by percents where V has an offset. Each
    // tile's P̃·V starts from zero here and is added to O in f32 registers.
    // O lags one tile behind the softmax: after tile j's merge it holds tiles <= j - 1 at their
    // own row max m_{j-1}, so the merge is one FFMA, O * alpha_{j-1} + P̃·V_{j-1}, with alpha
    // kept from the previous softmax (0 before the first: O is 0 then).
    struct Pv {
        float o[NV / 8][4];
        float alpha[2] = {0.f, 0.f};
        __device__ __forceinline__ void fence() { fence_regs(o); }
    };

    static __device__ __forceinline__ u64 qk_desc(u32 addr) {
        return D == 128 ? smem_desc_sw128(addr, 16, 1024) : smem_desc_sw64(addr, 16, 512);
    }
    static __device__ __forceinline__ void load_q(const Params& P, u32 sQ, int h, int row, int b, u32 bar) {
        tma_load_4d(sQ, &P.tq, 0, h, row, b, bar);
    }
    static __device__ __forceinline__ void load_k(const Params& P, u32 sK, int hk, int row, int b, u32 bar) {
        tma_load_4d(sK, &P.tk, 0, hk, row, b, bar);
    }
    // V^T: the box of BN tokens (innermost) x DV channels.
    static __device__ __forceinline__ void load_v(const Params& P, u32 sV, int hk, int row, int b, u32 bar) {
        tma_load_4d(sV, &P.tv, row, 0, hk, b, bar);
        if constexpr (VRES) tma_load_4d(sV + DV * BN + ONES, &P.tv_lo, row, 0, hk, b, bar);
    }
    // e4m3 1.0 (0x38) in every slot's row-sum rows; the swizzle moves bytes within a row only.
    static __device__ __forceinline__ void init_slots(unsigned char* sV, int stages) {
        for (int i = threadIdx.x; i < stages * ONES / 16; i += blockDim.x) {
            const int slot = i / (ONES / 16), at = i % (ONES / 16);
            *reinterpret_cast<uint4*>(sV + slot * V_SLOT + DV * BN + 16 * at) =
                make_uint4(0x38383838u, 0x38383838u, 0x38383838u, 0x38383838u);
        }
    }
    static __device__ __forceinline__ Row row(const Params& P, int b, int h, int hk, int r0, const SeqInfo& seq) {
        Row r;
        // Rows past the sequence (the second consumer's, in a last block of <= 64 rows) take the
        // sequence's last block's scale; nothing of theirs is stored.
        const int q_last = max(1, (seq.nq + QA_BLOCK - 1) / QA_BLOCK) - 1;
        r.mod.scale_log2 = P.q_scale[((i64)b * P.p.heads_q + h) * P.q_blocks + min(r0 / QA_BLOCK, q_last)];
        r.mod.cap_in = r.mod.cap_out = r.mod.slope_log2 = 0.f;
        r.mod.softcap = false;
        r.k_scale = P.k_scale + ((i64)b * P.p.heads_kv + hk) * P.k_blocks;
        r.k_blocks = max(1, (seq.nk + QA_BLOCK - 1) / QA_BLOCK);  // this sequence's blocks
        return r;
    }
    static __device__ __forceinline__ void issue_s(Acc (&s)[BN / 8][4], u32 sQ, int c, u32 sK) {
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk)
            Wgmma8<QK, BN>::ss(s, qk_desc(sQ + c * 64 * D + kk * 32), qk_desc(sK + kk * 32), kk > 0);
    }
    // Loaded while S is on the tensor cores. The second block of the last tile may lie past the
    // keys (those are masked): clamp the read.
    static __device__ __forceinline__ Keys keys(const Params&, const Row& r, int j, int) {
        return Keys{r.k_scale[2 * j], r.k_scale[min(2 * j + 1, r.k_blocks - 1)]};
    }
    // s32 to f32 without the conversion unit (I2F issues at a quarter of the FMA rate): |a| <=
    // 127^2 * 128 < 2^22, so the bits of 1.5 * 2^23 + a read as a float are exactly
    // 1.5 * 2^23 + a. The offset and the scales are applied in the softmax's exp2 FFMA.
    // FP8 scores are f32 already.
    static constexpr float BIAS = QK == W8_INT8 ? 12582912.f : 0.f;  // 1.5 * 2^23
    static __device__ __forceinline__ void scores(const Acc (&a)[BN / 8][4], float (&s)[BN / 8][4], const Keys&) {
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if constexpr (QK == W8_INT8) s[i][e] = __int_as_float(a[i][e] + 0x4B400000);
                else s[i][e] = a[i][e];
            }
    }
    // Score (log2 units) = (s - BIAS) * k_scale * q_scale, with q_scale the `factor`
    // scores_to_log2 left. The rounding of -BIAS * f (under one unit of a) is far below the
    // INT8 codes' own error.
    static __device__ __forceinline__ void softmax(float (&s)[BN / 8][4], float (&m_row)[2], float (&l_row)[2],
                                                   float (&alpha)[2], float factor, const Keys& k) {
        const float f[2] = {factor * k.lo, factor * k.hi};
        const float off[2] = {-BIAS * f[0], -BIAS * f[1]};
        softmax_p_halves<BN, !MMA_SUM>(s, m_row, l_row, alpha, f, off, P_LOG2);
    }
    // Register r of k-step kk holds, byte e, the key of accumulator group 4kk + 2(r >> 1) + (e >> 1),
    // element 2(r & 1) + (e & 1): the V_ORDER permutation of A's logical keys.
    static __device__ __forceinline__ void pack_p(const float (&s)[BN / 8][4], u32 (&pf)[BN / PK][4]) {
#pragma unroll
        for (int kk = 0; kk < BN / 32; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int i = 4 * kk + 2 * (r >> 1), h = 2 * (r & 1);
                pf[kk][r] = (u32)e4m3x2(s[i][h], s[i][h + 1]) | ((u32)e4m3x2(s[i + 1][h], s[i + 1][h + 1]) << 16);
            }
    }
    static __device__ __forceinline__ void issue_pv(float (&)[DV / 8][4], Pv& pv, const u32 (&pf)[BN / PK][4], u32 sV) {
#pragma unroll
        for (int kk = 0; kk < BN / 32; ++kk)
            Wgmma8Rs<NV>::rs(pv.o, pf[kk], smem_desc_sw128(sV + kk * 32, 16, 1024), kk > 0);
        if constexpr (VRES) {
            // The codes' columns only: the row sums are P̃'s, counted once.
            float(&o)[DV / 8][4] = *reinterpret_cast<float(*)[DV / 8][4]>(&pv.o);
#pragma unroll
            for (int kk = 0; kk < BN / 32; ++kk)
                Wgmma8Rs<DV>::rs(o, pf[kk], smem_desc_sw128(sV + DV * BN + ONES + kk * 32, 16, 1024), 1);
        }
    }
    // O = O * alpha_{j-1} + P̃·V_{j-1} in f32, and l likewise from the row-sum columns (every
    // column of that group holds the row's sum); alpha (tile j's) is kept for the next merge.
    static __device__ __forceinline__ void merge_pv(float (&o)[DV / 8][4], float (&l_row)[2], Pv& pv,
                                                    const float (&alpha)[2]) {
        merge_last(o, l_row, pv);
        pv.alpha[0] = alpha[0], pv.alpha[1] = alpha[1];
    }
    static __device__ __forceinline__ void merge_last(float (&o)[DV / 8][4], float (&l_row)[2], const Pv& pv) {
#pragma unroll
        for (int i = 0; i < DV / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[i][e] = fmaf(o[i][e], pv.alpha[e >> 1], pv.o[i][e]);
        if constexpr (MMA_SUM) {
            l_row[0] = fmaf(l_row[0], pv.alpha[0], pv.o[DV / 8][0]);
            l_row[1] = fmaf(l_row[1], pv.alpha[1], pv.o[DV / 8][2]);
        }
    }
    // O / l times V's channel scale, plus V's mean (rows that saw no key stay 0).
    static __device__ __forceinline__ void finish(float (&o)[DV / 8][4], const float (&inv)[2], const Params& P, int b,
                                                  int hk, int t) {
        const i64 at = ((i64)b * P.p.heads_kv + hk) * DV;
        const float* vs = P.v_scale + at;
        const float* vm = P.v_mean + at;
#pragma unroll
        for (int i = 0; i < DV / 8; ++i) {
            const int col = 8 * i + 2 * t;
            const float2 sc = *reinterpret_cast<const float2*>(vs + col), mn = *reinterpret_cast<const float2*>(vm + col);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                o[i][2 * r] = inv[r] > 0.f ? fmaf(o[i][2 * r] * inv[r], sc.x, mn.x) : 0.f;
                o[i][2 * r + 1] = inv[r] > 0.f ? fmaf(o[i][2 * r + 1] * inv[r], sc.y, mn.y) : 0.f;
            }
        }
    }
};
