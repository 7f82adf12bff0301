"""Quantized attention (INT8 Q·Kᵀ, FP8 P̃·V): ferrokernels.quant_attention vs bf16 attention
(torch SDPA's cuDNN and flash backends, our own dense kernel) and SageAttention (the Triton
1.0.6 release), in one process.

Workloads: the dense bench's (batch * seqlen = 32K tokens, heads * head_dim = 2048) plus
seqlen 32K, head_dim 64 and 128, causal and not; bf16 inputs shaped like LLM activations (K with
a per-channel mean and outlier channels). TFLOP/s counts the bf16 operations,
4 * b * h * n^2 * d, halved for causal, so the figures compare directly with the dense bench.
Our time includes the quantization pre-pass; impl "ferrokernels-kernel" is the attention
kernel alone, on codes prepared outside the timing. "ferrokernels-fp8" is fp8_attention on
inputs already in e4m3 with per-head descales (FlashAttention-3's FP8 interface; unsmoothed
codes, so its accuracy on these keys is lower). "ferrokernels-fp8x2" is quant_attention with
pv="fp8x2" (V as two e4m3 terms: a second P̃·V GEMM for 3 more bits of V).

Varlen (bench "quant_attention_varlen"): 64 packed sequences of 128-4096 tokens, 16 heads, D=128,
quant_attention_varlen against our bf16 attention_varlen.

Accuracy on batch 0, heads 0-1 against float64 attention: `rel_err`, `cos` (cosine
similarity) and `l1` (relative L1, sum |out - ref| / sum |ref|).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ferrokernels as fk
from ferrokernels import _native
from ferrokernels._runtime import stream_of
from ferrokernels.bench import load_bench_module, time_ms
from ferrokernels.quant_attention import fp8_attention, fp8_quantize, prepare
from ferrokernels.runtime import progress_bar

N_INPUTS = 2


def sage_peer():
    try:
        from sageattention import sageattn
    except Exception:  # noqa: BLE001 - a peer that is missing or fails to import is skipped
        return None
    return sageattn


def llm_like(b, n, h, d, mean, outliers, spread, g):
    x = torch.randn(b, n, h, d, device="cuda", generator=g)
    mu = torch.randn(1, 1, h, d, device="cuda", generator=g) * mean
    idx = torch.randperm(d, device="cuda", generator=g)[:outliers]
    mu[..., idx] *= 10
    x[..., idx] *= spread
    return (x + mu).to(torch.bfloat16)


def inputs(b, n, h, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = llm_like(b, n, h, d, 0.5, 2, 2, g)
    k = llm_like(b, n, h, d, 2.0, 4, 3, g)
    v = torch.randn(b, n, h, d, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v


def accuracy(out_nhd, ref):
    o = out_nhd[0, :, :2].double().flatten()
    r = ref.flatten()
    rel = ((o - r).norm() / r.norm()).item()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    l1 = ((o - r).abs().sum() / r.abs().sum()).item()
    return rel, cos, l1


def kernel_only(q, k, v, causal, pv="fp8"):
    """The attention kernel on codes prepared once (the pre-pass outside the timing)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    c = prepare(q, k, v, scale=scale, v_residual=pv == "fp8x2")
    out = torch.empty_like(q)
    ws = torch.empty(1, dtype=torch.int32, device=q.device)

    def call():
        _native.quant_attention_fwd(c["q"], c["k"], c["v"], c["q_scale"], c["k_scale"], c["channels"], out,
                                    v_lo=c.get("v_lo"), causal=causal, workspace=ws, stream=stream_of(q))
        return out
    return call


def run(quick: bool = False):
    ref_slice = load_bench_module("attention").ref_slice
    sage = sage_peer()
    records = []
    seqlens = [4096, 16384] if quick else [1024, 4096, 16384, 32768]
    for d in (64, 128):
        for n in progress_bar(seqlens, f"quant_attention d={d}"):
            b, h = max(1, 32768 // n), 2048 // d
            sets = [inputs(b, n, h, d, seed=i) for i in range(N_INPUTS)]
            torch_sets = [tuple(x.transpose(1, 2).contiguous() for x in s) for s in sets]
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                params = {"batch": b, "heads": h, "seqlen": n, "head_dim": d, "causal": causal, "dtype": "bfloat16"}
                ref = ref_slice(*sets[0], causal)
                kernels = [kernel_only(*s, causal) for s in sets]
                fp8_sets = [[t for x in s for t in fp8_quantize(x)] for s in sets]
                impls = {
                    "ferrokernels": (lambda i: fk.quant_attention(*sets[i], causal=causal), True),
                    "ferrokernels-kernel": (lambda i: kernels[i](), True),
                    "ferrokernels-fp8x2": (lambda i: fk.quant_attention(*sets[i], causal=causal, pv="fp8x2"), True),
                    "ferrokernels-bf16": (lambda i: fk.attention(*sets[i], causal=causal), True),
                    "ferrokernels-fp8": (lambda i: fp8_attention(*fp8_sets[i][0::2], *fp8_sets[i][1::2], causal=causal),
                                         True),
                }
                for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                       ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def call(i, backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(*torch_sets[i], is_causal=causal)
                    impls[label] = (call, False)
                if sage is not None:
                    impls["sageattention"] = (lambda i: sage(*torch_sets[i], tensor_layout="HND", is_causal=causal),
                                              False)
                for label, (fn, ours_layout) in impls.items():
                    try:
                        out = fn(0)
                        rel, cos, l1 = accuracy(out if ours_layout else out.transpose(1, 2), ref)
                        ms = time_ms(fn, N_INPUTS)
                    except Exception as e:  # noqa: BLE001 - a peer that cannot run a shape is reported
                        print(f"  {label} failed on {params}: {str(e).splitlines()[0]}")
                        continue
                    tflops = flops / ms / 1e9
                    records.append({"bench": "quant_attention", "impl": label, "params": params, "ms": round(ms, 4),
                                    "tflops": round(tflops, 1), "gbps": None, "rel_err": float(f"{rel:.3g}"),
                                    "cos": round(cos, 6), "l1": float(f"{l1:.3g}")})
                    print(f"  d={d:3d} n={n:5d} causal={causal!s:5} {label:19s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s "
                          f"cos {cos:.5f} l1 {l1:.3f}")
            del sets, torch_sets, kernels, fp8_sets
            torch.cuda.empty_cache()
    return records + run_varlen()


def run_varlen(n_seqs=64, lo=128, hi=4096, h=16, d=128):
    """Packed sequences (the dense bench's varlen workload): quant_attention_varlen against our
    bf16 attention_varlen; TFLOP/s from each sequence's own n^2."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (n_seqs,), generator=g)
    total = int(lens.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).cuda()
    sets = [tuple(x[0] for x in inputs(1, total, h, d, seed=i)) for i in range(N_INPUTS)]
    mx = int(lens.max())
    records = []
    for causal in (False, True):
        flops = sum(4 * h * int(n) ** 2 * d for n in lens) / (2 if causal else 1)
        params = {"seqs": n_seqs, "lengths": f"{lo}-{hi}", "heads": h, "head_dim": d, "causal": causal,
                  "dtype": "bfloat16"}
        runs = {"ferrokernels": lambda i: fk.quant_attention_varlen(*sets[i], cu, cu, mx, mx, causal=causal),
                "ferrokernels-bf16": lambda i: fk.attention_varlen(*sets[i], cu, cu, mx, mx, causal=causal)}
        for label, fn in runs.items():
            ms = time_ms(fn, N_INPUTS)
            records.append({"bench": "quant_attention_varlen", "impl": label, "params": params, "ms": round(ms, 4),
                            "tflops": round(flops / ms / 1e9, 1), "gbps": None, "rel_err": None})
            print(f"  varlen causal={causal!s:5} {label:19s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
    return records
