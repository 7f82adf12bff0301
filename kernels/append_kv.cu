// append_kv: writes n_new tokens of K and V per sequence into a contiguous or paged cache at
// positions cache_seqlens[b] + t, optionally rotating K (rotary embedding) on the way.
// One thread moves one 16-byte chunk of K and of V; with NeoX-style rotary (halves) a thread
// owns a chunk of the first half and its partner rd/2 columns later, with GPT-J style
// (interleaved pairs) a chunk holds its own four pairs.
#pragma once
#include "common/types.cuh"

// Mirrors `AppendParams` in src/ops/append_kv.rs. Strides in elements.
struct AppendParams {
    const void* k_new;         // (batch, n_new, heads_kv, D)
    const void* v_new;
    void* k;                   // cache, as in decode.cu
    void* v;
    const i32* seqlens;        // (batch,) keys already in the cache
    const i32* block_table;    // (batch, max_pages) or null
    const void* cos;           // (positions, rotary_dim / 2) or null: no rotary
    const void* sin;
    i64 kn_sb, kn_ss, kn_sh;
    i64 vn_sb, vn_ss, vn_sh;
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 bt_sb;
    i64 cs_ss;                 // row stride of cos and sin
    i32 batch, n_new, heads_kv, head_dim;
    i32 page_shift, capacity, num_pages;
    i32 rotary_dim;            // 0 = none
    i32 interleaved;           // GPT-J pairs (2i, 2i+1) instead of halves (i, i + rd/2)
    i32 cs_f32;                // cos/sin are float32 (else the cache dtype)
    i32 positions;             // rows of cos/sin
    i32 pad_;
};

template <typename T>
__device__ __forceinline__ float cs_at(const AppendParams& p, const void* t, int pos, int i) {
    if (p.cs_f32) return static_cast<const float*>(t)[pos * p.cs_ss + i];
    return to_float(static_cast<const T*>(t)[pos * p.cs_ss + i]);
}

template <typename T>
__device__ __forceinline__ void to_f32x8(const uint4& u, float (&x)[8]) {
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 from_f32x8(const float (&x)[8]) {
    uint4 u;
    u.x = pack2<T>(x[0], x[1]);
    u.y = pack2<T>(x[2], x[3]);
    u.z = pack2<T>(x[4], x[5]);
    u.w = pack2<T>(x[6], x[7]);
    return u;
}

template <typename T>
__device__ __forceinline__ void append_kv(const AppendParams& p) {
    const int chunks = p.head_dim / 8;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 total = (i64)p.batch * p.n_new * p.heads_kv * chunks;
    if (idx >= total) return;
    const int c = idx % chunks;
    const i64 row = idx / chunks;
    const int h = row % p.heads_kv;
    const int t = (row / p.heads_kv) % p.n_new;
    const int b = row / ((i64)p.heads_kv * p.n_new);
    const int pos = p.seqlens[b] + t;
    if (pos < 0 || pos >= p.capacity) return;  // rejected on the host; never write outside
    i64 page = b, slot = pos;
    if (p.block_table != nullptr) {
        page = p.block_table[b * p.bt_sb + (pos >> p.page_shift)];
        slot = pos & ((1 << p.page_shift) - 1);
        if (page < 0 || page >= p.num_pages) return;
    }
    const int col = c * 8;
    const T* kn = static_cast<const T*>(p.k_new) + b * p.kn_sb + t * p.kn_ss + h * p.kn_sh;
    const T* vn = static_cast<const T*>(p.v_new) + b * p.vn_sb + t * p.vn_ss + h * p.vn_sh;
    T* kc = static_cast<T*>(p.k) + page * p.k_sb + slot * p.k_ss + h * p.k_sh;
    T* vc = static_cast<T*>(p.v) + page * p.v_sb + slot * p.v_ss + h * p.v_sh;
    *reinterpret_cast<uint4*>(vc + col) = *reinterpret_cast<const uint4*>(vn + col);

    const int rd = p.rotary_dim;
    const uint4 raw = *reinterpret_cast<const uint4*>(kn + col);
    if (rd == 0 || col >= rd || pos >= p.positions) {
        *reinterpret_cast<uint4*>(kc + col) = raw;
        return;
    }
    float x[8];
    to_f32x8<T>(raw, x);
    if (p.interleaved) {
        // Pairs (col + 2i, col + 2i + 1) rotate by angle index (col / 2 + i).
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float cs = cs_at<T>(p, p.cos, pos, col / 2 + i), sn = cs_at<T>(p, p.sin, pos, col / 2 + i);
            const float a = x[2 * i], bb = x[2 * i + 1];
            x[2 * i] = a * cs - bb * sn;
            x[2 * i + 1] = a * sn + bb * cs;
        }
        *reinterpret_cast<uint4*>(kc + col) = from_f32x8<T>(x);
        return;
    }
    // Halves: column j < rd/2 pairs with j + rd/2; the first-half thread does both.
    const int half = rd / 2;
    if (col >= half) return;
    float y[8];
    to_f32x8<T>(*reinterpret_cast<const uint4*>(kn + col + half), y);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float cs = cs_at<T>(p, p.cos, pos, col + i), sn = cs_at<T>(p, p.sin, pos, col + i);
        const float a = x[i], bb = y[i];
        x[i] = a * cs - bb * sn;
        y[i] = a * sn + bb * cs;
    }
    *reinterpret_cast<uint4*>(kc + col) = from_f32x8<T>(x);
    *reinterpret_cast<uint4*>(kc + col + half) = from_f32x8<T>(y);
}
