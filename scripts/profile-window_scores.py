"""One window_scores workload, warmed up, for `ncu` (scripts/gpu-check profile,
PROFILE=window_scores): Usage: profile-window_scores.py BATCH LEN  (32 q / 8 kv heads, D=128,
bf16, window 64, the LSE given)"""

import sys

import torch

import ferrokernels as fk
import ferrokernels.kv as kv

batch, n = (int(x) for x in sys.argv[1:3])
q = torch.randn(batch, 64, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(batch, n, 8, 128, device="cuda", dtype=torch.bfloat16)
lse = fk.attention(q, k, k[..., :8], causal=True, return_lse=True)[1].contiguous()
for _ in range(3):
    kv.window_scores(k, q, lse)
torch.cuda.synchronize()
