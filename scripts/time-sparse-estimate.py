"""Where estimate_blocks' time goes at one size: host time per call (no sync), GPU time per call
(CUDA events; includes waiting on the host when the host is slower), and the sparse kernel
it feeds. python3 scripts/time-sparse-estimate.py [N] (default 32768; 32 heads, D=128, bf16)."""

import sys
import time

import torch

import ferrokernels as fk
import ferrokernels.sparse as sp
from ferrokernels.bench import time_ms

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v = (torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
top = max(1, n // 1280)
for method in ("pooled", "antidiagonal"):
    est = lambda: sp.estimate_blocks(q, k, method=method, top_k=top).tiles()  # noqa: E731
    for _ in range(3):
        est()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        est()
    host = (time.perf_counter() - t0) / 10 * 1e3
    torch.cuda.synchronize()
    gpu = time_ms(lambda i: est(), 1, reps=10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        est()
        torch.cuda.synchronize()
    kernels = sum(e.device_time_total for e in prof.key_averages()) / 1e3
    bm = sp.estimate_blocks(q, k, method=method, top_k=top)
    bm.tiles()
    kern = time_ms(lambda i: fk.sparse_attention(q, k, v, bm), 1, reps=10)
    print(f"n={n} {method:12s} density {bm.density():.3f}: host {host:.2f} ms/call, events {gpu:.2f} ms, "
          f"GPU kernels {kernels:.2f} ms; sparse kernel {kern:.2f} ms")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=8))
