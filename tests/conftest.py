"""Shared fixtures and the float64 references every accuracy test compares against."""

import math

import pytest
import torch

import ferrokernels as fk

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def nvrtc_available() -> bool:
    return "nvrtc_version" in fk._native.runtime_info()


def devices():
    """CPU always; CUDA marked so `pytest -m cuda` selects it and CPU runs skip it."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# The error our result may have on top of the inputs' own rounding, when torch's error on the
# same inputs is smaller: output rounding of the dtype (bf16 keeps 8 mantissa bits).
ERR_FLOOR = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def causal_mask(nq: int, nk: int, offset: int, device="cpu"):
    """True where key j is visible to query i: j <= i + offset."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + offset


def reference(q, k, v, causal=False, offset=None, scale=None):
    """float64 attention in (batch, seqlen, heads, dim) layout; returns (out, lse).
    Rows that see no key give 0 and lse -inf (the kernel's convention)."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qq = q.double().transpose(1, 2)
    kk = k.double().repeat_interleave(hq // hk, dim=2).transpose(1, 2)
    vv = v.double().repeat_interleave(hq // hk, dim=2).transpose(1, 2)
    s = (qq @ kk.transpose(-1, -2)) * scale
    if causal:
        off = nk - nq if offset is None else offset
        s = s.masked_fill(~causal_mask(nq, nk, off, s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2), lse


def torch_lowp(q, k, v, causal=False, offset=None, scale=None):
    """torch's own SDPA on the same low-precision inputs: the error budget we are held to."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    mask = None
    if causal:
        off = nk - nq if offset is None else offset
        mask = causal_mask(nq, nk, off, q.device)
    kk = k.repeat_interleave(hq // hk, dim=2)
    vv = v.repeat_interleave(hq // hk, dim=2)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.transpose(1, 2).nan_to_num(0.0)
