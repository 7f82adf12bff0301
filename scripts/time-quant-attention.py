"""Quick timing of quant_attention for tuning (the full comparison is
benchmarks/bench_quant_attention.py): kernel alone, with the pre-pass, and cuDNN bf16, in
TFLOP/s counted as bf16 (4 b h n^2 d, halved for causal).

    python3 scripts/time-quant-attention.py [D:N ...]     (default 128:8192 128:16384 64:16384)
PV=fp8x2 times the two-term V.
"""

import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ferrokernels as fk
from ferrokernels.bench import load_bench_module, time_ms

bench = load_bench_module("quant_attention")
shapes = [tuple(int(x) for x in a.split(":")) for a in sys.argv[1:]] or [(128, 8192), (128, 16384), (64, 16384)]
for d, n in shapes:
    b, h = max(1, 32768 // n), 2048 // d
    q, k, v = bench.inputs(b, n, h, d, seed=0)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    for causal in (False, True):
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        pv = os.environ.get("PV", "fp8")
        kern = bench.kernel_only(q, k, v, causal, pv)

        def cudnn(i):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        row = []
        for label, fn in (("kernel", lambda i: kern()), ("total", lambda i: fk.quant_attention(q, k, v, causal=causal, pv=pv)),
                          ("cudnn", cudnn)):
            ms = time_ms(fn, 1)
            row.append(f"{label} {ms:7.3f} ms {flops / ms / 1e9:6.1f} TF/s")
        print(f"d={d} n={n} b={b} h={h} causal={causal!s:5}  " + "  ".join(row), flush=True)
