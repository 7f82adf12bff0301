"""Where decode's time goes at batch 1: a line through time against cache length (fixed cost and
marginal bandwidth) per format, and the kernels' own
durations from the profiler (decode vs the split merge):
python scripts/probe-decode-overhead.py [splits]  (32 q / 8 kv heads, D=128, bf16 q)."""
import os
import sys

import torch

import ferrokernels as fk
from ferrokernels import _native, kv_quant
from ferrokernels.bench import graph_copies, rotating, time_graph_ms

hq, hk, d = 32, 8, 128


def caches(fmt, b, n):
    """Enough copies of a (b, n) cache of `fmt` to stream ~200 MB per timed graph."""
    k, v = (torch.randn(b, n, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if fmt == "bf16":
        nbytes = 2 * k.numel() * 2
        return [(k.clone(), v.clone()) for _ in range(graph_copies(nbytes))]
    def one():
        c = kv_quant.QuantizedKV(b, hk, d, n, format=fmt, dtype=torch.bfloat16, device="cuda")
        c.append(k, v)
        return c
    first = one()
    return [first] + [one() for _ in range(graph_copies(first.nbytes()) - 1)]


def call(fmt, q, cache, b, n):
    """One decode launch on the plan's splits (FERROKERNELS_DECODE_SPLITS overrides them)."""
    if fmt == "bf16":
        lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
        return lambda: fk.decode_attention(q, cache[0], cache[1], lens, validate=False)
    return lambda: cache.decode(q, validate=False)


def timed(fmt, b, n):
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    cs = caches(fmt, b, n)
    return time_graph_ms(rotating(lambda i: call(fmt, q, cs[i], b, n), len(cs))) * 1e3


def kernel_times(fmt, b, n):
    """Per-kernel device microseconds of one call, from the profiler (median of 20 calls)."""
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    fn = call(fmt, q, caches(fmt, b, n)[0], b, n)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.setdefault(e.name[:40], []).append(e.device_time)
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def plan_splits(fmt, b, n):
    if fmt == "bf16":
        return _native.decode_plan(0, "bfloat16", b, 1, hq, hk, d, n)[0]
    return _native.kv_quant_plan(0, "bfloat16", fmt, b, 1, hq, hk, d, n)[0]


if sys.argv[1:2] == ["splits"]:
    # Split counts against the plan's (FERROKERNELS_DECODE_SPLITS is read per call).
    for fmt in ("bf16", "int8"):
        for b, n in ((1, 32768), (1, 131072)):
            auto = plan_splits(fmt, b, n)
            line = f"{fmt} ({b},{n // 1024}K) plan {auto}: {timed(fmt, b, n):.1f}us |"
            for s in (16, 24, 33, 40, 49, 56, 66, 99):
                os.environ["FERROKERNELS_DECODE_SPLITS"] = str(s)
                line += f" {s}: {timed(fmt, b, n):.1f}"
            del os.environ["FERROKERNELS_DECODE_SPLITS"]
            print(line, flush=True)
    sys.exit(0)

for fmt in ("bf16", "int8", "int4"):
    lens = (1024, 4096, 16384, 32768, 65536, 131072)
    ts = [timed(fmt, 1, n) for n in lens]
    # Least squares t = a + n * c over the lengths >= 16K (where every slot has several tiles).
    xs, ys = lens[2:], ts[2:]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - c * mx
    print(f"{fmt}: " + " ".join(f"{n // 1024}K {t:.1f}us (s={plan_splits(fmt, 1, n)})" for n, t in zip(lens, ts))
          + f" | fixed {a:.1f} us, {c * 1024:.3f} us per 1K keys")
    for b, n in ((1, 1024), (1, 32768), (1, 131072), (16, 8192)):
        print(f"  kernels ({b},{n}):", {k: round(v, 1) for k, v in kernel_times(fmt, b, n).items()})
