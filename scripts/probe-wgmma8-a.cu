// Probes the register layout of wgmma's 8-bit A operand (e4m3, k32), which the quantized
// attention kernel relies on to feed P̃ from the S accumulators without shuffles
// (benchmarks/NOTES.md, "Kernel plan"). Hypothesis: thread (warp w, lane = 4g + t) register r,
// byte e holds A[16w + g + 8 (r & 1)][16 (r >> 1) + 4t + e].
//
// B (32 x 8) is a selector: column n picks row k = 8s + n, so D[m][n] = A[m][8s + n]. A's bytes
// are set to codes that name their (r, e) or their t; D reads them back.
//
// On the GPU machine (compute_90a: plain -arch=sm_90 PTX has no wgmma):
//   nvcc -gencode arch=compute_90a,code=sm_90a -o /tmp/probe scripts/probe-wgmma8-a.cu && /tmp/probe
// Result on the H100, 2026-11-24: "layout as hypothesised (0 mismatches)".
#include <cstdio>
#include <cuda_runtime.h>

typedef unsigned int u32;
typedef unsigned long long u64;

__device__ unsigned char e4m3_of(int v) {  // small positive integers 1..16, exact in e4m3
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.f), "f"((float)v));
    return (unsigned char)(r & 0xff);
}

__global__ void probe(float* out) {  // out: [encoding 2][selector 4][64][8]
    __shared__ __align__(1024) unsigned char b[8 * 128];
    const int lane = threadIdx.x & 31, t = lane & 3;
    const u32 base = (u32)__cvta_generic_to_shared(b);
    for (int enc = 0; enc < 2; ++enc)
        for (int s = 0; s < 4; ++s) {
            // B K-major in 128-byte swizzled rows: row n, 16-byte chunk c at chunk c ^ (n % 8).
            for (int i = threadIdx.x; i < 8 * 128; i += blockDim.x) {
                const int n = i / 128, byte = i % 128, chunk = byte / 16, within = byte % 16;
                const int logical_chunk = chunk ^ (n % 8), k = logical_chunk * 16 + within;
                b[i] = (k == 8 * s + n) ? e4m3_of(1) : 0;
            }
            __syncthreads();
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            u32 a[4];
            for (int r = 0; r < 4; ++r) {
                u32 w = 0;
                for (int e = 0; e < 4; ++e) w |= (u32)e4m3_of(enc == 0 ? 1 + 4 * r + e : 1 + t) << (8 * e);
                a[r] = w;
            }
            u64 desc = 0;
            desc |= (u64)((base & 0x3FFFF) >> 4);
            desc |= (u64)(16 >> 4) << 16;
            desc |= (u64)(1024 >> 4) << 32;
            desc |= 1ull << 62;
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
            asm volatile(
                "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1;\n}\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(0));
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
            const int warp = threadIdx.x / 32, g = lane / 4;
            float* o = out + (enc * 4 + s) * 64 * 8;
            o[(16 * warp + g) * 8 + 2 * t] = d[0];
            o[(16 * warp + g) * 8 + 2 * t + 1] = d[1];
            o[(16 * warp + g + 8) * 8 + 2 * t] = d[2];
            o[(16 * warp + g + 8) * 8 + 2 * t + 1] = d[3];
            __syncthreads();
        }
}

int main() {
    float* dev;
    cudaMalloc(&dev, 2 * 4 * 64 * 8 * sizeof(float));
    probe<<<1, 128>>>(dev);
    static float host[2 * 4 * 64 * 8];
    if (cudaMemcpy(host, dev, sizeof(host), cudaMemcpyDeviceToHost) != cudaSuccess) {
        printf("launch failed: %s\n", cudaGetErrorString(cudaGetLastError()));
        return 1;
    }
    int bad = 0;
    for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 32; ++k) {
            const int s = k / 8, n = k % 8;
            const int re = (int)host[(0 * 4 + s) * 512 + m * 8 + n] - 1, t = (int)host[(1 * 4 + s) * 512 + m * 8 + n] - 1;
            const int r = re / 4, e = re % 4;
            const bool ok = (r & 1) == (m % 16) / 8 && (r >> 1) == k / 16 && t == (k % 16) / 4 && e == k % 4;
            if (!ok && bad++ < 10) printf("A[%d][%d] came from r=%d e=%d t=%d\n", m, k, r, e, t);
        }
    printf(bad ? "layout differs from the hypothesis at %d places\n" : "layout as hypothesised (%d mismatches)\n", bad);
    return bad != 0;
}
