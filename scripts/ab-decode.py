"""A/B timing of decode_attention under two values of one environment variable, in one process
(kernel variants are chosen per call). Usage:
    ab-decode.py VAR VALUE_A VALUE_B [BATCH,LEN,HEADS_Q ...]      (heads_kv 8, D 128, bf16)
VAR=LAYOUT with values bnhd / bhnd compares cache memory layouts instead (the same logical
(batch, len, heads_kv, D) tensor, heads interleaved per token or each head's rows contiguous)."""

import os
import sys

import torch

import ferrokernels as fk
from ferrokernels.bench import time_graph_ms

var, a, b = sys.argv[1:4]
shapes = sys.argv[4:] or ["1,32768,32", "1,131072,32", "16,8192,32", "64,4096,32", "256,1024,32"]
for spec in shapes:
    batch, n, hq = (int(x) for x in spec.split(","))
    q = torch.randn(batch, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, n, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layouts = {"bnhd": (k, v), "bhnd": tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))}
    lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    gb = 2 * k.numel() * 2 / 1e9
    res = {}
    for value in (a, b, a, b):
        kk, vv = layouts[value] if var == "LAYOUT" else (k, v)
        if var != "LAYOUT":
            os.environ[var] = value
        ms = time_graph_ms(lambda: fk.decode_attention(q, kk, vv, lens, validate=False))
        res.setdefault(value, []).append(ms)
    line = "  ".join(f"{var.split('_')[-1]}={val}: {min(t) * 1000:6.1f} us {gb / min(t) * 1000:5.0f} GB/s" for val, t in res.items())
    print(f"b={batch:3d} n={n:6d} hq={hq}  {line}", flush=True)
    del q, k, v, layouts
