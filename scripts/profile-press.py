"""Where a press's time goes: the GPU kernels it launches (torch profiler, summed per kernel
name over 5 calls) beside its eager and CUDA-graph time per call, at batch 1.

N=32768 python scripts/profile-press.py [press ...]   (names for kv.make_press; default kvmerge adakv
duo_attention; N the layer's tokens, default 8192) 32 q / 8 kv heads, D=128, bf16, ratio 0.5,
a 64-query window, the prefill's LSE given.
"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import ferrokernels as fk
import ferrokernels.kv as kv
from ferrokernels.bench import time_graph_ms, time_ms

HQ, HK, D, W = 32, 8, 128, 64
N = int(os.environ.get("N", 8192))
names = sys.argv[1:] or ["kvmerge", "adakv", "duo_attention"]
q = torch.randn(1, N, HQ, D, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, N, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
lse = fk.attention(q, k, v, causal=True, return_lse=True)[1][..., N - W:].contiguous()
win = q[:, N - W:]
prefill = time_ms(lambda i: fk.attention(q, k, v, causal=True), reps=10)
print(f"prefill {prefill * 1e3:.1f} us")
for name in names:
    press = kv.make_press(name) if name == "duo_attention" else kv.make_press(name, ratio=0.5)
    call = lambda: press(k, v, win, lse=lse)  # noqa: E731
    eager = time_ms(lambda i: call())
    try:
        graph = f"{time_graph_ms(call, calls=5, reps=5) * 1e3:.1f} us"
    except Exception as e:  # a press that syncs with the host cannot be captured
        graph = f"not capturable ({type(e).__name__})"
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print(f"\n== {name}: eager {eager * 1e3:.1f} us ({100 * eager / prefill:.1f}% of prefill), graph {graph}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
