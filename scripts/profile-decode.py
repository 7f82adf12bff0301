"""One decode workload, warmed up, for `ncu` (scripts/gpu-check profile, PROFILE=decode): the
launch to profile is the last one. Usage: profile-decode.py BATCH LEN HEADS_Q  (8 kv heads,
D=128, bf16, contiguous cache)"""

import sys

import torch

import ferrokernels as fk

batch, n, hq = (int(x) for x in sys.argv[1:4])
q = torch.randn(batch, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(batch, n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
for _ in range(3):
    fk.decode_attention(q, k, v, lens, validate=False)
torch.cuda.synchronize()
