"""Decode attention: a few new tokens per sequence against a KV cache.

The cache is contiguous ``(batch, capacity, heads_kv, head_dim)`` or paged
``(num_pages, page_size, heads_kv, head_dim)`` with an int32 ``block_table (batch, max_pages)``
(page sizes: powers of two up to 256). ``cache_seqlens[b]`` (int32) counts sequence b's keys
with the new tokens already written (``append_kv``); new token i sits at position
``cache_seqlens[b] - q_len + i``. ``cache_leftpad`` (flash-attn's name) moves the first key of a
sequence, or of each (sequence, kv head), right: e.g. a cache that keeps a different number of
tokens per head can right-align them and append at one length per sequence.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from . import _native
from ._runtime import empty, expect_rank, float32_of, is_torch, stream_of, torch
from .attention import _softcap, _window

Q_LAYOUT = "(batch, q_len, heads_q, head_dim)"
CACHE_LAYOUT = "(batch, capacity, heads_kv, head_dim) or (num_pages, page_size, heads_kv, head_dim)"


def _decode_window(window):
    """An int is the left side (keys before the token's position); a pair is (left, right)."""
    if isinstance(window, int) and not isinstance(window, bool):
        return (window, -1)
    return _window(window)


def _host(t):
    return t.detach().cpu() if is_torch(t) and t.is_cuda else t


def _capturing(t) -> bool:
    return is_torch(t) and t.is_cuda and torch.cuda.is_current_stream_capturing()


def _validate_tables(cache_seqlens, block_table, capacity: int, page_size: int, num_pages: int, extra: int = 0,
                     cache_leftpad=None):
    """Lengths (plus `extra` tokens being appended) within the capacity, every page in use
    inside the pool and every left padding within its sequence, checked on the host before the
    launch (a device-to-host copy for GPU tables; skipped while a CUDA graph is being captured,
    where the kernels still skip out-of-pool pages instead of touching them). Returns the host
    lengths (None if skipped)."""
    if _capturing(cache_seqlens):
        return None
    lens = _host(cache_seqlens)
    _native.decode_check_tables(lens, None if block_table is None else _host(block_table),
                                capacity, page_size, num_pages, extra,
                                None if cache_leftpad is None else _host(cache_leftpad))
    return lens


def _cache_geometry(k_cache, block_table):
    """(page_size or 0, num_pages, capacity per sequence) of a contiguous or paged cache."""
    expect_rank(k_cache, 4, "k_cache", CACHE_LAYOUT)
    if block_table is None:
        return 0, 0, int(k_cache.shape[1])
    if getattr(block_table, "ndim", None) != 3:
        expect_rank(block_table, 2, "block_table", "(batch, max_pages) or (batch, heads_kv, max_pages)")
    page_size = int(k_cache.shape[1])
    return page_size, int(k_cache.shape[0]), int(block_table.shape[-1]) * page_size


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, cache_leftpad=None,
                     causal_q: bool = True, scale: Optional[float] = None, softcap: Optional[float] = None,
                     window=None, return_lse: bool = False, out=None, validate: bool = True):
    """Attention of ``q`` (batch, q_len, heads_q, head_dim) over a KV cache.

    Parameters
    ----------
    q : (batch, q_len, heads_q, head_dim) float16/bfloat16 (float32 on the CPU); q_len is
        typically 1, or a handful of tokens being verified (speculative decoding).
    k_cache, v_cache : contiguous ``(batch, capacity, heads_kv, head_dim)``, or paged
        ``(num_pages, page_size, heads_kv, head_dim)`` when ``block_table`` is given. heads_q
        must be a multiple of heads_kv (GQA/MQA: every q head of a kv head shares one pass).
    cache_seqlens : int32 (batch,), keys per sequence including the q_len new tokens.
    block_table : int32 (batch, max_pages): page j of sequence b is ``block_table[b, j]``; or
        (batch, heads_kv, max_pages): kv head h of sequence b reads its own pages
        ``block_table[b, h, j]`` (sparse decode: a page set per head).
    cache_leftpad : int32 (batch,) or (batch, heads_kv): sequence b's (kv head h's) keys are
        ``[cache_leftpad[b(, h)], cache_seqlens[b])``; earlier slots are ignored. Positions (for
        ``causal_q`` and ``window``) stay cache indices.
    causal_q : new token i sees keys up to its own position (else every key in the cache).
    scale : softmax scale, default 1/sqrt(head_dim).
    softcap : scores become ``softcap * tanh(score / softcap)`` (Gemma 2).
    window : int (keys before the position, Mistral-style sliding window) or (left, right).
    return_lse : also return the float32 natural-log LSE, (batch, heads_q, q_len).
    out : optional preallocated output like q.
    validate : check lengths and block table entries on the host first (for GPU tables a
        device-to-host copy; skipped under CUDA graph capture). Turn off in a tight loop whose
        tables are known good, e.g. those of ``PagedKVCache``.

    Returns out, or (out, lse). Rows that see no key (an empty sequence) give 0 and LSE -inf.
    """
    window = list(_decode_window(window))
    softcap = _softcap(softcap)
    if is_torch(q) and torch.compiler.is_compiling():
        o, lse = torch.ops.ferrokernels.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table,
                                                         cache_leftpad, causal_q, scale, softcap, window,
                                                         return_lse, validate)
        return (o, lse) if return_lse else o
    out, lse = _decode_run(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, causal_q, scale, softcap,
                           window, return_lse, out, validate)
    return (out, lse) if return_lse else out


def _decode_run(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, causal_q, scale, softcap, window,
                return_lse, out, validate):
    expect_rank(q, 4, "q", Q_LAYOUT)
    page_size, num_pages, capacity = _cache_geometry(k_cache, block_table)
    batch, q_len, heads_q, head_dim = (int(x) for x in q.shape)
    heads_kv = int(k_cache.shape[2])
    if out is None:
        out = empty(q, tuple(q.shape))
    lse = empty(q, (batch, heads_q, q_len), float32_of(q)) if return_lse else None
    if validate:
        _validate_tables(cache_seqlens, block_table, capacity, page_size, num_pages, cache_leftpad=cache_leftpad)
    splits, workspace = 1, None
    plannable = heads_kv > 0 and heads_q % heads_kv == 0 and q.dtype in (torch.float16, torch.bfloat16)
    if is_torch(q) and q.is_cuda and plannable:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        splits, floats = _native.decode_plan(index, str(q.dtype).removeprefix("torch."), batch, q_len, heads_q,
                                             heads_kv, head_dim, capacity)
        if floats:
            # From torch's allocator, so a captured CUDA graph owns its copy.
            workspace = torch.empty(floats, dtype=torch.float32, device=q.device)
    _native.decode_fwd(q, k_cache, v_cache, cache_seqlens, out, lse, block_table=block_table,
                       cache_leftpad=cache_leftpad, causal_q=causal_q,
                       scale=None if scale is None else float(scale), softcap=softcap,
                       window=tuple(window), workspace=workspace, splits=splits, stream=stream_of(q))
    return out, lse


def append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table=None, *, rotary=None,
              rotary_interleaved: bool = False, validate: bool = True) -> None:
    """Writes ``k_new``/``v_new`` (batch, n_new, heads_kv, head_dim) into the cache at positions
    ``cache_seqlens[b] + t`` (contiguous or paged layout, as ``decode_attention``), in place.

    rotary : optional ``(cos, sin)``, each (positions, rotary_dim / 2), float32 or the cache
        dtype: K is rotated by the token's position on the way in (the first rotary_dim
        columns; GPT-NeoX halves, or GPT-J pairs with ``rotary_interleaved=True``).
    validate : check on the host that the new tokens fit the capacity, their pages are inside
        the pool and the rotary table covers their positions (skipped under graph capture).

    ``cache_seqlens`` is not advanced: add n_new once every layer has appended.
    """
    expect_rank(k_new, 4, "k_new", "(batch, n_new, heads_kv, head_dim)")
    page_size, num_pages, capacity = _cache_geometry(k_cache, block_table)
    cos = sin = None
    if rotary is not None:
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise ValueError("rotary must be a (cos, sin) pair of (positions, rotary_dim / 2) tensors")
        cos, sin = rotary
    if is_torch(k_new) and torch.compiler.is_compiling():
        torch.ops.ferrokernels.append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos, sin,
                                         bool(rotary_interleaved), validate)
        return
    _append_run(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos, sin, bool(rotary_interleaved),
                validate, page_size, num_pages, capacity)


def _append_run(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos, sin, interleaved, validate,
                page_size, num_pages, capacity):
    n_new = int(k_new.shape[1])
    if validate:
        lens = _validate_tables(cache_seqlens, block_table, capacity, page_size, num_pages, extra=n_new)
        if lens is not None and cos is not None and len(lens) and n_new:
            last = int(lens.max()) + n_new - 1
            if last >= int(cos.shape[0]):
                raise ValueError(f"rotary cos/sin have {int(cos.shape[0])} positions but the new tokens reach "
                                 f"position {last}")
    _native.append_kv_fwd(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos=cos, sin=sin,
                          interleaved=interleaved, stream=stream_of(k_new))


# torch.compile support: custom ops with fake implementations (see attention.py).
if torch is not None:

    @torch.library.custom_op("ferrokernels::decode_attention", mutates_args=())
    def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   block_table: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor], causal_q: bool,
                   scale: Optional[float], softcap: float, window: List[int], return_lse: bool,
                   validate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        out, lse = _decode_run(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, causal_q, scale,
                               softcap, window, return_lse, None, validate)
        return out, lse if lse is not None else q.new_empty((0,), dtype=torch.float32)

    @_decode_op.register_fake
    def _(q, k_cache, v_cache, cache_seqlens, block_table, cache_leftpad, causal_q, scale, softcap, window,
          return_lse, validate):
        b, n, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((b, h, n) if return_lse else (0,), dtype=torch.float32)

    @torch.library.custom_op("ferrokernels::append_kv", mutates_args=("k_cache", "v_cache"))
    def _append_op(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                   sin: Optional[torch.Tensor], interleaved: bool, validate: bool) -> None:
        page_size, num_pages, capacity = _cache_geometry(k_cache, block_table)
        _append_run(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos, sin, interleaved, validate,
                    page_size, num_pages, capacity)

    @_append_op.register_fake
    def _(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos, sin, interleaved, validate):
        return None
