"""One W4A16 GEMM (group 128, bf16), warmed up, for `ncu` (scripts/gpu-check profile,
PROFILE=gemm; the third launch is profiled). Usage: profile-gemm.py M N K [int8|fp8]
(the last argument profiles that W8A8 format instead)."""

import sys

import torch

import ferrokernels as fk

m, n, k = (int(x) for x in sys.argv[1:4])
w = torch.randn(n, k, device="cuda") * 0.02
if len(sys.argv) > 4:
    qw = fk.gemm.quantize_w8a8(w, sys.argv[4])
else:
    qw = fk.gemm.quantize(w, group_size=128, scale_dtype=torch.bfloat16)
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    fk.gemm.linear(x, qw)
torch.cuda.synchronize()
