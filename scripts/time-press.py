"""Where a SnapKV press's time goes on the GPU: the window_scores kernel, the pooling, the
top-k + sort and the gather, each timed alone beside the prefill: GPU time (a CUDA graph of
10 calls, launch overhead removed) and eager time (CUDA events around one Python call).

python scripts/time-press.py   (32 q / 8 kv heads, D=128, bf16, window 64, ratio 0.5)
"""

import torch

import ferrokernels as fk
import ferrokernels.kv as kv
from ferrokernels.bench import time_graph_ms, time_ms

HQ, HK, D, W = 32, 8, 128, 64

for b, n in [(1, 8192), (1, 32768), (4, 8192)]:
    q = torch.randn(b, n, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, n, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lse = fk.attention(q, k, v, causal=True, return_lse=True)[1][..., n - W:].contiguous()
    win = q[:, n - W:]
    press = kv.SnapKV(0.5)
    kept = press.budget(n)
    t = {
        "prefill": time_ms(lambda i: fk.attention(q, k, v, causal=True), reps=10),
        "lse pass (window attention)": time_ms(lambda i: fk.attention(win, k, k[..., :8], causal=True, return_lse=True)),
        "lse pass (window_lse kernel)": time_ms(lambda i: kv._window_lse(win, k, D ** -0.5)),
        "window_scores kernel": time_ms(lambda i: kv.window_scores(k, win, lse)),
    }
    s = kv.window_scores(k, win, lse)[..., : n - W]
    t["avg_pool + pad"] = time_ms(lambda i: kv._pad_with_max(torch.nn.functional.avg_pool1d(s, 5, 1, 2), W))
    sc = press.score(k, v, win, lse=lse)
    t["topk + sort"] = time_ms(lambda i: kv._top(sc, kept))
    idx = kv._top(sc, kept)
    lens = torch.full(idx.shape[:2], kept, dtype=torch.int32, device="cuda")
    t["gather"] = time_ms(lambda i: kv._gather(k, v, idx, lens))
    t["whole press (lse given)"] = time_ms(lambda i: press(k, v, win, lse=lse))
    t["whole press (lse computed)"] = time_ms(lambda i: press(k, v, win))
    fns = {
        "window_scores kernel": lambda: kv.window_scores(k, win, lse),
        "avg_pool + pad": lambda: kv._pad_with_max(torch.nn.functional.avg_pool1d(s, 5, 1, 2), W),
        "topk + sort": lambda: kv._top(sc, kept),
        "gather": lambda: kv._gather(k, v, idx, lens),
        "whole press (lse given)": lambda: press(k, v, win, lse=lse),
        "lse pass (window_lse kernel)": lambda: kv._window_lse(win, k, D ** -0.5),
        "whole press (lse computed)": lambda: press(k, v, win),
    }
    g = {name: time_graph_ms(fn, calls=10, reps=10) for name, fn in fns.items()}
    print(f"(b={b}, n={n}):                    eager            GPU (graph)")
    for name, ms in t.items():
        gpu = f"{1000 * g[name]:9.1f} us {100 * g[name] / t['prefill']:6.2f}%" if name in g else ""
        print(f"  {name:30s} {1000 * ms:9.1f} us {100 * ms / t['prefill']:6.2f}%  {gpu}")
