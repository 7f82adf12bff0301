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


def dtypes_for(device):
    """Every dtype the device's kernels take."""
    return [torch.float16, torch.bfloat16] + ([torch.float32] if device == "cpu" else [])


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# The error our result may have on top of the inputs' own rounding, when torch's error on the
# same inputs is smaller: output rounding of the dtype (bf16 keeps 8 mantissa bits).
ERR_FLOOR = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def visible(nq, nk, offset, causal=False, window=None, device="cpu"):
    """True where key j is visible to query i under causal + window=(left, right) (-1/None =
    unbounded), the diagonal shifted by offset."""
    i = torch.arange(nq, device=device)[:, None] + offset
    j = torch.arange(nk, device=device)[None, :]
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    ok = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left is not None and left >= 0:
        ok &= j >= i - left
    if right is not None and right >= 0:
        ok &= j <= i + right
    return ok


def score_bias(q, k, offset, alibi=None, mask=None, causal=False, window=None):
    """The additive float64 bias (b, h, nq, nk) every mod adds: ALiBi, mask, -inf outside the
    causal/window bounds. None when there is nothing to add."""
    b, nq, hq, _ = q.shape
    nk = k.shape[1]
    dev = q.device
    bias = torch.zeros(b, hq, nq, nk, dtype=torch.float64, device=dev)
    if alibi is not None:
        slopes = alibi.double().reshape(-1 if alibi.ndim == 2 else 1, hq)[..., None, None]
        i = torch.arange(nq, device=dev)[:, None] + offset
        j = torch.arange(nk, device=dev)[None, :]
        bias = bias - slopes * (i - j).abs().double()
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask, float("-inf"))
        else:
            bias = bias + mask.double()
    return bias.masked_fill(~visible(nq, nk, offset, causal, window, dev), float("-inf"))


def reference(q, k, v, causal=False, offset=None, scale=None, window=None, softcap=None, alibi=None, mask=None):
    """float64 attention in (batch, seqlen, heads, dim) layout; returns (out, lse).
    Rows that see no key give 0 and lse -inf (the kernel's convention)."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    off = nk - nq if offset is None else offset
    qq = q.double().transpose(1, 2)
    kk = k.double().repeat_interleave(hq // hk, dim=2).transpose(1, 2)
    vv = v.double().repeat_interleave(hq // hk, dim=2).transpose(1, 2)
    s = (qq @ kk.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s + score_bias(q, k, off, alibi, mask, causal, window)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2), lse


def torch_lowp(q, k, v, causal=False, offset=None, scale=None, window=None, softcap=None, alibi=None, mask=None):
    """torch on the same low-precision inputs: the error budget we are held to. SDPA with the
    mods as a float mask; with softcap (which SDPA cannot express) scores are formed in the
    input dtype and softmaxed in float32."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    off = nk - nq if offset is None else offset
    kk = k.repeat_interleave(hq // hk, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(hq // hk, dim=2).transpose(1, 2)
    qq = q.transpose(1, 2)
    bias = score_bias(q, k, off, alibi, mask, causal, window)
    if softcap:
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        s = (qq @ kk.transpose(-1, -2)).float() * scale
        s = softcap * torch.tanh(s / softcap) + bias.float()
        o = torch.softmax(s, dim=-1).to(q.dtype) @ vv
    else:
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias.to(q.dtype), scale=scale)
    return o.transpose(1, 2).nan_to_num(0.0)


def make(shape, dtype, device, seed, dv=None):
    """Fresh random q, k, v for (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)."""
    b, nq, nk, hq, hk, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(b, nq, hq, d), mk(b, nk, hk, d), mk(b, nk, hk, dv or d)


def check_against_reference(q, k, v, out, lse, causal=False, **mods):
    """Holds out (and lse) to float64 attention with the same mods: rel err within
    max(2x torch's own low-precision error, the dtype floor); LSE within 2e-3."""
    ref, ref_lse = reference(q, k, v, causal, **mods)
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    err = rel_err(out, ref)
    torch_err = rel_err(torch_lowp(q, k, v, causal, **mods), ref)
    budget = max(2 * torch_err, ERR_FLOOR[q.dtype])
    assert err <= budget, f"rel err {err:.2e} > budget {budget:.2e} (torch {torch_err:.2e})"
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "LSE -inf rows differ"
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 2e-3
        assert (lse[~finite] == float("-inf")).all()
    return err
