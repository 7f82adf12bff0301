"""KV-cache presses: the time one layer's press takes after prefill, against that layer's
prefill attention (our causal kernel) in the same process: the issue's bound is <= 5%.

Workloads: batch 1 and 4, N in {8K, 32K}, 32 query heads over 8 kv heads, head_dim 128, bf16;
presses at ratio 0.5 (kvpress's defaults otherwise). The queries a press reads are the last
window's (64; 32 for ThinK); ObservedAttention reads all of them (H2O needs every query's
attention). `overhead` = press / prefill attention of the layer; `gpu_overhead` the same for
the press's GPU time alone (a CUDA graph of 10 calls: no Python launch cost; not for AdaKV and
DuoAttention, which read lengths on the host); `released` = the fraction of the layer's K/V
bytes the compressed tensors no longer hold. Attention-based presses are
timed twice: `lse: "prefill"` takes the queries' LSE from the prefill's attention (what
hf.CompressedCache does), `lse: "computed"` pays one attention pass of the window for it.

Quantized KV (records with `params.op == "decode"`): one new token per sequence against a
cache of (batch, seqlen) in {(1, 32K), (16, 8K), (1, 128K)}, 32 q / 8 kv heads, D=128, bf16 q;
ours on the bf16 cache (`ferrokernels-bf16`, the decode kernel) and on int8 / fp8 / int4 / int2
caches (group 32, ring of 128 + 32 tokens for KIVI). CUDA-graph timing of 10 calls, rotating
over copies of the cache so ~200 MB stream per graph (a 17 MB int4 cache would otherwise be
served from L2). GB/s = bytes the kernel must read (codes + scales + ring) / time; `speedup` =
bf16 time / this time; rel_err against float64 attention over the *unquantized* cache.
"""

from __future__ import annotations

import torch

import copy
import math

import ferrokernels as fk
import ferrokernels.kv as kv
from ferrokernels import kv_quant
from ferrokernels.bench import graph_copies, rotating, time_graph_ms, time_ms
from ferrokernels.runtime import progress_bar

HQ, HK, D = 32, 8, 128
HOST_SYNC = ("adakv-snapkv", "duo_attention")  # presses that read per-head lengths on the host


def presses():
    return [("streaming_llm", kv.StreamingLLM(0.5)), ("knorm", kv.Knorm(0.5)), ("snapkv", kv.SnapKV(0.5)),
            ("pyramidkv", kv.PyramidKV(0.5)), ("tova", kv.TOVA(0.5)), ("adakv-snapkv", kv.AdaKV(kv.SnapKV(0.5))),
            ("duo_attention", kv.DuoAttention(0.5)), ("kvmerge-snapkv", kv.KVMerge(kv.SnapKV(0.5))),
            ("think", kv.ThinK(0.5)), ("observed_attention", kv.ObservedAttention(0.5))]


def run(quick: bool = False):
    return run_quantized(quick) + run_presses(quick)


def run_presses(quick: bool = False):
    records = []
    shapes = [(1, 8192), (1, 32768), (4, 8192)] if not quick else [(1, 8192), (1, 32768)]
    for b, n in progress_bar(shapes, "kv"):
        q = torch.randn(b, n, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, n, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        prefill = time_ms(lambda i: fk.attention(q, k, v, causal=True), 1, reps=10)
        lse_all = fk.attention(q, k, v, causal=True, return_lse=True)[1]
        print(f"  b={b} n={n:6d} prefill attention {prefill:8.3f} ms")
        for (name, press), lse in [(p, lse) for p in presses() for lse in ("prefill", "computed")]:
            if name == "observed_attention" and n * b > 32768:
                continue
            queries = q if name == "observed_attention" else q[:, -(32 if name == "think" else 64):]
            if not getattr(press, "needs_queries", False) or name == "think":
                if lse == "computed":
                    continue
                lse = None
            given = lse_all[..., n - queries.shape[1]:] if lse == "prefill" else None
            fn = (lambda i: press(k, v, queries)) if name == "think" else (lambda i: press(k, v, queries, lse=given))
            try:
                ms = time_ms(fn, 1, warmup=2, reps=10)
                # GPU time without the Python that launches it (a graph of 10 calls); AdaKV and
                # DuoAttention read per-head lengths on the host, so they cannot be captured.
                gpu = None if name in HOST_SYNC else time_graph_ms(lambda: fn(0), calls=10, reps=10)
            except Exception as e:  # noqa: BLE001 - a press that cannot run a shape is reported
                print(f"  {name} failed: {str(e).splitlines()[0][:200]}")
                continue
            out = fn(0)
            held = (out[1].keys.numel() * out[1].keys.element_size() + v.numel() * v.element_size()
                    if name == "think" else out.keys.numel() * out.keys.element_size()
                    + out.values.numel() * out.values.element_size())
            released = 1 - held / (2 * k.numel() * k.element_size())
            params = {"batch": b, "seqlen": n, "heads_q": HQ, "heads_kv": HK, "head_dim": D, "press": name, "ratio": 0.5}
            if lse is not None:
                params["lse"] = lse
            records.append({"bench": "kv", "impl": "ferrokernels", "params": params, "ms": round(ms, 4), "tflops": None,
                            "gbps": None, "rel_err": None, "overhead": round(ms / prefill, 4),
                            "gpu_ms": None if gpu is None else round(gpu, 4),
                            "gpu_overhead": None if gpu is None else round(gpu / prefill, 4),
                            "released": round(released, 3), "prefill_ms": round(prefill, 4)})
            gpu_txt = "" if gpu is None else f"  GPU {1000 * gpu:7.1f} us ({100 * gpu / prefill:5.2f}%)"
            print(f"  b={b} n={n:6d} {name:20s} {lse or '':8s} {ms:8.3f} ms  overhead {100 * ms / prefill:6.2f}%{gpu_txt}  "
                  f"released {100 * released:5.1f}%")
        del q, k, v
        torch.cuda.empty_cache()
    return records


def _clone(cache):
    c = copy.copy(cache)
    for name in ("k_codes", "v_codes", "k_meta", "v_meta", "k_res", "v_res", "seqlens", "quant_lens"):
        t = getattr(cache, name)
        setattr(c, name, None if t is None else t.clone())
    return c


def _ref(q, k, v):
    """float64 output of sequence 0, (hq, d)."""
    hq, hk = q.shape[2], k.shape[2]
    kk = k[0].double().repeat_interleave(hq // hk, dim=1)
    vv = v[0].double().repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("hd,nhd->hn", q[0, 0].double(), kk) / math.sqrt(q.shape[-1])
    return torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv)


def run_quantized(quick: bool = False):
    records = []
    shapes = [(1, 32768), (16, 8192)] + ([] if quick else [(1, 131072)])
    for b, n in progress_bar(shapes, "kv decode"):
        q = torch.randn(b, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, n, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.full((b,), n, dtype=torch.int32, device="cuda")
        ref = _ref(q, k, v)
        params = {"op": "decode", "batch": b, "seqlen": n, "heads_q": HQ, "heads_kv": HK, "head_dim": D,
                  "dtype": "bfloat16"}
        dense_bytes = 2 * k.numel() * k.element_size()
        base = time_graph_ms(lambda: fk.decode_attention(q, k, v, seqlens, validate=False))
        err = ((fk.decode_attention(q, k, v, seqlens)[0, 0].double() - ref).norm() / ref.norm()).item()
        records.append({"bench": "kv", "impl": "ferrokernels-bf16", "params": params, "ms": round(base, 5),
                        "tflops": None, "gbps": round(dense_bytes / base / 1e6, 1), "rel_err": float(f"{err:.3g}"),
                        "speedup": 1.0})
        print(f"  b={b:2d} n={n:6d} bf16 {base * 1000:8.1f} us {dense_bytes / base / 1e6:6.0f} GB/s")
        for fmt in kv_quant.FORMATS:
            cache = kv_quant.QuantizedKV(b, HK, D, n, format=fmt, group_size=32, residual=128, dtype=torch.bfloat16,
                                         device="cuda")
            cache.append(k, v)
            nbytes = cache.nbytes()
            copies = [cache] + [_clone(cache) for _ in range(graph_copies(nbytes) - 1)]
            fn = rotating(lambda i: (lambda c=copies[i]: c.decode(q, validate=False)), len(copies))
            ms = time_graph_ms(fn)
            err = ((cache.decode(q)[0, 0].double() - ref).norm() / ref.norm()).item()
            records.append({"bench": "kv", "impl": f"ferrokernels-{fmt}", "params": params, "ms": round(ms, 5),
                            "tflops": None, "gbps": round(nbytes / ms / 1e6, 1), "rel_err": float(f"{err:.3g}"),
                            "speedup": round(base / ms, 3)})
            print(f"  b={b:2d} n={n:6d} {fmt:5s} {ms * 1000:8.1f} us {nbytes / ms / 1e6:6.0f} GB/s  "
                  f"{base / ms:5.2f}x  err {err:.2e}")
            del copies, cache, fn
        del q, k, v
        torch.cuda.empty_cache()
    return records
