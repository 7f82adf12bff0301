"""Dense attention forward.

``attention`` takes flash-attn's ``(batch, seqlen, heads, head_dim)`` layout and aligns the
causal diagonal bottom-right when ``seqlen_q != seqlen_k`` (as flash-attn >= 2.1).
``sdpa`` takes torch's ``(batch, heads, seqlen, head_dim)`` layout and semantics (causal
top-left, like ``torch.nn.functional.scaled_dot_product_attention``); it runs the same
kernel on transposed views, without copies.
"""

from __future__ import annotations

from typing import Optional, Tuple

from . import _native
from ._runtime import empty, expect_rank, float32_of, is_torch, stream_of, torch

LAYOUT = "(batch, seqlen, heads, head_dim)"
SDPA_LAYOUT = "(batch, heads, seqlen, head_dim)"


def _run(q, k, v, out, causal: bool, bottom_right: bool, scale, return_lse: bool):
    """Allocates what the caller did not pass, then runs the native op. q/k/v/out are
    (batch, seqlen, heads, head_dim) views."""
    expect_rank(q, 4, "q", LAYOUT)
    expect_rank(v, 4, "v", LAYOUT)
    b, nq, h, _ = q.shape
    if out is None:
        out = empty(q, (b, nq, h, v.shape[3]))
    lse = empty(q, (b, h, nq), float32_of(q)) if return_lse else None
    _native.attention_fwd(q, k, v, out, lse, causal, bottom_right,
                          None if scale is None else float(scale), stream_of(q))
    return out, lse


def attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, out=None):
    """Exact attention ``softmax(scale * q @ k^T) @ v``.

    Parameters
    ----------
    q : Tensor, (batch, seqlen_q, heads_q, head_dim)
    k, v : Tensor, (batch, seqlen_k, heads_kv, head_dim)
        ``heads_q`` must be a multiple of ``heads_kv`` (GQA/MQA). Any strides with a
        contiguous last dim (e.g. slices of a packed qkv tensor).
    causal : bool
        Mask keys after each query; the diagonal is aligned bottom-right, so query ``i`` sees
        keys ``j <= i + seqlen_k - seqlen_q``. Rows that see no key return 0 (LSE ``-inf``).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    return_lse : bool
        Also return the log-sum-exp (natural log), float32 ``(batch, heads_q, seqlen_q)``.
    out : Tensor, optional
        Written in place, shape ``(batch, seqlen_q, heads_q, head_dim)``.

    Returns
    -------
    out, or (out, lse) when ``return_lse``.

    GPU: float16/bfloat16, head_dim a multiple of 8 up to 256. CPU: float32 too.
    """
    if is_torch(q) and torch.compiler.is_compiling():
        o, lse = torch.ops.ferrokernels.attention(q, k, v, causal, scale, return_lse)
        if out is not None:
            out.copy_(o)
            o = out
    else:
        o, lse = _run(q, k, v, out, causal, True, scale, return_lse)
    return (o, lse) if return_lse else o


def _sdpa_views(query, key, value, attn_mask, dropout_p, enable_gqa):
    """Checks torch-only arguments and returns (q, k, v) as (batch, seqlen, heads, dim) views."""
    if attn_mask is not None:
        raise NotImplementedError("ferrokernels.sdpa does not support attn_mask yet (see the README's support table)")
    if dropout_p != 0.0:
        raise NotImplementedError("ferrokernels.sdpa is inference-only: dropout_p must be 0.0")
    views = []
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) == 3:  # (batch, seqlen, dim): one head
            x = x.unsqueeze(1) if is_torch(x) else x[:, None]
        expect_rank(x, 4, name, SDPA_LAYOUT)
        views.append(x.transpose(1, 2) if is_torch(x) else x.swapaxes(1, 2))
    if not enable_gqa and views[0].shape[2] != views[1].shape[2]:
        from ._runtime import ShapeError

        raise ShapeError(f"query has {views[0].shape[2]} heads but key has {views[1].shape[2]}; "
                         "pass enable_gqa=True for grouped-query attention")
    return views


def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
         scale: Optional[float] = None, enable_gqa: bool = False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (inference).

    query ``(batch, heads_q, seqlen_q, head_dim)``, key/value ``(batch, heads_kv, seqlen_k,
    head_dim)`` (3-D ``(batch, seqlen, head_dim)`` also accepted). ``is_causal`` masks as torch
    does: query ``i`` sees keys ``0..i`` (top-left). Returns ``(batch, heads_q, seqlen_q,
    head_dim)``, contiguous.
    """
    squeeze = getattr(query, "ndim", 4) == 3
    q, k, v = _sdpa_views(query, key, value, attn_mask, dropout_p, enable_gqa)
    if is_torch(q) and torch.compiler.is_compiling():
        o = torch.ops.ferrokernels.sdpa(q, k, v, is_causal, scale)
    else:
        b, nq, h, _ = q.shape
        o = empty(q, (b, h, nq, v.shape[3]))
        _run(q, k, v, o.transpose(1, 2) if is_torch(o) else o.swapaxes(1, 2), is_causal, False, scale, False)
    return o[:, 0] if squeeze else o


# torch.compile support: custom ops with fake implementations, so a traced graph keeps our
# kernel as one node. Eager calls above skip the dispatcher (it costs ~10 us a call).
if torch is not None:

    @torch.library.custom_op("ferrokernels::attention", mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: Optional[float], return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        o, lse = _run(q, k, v, None, causal, True, scale, return_lse)
        return o, (lse if lse is not None else q.new_empty((0,), dtype=torch.float32))

    @_attention_op.register_fake
    def _(q, k, v, causal, scale, return_lse):
        b, nq, h, _ = q.shape
        o = q.new_empty((b, nq, h, v.shape[3]))
        lse = q.new_empty((b, h, nq) if return_lse else (0,), dtype=torch.float32)
        return o, lse

    @torch.library.custom_op("ferrokernels::sdpa", mutates_args=())
    def _sdpa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 scale: Optional[float]) -> torch.Tensor:
        b, nq, h, _ = q.shape
        o = q.new_empty((b, h, nq, v.shape[3]))
        _run(q, k, v, o.transpose(1, 2), causal, False, scale, False)
        return o

    @_sdpa_op.register_fake
    def _(q, k, v, causal, scale):
        b, nq, h, _ = q.shape
        return q.new_empty((b, h, nq, v.shape[3]))
