// Decode over a quantized KV cache: the decode kernel's attention loop (decode.cu) with a tile
// source that streams codes and scales, and dequantizes each 64-key tile into float16 shared
// memory before the MMAs read it. The bytes read per key shrink 2x (8-bit) to 8x (2-bit); the
// dequantization is a few packed half instructions per pair of values.
//
// Storage (contiguous, head-major, capacity a multiple of 64), per kv head:
//   codes   uint8 (batch, heads_kv, capacity, D * bits / 8), K and V alike
//   int8 / fp8 (e4m3): one float32 scale per token (batch, heads_kv, capacity), K and V alike;
//           value = code * scale (int8 codes are signed, symmetric)
//   int4 / int2 (KIVI): codes are unsigned, value = code * scale + min;
//           K per channel over groups of G tokens: float16 (batch, heads_kv, capacity / G, 2, D),
//             the group's D scales then its D mins;
//           V per token over groups of G channels: float16 (batch, heads_kv, capacity, D / G, 2),
//             (scale, min) pairs.
//   A chunk of 8 channels packs into 8 * bits bits: even channels fill the low half, odd
//   channels the high half, channel 2k + h at bit h * 4 * bits + k * bits, so one shift and
//   mask puts a (2k, 2k + 1) pair into the two halves of a float16x2 (int8 / fp8: bytes in order).
//
// Keys at and beyond quant_lens[b] (KIVI's full-precision window of recent tokens) live in a
// residual ring (batch, heads_kv, res_cap, D) of the model dtype: key k at slot k % res_cap.
#pragma once
#include "decode.cu"

// Mirrors `KvQuantParams` in src/ops/kv_quant.rs field for field.
struct KvQuantParams {
    const unsigned char* k_codes;
    const unsigned char* v_codes;
    const void* k_meta;
    const void* v_meta;
    const void* k_res;        // residual ring or null
    const void* v_res;
    const i32* quant_lens;    // (batch,) keys held as codes
    i32 res_cap;              // ring slots (0 without a ring)
    i32 group;                // int4 / int2 group size G (tokens for K, channels for V)
    i32 group_shift;          // log2(G): the per-row group arithmetic is shifts, not divisions
    i32 pad_;
};

enum KvFormat { KV_INT8 = 0, KV_FP8 = 1, KV_INT4 = 2, KV_INT2 = 3 };

template <int FMT> struct KvBits {
    static constexpr int value = FMT == KV_INT4 ? 4 : FMT == KV_INT2 ? 2 : 8;
};

__device__ __forceinline__ __half2 u32_half2(u32 x) { return *reinterpret_cast<__half2*>(&x); }
__device__ __forceinline__ u32 half2_u32(__half2 x) { return *reinterpret_cast<u32*>(&x); }

// Eight int8 codes (two words, bytes in channel order) times `s` as eight float16s. A byte b
// with its sign bit flipped is 1024 + 128 + b in the mantissa of 0x6400: exact, then one
// subtraction and one rounding multiply.
__device__ __forceinline__ uint4 deq_int8(uint2 c, __half2 s) {
    const u32 w[2] = {c.x ^ 0x80808080u, c.y ^ 0x80808080u};
    const __half2 bias = __float2half2_rn(1152.f);
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        out[2 * i] = half2_u32(__hmul2(__hsub2(u32_half2(__byte_perm(w[i], 0x64646464u, 0x4140)), bias), s));
        out[2 * i + 1] = half2_u32(__hmul2(__hsub2(u32_half2(__byte_perm(w[i], 0x64646464u, 0x4342)), bias), s));
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// Eight e4m3 codes times `s`: the hardware converts a byte pair to float16x2 exactly.
__device__ __forceinline__ uint4 deq_fp8(uint2 c, __half2 s) {
    const u32 w[2] = {c.x, c.y};
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            u32 pair;
            asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(pair) : "h"((unsigned short)(w[i] >> (16 * h))));
            out[2 * i + h] = half2_u32(__hmul2(u32_half2(pair), s));
        }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// Eight unsigned BITS-bit codes packed as described above (`word` holds the chunk in its low
// 8 * BITS bits, spread so each half starts at bit 16) to code * s + m, with s, m per pair.
template <int BITS>
__device__ __forceinline__ uint4 deq_low(u32 word, const __half2 (&s)[4], const __half2 (&m)[4]) {
    constexpr u32 MASK = (1u << BITS) - 1;
    const __half2 magic = __float2half2_rn(1024.f);
    u32 out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const u32 h = ((word >> (BITS * k)) & (MASK | MASK << 16)) | 0x64006400u;  // 1024 + code
        out[k] = half2_u32(__hfma2(__hsub2(u32_half2(h), magic), s[k], m[k]));
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// A chunk's code word with its two halves at bits 0 and 16.
template <int BITS>
__device__ __forceinline__ u32 chunk_word(const unsigned char* p) {
    if constexpr (BITS == 4) {
        return *reinterpret_cast<const u32*>(p);
    } else {
        const u32 v = *reinterpret_cast<const unsigned short*>(p);
        return (v & 0xffu) | ((v & 0xff00u) << 8);
    }
}

// 16-byte chunk loads of `bytes` bytes (a multiple of 16) from `src` into shared `dst` by the
// `threads` threads of a key group (this one is `tid`); chunks at or past `valid` bytes are
// zero-filled without reading.
__device__ __forceinline__ void copy_chunks(unsigned char* dst, const unsigned char* src, int bytes, int valid, int tid,
                                            int threads) {
    for (int c = tid * 16; c < bytes; c += threads * 16) {
        const bool ok = c < valid;
        cp_async_16(smem_addr(dst + c), ok ? src + c : src, ok);
    }
}

template <typename T, int D, int STAGES_, int FMT, int WR>
struct QuantTiles {
    using MT = __half;
    using KG = KeyGroup<WR>;
    static constexpr int BN = 64, STAGES = STAGES_, SROW = D + 8, CH = D / 8, KT = KG::KT;
    static constexpr int BITS = KvBits<FMT>::value;
    static constexpr int CB = D * BITS / 8;                          // code bytes per key
    static constexpr int CODE_BYTES = BN * CB;
    // int4 / int2 K: each key group keeps the token groups (G >= 32) its KT keys touch.
    static constexpr int K_META_SLOT = (KT > 32 ? KT / 32 : 1) * 4 * D;
    static constexpr int K_META_BYTES = FMT < KV_INT4 ? BN * 4 : KG::WK * K_META_SLOT;
    static constexpr int V_META_BYTES = FMT < KV_INT4 ? BN * 4 : 8 * D;
    static constexpr int STAGE_BYTES = 2 * CODE_BYTES + K_META_BYTES + V_META_BYTES;
    static constexpr int DEQ_BYTES = 2 * BN * SROW * 2;
    static constexpr int RSTEP = KG::THREADS / CH;
    static_assert(KT % RSTEP == 0, "a group's rows split evenly into passes");
    static constexpr int D_LOG2 = D == 64 ? 6 : D == 128 ? 7 : 8;

    const DecodeParams& p;
    const KvQuantParams& q;
    __half* sKV;             // the dequantized tile, K then V
    unsigned char* raw;      // STAGES stages of STAGE_BYTES
    KG grp;
    i64 head;                // (b * heads_kv + hk)
    int qlen, len;

    __device__ QuantTiles(const DecodeParams& p_, const KvQuantParams& q_, unsigned char* area, int b, int hk, int len_)
        : p(p_), q(q_), sKV(reinterpret_cast<__half*>(area)), raw(area + DEQ_BYTES), len(len_) {
        head = (i64)b * p.heads_kv + hk;
        qlen = min(q.quant_lens[b], len);
    }

    // The first token group of the K meta slot of the group's rows of tile j.
    __device__ __forceinline__ int k_group0(int j) const { return (j * BN + grp.row0()) >> q.group_shift; }

    __device__ void load(int j, int stage) {
        const int r0 = grp.row0();
        const int rows = min(KT, qlen - j * BN - r0);  // quantized keys among the group's rows
        if (rows <= 0) return;
        unsigned char* st = raw + stage * STAGE_BYTES;
        const i64 row0 = head * p.capacity + (i64)j * BN + r0;
        const int t = grp.tid, n = KG::THREADS;
        copy_chunks(st + r0 * CB, q.k_codes + row0 * CB, KT * CB, rows * CB, t, n);
        copy_chunks(st + CODE_BYTES + r0 * CB, q.v_codes + row0 * CB, KT * CB, rows * CB, t, n);
        unsigned char* kmeta = st + 2 * CODE_BYTES;
        unsigned char* vmeta = kmeta + K_META_BYTES;
        if constexpr (FMT < KV_INT4) {
            // KT * 4 bytes of scales per group: 64 at KT = 16, four 16-byte chunks.
            copy_chunks(kmeta + r0 * 4, reinterpret_cast<const unsigned char*>(static_cast<const float*>(q.k_meta) + row0),
                        KT * 4, rows * 4, t, n);
            copy_chunks(vmeta + r0 * 4, reinterpret_cast<const unsigned char*>(static_cast<const float*>(q.v_meta) + row0),
                        KT * 4, rows * 4, t, n);
        } else {
            // K: the token groups holding the group's rows, D scales then D mins each.
            const int gs = q.group_shift, g0 = k_group0(j);
            const int groups = ((j * BN + r0 + KT - 1) >> gs) - g0 + 1;
            const int valid = ((j * BN + r0 + rows - 1) >> gs) - g0 + 1;
            const i64 gbase = head * (p.capacity >> gs) + g0;
            copy_chunks(kmeta + grp.wk * K_META_SLOT,
                        reinterpret_cast<const unsigned char*>(static_cast<const __half*>(q.k_meta) + gbase * 2 * D),
                        groups * 4 * D, valid * 4 * D, t, n);
            // V: (scale, min) per token and channel group.
            const int per_row = (D >> gs) * 4;
            copy_chunks(vmeta + r0 * per_row,
                        reinterpret_cast<const unsigned char*>(static_cast<const __half*>(q.v_meta) + row0 * (D >> gs) * 2),
                        KT * per_row, rows * per_row, t, n);
        }
    }

    // Row r's 8 channels at chunk c8 of K (V: IS_V) of tile j from stage `st`, dequantized.
    // int4 / int2 K: the scales and mins of a thread's 8 channels in the token group of row r.
    struct KMeta {
        __half2 s[4], m[4];
    };
    __device__ __forceinline__ void k_meta(const unsigned char* st, int j, int r, int c8, KMeta& km) const {
        if constexpr (FMT >= KV_INT4) {
            const int g = ((j * BN + r) >> q.group_shift) - k_group0(j);
            const __half* gm = reinterpret_cast<const __half*>(st + 2 * CODE_BYTES + grp.wk * K_META_SLOT) + g * 2 * D + c8 * 8;
            const uint4 sv = *reinterpret_cast<const uint4*>(gm), mv = *reinterpret_cast<const uint4*>(gm + D);
            const u32 sw[4] = {sv.x, sv.y, sv.z, sv.w}, mw[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) km.s[k] = u32_half2(sw[k]), km.m[k] = u32_half2(mw[k]);
        }
    }

    // Row r's 8 channels at chunk c8 of K (V: IS_V) from stage `st`, dequantized; int4 / int2 K
    // with the row's `km`.
    template <bool IS_V>
    __device__ __forceinline__ uint4 dequant(const unsigned char* st, int r, int c8, const KMeta& km) const {
        const unsigned char* codes = st + (IS_V ? CODE_BYTES : 0) + r * CB + c8 * BITS;
        const unsigned char* meta = st + 2 * CODE_BYTES + (IS_V ? K_META_BYTES : 0);
        if constexpr (FMT < KV_INT4) {
            // K's codes stay exact (its scale multiplies the scores: scale_scores), V's are scaled.
            const __half2 s = __float2half2_rn(IS_V ? reinterpret_cast<const float*>(meta)[r] : 1.f);
            const uint2 c = *reinterpret_cast<const uint2*>(codes);
            return FMT == KV_INT8 ? deq_int8(c, s) : deq_fp8(c, s);
        } else if constexpr (IS_V) {
            const int gs = q.group_shift;
            const u32 sm = reinterpret_cast<const u32*>(meta)[(r << (D_LOG2 - gs)) + ((c8 * 8) >> gs)];
            const __half2 pair = u32_half2(sm);
            __half2 s[4], m[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) s[k] = __low2half2(pair), m[k] = __high2half2(pair);
            return deq_low<BITS>(chunk_word<BITS>(codes), s, m);
        } else {
            return deq_low<BITS>(chunk_word<BITS>(codes), km.s, km.m);
        }
    }

    // Residual key `key` (its slot in the ring), chunk c8, as float16.
    __device__ __forceinline__ uint4 residual(const void* ring, int key, int c8) const {
        const T* src = static_cast<const T*>(ring) + ((head * q.res_cap) + key % q.res_cap) * D + c8 * 8;
        return convert8<T, __half>(*reinterpret_cast<const uint4*>(src));
    }

    // The group's threads dequantize its rows (thread t: chunk column t % CH of rows
    // t / CH + RSTEP * i), then the group's barrier. Keys past the sequence are zeros (masked,
    // but their P * V must stay finite). (K and V taking turns in one tile, V after the
    // softmax, halved this shared memory and ran 10-20% slower: one more step in every tile's
    // chain; NOTES kv_quant v3.)
    __device__ const __half* ready(int j, int stage) {
        const unsigned char* st = raw + stage * STAGE_BYTES;
        const int c8 = grp.tid % CH, r0 = grp.row0() + grp.tid / CH;
        // KT <= 32 <= G aligned rows lie in one token group: K's meta is loaded once, not per row.
        constexpr bool ONE_K_GROUP = KT <= 32;
        KMeta km;
        if constexpr (ONE_K_GROUP) k_meta(st, j, r0, c8, km);
        // Unrolled, the rows are independent chains (load, convert, store); with two or four
        // row groups the registers are short (twice unrolled, f16 d128 r2 int8 spilled).
#pragma unroll(WR == 1 ? 8 : 1)
        for (int i = 0; i < KT / RSTEP; ++i) {
            const int r = r0 + RSTEP * i, key = j * BN + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
            if (key < qlen) {
                if constexpr (!ONE_K_GROUP) k_meta(st, j, r, c8, km);
                kv = dequant<false>(st, r, c8, km);
                vv = dequant<true>(st, r, c8, km);
            } else if (key < len && q.res_cap > 0) {
                kv = residual(q.k_res, key, c8);
                vv = residual(q.v_res, key, c8);
            }
            *reinterpret_cast<uint4*>(sKV + r * SROW + c8 * 8) = kv;
            *reinterpret_cast<uint4*>(sKV + (BN + r) * SROW + c8 * 8) = vv;
        }
        grp.sync();
        return sKV;
    }

    __device__ void sync() const { grp.sync(); }

    // 8-bit K: the scores of keys k0.. (this warp's columns of the tile in `stage`) times each
    // key's scale, in float32, so a key's dot product is exact before its scale.
    template <int N>
    __device__ __forceinline__ void scale_scores(float (&s)[N / 8][4], int stage, int k0, int t) const {
        if constexpr (FMT < KV_INT4) {
            const float* ks = reinterpret_cast<const float*>(raw + stage * STAGE_BYTES + 2 * CODE_BYTES) + k0;
#pragma unroll
            for (int i = 0; i < N / 8; ++i) {
                const float2 f = *reinterpret_cast<const float2*>(ks + 8 * i + 2 * t);
                s[i][0] *= f.x, s[i][1] *= f.y, s[i][2] *= f.x, s[i][3] *= f.y;
            }
        }
    }

    __device__ float* scratch() const { return reinterpret_cast<float*>(sKV); }
};

template <typename T, int D, int WR, int STAGES, int FMT>
__device__ __forceinline__ void kv_quant_decode(const DecodeParams& p, const KvQuantParams& q) {
    constexpr int ROWS = 16 * WR;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const DecodeWork w = decode_work<ROWS>(p, p.capacity);
    QuantTiles<T, D, STAGES, FMT, WR> tiles(p, q, smem_raw + ROWS * (D + 8) * 2, w.b, w.hk, w.len);
    decode_attend<T, D, WR>(p, smem_raw, tiles, w);
}
