"""The demo: ferrokernels.attention against torch's scaled_dot_product_attention on one
transformer-sized workload, on the GPU when there is one, else the CPU: accuracy against a
float64 reference, and speed."""

from __future__ import annotations

import math
import time

import torch

import ferrokernels as fk


def _time(fn, device, reps):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # A Llama-like layer: 32 query heads, 8 kv heads, head_dim 128.
    b, n, hq, hk, d = (4, 4096, 32, 8, 128) if device == "cuda" else (1, 1024, 8, 2, 64)
    reps = 20 if device == "cuda" else 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, hq, d, generator=g).to(device, dtype)
    k = torch.randn(b, n, hk, d, generator=g).to(device, dtype)
    v = torch.randn(b, n, hk, d, generator=g).to(device, dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    print(f"ferrokernels {fk.__version__} on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), {dtype}")
    print(f"causal attention, batch {b}, seqlen {n}, heads {hq}q/{hk}kv, head_dim {d}")

    ours = lambda: fk.sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
    theirs = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731

    # float64 reference on the first batch element, first 2 kv groups.
    h = 2 * hq // hk
    qs, ks, vs = (x[0, :h].double() for x in (qt, kt.repeat_interleave(hq // hk, 1), vt.repeat_interleave(hq // hk, 1)))
    s = qs @ ks.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
    ref = torch.softmax(s, -1) @ vs
    err = lambda o: ((o[0, :h].double() - ref).norm() / ref.norm()).item()  # noqa: E731

    flops = 4 * b * hq * n * n * d / 2
    rows = []
    for name, fn in (("ferrokernels", ours), ("torch sdpa", theirs)):
        ms = _time(fn, device, reps)
        rows.append((name, ms, flops / ms / 1e9, err(fn())))
    print(f"{'':14s}{'ms':>10s}{'TFLOP/s':>10s}{'rel err':>10s}")
    for name, ms, tf, e in rows:
        print(f"{name:14s}{ms:10.3f}{tf:10.2f}{e:10.1e}")
    print(f"speed-up vs torch: {rows[1][1] / rows[0][1]:.2f}x")
    return 0
