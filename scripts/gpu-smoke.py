"""One small attention call per kernel path, synchronised, with its error: run under `timeout`
by scripts/gpu-check before the test suite, so a hanging kernel costs seconds, not the call."""

import math
import os

import torch

import ferrokernels as fk


def main():
    torch.manual_seed(0)
    for path in ("sm80", "auto"):
        os.environ["FERROKERNELS_ATTENTION_PATH"] = path
        for d, causal in ((128, False), (128, True), (64, True), (256, False)):
            q, k, v = (torch.randn(2, 300, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            o = fk.attention(q, k, v, causal=causal)
            torch.cuda.synchronize()
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                is_causal=causal, scale=1 / math.sqrt(d)).transpose(1, 2)
            err = ((o.double() - ref).norm() / ref.norm()).item()
            print(f"smoke path={path:4s} d={d} causal={causal}: rel err {err:.2e}", flush=True)
    os.environ.pop("FERROKERNELS_ATTENTION_PATH")


if __name__ == "__main__":
    main()
