"""Low-bit GEMM: ferrokernels formats vs bf16 cuBLAS (torch.matmul), tinygemm
(torch._weight_int4pack_mm), FP8 torch._scaled_mm and torch._int_mm, in one process.

Shapes (N x K): 8192x8192, 28672x8192, 8192x28672, 4096x4096; M in {1, 2, 4, ..., 4096}.
Each call is timed inside a CUDA graph of 10 calls (launch overhead excluded), the calls rotating
over enough copies of the weight (up to 10) that it is not served from the 50 MB L2 of an H100
(a model's next layer would have evicted it); TFLOP/s counts
2 * M * N * K. rel_err: ||out - ref|| / ||ref|| against the float32 product of the same
(dequantized) weights (for W8A8 it includes the activations' quantization error). A format whose
CUDA kernel is not written yet is reported and skipped.
"""

from __future__ import annotations

import torch

import ferrokernels as fk
from ferrokernels.bench import graph_copies, rotating, time_graph_ms
from ferrokernels.runtime import progress_bar

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_SHAPES = [(8192, 8192)]
QUICK_MS = [1, 16, 64, 1024]
GROUP = 128


def ours(w):
    """ferrokernels formats of the bf16 weight w (N, K)."""
    formats = {
        "ferrokernels-w4a16": fk.gemm.quantize(w, bits=4, group_size=GROUP),
        "ferrokernels-w8a16": fk.gemm.quantize(w, bits=8, group_size=-1),
    }
    # W8A8 runs its kernel on Hopper only; elsewhere linear() dequantizes per call, which says
    # nothing about the format's speed.
    if torch.cuda.get_device_capability() == (9, 0):
        formats["ferrokernels-w8a8-fp8"] = fk.gemm.quantize_w8a8(w, "fp8")
        formats["ferrokernels-w8a8-int8"] = fk.gemm.quantize_w8a8(w, "int8")
    return formats


def tinygemm(w):
    """torch's int4 weight-only kernel with the same group size, or None where unavailable."""
    qw = fk.gemm.quantize(w, bits=4, group_size=GROUP, sym=False)
    codes = fk.gemm.unpack_int4(qw.qweight).to(torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack(((codes[:, 1::2] << 4) | codes[:, 0::2]).to(torch.uint8), 8)
    except Exception:  # the packing API differs across torch versions
        return None
    s = qw.scales.to(torch.bfloat16)
    zeros = (8 - qw.zeros.to(torch.float32)) * s.float()  # tinygemm: w = (q - 8) * s + z
    sz = torch.stack([s, zeros.to(torch.bfloat16)], dim=-1).transpose(0, 1).contiguous()
    return lambda x: torch._weight_int4pack_mm(x, packed, GROUP, sz)


def clone_qw(qw):
    """A copy of qw's tensors (a separate packed cache, separate memory)."""
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    return fk.gemm.replace(qw, qweight=c(qw.qweight), scales=c(qw.scales), zeros=c(qw.zeros))


def run(quick: bool = False):
    records = []
    for n, k in progress_bar(QUICK_SHAPES if quick else SHAPES, "gemm shapes"):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        formats = ours(w)
        deq = {name: fk.gemm.dequantize(qw, torch.float32) for name, qw in formats.items()}
        tgs = [tinygemm(w) for _ in range(graph_copies(n * k // 2))]
        amax = w.float().abs().amax()
        w8 = (w.float() / (amax / 448)).to(torch.float8_e4m3fn)
        w8_scale = (amax / 448).reshape(1, 1)
        wi8 = torch.round(w.float() / (amax / 127)).to(torch.int8)
        ws = [w] + [w.clone() for _ in range(graph_copies(w.numel() * 2) - 1)]
        qws = {name: [qw] + [clone_qw(qw) for _ in range(graph_copies(qw.qweight.numel() * qw.qweight.element_size()) - 1)]
               for name, qw in formats.items()}
        w8s = [w8] + [w8.clone() for _ in range(graph_copies(n * k) - 1)]
        wi8s = [wi8] + [wi8.clone() for _ in range(graph_copies(n * k) - 1)]
        weight_bytes = {name: qw.qweight.numel() * qw.qweight.element_size() + qw.scales.numel() * 2
                        for name, qw in formats.items()}
        weight_bytes["cublas_bf16"] = w.numel() * 2
        for m in (QUICK_MS if quick else MS):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            params = {"m": m, "n": n, "k": k, "dtype": "bfloat16", "group_size": GROUP}
            # label -> (instance i -> callable, instances, dequantized weight for rel_err)
            impls = {"cublas_bf16": (lambda i: (lambda: x @ ws[i].t()), len(ws), w.float())}
            for name, group in qws.items():
                impls[name] = (lambda i, g=group: (lambda: fk.gemm.linear(x, g[i])), len(group), deq[name])
            if tgs[0] is not None:
                impls["tinygemm_int4"] = (lambda i: (lambda: tgs[i](x)), len(tgs), None)
            x8 = (x.float() / (x.float().abs().amax() / 448)).to(torch.float8_e4m3fn)
            x8_scale = (x.float().abs().amax() / 448).reshape(1, 1)
            impls["scaled_mm_fp8"] = (lambda i: (lambda: torch._scaled_mm(
                x8, w8s[i].t(), scale_a=x8_scale, scale_b=w8_scale, out_dtype=torch.bfloat16)), len(w8s), None)
            # Our W8A8 granularity: per-token x per-channel scales (the peer's activation
            # quantization is not timed; ours is).
            x8_rows = (x.float().abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12)
            x8r = (x.float() / x8_rows).to(torch.float8_e4m3fn)
            w8_rows = torch.full((1, n), float(amax / 448), device="cuda")
            impls["scaled_mm_fp8_rowwise"] = (lambda i: (lambda: torch._scaled_mm(
                x8r, w8s[i].t(), scale_a=x8_rows, scale_b=w8_rows, out_dtype=torch.bfloat16)), len(w8s), None)
            xi8 = torch.round(x.float() / (x.float().abs().amax() / 127)).to(torch.int8)
            impls["int_mm_int8"] = (lambda i: (lambda: torch._int_mm(xi8, wi8s[i].t())), len(wi8s), None)
            for label, (make, count, ref_w) in impls.items():
                try:
                    fn = rotating(make, count)
                    out = fn()
                    err = None
                    if ref_w is not None:
                        ref = x.float() @ ref_w.t()
                        err = float(f"{((out.float() - ref).norm() / ref.norm()).item():.3g}")
                    ms = time_graph_ms(fn)
                except (NotImplementedError, RuntimeError) as e:
                    print(f"  {label} skipped on {params}: {str(e).splitlines()[0]}")
                    continue
                tflops = 2 * m * n * k / ms / 1e9
                # Weight bytes streamed per call (what bounds small M), where we know them.
                gb = weight_bytes.get(label)
                gbps = None if gb is None else round((gb + 2 * m * (n + k)) / ms / 1e6, 1)
                records.append({"bench": "gemm", "impl": label, "params": params, "ms": round(ms, 5),
                                "tflops": round(tflops, 2), "gbps": gbps, "rel_err": err})
                print(f"  m={m:5d} n={n:6d} k={k:6d} {label:24s} {ms * 1000:9.1f} us {tflops:8.1f} TFLOP/s"
                      f"{'' if gbps is None else f' {gbps:7.0f} GB/s'}")
        del w, formats, deq, ws, qws, w8s, wi8s, tgs
        torch.cuda.empty_cache()
    return records
