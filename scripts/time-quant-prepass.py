"""Times quant_attention's GPU pre-pass (CUDA events, median) against the bytes it must move."""
import torch

from ferrokernels.bench import time_ms
from ferrokernels.quant_attention import prepare

for n, hq, hk in ((32768, 32, 8), (8192, 32, 8), (8192, 32, 32)):
    q = torch.randn(1, n, hq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda i: prepare(q, k, v, scale=0.088, smooth_v=True))
    # Q read twice (stats, codes), K and V twice; codes written once (1 byte per element).
    moved = q.numel() * (2 * 2 + 1) + 2 * k.numel() * (2 * 2 + 1)
    print(f"N={n} heads {hq}q/{hk}kv: {ms * 1e3:.1f} us, {moved / ms / 1e6:.0f} GB/s")
