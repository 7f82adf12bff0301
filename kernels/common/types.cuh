// Scalar types and conversions shared by every kernel. NVRTC has no host headers, so the
// fixed-width integer names are ours.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Two floats rounded to one register holding two T (low half first), the operand format of
// the 16-bit tensor-core instructions.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);

template <> __device__ __forceinline__ u32 pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&h);
}

template <> __device__ __forceinline__ u32 pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&h);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// std::conditional without the host headers NVRTC lacks.
template <bool C, typename A, typename B> struct Select {
    using type = A;
};
template <typename A, typename B> struct Select<false, A, B> {
    using type = B;
};

template <typename A, typename B> struct SameType {
    static constexpr bool value = false;
};
template <typename A> struct SameType<A, A> {
    static constexpr bool value = true;
};

// Eight 16-bit floats of type S (a 16-byte chunk) as eight of type D, through float.
template <typename S, typename D>
__device__ __forceinline__ uint4 convert8(uint4 x) {
    if constexpr (SameType<S, D>::value) {
        return x;
    } else {
        u32 w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const S* s = reinterpret_cast<const S*>(&w[i]);
            w[i] = pack2<D>(to_float(s[0]), to_float(s[1]));
        }
        return make_uint4(w[0], w[1], w[2], w[3]);
    }
}
