"""Where vertical_slash's host time goes at 32K (32 heads, D=128, bf16): host milliseconds per
call (no sync), then cProfile's Python functions and torch's CPU-side op table for one call.
An eager estimate is host-bound when this exceeds its GPU time (time-vertical-slash.py).

python3 scripts/profile-vertical-slash-host.py
"""
import cProfile, pstats, torch, time
import ferrokernels.sparse as sp
n, H, D = 32768, 32, 128
q, k = (torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3): sp.vertical_slash(q, k).tiles()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(10): sp.vertical_slash(q, k).tiles()
print("host per call", (time.perf_counter() - t0) / 10 * 1e3, "ms"); torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable()
for _ in range(10): sp.vertical_slash(q, k).tiles()
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    sp.vertical_slash(q, k).tiles()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
