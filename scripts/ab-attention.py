"""A/B timing of our attention under two settings of one environment variable, interleaved in
one process (the kernel reads FERROKERNELS_* at each launch). Usage:
    ab-attention.py VAR VALUE_A VALUE_B [D,N,CAUSAL ...]
e.g. ab-attention.py FERROKERNELS_ATTENTION_PERSISTENT 1 0 128,1024,0 64,4096,1"""

import os
import sys

import torch

import ferrokernels as fk
from ferrokernels.bench import time_ms

var, a, b = sys.argv[1:4]
shapes = sys.argv[4:] or [f"{d},{n},{c}" for d in (64, 128, 256) for n in (1024, 4096, 16384) for c in (0, 1)]
for spec in shapes:
    d, n, causal = (int(x) for x in spec.split(","))
    bs, h = 32768 // n, 2048 // d
    sets = [tuple(torch.randn(bs, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)) for _ in range(2)]
    flops = 4 * bs * h * n * n * d / (2 if causal else 1)
    res = {}
    for value in (a, b, a, b):
        os.environ[var] = value
        ms = time_ms(lambda i: fk.attention(*sets[i], causal=bool(causal)), 2)
        res.setdefault(value, []).append(flops / ms / 1e9)
    line = "  ".join(f"{var.split('_')[-1]}={v}: {max(t):6.1f}" for v, t in res.items())
    print(f"d={d:3d} n={n:5d} causal={causal}  {line}  TFLOP/s", flush=True)
    del sets
