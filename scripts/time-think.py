"""A decode step over a ThinK layer (kv.pruned_attention: kept key channels, full values, a few
new tokens) beside the decode kernel over the same tokens uncompressed: CUDA-graph time of
10 steps (launch overhead removed) and eager time per step.

python scripts/time-think.py   (32 q / 8 kv heads, D=128, bf16, key_ratio 0.5, 8 new tokens)
"""

import torch

import ferrokernels as fk
import ferrokernels.kv as kv
from ferrokernels.bench import time_graph_ms, time_ms

HQ, HK, D, NEW = 32, 8, 128, 8

for b, n in [(1, 8192), (1, 32768), (16, 8192)]:
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    k, v, q = rnd(b, n + NEW, HK, D), rnd(b, n + NEW, HK, D), rnd(b, 1, HQ, D)
    ch = torch.sort(torch.randperm(D, device="cuda")[: D // 2]).values.expand(b, HK, D // 2).contiguous()
    kc = torch.gather(k[:, :n], 3, ch[:, None].expand(b, n, HK, D // 2)).transpose(1, 2).contiguous()
    vc = v[:, :n].transpose(1, 2).contiguous()
    lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    kn, vn = k[:, n:].transpose(1, 2).contiguous(), v[:, n:].transpose(1, 2).contiguous()  # heads first
    think = lambda: kv.pruned_attention(q, kc, ch, vc, lens, k_new=kn, v_new=vn, new_before=NEW - 1)  # noqa: E731
    full_lens = torch.full((b,), n + NEW, dtype=torch.int32, device="cuda")
    full = lambda: fk.decode_attention(q, k, v, full_lens)  # noqa: E731
    row = {name: (time_graph_ms(fn) * 1e3, time_ms(lambda i: fn()) * 1e3) for name, fn in
           (("decode kernel, full cache", full), ("pruned_attention (ThinK 0.5)", think))}
    print(f"(b={b}, n={n}): " + "; ".join(f"{k_} graph {a:.1f} us, eager {e:.1f} us" for k_, (a, e) in row.items()))
