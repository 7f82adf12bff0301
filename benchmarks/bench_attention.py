"""Dense attention forward: ferrokernels vs torch SDPA (FLASH_ATTENTION and CUDNN_ATTENTION
backends) and compiled flex_attention, in one process.

Workloads: batch * seqlen = 32K tokens, heads * head_dim = 2048, seqlen in {1K, 4K, 16K},
head_dim in {64, 128, 256}, causal and not, bf16. Each impl gets its native layout
(ours (b, n, h, d), torch's (b, h, n, d)), contiguous.
TFLOP/s counts 4 * b * h * n^2 * d (two matmuls), halved for causal.
rel_err: ||out - ref|| / ||ref|| on batch 0, heads 0-1, against float64.

Varlen (bench "attention_varlen"): 64 sequences of random length 128-4096 packed, 16 heads,
D=128; TFLOP/s counts each sequence's own n^2. Beside it the dense kernel on the same number
of tokens at the mean length (impl "ferrokernels-dense"), the figure varlen should stay within
10% of.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ferrokernels as fk
from ferrokernels.bench import time_ms
from ferrokernels.runtime import progress_bar

N_INPUTS = 2


def flex_peer():
    """Compiled flex_attention, or None where this torch has none."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    import torch._dynamo

    # One compiled kernel per workload shape: lift the recompile cap so none falls back to the
    # unfused eager path.
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(flex_attention, dynamic=False)

    def make(n, causal):
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, n, n, device="cuda")
        return lambda q, k, v: compiled(q, k, v, block_mask=mask)

    return make


def ref_slice(q, k, v, causal):
    """float64 output of batch 0, heads 0..1 in (n, h, d) layout, in query chunks."""
    qs, ks, vs = (x[0, :, :2].double() for x in (q, k, v))
    n, d = qs.shape[0], qs.shape[2]
    out = torch.empty_like(qs)
    for s in range(0, n, 1024):
        sc = torch.einsum("qhd,khd->hqk", qs[s:s + 1024], ks) / math.sqrt(d)
        if causal:
            i = torch.arange(s, min(s + 1024, n), device=q.device)[:, None]
            sc = sc.masked_fill(torch.arange(n, device=q.device)[None] > i, float("-inf"))
        out[s:s + 1024] = torch.einsum("hqk,khd->qhd", torch.softmax(sc, -1), vs)
    return out


def rel_err(out_nhd, ref):
    o = out_nhd[0, :, :2].double()
    return ((o - ref).norm() / ref.norm()).item()


def run(quick: bool = False):
    records = []
    flex = flex_peer()
    seqlens = [1024, 4096] if quick else [1024, 4096, 16384]
    dims = [64, 128] if quick else [64, 128, 256]
    for d in dims:
        for n in progress_bar(seqlens, f"attention d={d}"):
            b, h = 32768 // n, 2048 // d
            sets = [tuple(torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                    for _ in range(N_INPUTS)]
            torch_sets = [tuple(x.transpose(1, 2).contiguous() for x in s) for s in sets]
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                params = {"batch": b, "heads": h, "seqlen": n, "head_dim": d, "causal": causal, "dtype": "bfloat16"}
                ref = ref_slice(*sets[0], causal)
                impls = {"ferrokernels": lambda i: fk.attention(*sets[i], causal=causal)}
                for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def call(i, backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(*torch_sets[i], is_causal=causal)
                    impls[label] = call
                if flex is not None:
                    flex_fn = flex(n, causal)
                    impls["flex"] = lambda i, f=flex_fn: f(*torch_sets[i])
                for label, fn in impls.items():
                    try:
                        out = fn(0)
                        if label != "ferrokernels":
                            out = out.transpose(1, 2)
                        err = rel_err(out, ref)
                        ms = time_ms(fn, N_INPUTS)
                    except Exception as e:  # a peer that cannot run a shape is reported, not fatal
                        print(f"  {label} failed on {params}: {str(e).splitlines()[0]}")
                        continue
                    tflops = flops / ms / 1e9
                    records.append({"bench": "attention", "impl": label, "params": params, "ms": round(ms, 4),
                                    "tflops": round(tflops, 1), "gbps": None, "rel_err": float(f"{err:.3g}")})
                    print(f"  d={d:3d} n={n:5d} causal={causal!s:5} {label:13s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s err {err:.1e}")
            del sets, torch_sets
            torch.cuda.empty_cache()
    records += run_varlen()
    return records


def run_varlen(n_seqs=64, lo=128, hi=4096, h=16, d=128):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (n_seqs,), generator=g)
    total, mean = int(lens.sum()), int(lens.float().mean())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).cuda()
    sets = [tuple(torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for _ in range(N_INPUTS)]
    b = total // mean
    dense = [tuple(x[: b * mean].view(b, mean, h, d) for x in s) for s in sets]
    records = []
    for causal in (False, True):
        div = 2 if causal else 1
        flops = sum(4 * h * int(n) ** 2 * d for n in lens) / div
        dense_flops = 4 * b * h * mean * mean * d / div
        params = {"seqs": n_seqs, "lengths": f"{lo}-{hi}", "heads": h, "head_dim": d, "causal": causal,
                  "dtype": "bfloat16"}
        runs = {
            "ferrokernels": (lambda i: fk.attention_varlen(*sets[i], cu, cu, int(lens.max()), int(lens.max()),
                                                           causal=causal), flops),
            "ferrokernels-dense": (lambda i: fk.attention(*dense[i], causal=causal), dense_flops),
        }
        for label, (fn, fl) in runs.items():
            ms = time_ms(fn, N_INPUTS)
            tflops = fl / ms / 1e9
            records.append({"bench": "attention_varlen", "impl": label, "params": params, "ms": round(ms, 4),
                            "tflops": round(tflops, 1), "gbps": None, "rel_err": None})
            print(f"  varlen causal={causal!s:5} {label:19s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s")
    return records
