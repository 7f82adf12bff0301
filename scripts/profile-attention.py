"""One attention workload, warmed up, for `ncu` (scripts/gpu-check profile): the launch to
profile is the last one. Usage: profile-attention.py D N CAUSAL"""

import sys

import torch

import ferrokernels as fk

d, n, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
b, h = 32768 // n, 2048 // d
q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(3):
    fk.attention(q, k, v, causal=causal)
torch.cuda.synchronize()
