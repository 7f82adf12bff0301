"""Quantized attention (SageAttention-style): INT8 Q·Kᵀ and FP8 P̃·V with f32 accumulation.

The scheme, fixed here so the GPU kernel (to come) and this reference compute the same numbers:

1. ``smooth_k``: K minus its mean over the keys, per (batch, kv head, channel). Exact, since
   ``q · mean`` is the same for every key of a row and softmax ignores constants.
   ``smooth_v``: V minus its per-channel mean, added back to the output (the weights of a row sum
   to 1). This is exact too.
2. ``balance_qk`` (SmoothQuant between Q and K): channel c of K is divided by
   ``s_c = sqrt(amax K_c / amax Q_c)`` and channel c of Q multiplied by it (per batch and kv head,
   over all tokens; exact). Real keys have a few outlier channels, which would otherwise take up
   the whole INT8 range of every K block. The softmax scale and log2(e) are folded into Q, so
   the kernel's exponentials are ``exp2``.
3. Q is quantized to INT8 per block of 64 queries of one head, and K per block of 64 keys of
   one kv head: ``scale = amax / 127``, codes ``round(x * (1 / scale))`` (every division in the
   scheme is a multiplication by a reciprocal, as in the kernels). The product of codes is exact
   in int32.
4. Blocks of 64 keys go through the online softmax. ``P̃ = exp2(S - m)``, which lies in [0, 1],
   is rounded to FP8 e4m3 after scaling by 448 (e4m3's largest value). V is FP8 e4m3 per
   channel (``scale = amax / 448`` over the keys). ``P̃·V`` accumulates in float32, and the row sum
   ``l`` is of the rounded P̃ (so the weights sum to exactly 1: V's offsets pass through
   unchanged; the kernel gets it from the P̃·V GEMM itself). ``pv="fp8x2"`` writes V as two e4m3 terms, the codes plus the codes
   of their residual: the kernel runs a second P̃·V GEMM and V gains 3 bits (e4m3's 3 mantissa
   bits on both P̃ and V are most of the scheme's error).

``quant_attention`` runs this on the CPU (float64 products of the codes, as exact as the
kernel's int32 / f32 accumulators). On the GPU (Hopper), ``prepare`` runs steps 1-3 (and V's
codes) as CUDA kernels (kernels/quant_attention.cu), matching ``quantize_inputs``, and the
attention kernel runs step 4 on those codes: s8 wgmma for S, e4m3 wgmma for P̃·V. Its softmax
steps are 128 keys wide rather than 64 (the running max, and so the rounding of P̃, can differ
slightly from the reference's).
"""

from __future__ import annotations

import math
from typing import Optional

from ._runtime import ShapeError, expect_rank, torch
from .attention import LAYOUT

BLOCK = 64  # queries per Q scale, keys per K scale and per softmax step
FP8_MAX = 448.0
QK_FORMATS = ("int8",)
# "fp8x2": V as two e4m3 terms (codes + the codes of the residual), for 3 more bits of V.
PV_FORMATS = ("fp8", "fp8x2")


def _int8_blocks(x, scale_dtype=torch.float32):
    """INT8 codes of x (b, h, n, d) with one scale per block of BLOCK rows: (codes, scales
    (b, h, ceil(n / BLOCK)))."""
    b, h, n, d = x.shape
    pad = (-n) % BLOCK
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, -1, BLOCK, d)
    amax = xp.abs().amax(dim=(-1, -2))
    scale = (amax / 127.0).clamp_min(1e-12).to(scale_dtype)
    codes = torch.round(xp * (1.0 / scale)[..., None, None]).clamp(-127, 127)  # by reciprocal, as the kernel
    return codes.view(b, h, -1, d)[:, :, :n], scale


def _fp8(x):
    return x.to(torch.float8_e4m3fn).to(torch.float64)


def quantize_inputs(q, k, v, *, scale: float, smooth_k: bool = True, smooth_v: bool = False, balance_qk: bool = True,
                    v_residual: bool = False):
    """Steps 1-3 of the scheme on (batch, seqlen, heads, dim) tensors: returns a dict of the
    codes (float64 holding integers / e4m3 values, (b, h, n, d) layout) and scales. With
    ``v_residual`` V's codes are the sum of two e4m3 terms, ``e4m3(x) + e4m3(x - e4m3(x))``."""
    qf, kf, vf = (x.transpose(1, 2).to(torch.float32) for x in (q, k, v))
    k_mean = kf.mean(dim=2, keepdim=True) if smooth_k else None
    v_mean = vf.mean(dim=2, keepdim=True) if smooth_v else None
    if k_mean is not None:
        kf = kf - k_mean
    if v_mean is not None:
        vf = vf - v_mean
    if balance_qk:
        # SmoothQuant between Q and K: channel c of K divided by s_c, of Q multiplied by it (exact),
        # s_c = sqrt(amax K_c / amax Q_c) evening out K's outlier channels against Q's.
        group = qf.shape[1] // kf.shape[1]
        q_amax = qf.abs().amax(dim=2).view(qf.shape[0], kf.shape[1], group, -1).amax(dim=2)  # (b, hk, d)
        k_amax = kf.abs().amax(dim=2)
        s_c = torch.sqrt(k_amax.clamp_min(1e-6) / q_amax.clamp_min(1e-6))[:, :, None, :]
        kf = kf * (1.0 / s_c)
        qf = qf * s_c.repeat_interleave(group, 1)
    q_codes, q_scale = _int8_blocks(qf * (scale * math.log2(math.e)))
    k_codes, k_scale = _int8_blocks(kf)
    v_scale = (vf.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    x = vf * (1.0 / v_scale)
    v_codes = _fp8(x)
    if v_residual:  # the residual in float32, as the pre-pass computes it
        v_codes = v_codes + _fp8(x - v_codes.to(torch.float32))
    return {"q": q_codes.double(), "q_scale": q_scale.double(), "k": k_codes.double(), "k_scale": k_scale.double(),
            "v": v_codes, "v_scale": v_scale.double(), "v_mean": None if v_mean is None else v_mean.double()}


SPLIT_ROWS = 1024  # tokens per statistics CTA of the GPU pre-pass (kernels/quant_attention.cu)
# Column 4t + e of every 16 in the GPU's transposed V holds token 8 * (e >> 1) + 2t + (e & 1): the
# order the S accumulators give P̃ to the 8-bit wgmma A operand, so P̃·V needs no shuffles.
V_ORDER = [8 * (e >> 1) + 2 * t + (e & 1) for t in range(4) for e in range(4)]


def prepare(q, k, v, *, scale: float, smooth_k: bool = True, smooth_v: bool = False, balance_qk: bool = True,
            v_residual: bool = False, varlen: Optional[tuple] = None) -> dict:
    """The GPU pre-pass (CUDA f16/bf16 tensors, head_dim 64 or 128, Hopper): the same codes
    as ``quantize_inputs``, in the layouts the attention kernel reads:
    ``q``/``k`` int8 (b, n, h, d), ``q_scale``/``k_scale`` float32 (b, h, ceil(n / 64)),
    ``v`` float8_e4m3fn (b, h_kv, d, n rounded up to 64; V transposed, tokens permuted within
    every 16 as ``V_ORDER``, zero past n), with ``v_residual`` ``v_lo`` the same for the
    residual's codes, and ``channels`` float32 (4, b, h_kv, d): K's mean, the Q/K balance
    factor, V's mean, V's scale. ``varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k)`` takes packed (total, heads, head_dim) inputs: statistics per sequence, and
    the outputs a batch of the longest sequence (b = number of sequences)."""
    from . import _native
    from ._runtime import stream_of

    if varlen is None:
        b, nq, hq, d = (int(x) for x in q.shape)
        nk, hk = int(k.shape[1]), int(k.shape[2])
        cu_q = cu_k = None
    else:
        cu_q, cu_k, nq, nk = varlen
        b, nq, nk = int(cu_q.shape[0]) - 1, int(nq), int(nk)
        hq, d, hk = int(q.shape[1]), int(q.shape[2]), int(k.shape[1])
    sq, sk = max(1, -(-nq // SPLIT_ROWS)), max(1, -(-nk // SPLIT_ROWS))
    f32 = dict(dtype=torch.float32, device=q.device)
    out = {
        "q": torch.empty((b, nq, hq, d), dtype=torch.int8, device=q.device),
        "q_scale": torch.empty((b, hq, -(-nq // BLOCK)), **f32),
        "k": torch.empty((b, nk, hk, d), dtype=torch.int8, device=q.device),
        "k_scale": torch.empty((b, hk, -(-nk // BLOCK)), **f32),
        "v": torch.empty((b, hk, d, -(-nk // BLOCK) * BLOCK), dtype=torch.float8_e4m3fn, device=q.device),
        "channels": torch.empty((4, b, hk, d), **f32),
    }
    if v_residual:
        out["v_lo"] = torch.empty_like(out["v"])
    stats = torch.empty(((sq * b * hq + 2 * sk * b * hk) * 3 * d,), **f32)
    _native.quant_attention_prepare(q, k, v, stats=stats, channels=out["channels"], q_codes=out["q"],
                                    q_scale=out["q_scale"], k_codes=out["k"], k_scale=out["k_scale"],
                                    v_codes=out["v"], v_lo=out.get("v_lo"), q_post=float(scale * math.log2(math.e)),
                                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=nq, max_seqlen_k=nk,
                                    smooth_k=smooth_k, smooth_v=smooth_v, balance=balance_qk, stream=stream_of(q))
    return out


def _check_shapes(q, k, v, op: str):
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        expect_rank(x, 4, name, LAYOUT)
    b, nq, hq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ShapeError(f"q, k and v must share the batch size, got {b}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ShapeError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share seqlen_k and heads_kv")
    if k.shape[3] != d:
        raise ShapeError(f"q has head_dim {d} but k has {k.shape[3]}")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ShapeError(f"heads_q {hq} must be a multiple of heads_kv {k.shape[2]}")
    if d not in (64, 128) or v.shape[3] != d:
        raise NotImplementedError(f"{op} takes head_dim 64 or 128 (q/k and v alike), got {d} and {v.shape[3]}")


def _check_float_dtypes(q, k, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a float16/bfloat16/float32 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check(q, k, v, qk, pv, varlen: bool = False):
    """quant_attention's (or, with ``varlen``, quant_attention_varlen's) argument checks."""
    from .attention import VARLEN_LAYOUT

    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        expect_rank(x, 3 if varlen else 4, name, VARLEN_LAYOUT if varlen else LAYOUT)
    if qk not in QK_FORMATS:
        raise NotImplementedError(f"qk={qk!r}: supported {QK_FORMATS}")
    if pv not in PV_FORMATS:
        raise NotImplementedError(f"pv={pv!r}: supported {PV_FORMATS}")
    if varlen:
        _check_shapes(q[None], k[None], v[None], "quant_attention_varlen")
    else:
        _check_shapes(q, k, v, "quant_attention")
    _check_float_dtypes(q, k, v)


def quant_attention(q, k, v, *, causal: bool = False, qk: str = "int8", pv: str = "fp8", smooth_k: bool = True,
                    smooth_v: bool = False, balance_qk: bool = True, scale: Optional[float] = None,
                    return_lse: bool = False):
    """Attention with INT8 Q·Kᵀ and FP8 P̃·V (the scheme above), for ordinary q/k/v in flash-attn's
    layout ``(batch, seqlen, heads, head_dim)``: GQA, causal (bottom-right), head_dim 64 or 128.
    CPU tensors run the scheme's reference; CUDA tensors (float16/bfloat16, Hopper) the pre-pass
    and the sm_90 kernel. Returns out in q's dtype, and with ``return_lse`` the float32
    natural-log LSE ``(batch, heads_q, seqlen_q)``."""
    _check(q, k, v, qk, pv)
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if q.is_cuda:
        return _quant_attention_cuda(q, k, v, causal, smooth_k, smooth_v, balance_qk, pv == "fp8x2", scale, return_lse)
    if nk == 0 or b * nq * hq == 0:  # no keys: every row is empty
        out = torch.zeros(q.shape, dtype=q.dtype)
        return (out, torch.full((b, hq, nq), -math.inf)) if return_lse else out
    c = quantize_inputs(q, k, v, scale=scale, smooth_k=smooth_k, smooth_v=smooth_v, balance_qk=balance_qk,
                        v_residual=pv == "fp8x2")
    group = hq // hk
    q_scale_rows = c["q_scale"].repeat_interleave(BLOCK, dim=2)[:, :, :nq, None]  # (b, hq, nq, 1)
    m, l, acc = _attend_codes(c["q"], q_scale_rows, c["k"].repeat_interleave(group, 1),
                              c["k_scale"].repeat_interleave(group, 1), c["v"].repeat_interleave(group, 1),
                              c["v_scale"].repeat_interleave(group, 1), causal)
    v_mean = None if c["v_mean"] is None else c["v_mean"].repeat_interleave(group, 1)
    k_mean = k.to(torch.float64).mean(dim=1).repeat_interleave(group, 1) if smooth_k else None
    return _finish(q, m, l, acc, v_mean, k_mean, scale, return_lse)


def _quant_attention_cuda(q, k, v, causal, smooth_k, smooth_v, balance_qk, v_residual, scale, return_lse):
    """The pre-pass, then the Hopper kernel on its codes (kernels/quant_attention.cu)."""
    if q.dtype == torch.float32:
        raise TypeError("q is float32; the CUDA quant_attention takes float16 or bfloat16 (float32 runs on the CPU)")
    out, lse, empty = _gpu_outputs(q, k, q.dtype, return_lse)
    if not empty:
        c = prepare(q, k, v, scale=scale, smooth_k=smooth_k, smooth_v=smooth_v, balance_qk=balance_qk,
                    v_residual=v_residual)
        _launch(c, out, lse, causal)
        if lse is not None and smooth_k:
            _unsmooth_lse(lse, q, c["channels"][0].repeat_interleave(q.shape[2] // k.shape[2], 1), scale)
    return (out, lse) if return_lse else out


def quant_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                          causal: bool = False, qk: str = "int8", pv: str = "fp8", smooth_k: bool = True,
                          smooth_v: bool = False, balance_qk: bool = True, scale: Optional[float] = None,
                          return_lse: bool = False):
    """quant_attention over packed variable-length sequences (``attention_varlen``'s layout): q
    ``(total_q, heads_q, head_dim)``, k/v ``(total_k, heads_kv, head_dim)``, int32
    ``cu_seqlens`` offsets. Every sequence is quantized on its own (its K / V means and scales,
    its 64-row blocks), exactly as ``quant_attention`` on that sequence alone; causal is
    bottom-right per sequence. Returns out ``(total_q, heads_q, head_dim)``, and with
    ``return_lse`` the float32 LSE ``(heads_q, total_q)``."""
    from .attention import _check_cu_seqlens

    _check(q, k, v, qk, pv, varlen=True)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ShapeError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         "must have the same length (batch + 1)")
    d, hq = int(q.shape[2]), int(q.shape[1])
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    opts = dict(causal=causal, pv=pv, smooth_k=smooth_k, smooth_v=smooth_v, balance_qk=balance_qk, scale=scale)
    if not q.is_cuda:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for i in range(len(cq) - 1):
            o, lse = quant_attention(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                     return_lse=True, **opts)
            outs.append(o[0])
            lses.append(lse[0])
        out = torch.cat(outs) if outs else q.new_zeros((0, hq, d))
        lse = torch.cat(lses, dim=1) if lses else torch.zeros((hq, 0))
        return (out, lse) if return_lse else out
    if q.dtype == torch.float32:
        raise TypeError("q is float32; the CUDA quant_attention takes float16 or bfloat16 (float32 runs on the CPU)")
    _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
    _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    out = torch.zeros((q.shape[0], hq, d), dtype=q.dtype, device=q.device)  # rows past cu[-1] stay 0
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
    b = int(cu_seqlens_q.shape[0]) - 1
    if b == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or q.shape[0] == 0 or k.shape[0] == 0:
        return (out, lse) if return_lse else out
    varlen = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    c = prepare(q, k, v, scale=scale, smooth_k=smooth_k, smooth_v=smooth_v, balance_qk=balance_qk,
                v_residual=pv == "fp8x2", varlen=varlen)
    _launch(c, out, lse, causal, varlen)
    if lse is not None and smooth_k:  # q . mean(k) of each token's own sequence back into the LSE
        lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(b, device=q.device), lens, output_size=int(cu_seqlens_q[-1]))
        k_mean = c["channels"][0].repeat_interleave(hq // int(k.shape[1]), 1)[seq]  # (tokens, hq, d)
        rows = slice(0, seq.shape[0])
        lse[:, rows] += scale * torch.einsum("nhd,nhd->hn", q[rows].to(torch.float32), k_mean)
    return (out, lse) if return_lse else out


def _gpu_outputs(q, k, dtype, return_lse):
    """The output (and LSE) of a GPU call; with no keys or no rows they are final already (0 and
    -inf, as on the CPU), and `empty` says so."""
    b, nq, hq, d = (int(x) for x in q.shape)
    out = torch.empty((b, nq, hq, d), dtype=dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device) if return_lse else None
    empty = b * nq * hq == 0 or int(k.shape[1]) == 0
    if empty:
        out.zero_()
        if lse is not None:
            lse.fill_(-math.inf)
    return out, lse, empty


def _launch(c, out, lse, causal, varlen=None):
    """The Hopper kernel on codes in prepare()'s layouts (dict c)."""
    from . import _native
    from ._runtime import stream_of

    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, 0, 0)
    workspace = torch.empty(1, dtype=torch.int32, device=out.device) if causal or varlen else None
    _native.quant_attention_fwd(c["q"], c["k"], c["v"], c["q_scale"], c["k_scale"], c["channels"], out, lse,
                                v_lo=c.get("v_lo"), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_q),
                                max_seqlen_k=int(max_k), causal=causal, workspace=workspace, stream=stream_of(out))


def _unsmooth_lse(lse, q, k_mean, scale):
    """The kernel's scores had K's mean (per q head: (b, hq, d)) taken out: puts scale * q . mean
    back into the LSE, in place."""
    lse += scale * torch.einsum("bnhd,bhd->bhn", q.to(torch.float32), k_mean.to(torch.float32))


def _attend_codes(qc, q_scale_rows, kc, k_scale_blocks, vc, v_scale, causal):
    """Steps 4 of the scheme on codes (float64, (b, h, n, d), K/V already repeated to the q
    heads): S per 64-key block in log2 units, online softmax, FP8 P̃ times V's codes.
    q_scale_rows (b, h, nq, 1), k_scale_blocks (b, h, ceil(nk / 64)), v_scale broadcastable to
    (b, h, 1, d). Returns the running max, row sum and unnormalised output."""
    b, hq, nq, d = qc.shape
    nk = kc.shape[2]
    m = torch.full((b, hq, nq, 1), -math.inf, dtype=torch.float64)
    l = torch.zeros_like(m)
    acc = torch.zeros((b, hq, nq, vc.shape[-1]), dtype=torch.float64)
    rows = torch.arange(nq)[:, None] + (nk - nq)
    for j, start in enumerate(range(0, nk, BLOCK)):
        cols = slice(start, min(start + BLOCK, nk))
        s = (qc @ kc[:, :, cols].transpose(-1, -2)) * q_scale_rows * k_scale_blocks[:, :, j, None, None]
        if causal:
            s = s.masked_fill(torch.arange(start, cols.stop)[None, :] > rows, -math.inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows that have seen no key yet
        p = torch.exp2(s - safe)
        alpha = torch.exp2(torch.where(torch.isinf(m), -math.inf, m - safe))
        p8 = _fp8(p * FP8_MAX)
        # The row sum is of the rounded P̃, as the numerator's: the weights sum to exactly 1.
        l = l * alpha + p8.sum(-1, keepdim=True) / FP8_MAX
        acc = acc * alpha + (p8 @ vc[:, :, cols]) * (v_scale / FP8_MAX)
        m = m_new
    return m, l, acc


def _finish(q, m, l, acc, v_mean, k_mean, scale, return_lse):
    """Normalises, adds V's mean back, and the LSE (natural log) with K's mean put back."""
    seen = l > 0
    out = torch.where(seen, acc / torch.where(seen, l, 1.0), 0.0)
    if v_mean is not None:
        out = torch.where(seen, out + v_mean, 0.0)
    out = out.transpose(1, 2).to(q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32)
                                 else torch.bfloat16)
    if not return_lse:
        return out
    lse = torch.where(seen, (m + torch.log2(torch.where(seen, l, 1.0))) * math.log(2.0), -math.inf)[..., 0]
    if k_mean is not None:  # the smoothing shifted each row's scores by scale * q . mean(k): put it back
        lse = lse + scale * torch.einsum("bnhd,bhd->bhn", q.to(torch.float64), k_mean)
    return out, lse.to(torch.float32)


# --- FP8 attention (FlashAttention-3 style) --------------------------------------------------

def hadamard(d: int, dtype=torch.float32, device=None) -> "torch.Tensor":
    """The orthonormal Hadamard matrix of order d (a power of two), Sylvester's construction."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(dtype=dtype, device=device)


def fp8_quantize(x, *, rotate: bool = False):
    """e4m3 codes of x (batch, seqlen, heads, head_dim) with one descale per (batch, head)
    (``x ≈ codes * descale``). ``rotate`` first multiplies the head dim by the orthonormal
    Hadamard matrix (incoherent processing: outlier channels spread over all channels; apply it
    to q and k alike, which leaves q · k unchanged). Returns (codes, descale float32 (b, h))."""
    xf = x.to(torch.float32)
    if rotate:
        xf = xf @ hadamard(x.shape[-1], device=x.device)
    amax = xf.abs().amax(dim=(1, 3))  # (b, h)
    descale = (amax / FP8_MAX).clamp_min(1e-12)
    codes = (xf * (1.0 / descale)[:, None, :, None]).to(torch.float8_e4m3fn)
    return codes, descale


def fp8_attention(q, k, v, descale_q=None, descale_k=None, descale_v=None, *, causal: bool = False,
                  scale: Optional[float] = None, smooth_k: bool = True, hadamard_qk: bool = False,
                  return_lse: bool = False):
    """Attention on FP8 e4m3 inputs, FlashAttention-3 style: ``q``/``k``/``v`` are e4m3 codes
    ``(batch, seqlen, heads, head_dim)`` with float32 descales ``(batch, heads)`` (``x ≈ codes *
    descale``; None = 1). S = q·kᵀ in FP8 with f32 accumulation, P̃ in FP8, P̃·V in FP8 with f32
    accumulation. float16/bfloat16 inputs are quantized here first (``fp8_quantize``, per
    (batch, head)): ``smooth_k`` subtracts K's per-channel mean first (exact, see quant_attention;
    real keys' large channel means would otherwise set the scale), ``hadamard_qk`` rotates q and k
    by a Hadamard matrix before they are quantized. GQA, causal (bottom-right), head_dim 64 or 128. Output bfloat16 for e4m3 inputs
    (else the inputs' dtype), and the float32 LSE with ``return_lse``."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        expect_rank(x, 4, name, LAYOUT)
    fp8_in = q.dtype == torch.float8_e4m3fn
    if fp8_in != (k.dtype == torch.float8_e4m3fn) or fp8_in != (v.dtype == torch.float8_e4m3fn):
        raise TypeError(f"q, k, v must all be float8_e4m3fn, or all float16/bfloat16, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if fp8_in and hadamard_qk:
        raise ValueError("hadamard_qk rotates q and k before they are quantized; e4m3 inputs are already quantized "
                         "(rotate them with ferrokernels.quant_attention.fp8_quantize(x, rotate=True))")
    _check_shapes(q, k, v, "fp8_attention")
    if not fp8_in:
        _check_float_dtypes(q, k, v)
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    k_mean = None
    q_in = q
    if not fp8_in:
        if smooth_k:
            k_mean = k.to(torch.float32).mean(dim=1, keepdim=True)
            k = k.to(torch.float32) - k_mean
            k_mean = k_mean[:, 0].double().repeat_interleave(hq // hk, 1)  # (b, hq, d), for the LSE
        (q, descale_q), (k, descale_k), (v, descale_v) = (fp8_quantize(q, rotate=hadamard_qk),
                                                          fp8_quantize(k, rotate=hadamard_qk), fp8_quantize(v))
    ones = lambda h: torch.ones(b, h, device=q.device)  # noqa: E731
    dq = ones(hq) if descale_q is None else descale_q
    dk = ones(hk) if descale_k is None else descale_k
    dv = ones(hk) if descale_v is None else descale_v
    for t, h, name in ((dq, hq, "descale_q"), (dk, hk, "descale_k"), (dv, hk, "descale_v")):
        if tuple(t.shape) != (b, h):
            raise ShapeError(f"{name} must be float32 (batch, heads) = ({b}, {h}), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out_dtype = torch.bfloat16 if fp8_in else q_in.dtype
    if q.is_cuda:
        return _fp8_attention_cuda(q, k, v, dq, dk, dv, causal, scale, k_mean, q_in, out_dtype, return_lse)
    dq, dk, dv = dq.double(), dk.double(), dv.double()
    group = hq // hk
    qc, kc, vc = (x.transpose(1, 2).double() for x in (q, k, v))
    q_scale_rows = (dq * scale * math.log2(math.e))[:, :, None, None]
    k_blocks = dk.repeat_interleave(group, 1)[:, :, None].expand(b, hq, -(-nk // BLOCK))
    m, l, acc = _attend_codes(qc, q_scale_rows, kc.repeat_interleave(group, 1), k_blocks,
                              vc.repeat_interleave(group, 1), dv.repeat_interleave(group, 1)[:, :, None, None], causal)
    return _finish(q.to(torch.bfloat16) if fp8_in else q_in, m, l, acc, None, k_mean, scale, return_lse)


def v_transposed(v):
    """e4m3 V (batch, seqlen, heads, head_dim) in the layout the kernel reads: (batch, heads,
    head_dim, seqlen rounded up to 64), zero past seqlen, tokens permuted within every 16 as
    ``V_ORDER`` (what the pre-pass writes for quant_attention)."""
    b, n, h, d = v.shape
    n_pad = -(-n // BLOCK) * BLOCK
    vt = torch.zeros((b, h, d, n_pad), dtype=torch.uint8, device=v.device)
    vt[..., :n] = v.view(torch.uint8).permute(0, 2, 3, 1)
    cols = torch.arange(n_pad, device=v.device)
    order = torch.tensor(V_ORDER, device=v.device)
    return vt[..., (cols // 16) * 16 + order[cols % 16]].contiguous().view(torch.float8_e4m3fn)


def _fp8_attention_cuda(q, k, v, dq, dk, dv, causal, scale, k_mean, q_in, out_dtype, return_lse):
    """The Hopper kernel with e4m3 Q·Kᵀ: quant_attention's kernel, its per-block scales all
    equal to the per-head descales."""
    out, lse, empty = _gpu_outputs(q, k, out_dtype, return_lse)
    if not empty:
        b, nq, hq, d = (int(x) for x in q.shape)
        nk, hk = int(k.shape[1]), int(k.shape[2])
        f32 = lambda t: t.to(device=q.device, dtype=torch.float32)  # noqa: E731
        channels = torch.zeros((4, b, hk, d), dtype=torch.float32, device=q.device)
        channels[3] = f32(dv)[:, :, None]
        c = {"q": q.contiguous(), "k": k.contiguous(), "v": v_transposed(v), "channels": channels,
             "q_scale": (f32(dq) * (scale * math.log2(math.e)))[:, :, None].expand(b, hq, -(-nq // BLOCK)).contiguous(),
             "k_scale": f32(dk)[:, :, None].expand(b, hk, -(-nk // BLOCK)).contiguous()}
        _launch(c, out, lse, causal)
        if lse is not None and k_mean is not None:
            _unsmooth_lse(lse, q_in, k_mean, scale)
    return (out, lse) if return_lse else out
