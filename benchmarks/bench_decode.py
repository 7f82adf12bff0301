"""Decode attention: one new token per sequence against a bf16 KV cache, ferrokernels vs torch
SDPA (FLASH_ATTENTION and CUDNN_ATTENTION backends) in one process.

Workloads: D=128, heads 32q/8kv and 64q/8kv, (batch, length) in {(1, 32K), (1, 128K), (16, 8K),
(64, 4K), (256, 1K)}; ours on the contiguous cache and on paged caches (pages of 16 and 128,
shuffled in the pool), the peers on the contiguous cache in their (b, h, n, d) layout with
`enable_gqa=True` (K/V expanded over the group where a backend refuses it: they then read more
bytes than the GB/s column credits).
Each call is timed inside a CUDA graph of 10 calls (launch overhead excluded, as in a
generation loop). GB/s = K and V bytes of the cache ÷ time; the ceiling is the device copy
measured in the same run (`ceilings.copy_gbps`).
rel_err: ||out - ref|| / ||ref|| against float64 on batch 0.

append_kv (bench "append_kv"): 16 sequences x 8K new tokens, 8 kv heads, D=128, bf16, into a
contiguous and a paged (16) cache, with and without rotary; GB/s counts bytes read + written,
against the same copy ceiling.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ferrokernels as fk
from ferrokernels.bench import time_graph_ms
from ferrokernels.runtime import progress_bar

D = 128
HEADS = [(32, 8), (64, 8)]
SHAPES = [(1, 32768), (1, 131072), (16, 8192), (64, 4096), (256, 1024)]
QUICK_SHAPES = [(1, 32768), (16, 8192), (256, 1024)]
PAGES = [16, 128]


def paged(k, v, page):
    """The cache as shuffled pages plus a block table."""
    b, n, hk, d = k.shape
    per_seq = n // page
    perm = torch.randperm(b * per_seq, device=k.device)
    pool_k = torch.empty(b * per_seq, page, hk, d, device=k.device, dtype=k.dtype)
    pool_v = torch.empty_like(pool_k)
    pool_k[perm] = k.reshape(b * per_seq, page, hk, d)
    pool_v[perm] = v.reshape(b * per_seq, page, hk, d)
    return pool_k, pool_v, perm.view(b, per_seq).to(torch.int32)


def ref_out(q, k, v):
    """float64 output of sequence 0, (1, hq, d)."""
    hq, hk = q.shape[2], k.shape[2]
    qq = q[0, 0].double()
    kk = k[0].double().repeat_interleave(hq // hk, dim=1)
    vv = v[0].double().repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("hd,nhd->hn", qq, kk) / math.sqrt(q.shape[-1])
    return torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv)


def rel_err(out, ref):
    o = out[0, 0].double()
    return ((o - ref).norm() / ref.norm()).item()


def run_append(batch=16, n=8192, hk=8):
    records = []
    kn, vn = (torch.randn(batch, n, hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = torch.empty_like(kn), torch.empty_like(vn)
    zeros = torch.zeros(batch, dtype=torch.int32, device="cuda")
    pk, pv, table = paged(kc, vc, 16)
    ang = torch.arange(n, device="cuda", dtype=torch.float32)[:, None] * torch.rand(1, D // 2, device="cuda")
    rot = (ang.cos(), ang.sin())
    moved = 4 * kn.numel() * kn.element_size()  # K and V, read and written
    params = {"batch": batch, "n_new": n, "heads_kv": hk, "head_dim": D, "dtype": "bfloat16"}
    runs = {
        "ferrokernels": lambda: fk.append_kv(kn, vn, kc, vc, zeros, validate=False),
        "ferrokernels-paged16": lambda: fk.append_kv(kn, vn, pk, pv, zeros, table, validate=False),
        "ferrokernels-rotary": lambda: fk.append_kv(kn, vn, kc, vc, zeros, rotary=rot, validate=False),
        "torch-copy": lambda: (kc.copy_(kn), vc.copy_(vn)),
    }
    for label, fn in runs.items():
        ms = time_graph_ms(fn, calls=3, reps=10)
        gbps = moved / ms / 1e6
        records.append({"bench": "append_kv", "impl": label, "params": params, "ms": round(ms, 4),
                        "tflops": None, "gbps": round(gbps, 1), "rel_err": None})
        print(f"  append_kv {label:22s} {ms * 1000:8.1f} us {gbps:7.0f} GB/s")
    return records


def run(quick: bool = False):
    records = run_append()
    for hq, hk in HEADS:
        for batch, n in progress_bar(QUICK_SHAPES if quick else SHAPES, f"decode {hq}q/{hk}kv"):
            q = torch.randn(batch, 1, hq, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, n, hk, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            seqlens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
            kv_bytes = 2 * k.numel() * k.element_size()
            ref = ref_out(q, k, v)
            params = {"batch": batch, "seqlen": n, "heads_q": hq, "heads_kv": hk, "head_dim": D, "dtype": "bfloat16"}
            impls = {"ferrokernels": lambda: fk.decode_attention(q, k, v, seqlens, validate=False)}
            for page in PAGES:
                pk, pv, table = paged(k, v, page)
                impls[f"ferrokernels-paged{page}"] = (
                    lambda pk=pk, pv=pv, table=table: fk.decode_attention(q, pk, pv, seqlens, block_table=table, validate=False))
            tq, tk, tv = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def gqa(backend=backend):
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True).transpose(1, 2)
                impls[label] = gqa
            for label, fn in impls.items():
                try:
                    err = rel_err(fn(), ref)
                    ms = time_graph_ms(fn)
                except Exception as e:  # a peer that cannot run a shape is reported, not fatal
                    print(f"  {label} failed on {params}: {str(e).splitlines()[0]}")
                    continue
                gbps = kv_bytes / ms / 1e6
                records.append({"bench": "decode", "impl": label, "params": params, "ms": round(ms, 5),
                                "tflops": None, "gbps": round(gbps, 1), "rel_err": float(f"{err:.3g}")})
                print(f"  hq={hq} b={batch:3d} n={n:6d} {label:22s} {ms * 1000:8.1f} us {gbps:7.0f} GB/s err {err:.1e}")
            del q, k, v, tk, tv, impls
            torch.cuda.empty_cache()
    return records
