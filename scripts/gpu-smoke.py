"""One small attention call per kernel path and a few decode calls, synchronised, with its error: run under `timeout`
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
    # Decode: one split and many, contiguous and paged, GQA 4 and 8 with 1 and 5 new tokens.
    for batch, n, hq, q_len, page in ((4, 300, 16, 1, None), (1, 20000, 32, 1, None), (2, 4096, 32, 5, 16)):
        hk = 4
        q = torch.randn(batch, q_len, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, n, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
        kw, kc, vc = {}, k, v
        if page:
            kc, vc = k.view(-1, page, hk, 128), v.view(-1, page, hk, 128)
            kw["block_table"] = torch.arange(batch * n // page, dtype=torch.int32, device="cuda").view(batch, -1)
        o = fk.decode_attention(q, kc, vc, lens, **kw)
        torch.cuda.synchronize()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
            attn_mask=torch.ones(q_len, n, dtype=torch.bool, device="cuda").tril(n - q_len),
            enable_gqa=True).transpose(1, 2)
        err = ((o.double() - ref).norm() / ref.norm()).item()
        print(f"smoke decode b={batch} n={n} hq={hq} q_len={q_len} page={page}: rel err {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
