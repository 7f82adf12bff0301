"""Sparse decode (Quest page selection) against full decode, CUDA-graph timings (launch overhead
removed): python3 scripts/time-sparse-decode.py. 32 q heads, 8 kv heads, D=128, pages of 16."""

import torch, ferrokernels as fk, ferrokernels.sparse as sp
from ferrokernels.bench import time_graph_ms
for b, n in ((1, 32768), (16, 8192)):
    ps, hk, hq, d = 16, 8, 32, 128
    mp = n // ps
    kc = torch.randn(b * mp, ps, hk, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.arange(b * mp, device="cuda", dtype=torch.int32).view(b, mp)
    lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    summ = sp.page_summaries(kc)
    full = time_graph_ms(lambda: fk.decode_attention(q, kc, vc, lens, block_table=table, validate=False))
    for budget in (1024, 2048, 4096):
        sel = time_graph_ms(lambda: sp.select_pages(q, summ, lens, table, ps, budget))
        t, nl = sp.select_pages(q, summ, lens, table, ps, budget)
        dec = time_graph_ms(lambda: fk.decode_attention(q, kc, vc, nl, block_table=t, validate=False))
        print(f"b={b} n={n} budget={budget}: full decode {full*1e3:.1f} us, selected decode {dec*1e3:.1f} us, selection {sel*1e3:.1f} us")
