// sm_90 building blocks: mbarriers, TMA (cp.async.bulk.tensor) loads, warpgroup MMA fences,
// register reallocation between warpgroups, and shared-memory matrix descriptors.
#pragma once
#include "common/types.cuh"
#include "common/mma.cuh"

// A CUtensorMap as the driver encodes it (cuTensorMapEncodeTiled); opaque to the kernel and
// passed by value in the __grid_constant__ parameter block.
struct __align__(64) TmaDesc {
    u64 raw[16];
};

// --- mbarriers -----------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

// Makes the initialised barriers visible to the async (TMA) proxy and the other threads.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrives once and adds `bytes` to the transaction count the phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Blocks until the phase with parity `phase` has completed. A fresh barrier is in phase 0, so
// waiting on parity 1 returns at once (how producers start on empty slots).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 phase) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(phase)
        : "memory");
}

// --- TMA -----------------------------------------------------------------------------------
// Loads the box at coordinates (c0 innermost .. c3) of a 4-D tensor map into shared memory;
// completion is signalled on `bar` as transaction bytes. Out-of-range elements are zero-filled.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* map, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// The 2-D form: the box at (c0 innermost, c1).
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaDesc* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}

// --- warpgroups ----------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads/writes of accumulator registers across wgmma fences.
template <int R, int C> __device__ __forceinline__ void fence_regs(float (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) asm volatile("" : "+f"(x[i][j])::"memory");
}

// Integer accumulators (s8 wgmma).
template <int R, int C> __device__ __forceinline__ void fence_regs(int (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) asm volatile("" : "+r"(x[i][j])::"memory");
}

// The same for registers an in-flight wgmma reads (A fragments): keeps them live, unmodified,
// until after the wait.
template <int R, int C> __device__ __forceinline__ void fence_regs(u32 (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) asm volatile("" : "+r"(x[i][j])::"memory");
}

template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Barrier among `threads` threads (a multiple of 32) using hardware barrier `id` (1..15; 0 is
// __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Signals barrier `id` without waiting (the other side calls named_barrier).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's generic-proxy shared-memory accesses before later async-proxy (TMA)
// accesses that another thread's mbarrier arrival releases.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// --- programmatic dependent launch -----------------------------------------------------------
// The primary kernel lets its dependent (launched with Device::launch_dependent) start early;
// the dependent waits for the primary's completion and memory before reading its results.
// Both are no-ops when the launch was an ordinary one.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// --- shared-memory matrix descriptors --------------------------------------------------------
// Tiles are stored as 64-element (128-byte) wide column blocks, each a run of 128-byte rows
// swizzled the way TMA's SWIZZLE_128B writes them (16-byte chunk c of row r lands at c ^ (r % 8));
// every block starts 1024-byte aligned.
//
// K-major operand (the reduction dim is contiguous, e.g. Q and K in Q K^T): 8-row groups are
// 1024 bytes apart (SBO); the leading offset is unused. N-major operand (e.g. V in P V): LBO is
// the distance between 64-wide column blocks, SBO the distance between 8-row groups.
__device__ __forceinline__ u64 smem_desc_sw128(u32 addr, u32 lbo, u32 sbo) {
    u64 d = 0;
    d |= (u64)((addr & 0x3FFFF) >> 4);
    d |= (u64)((lbo & 0x3FFFF) >> 4) << 16;
    d |= (u64)((sbo & 0x3FFFF) >> 4) << 32;
    d |= 1ull << 62;  // 128-byte swizzle
    return d;
}

// The same for 64-byte rows in TMA's 64-byte swizzle (16-byte chunk c of row r at c ^ ((r / 2) % 4)),
// e.g. 8-bit K-major tiles of 64 channels: 8-row groups are 512 bytes apart.
__device__ __forceinline__ u64 smem_desc_sw64(u32 addr, u32 lbo, u32 sbo) {
    return (smem_desc_sw128(addr, lbo, sbo) & ~(3ull << 62)) | (2ull << 62);
}

// Byte offset of element (row, col) in a swizzled tile of `rows` rows per column block.
__device__ __forceinline__ u32 sw128_offset(int row, int col, int rows) {
    const int block = col >> 6, chunk = (col >> 3) & 7;
    return block * rows * 128 + row * 128 + ((chunk ^ (row & 7)) << 4) + (col & 7) * 2;
}
