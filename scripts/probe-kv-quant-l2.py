"""Is the quantized decode limited by memory or by the SM? The same kernel with its cache
resident in L2 (one copy of a 1K-token cache, re-read by every call) against a streamed 8K one:
python scripts/probe-kv-quant-l2.py  (batch 16, 32 q / 8 kv heads, D=128, bf16 q)."""
import torch

import ferrokernels as fk
from ferrokernels import kv_quant
from ferrokernels.bench import graph_copies, rotating, time_graph_ms

b, hq, hk, d = 16, 32, 8, 128
for n in (1024, 8192):
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, n, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    base = time_graph_ms(lambda: fk.decode_attention(q, k, v, lens, validate=False))
    line = f"n={n:5d} bf16 {base * 1e3:7.1f} us ({base * 1e3 / (b * n / 1e6):6.1f} us/Mkey)"
    for fmt in ("int8", "int4"):
        cache = kv_quant.QuantizedKV(b, hk, d, n, format=fmt, dtype=torch.bfloat16, device="cuda")
        cache.append(k, v)
        copies = 1 if n == 1024 else graph_copies(cache.nbytes())
        cs = [cache] + [cache for _ in range(copies - 1)]
        ms = time_graph_ms(rotating(lambda i: (lambda c=cs[i]: c.decode(q, validate=False)), len(cs)))
        line += f" | {fmt} {ms * 1e3:7.1f} us ({ms * 1e3 / (b * n / 1e6):6.1f} us/Mkey)"
    print(line + ("  [L2-resident]" if n == 1024 else "  [streamed]"))
