"""A/B timing of ferrokernels.gemm.linear (W4A16, group 128, bf16) under two values of one
environment variable, in one process (kernel variants are chosen per call). Usage:
    ab-gemm.py VAR VALUE_A VALUE_B [M,N,K ...]
AB_BITS=8 times W8A16 instead; AB_ACT=fp8|int8 the W8A8 formats.
Weights rotate over copies so the ten calls of a timed graph stream ~200 MB, not the L2."""

import os
import sys

import torch

import ferrokernels as fk
from ferrokernels.bench import graph_copies, rotating, time_graph_ms

var, a, b = sys.argv[1:4]
shapes = sys.argv[4:] or ["1,8192,8192", "16,8192,8192", "64,8192,8192", "1,28672,8192", "1,4096,4096"]
bits = int(os.environ.get("AB_BITS", "4"))
act = os.environ.get("AB_ACT")
for spec in shapes:
    m, n, k = (int(x) for x in spec.split(","))
    w = torch.randn(n, k, device="cuda") * 0.02
    if act:
        qw = fk.gemm.quantize_w8a8(w, act)
    else:
        qw = fk.gemm.quantize(w, bits=bits, group_size=128 if bits == 4 else -1, scale_dtype=torch.bfloat16)
    nbytes = qw.qweight.numel() * qw.qweight.element_size()
    qws = [qw] + [fk.gemm.replace(qw, qweight=qw.qweight.clone(), scales=qw.scales.clone(),
                                  zeros=None if qw.zeros is None else qw.zeros.clone())
                  for _ in range(graph_copies(nbytes) - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    res = {}
    for value in (a, b, a, b):
        os.environ[var] = value
        call = rotating(lambda i: (lambda: fk.gemm.linear(x, qws[i])), len(qws))
        res.setdefault(value, []).append(time_graph_ms(call))
    gb = nbytes + qw.scales.numel() * 2
    line = " ".join(f"{var}={v}: {min(t) * 1e3:7.1f} us {gb / min(t) / 1e6:6.0f} GB/s" for v, t in res.items())
    print(f"m={m:4d} n={n:6d} k={k:6d}  {line}", flush=True)
