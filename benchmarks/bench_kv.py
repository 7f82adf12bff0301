"""KV-cache presses: the time one layer's press takes after prefill, against that layer's
prefill attention (our causal kernel) in the same process: the issue's bound is <= 5%.

Workloads: batch 1 and 4, N in {8K, 32K}, 32 query heads over 8 kv heads, head_dim 128, bf16;
presses at ratio 0.5 (kvpress's defaults otherwise). The queries a press reads are the last
window's (64; 32 for ThinK); ObservedAttention reads all of them (H2O needs every query's
attention) and is timed at 8K only. `overhead` = press / prefill attention of the layer;
`released` = the fraction of the layer's K/V bytes the compressed tensors no longer hold.
"""

from __future__ import annotations

import torch

import ferrokernels as fk
import ferrokernels.kv as kv
from ferrokernels.bench import time_ms
from ferrokernels.runtime import progress_bar

HQ, HK, D = 32, 8, 128


def presses():
    return [("streaming_llm", kv.StreamingLLM(0.5)), ("knorm", kv.Knorm(0.5)), ("snapkv", kv.SnapKV(0.5)),
            ("pyramidkv", kv.PyramidKV(0.5)), ("tova", kv.TOVA(0.5)), ("adakv-snapkv", kv.AdaKV(kv.SnapKV(0.5))),
            ("duo_attention", kv.DuoAttention(0.5)), ("kvmerge-snapkv", kv.KVMerge(kv.SnapKV(0.5))),
            ("think", kv.ThinK(0.5)), ("observed_attention", kv.ObservedAttention(0.5))]


def run(quick: bool = False):
    records = []
    shapes = [(1, 8192), (1, 32768), (4, 8192)] if not quick else [(1, 8192), (1, 32768)]
    for b, n in progress_bar(shapes, "kv"):
        q = torch.randn(b, n, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, n, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        prefill = time_ms(lambda i: fk.attention(q, k, v, causal=True), 1, reps=10)
        print(f"  b={b} n={n:6d} prefill attention {prefill:8.3f} ms")
        for name, press in presses():
            if name == "observed_attention" and n > 8192:
                continue
            queries = q if name == "observed_attention" else q[:, -(32 if name == "think" else 64):]
            fn = (lambda i: press(k, v, queries))
            try:
                ms = time_ms(fn, 1, warmup=2, reps=10)
            except Exception as e:  # noqa: BLE001 - a press that cannot run a shape is reported
                print(f"  {name} failed: {str(e).splitlines()[0][:200]}")
                continue
            out = fn(0)
            held = (out[1].keys.numel() * out[1].keys.element_size() + v.numel() * v.element_size()
                    if name == "think" else out.keys.numel() * out.keys.element_size()
                    + out.values.numel() * out.values.element_size())
            released = 1 - held / (2 * k.numel() * k.element_size())
            params = {"batch": b, "seqlen": n, "heads_q": HQ, "heads_kv": HK, "head_dim": D, "press": name, "ratio": 0.5}
            records.append({"bench": "kv", "impl": "ferrokernels", "params": params, "ms": round(ms, 4), "tflops": None,
                            "gbps": None, "rel_err": None, "overhead": round(ms / prefill, 4),
                            "released": round(released, 3), "prefill_ms": round(prefill, 4)})
            print(f"  b={b} n={n:6d} {name:20s} {ms:8.3f} ms  overhead {100 * ms / prefill:6.2f}%  released "
                  f"{100 * released:5.1f}%")
        del q, k, v
        torch.cuda.empty_cache()
    return records
