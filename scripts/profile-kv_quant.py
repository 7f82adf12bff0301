"""One quantized-KV decode workload, warmed up, for `ncu` (scripts/gpu-check profile,
PROFILE=kv_quant): the third launch is profiled. Usage: profile-kv_quant.py BATCH LEN FORMAT
(32 q / 8 kv heads, D=128, bf16 q, a full cache)"""

import sys

import torch

from ferrokernels import kv_quant

batch, n, fmt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(batch, n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
cache = kv_quant.QuantizedKV(batch, 8, 128, n, format=fmt, dtype=torch.bfloat16, device="cuda")
cache.append(k, v)
for _ in range(3):
    cache.decode(q, validate=False)
torch.cuda.synchronize()
