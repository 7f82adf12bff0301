"""Dense attention forward.

``attention`` takes flash-attn's ``(batch, seqlen, heads, head_dim)`` layout and aligns the
causal diagonal bottom-right when ``seqlen_q != seqlen_k`` (as flash-attn >= 2.1).
``attention_varlen`` takes packed sequences ``(total_tokens, heads, head_dim)`` with int32
``cu_seqlens`` offsets (flash-attn's ``flash_attn_varlen_func``).
``sdpa`` takes torch's ``(batch, heads, seqlen, head_dim)`` layout and semantics (causal
top-left, ``attn_mask`` bool or additive, like ``torch.nn.functional.scaled_dot_product_attention``);
it runs the same kernel on transposed views, without copies.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from . import _native
from ._runtime import ShapeError, empty, expect_rank, float32_of, is_torch, stream_of, torch

LAYOUT = "(batch, seqlen, heads, head_dim)"
VARLEN_LAYOUT = "(total_tokens, heads, head_dim)"
SDPA_LAYOUT = "(batch, heads, seqlen, head_dim)"
MASK_TILE = 64  # kernels/common/attention.cuh: MASK_TILE


def _window(window) -> Tuple[int, int]:
    """(left, right) with None or -1 for an unbounded side, as flash-attn's window_size."""
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a (left, right) pair, got {window!r}")
    sides = []
    for x, which in zip(window, ("left", "right")):
        x = -1 if x is None else x
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"window {which} must be an int >= 0, -1 or None, got {x!r}")
        sides.append(x)
    return sides[0], sides[1]


def _softcap(softcap) -> float:
    return 0.0 if softcap is None else float(softcap)


def _check_cu_seqlens(cu, total: int, max_seqlen: int, name: str) -> None:
    """Validates offsets that live on the GPU, where the kernel cannot: copies batch + 1 ints to
    the host (a sync), skipped while a CUDA graph is being captured. Offsets in host memory are
    checked by the native op itself."""
    if not (is_torch(cu) and cu.is_cuda) or torch.cuda.is_current_stream_capturing():
        return
    _native.check_seqlens(cu.detach().cpu(), int(total), int(max_seqlen), name)


def _run(q, k, v, out, *, causal, bottom_right, scale, window, softcap, alibi, return_lse,
         mask=None, varlen=None):
    """Allocates what the caller did not pass, then runs the native op. Dense q/k/v/out are
    (batch, seqlen, heads, head_dim) views; varlen ones (total, heads, head_dim) with
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    rank, layout = (3, VARLEN_LAYOUT) if varlen else (4, LAYOUT)
    expect_rank(q, rank, "q", layout)
    expect_rank(v, rank, "v", layout)
    if out is None:
        out = empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
    lse = None
    if return_lse:
        lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
        lse = empty(q, lse_shape, float32_of(q))
    mask_tiles = _mask_tiles(mask, q.shape[1], k.shape[1]) if mask is not None and is_torch(q) and q.is_cuda else None
    cu_q, cu_k, max_q, max_k = varlen if varlen else (None, None, 0, 0)
    # The Hopper kernel's tile counter, used where tile costs differ (causal, windows, varlen):
    # from torch's allocator so CUDA graphs own their copy.
    uneven = causal or varlen is not None or any(x >= 0 for x in window)
    workspace = torch.empty(1, dtype=torch.int32, device=q.device) if uneven and is_torch(q) and q.is_cuda else None
    _native.attention_fwd(
        q, k, v, out, lse, causal=causal, bottom_right=bottom_right,
        scale=None if scale is None else float(scale), window=window, softcap=softcap,
        alibi=alibi, mask=mask, mask_tiles=mask_tiles, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=int(max_q), max_seqlen_k=int(max_k), workspace=workspace, stream=stream_of(q))
    return out, lse


def _tile_reduce(x, reduce, pad_value):
    """Reduces the last two axes of a 4-D bool tensor over MASK_TILE blocks; axes of size 1
    (broadcast) stay 1."""
    for axis in (2, 3):
        n = x.shape[axis]
        if n == 1:
            continue
        pad = (-n) % MASK_TILE
        if pad:
            shape = list(x.shape)
            shape[axis] = pad
            x = torch.cat([x, x.new_full(shape, pad_value)], dim=axis)
        x = reduce(x.unflatten(axis, (-1, MASK_TILE)), dim=axis + 1)
    return x


def _mask_tiles(mask, nq: int, nk: int):
    """uint8 per 64x64 tile: 0 = all masked (skipped), 1 = partial (read per element),
    2 = nothing masked and zero bias (mask not read)."""
    if mask.dtype == torch.bool:
        keep, clean = mask, mask
    else:
        keep, clean = mask != float("-inf"), mask == 0
    any_keep = _tile_reduce(keep, torch.any, False)
    all_clean = _tile_reduce(clean, torch.all, True)
    return torch.where(all_clean, 2, any_keep.to(torch.uint8)).to(torch.uint8)


def attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None,
              window: Optional[Sequence[Optional[int]]] = None, softcap: Optional[float] = None,
              alibi_slopes=None, return_lse: bool = False, out=None):
    """Exact attention ``softmax(mods(scale * q @ k^T)) @ v``.

    Parameters
    ----------
    q : Tensor, (batch, seqlen_q, heads_q, head_dim)
    k : Tensor, (batch, seqlen_k, heads_kv, head_dim)
    v : Tensor, (batch, seqlen_k, heads_kv, head_dim_v)
        ``heads_q`` must be a multiple of ``heads_kv`` (GQA/MQA). Any strides with a
        contiguous last dim (e.g. slices of a packed qkv tensor). ``head_dim_v`` may differ
        from ``head_dim`` (e.g. 192/128).
    causal : bool
        Mask keys after each query; the diagonal is aligned bottom-right, so query ``i`` sees
        keys ``j <= i + seqlen_k - seqlen_q``. Rows that see no key return 0 (LSE ``-inf``).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    window : (left, right), optional
        Sliding window (Mistral/Gemma): query ``i`` sees keys ``i + off - left .. i + off +
        right`` (``off = seqlen_k - seqlen_q``); ``None`` or ``-1`` leaves a side unbounded.
        With ``causal`` the right side is 0.
    softcap : float, optional
        Gemma-2 logit cap: scores become ``softcap * tanh(score / softcap)`` (after scaling).
    alibi_slopes : Tensor, float32 (heads_q,) or (batch, heads_q), optional
        Adds ``-slope * |i + off - j|`` to the scores (after softcap).
    return_lse : bool
        Also return the log-sum-exp (natural log), float32 ``(batch, heads_q, seqlen_q)``.
    out : Tensor, optional
        Written in place, shape ``(batch, seqlen_q, heads_q, head_dim_v)``.

    Returns
    -------
    out, or (out, lse) when ``return_lse``.

    GPU: float16/bfloat16, head dims multiples of 8 up to 256. CPU: float32 too.
    """
    o, lse = _dense(q, k, v, out, causal=causal, scale=scale, window=_window(window), softcap=_softcap(softcap),
                    alibi=alibi_slopes, mask=None, return_lse=return_lse)
    return (o, lse) if return_lse else o


def _dense(q, k, v, out, *, causal, scale, window, softcap, alibi, mask, return_lse):
    """`attention` with an optional dense mask (b, h, nq, nk)-broadcastable, bool or additive,
    applied on top of causal/window (bottom-right): the entry the transformers backend uses.
    Under torch.compile it goes through the custom op."""
    if is_torch(q) and torch.compiler.is_compiling():
        o, lse = torch.ops.ferrokernels.attention(q, k, v, causal, scale, list(window), softcap, alibi, mask,
                                                  return_lse)
        if out is not None:
            out.copy_(o)
            o = out
        return o, lse
    return _run(q, k, v, out, causal=causal, bottom_right=True, scale=scale, window=window, softcap=softcap,
                alibi=alibi, return_lse=return_lse, mask=mask)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, scale: Optional[float] = None,
                     window: Optional[Sequence[Optional[int]]] = None, softcap: Optional[float] = None,
                     alibi_slopes=None, return_lse: bool = False, out=None):
    """Attention over packed variable-length sequences (flash-attn's ``flash_attn_varlen_func``).

    q ``(total_q, heads_q, head_dim)``, k ``(total_k, heads_kv, head_dim)``, v ``(total_k,
    heads_kv, head_dim_v)``; sequence ``b`` owns q rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
    and k/v rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (int32, ``batch + 1`` entries, starting
    at 0, non-decreasing). ``max_seqlen_q/k`` bound every sequence's length. Options as
    :func:`attention`, applied per sequence (causal bottom-right per sequence).

    Returns out ``(total_q, heads_q, head_dim_v)``, and with ``return_lse`` the float32 LSE
    ``(heads_q, total_q)``. Rows past ``cu_seqlens_q[-1]`` are not written.
    """
    win, cap = _window(window), _softcap(softcap)
    expect_rank(q, 3, "q", VARLEN_LAYOUT)
    expect_rank(k, 3, "k", VARLEN_LAYOUT)
    compiling = is_torch(q) and torch.compiler.is_compiling()
    if not compiling:
        _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
        _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    if compiling:
        o, lse = torch.ops.ferrokernels.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale,
            list(win), cap, alibi_slopes, return_lse)
        if out is not None:
            out.copy_(o)
            o = out
    else:
        o, lse = _run(q, k, v, out, causal=causal, bottom_right=True, scale=scale, window=win,
                      softcap=cap, alibi=alibi_slopes, return_lse=return_lse,
                      varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return (o, lse) if return_lse else o


def _sdpa_views(query, key, value, dropout_p, enable_gqa):
    """Checks torch-only arguments and returns (q, k, v) as (batch, seqlen, heads, dim) views."""
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
        raise ShapeError(f"query has {views[0].shape[2]} heads but key has {views[1].shape[2]}; "
                         "pass enable_gqa=True for grouped-query attention")
    return views


def _sdpa_mask(attn_mask, three_d: bool):
    """torch broadcasting: a mask of rank < 4 gains leading axes of size 1."""
    if attn_mask is None:
        return None
    nd = getattr(attn_mask, "ndim", None)
    if nd is None or nd < 2 or nd > 4:
        raise ShapeError(f"attn_mask must be 2-D to 4-D, broadcastable to (batch, heads, seqlen_q, seqlen_k), "
                         f"got {getattr(attn_mask, 'shape', type(attn_mask).__name__)}")
    if three_d and nd == 3:  # (batch, L, S) for 3-D inputs: the head axis is the one added
        attn_mask = attn_mask[:, None]
    while attn_mask.ndim < 4:
        attn_mask = attn_mask[None]
    return attn_mask


def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
         scale: Optional[float] = None, enable_gqa: bool = False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (inference).

    query ``(batch, heads_q, seqlen_q, head_dim)``, key ``(batch, heads_kv, seqlen_k,
    head_dim)``, value ``(batch, heads_kv, seqlen_k, head_dim_v)`` (3-D ``(batch, seqlen,
    dim)`` also accepted). ``is_causal`` masks as torch does: query ``i`` sees keys ``0..i``
    (top-left). ``attn_mask`` is bool (True = attend) or additive (float32 or query's dtype),
    broadcastable to ``(batch, heads_q, seqlen_q, seqlen_k)``; on the GPU it is summarised per
    64x64 tile so fully masked tiles are skipped and unmasked ones never read. Rows that see no
    key return 0 (torch's math backend returns NaN there). Returns ``(batch, heads_q, seqlen_q,
    head_dim_v)``, contiguous.
    """
    three_d = getattr(query, "ndim", 4) == 3
    q, k, v = _sdpa_views(query, key, value, dropout_p, enable_gqa)
    mask = _sdpa_mask(attn_mask, three_d)
    if is_torch(q) and torch.compiler.is_compiling():
        o = torch.ops.ferrokernels.sdpa(q, k, v, mask, is_causal, scale)
    else:
        o = _sdpa_run(q, k, v, mask, is_causal, scale)
    return o[:, 0] if three_d else o


def _sdpa_run(q, k, v, mask, causal, scale):
    b, nq, h, _ = q.shape
    o = empty(q, (b, h, nq, v.shape[3]))
    o_view = o.transpose(1, 2) if is_torch(o) else o.swapaxes(1, 2)
    _run(q, k, v, o_view, causal=causal, bottom_right=False, scale=scale, window=(-1, -1),
         softcap=0.0, alibi=None, return_lse=False, mask=mask)
    return o


# torch.compile support: custom ops with fake implementations, so a traced graph keeps our
# kernel as one node. Eager calls above skip the dispatcher (it costs ~10 us a call).
if torch is not None:

    def _lse_or_empty(q, lse):
        return lse if lse is not None else q.new_empty((0,), dtype=torch.float32)

    @torch.library.custom_op("ferrokernels::attention", mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: Optional[float], window: List[int], softcap: float,
                      alibi: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        o, lse = _run(q, k, v, None, causal=causal, bottom_right=True, scale=scale, window=tuple(window),
                      softcap=softcap, alibi=alibi, return_lse=return_lse, mask=mask)
        return o, _lse_or_empty(q, lse)

    @_attention_op.register_fake
    def _(q, k, v, causal, scale, window, softcap, alibi, mask, return_lse):
        b, nq, h, _ = q.shape
        o = q.new_empty((b, nq, h, v.shape[3]))
        return o, q.new_empty((b, h, nq) if return_lse else (0,), dtype=torch.float32)

    @torch.library.custom_op("ferrokernels::attention_varlen", mutates_args=())
    def _attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                             scale: Optional[float], window: List[int], softcap: float,
                             alibi: Optional[torch.Tensor], return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        o, lse = _run(q, k, v, None, causal=causal, bottom_right=True, scale=scale, window=tuple(window),
                      softcap=softcap, alibi=alibi, return_lse=return_lse,
                      varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        return o, _lse_or_empty(q, lse)

    @_attention_varlen_op.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap,
          alibi, return_lse):
        o = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
        return o, q.new_empty((q.shape[1], q.shape[0]) if return_lse else (0,), dtype=torch.float32)

    @torch.library.custom_op("ferrokernels::sdpa", mutates_args=())
    def _sdpa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 causal: bool, scale: Optional[float]) -> torch.Tensor:
        return _sdpa_run(q, k, v, attn_mask, causal, scale)

    @_sdpa_op.register_fake
    def _(q, k, v, attn_mask, causal, scale):
        b, nq, h, _ = q.shape
        return q.new_empty((b, h, nq, v.shape[3]))
