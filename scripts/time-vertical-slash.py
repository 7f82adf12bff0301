"""vertical_slash at one size: the online estimate (last-64 attention, top-k, the mask), the
kernel's lists, the column gather, and the sparse kernel, against our dense causal kernel.
python3 scripts/time-vertical-slash.py [N] [VERTICAL] [SLASH] (default 32768 1000 6096; 32
heads, D=128, bf16; the bench's structured inputs, or random ones with a trailing --random)."""

import sys

import torch

import ferrokernels as fk
import ferrokernels.sparse as sp
from ferrokernels.bench import time_graph_ms, time_ms

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
nv = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
ns = int(sys.argv[3]) if len(sys.argv) > 3 else 6096
sys.path.insert(0, "benchmarks")
from bench_sparse import structured  # noqa: E402

q, k, v = structured(n) if "--random" not in sys.argv else (torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
est = time_ms(lambda i: sp.vertical_slash(q, k, vertical_size=nv, slash_size=ns), 1, reps=10)
# GPU time alone (the estimate has no host sync, so a CUDA graph captures it): what it adds to
# a prefill that keeps the GPU busy, where the eager figure also counts Python and launches.
est_gpu = time_graph_ms(lambda: sp.vertical_slash(q, k, vertical_size=nv, slash_size=ns), calls=1, reps=10)
bm = sp.vertical_slash(q, k, vertical_size=nv, slash_size=ns)
lists = time_ms(lambda i: sp.vertical_slash(q, k, vertical_size=nv, slash_size=ns).tiles(), 1, reps=10) - est
gather = time_ms(lambda i: bm.gather_columns(k, v, 32), 1, reps=10)
bm.tiles()
kern = time_ms(lambda i: fk.sparse_attention(q, k, v, bm), 1, reps=10)
dense = time_ms(lambda i: fk.attention(q, k, v, causal=True), 1, reps=10)
count = bm.tiles()[0]
walked = float(count.float().sum()) / (count.numel() * -(-n // 128))
print(f"n={n} v={nv} s={ns}: tiles walked {walked:.3f} of all, estimate {est:.2f} ms (GPU {est_gpu:.2f} ms, "
      f"{est_gpu / kern:.1%} of the kernel), lists {lists:.2f} ms, "
      f"gather {gather:.2f} ms, kernel (with gather) {kern:.2f} ms, dense causal {dense:.2f} ms; "
      f"vs_dense {kern / (walked * 2 * dense):.2f}, speed-up {dense / (kern + est + lists):.2f}x end to end")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    sp.vertical_slash(q, k, vertical_size=nv, slash_size=ns).tiles()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="device_time_total", row_limit=10))
