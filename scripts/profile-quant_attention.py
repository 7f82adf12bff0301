"""One quant_attention workload (the kernel on prepared codes), warmed up, for `ncu`
(scripts/gpu-check profile with PROFILE=quant_attention): the launch to profile is the third.
Usage: profile-quant_attention.py D N CAUSAL"""

import sys

import torch

from ferrokernels.bench import load_bench_module

bench = load_bench_module("quant_attention")
d, n, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
b, h = max(1, 32768 // n), 2048 // d
call = bench.kernel_only(*bench.inputs(b, n, h, d, seed=0), causal)
for _ in range(3):
    call()
torch.cuda.synchronize()
