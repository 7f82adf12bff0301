"""KV-cache compression: the published presses.

A press looks at one layer's keys and values after prefill (and the last queries, for the
attention-based ones) and keeps a budget of tokens per kv head; the rest is dropped (or merged
into what is kept), so the memory is released. Every press here follows the scoring formula
of NVIDIA kvpress where kvpress defines the method (its ``compression_ratio`` is ``ratio``:
the fraction removed), on batches of any size, on the CPU or the GPU:

- ``StreamingLLM`` (Xiao et al., 2023): the first ``n_sink`` tokens and the most recent.
- ``SnapKV`` (Li et al., 2024): the attention of the last ``window`` queries, averaged over
  them, pooled over ``kernel`` neighbouring keys, averaged over each kv head's query heads;
  the window itself is kept.
- ``PyramidKV`` (Cai et al., 2024): SnapKV's scores with a budget that shrinks with depth.
- ``ObservedAttention`` (H2O, Zhang et al., 2023): the attention every key receives from
  every query after it, averaged over those queries (computed in query chunks from the
  prefill's LSE: the full attention matrix never exists).
- ``TOVA`` (Oren et al., 2024): the last query's attention averaged over all heads.
- ``Knorm`` (Devoto et al., 2024): keys with the smallest L2 norm are the most attended.
- ``ThinK`` (Xu et al., 2024): drops key *channels* (the least ``q^2 k^2`` energy), kept
  compact with their channel ids (``ChannelPruned``).
- ``DuoAttention`` / RazorAttention (Xiao et al., 2024; Tang et al., 2024): retrieval heads keep
  everything, streaming heads keep sink + recent; head scores supplied, or estimated from how
  much of the window's attention falls outside sink + recent.
- ``AdaKV`` (Feng et al., 2024): one top-k over all heads of a layer (with a per-head
  floor): heads get different budgets.
- ``KVMerge`` (KVMerger / EMS style): tokens another press evicts are merged into their most
  similar kept key, weighted by their scores, instead of being dropped.

Tensors use ferrokernels' layout: keys / values ``(batch, seqlen, heads_kv, head_dim)``,
queries ``(batch, n, heads_q, head_dim)`` already rotated (the window's queries, or all of
them for ObservedAttention). A press returns a ``Compressed``: the kept keys / values
``(batch, kept, heads_kv, head_dim)`` in their original order, the kept positions and the
per-head lengths (presses with per-head budgets pad to the longest head).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

from . import _native
from ._runtime import ShapeError, bmm_f32, expect_rank, stream_of, torch
from .attention import LAYOUT
from .kv_quant import QuantizedKV, quantized_decode  # noqa: F401  (quantized KV lives beside the presses)

_CHUNK = 1 << 24  # score elements computed at once (window_scores' torch path)


@dataclass
class Compressed:
    """One layer's compressed KV.

    keys, values : ``(batch, kept, heads_kv, head_dim)``; positions ``(batch, heads_kv,
    kept)`` int64, the kept tokens' original positions, ascending (``-1`` past a head's
    length); lengths ``(batch, heads_kv)`` int32. For presses with one budget every head's
    length is ``kept``."""

    keys: "torch.Tensor"
    values: "torch.Tensor"
    positions: "torch.Tensor"
    lengths: "torch.Tensor"

    @property
    def uniform(self) -> bool:
        """Every head keeps the same number of tokens (no padding)."""
        return bool((self.lengths == self.keys.shape[1]).all())


def _check_kv(keys, values, queries=None, need_queries=False, name="press"):
    expect_rank(keys, 4, "keys", LAYOUT)
    expect_rank(values, 4, "values", LAYOUT)
    if tuple(values.shape[:3]) != tuple(keys.shape[:3]):
        raise ShapeError(f"values {tuple(values.shape)} must match keys {tuple(keys.shape)} but for head_dim")
    if queries is None:
        if need_queries:
            raise ValueError(f"{name} scores keys by attention: pass queries (batch, n, heads_q, head_dim)")
        return
    expect_rank(queries, 4, "queries", LAYOUT)
    if queries.shape[0] != keys.shape[0] or queries.shape[3] != keys.shape[3] or queries.shape[2] % keys.shape[2]:
        raise ShapeError(f"queries {tuple(queries.shape)} must share keys' batch and head_dim {tuple(keys.shape)}, "
                         f"with heads_q a multiple of heads_kv")


def _ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio (the fraction removed) must be in [0, 1), got {ratio!r}")
    return float(ratio)


_SCORE_KERNEL = True  # tests turn it off to compare the kernels with the torch path on one device
_SCORE_HEAD_DIMS = (64, 128, 256)  # src/ops/window_scores.rs: HEAD_DIMS
_WINDOW_LSE_MAX_W = 512  # longer windows take their LSE from the attention kernel


def window_scores(keys, queries, lse=None, scale=None, out=None):
    """float32 ``(batch, heads_kv, seqlen)``: each key's softmax attention from the ``w``
    queries, which sit at the last ``w`` positions (causal among themselves), summed over
    those queries and over each kv head's q heads. ``lse`` ``(batch, heads_q, w)``: the
    queries' log-sum-exp over their keys (natural log), e.g. from the prefill's attention;
    computed when None. On CUDA (16-bit, head_dim 64 / 128 / 256) one kernel computes it tile
    by tile (kernels/window_scores.cu): the (heads, w, seqlen) probabilities never exist.
    ``out``: a float32 ``(batch, heads_kv, seqlen)`` tensor to write into."""
    _check_kv(keys, keys, queries, True, "window_scores")
    b, n, hk, d = keys.shape
    w, hq = queries.shape[1], queries.shape[2]
    if w > n:
        raise ValueError(f"window_scores needs at least as many keys ({n}) as queries ({w})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if lse is not None:
        expect_rank(lse, 3, "lse", "(batch, heads_q, w)")
        if tuple(lse.shape) != (b, hq, w):
            raise ShapeError(f"lse must be ({b}, {hq}, {w}) for queries {tuple(queries.shape)}, got {tuple(lse.shape)}")
    if out is not None and (tuple(out.shape) != (b, hk, n) or out.dtype != torch.float32 or out.device != keys.device
                            or not out.is_contiguous()):
        raise ShapeError(f"out must be a contiguous float32 ({b}, {hk}, {n}) tensor on {keys.device}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if (_SCORE_KERNEL and keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16) and queries.dtype == keys.dtype
            and d in _SCORE_HEAD_DIMS):
        if lse is None:
            lse = _window_lse(queries, keys, scale)
        out = torch.empty(b, hk, n, dtype=torch.float32, device=keys.device) if out is None else out
        _native.window_scores(queries, keys, lse.float().contiguous(), out, scale=scale, stream=stream_of(keys))
        return out
    s = _window_scores_torch(keys, queries, lse, scale)
    return s if out is None else out.copy_(s)


def _window_lse(queries, keys, scale):
    """float32 ``(batch, heads_q, w)``: the window queries' LSE (natural log) over the keys up to
    their own positions, the last w (CUDA, 16-bit, head_dim 64 / 128 / 256). A short window
    takes the kernel on window_scores' tiles (CTAs over the keys, then a merge: a 64-row window
    fills the GPU); a long one (H2O's, every query) our attention kernel, whose CTAs are its
    128-row query tiles (the key-split kernel re-walks the rows per CTA: 2x slower at w = n)."""
    b, w, hq, d = queries.shape
    if w > _WINDOW_LSE_MAX_W:
        from .attention import attention
        # Bottom-right causal: the rows see every key up to their own. A narrow V: only the LSE is read.
        return attention(queries, keys, keys[..., :8], causal=True, scale=scale, return_lse=True)[1].float()
    lse = torch.empty(b, hq, w, dtype=torch.float32, device=keys.device)
    ws = torch.empty(_native.window_lse_workspace(b, keys.shape[1], w, hq, d), dtype=torch.float32, device=keys.device)
    _native.window_lse(queries, keys, lse, ws, scale=scale, stream=stream_of(keys))
    return lse


def _window_scores_torch(keys, queries, lse, scale):
    """window_scores in torch, a chunk of queries at a time: scores in the inputs' precision
    (as the model computes them), softmax in float32."""
    b, n, hk, d = keys.shape
    w, hq = queries.shape[1], queries.shape[2]
    g = hq // hk
    qg = queries.view(b, w, hk, g, d)
    step = max(1, 4 * _CHUNK // max(1, b * hq * n))
    pos = torch.arange(n, device=keys.device)

    def scores(r0, r1):
        s = torch.einsum("bqhgd,bkhd->bhgqk", qg[:, r0:r1], keys).float() * scale
        return s.masked_fill_(pos[None, :] > pos[n - w + r0:n - w + r1, None], float("-inf"))

    if lse is None:
        lse = torch.cat([torch.logsumexp(scores(r0, min(w, r0 + step)), -1) for r0 in range(0, w, step)], -1)
    else:
        lse = lse.float().view(b, hk, g, w)
    total = torch.zeros(b, hk, n, device=keys.device)
    for r0 in range(0, w, step):
        r1 = min(w, r0 + step)
        total += torch.exp(scores(r0, r1) - lse[..., r0:r1, None]).sum((2, 3))
    return total


def _pad_with_max(s, w):
    """s (b, h, m) followed by w columns of its global max, so those tokens are always kept
    (kvpress pads with ``scores.max().item()``; this stays on the device, no host sync)."""
    return torch.cat([s, s.max().expand(*s.shape[:2], w)], -1)


def _top(scores, n_kept):
    """int64 (batch, heads_kv, n_kept): the best-scored positions, in their original order (on
    CUDA one radix-select launch, kernels/kv_select.cu; ties to the earlier position)."""
    if _SCORE_KERNEL and scores.is_cuda and scores.dtype == torch.float32 and 0 < n_kept <= scores.shape[-1]:
        b, h, n = scores.shape
        idx = torch.empty(b, h, n_kept, dtype=torch.int64, device=scores.device)
        _native.kv_select_topk(scores.contiguous().view(b * h, n), idx.view(b * h, n_kept), stream=stream_of(scores))
        return idx
    return scores.topk(n_kept, -1).indices.sort(-1).values


def _keep(keys, values, scores, n_kept):
    """The n_kept best-scored tokens per (batch, kv head), in their original order."""
    idx = _top(scores, n_kept)
    return _gather(keys, values, idx, torch.full(idx.shape[:2], n_kept, dtype=torch.int32, device=idx.device))


def _rows_copyable(t) -> bool:
    """The gather kernel copies 16-byte pieces of rows: contiguous rows, 16-byte aligned."""
    e = t.element_size()
    return (t.stride(-1) == 1 and (t.shape[-1] * e) % 16 == 0 and t.data_ptr() % 16 == 0
            and all((s * e) % 16 == 0 for s in t.stride()[:-1]))


def _gather(keys, values, idx, lengths, padded=False):
    """Per (batch, kv head) rows idx (b, hk, kept) of keys / values; with `padded`, -1 entries
    (past a head's length) give zeros."""
    b, hk, kept = idx.shape
    if (_SCORE_KERNEL and keys.is_cuda and values.dtype == keys.dtype and _rows_copyable(keys)
            and _rows_copyable(values)):
        k = torch.empty(b, kept, hk, keys.shape[3], dtype=keys.dtype, device=keys.device)
        v = torch.empty(b, kept, hk, values.shape[3], dtype=values.dtype, device=values.device)
        # Negative entries come out as zero rows, so `padded` needs nothing more.
        _native.kv_select_gather(keys, values, idx.contiguous(), k, v, stream=stream_of(keys))
        return Compressed(k, v, idx, lengths)
    safe = idx.clamp(min=0).transpose(1, 2)                                  # (b, kept, hk)
    k = torch.gather(keys, 1, safe[..., None].expand(b, kept, hk, keys.shape[3]))
    v = torch.gather(values, 1, safe[..., None].expand(b, kept, hk, values.shape[3]))
    if padded:
        pad = (idx < 0).transpose(1, 2)[..., None]
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    return Compressed(k.contiguous(), v.contiguous(), idx, lengths)


class Press:
    """A scorer press: per (batch, kv head) scores, the ``budget`` best kept."""

    needs_queries = False

    def __init__(self, ratio: float = 0.5):
        self.ratio = _ratio(ratio)

    def score(self, keys, values, queries=None, lse=None):
        """float32 ``(batch, heads_kv, seqlen)``: higher = keep. ``lse`` ``(batch, heads_q,
        queries)``: the queries' log-sum-exp from the prefill's attention, if at hand (the
        attention-based presses then skip computing it)."""
        raise NotImplementedError

    def budget(self, n: int, layer: int = 0, n_layers: int = 1) -> int:
        """Tokens kept per head out of n (kvpress: ``max(1, int(n * (1 - ratio)))``)."""
        return max(1, int(n * (1 - self.ratio)))

    def __call__(self, keys, values, queries=None, *, layer: int = 0, n_layers: int = 1, lse=None) -> Compressed:
        _check_kv(keys, values, queries, self.needs_queries, type(self).__name__)
        n = keys.shape[1]
        if self.ratio == 0:
            pos = torch.arange(n, device=keys.device).expand(keys.shape[0], keys.shape[2], n)
            return Compressed(keys, values, pos, torch.full(pos.shape[:2], n, dtype=torch.int32, device=keys.device))
        return _keep(keys, values, self.score(keys, values, queries, lse=lse), min(n, self.budget(n, layer, n_layers)))


class StreamingLLM(Press):
    """The first ``n_sink`` tokens and the most recent ones."""

    def __init__(self, ratio: float = 0.5, n_sink: int = 4):
        super().__init__(ratio)
        self.n_sink = int(n_sink)

    def score(self, keys, values, queries=None, lse=None):
        b, n, hk, _ = keys.shape
        if n <= self.n_sink:
            raise ValueError(f"StreamingLLM needs more than n_sink={self.n_sink} tokens, got {n}")
        pruned = n - int(n * (1 - self.ratio))
        pos = torch.arange(n, device=keys.device)
        drop = (pos >= self.n_sink) & (pos < self.n_sink + pruned)
        return (~drop).float().expand(b, hk, n)


class Knorm(Press):
    """Keys with a small L2 norm draw the most attention: score = -||k||."""

    def score(self, keys, values, queries=None, lse=None):
        return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32).transpose(1, 2)


class SnapKV(Press):
    """The last ``window`` queries' attention, averaged over them, pooled over ``kernel``
    neighbouring keys, averaged per kv head; the window is always kept."""

    needs_queries = True

    def __init__(self, ratio: float = 0.5, window: int = 64, kernel: int = 5):
        super().__init__(ratio)
        self.window, self.kernel = int(window), int(kernel)

    def score(self, keys, values, queries=None, lse=None, scale=None):
        b, n, hk, _ = keys.shape
        w, hq = queries.shape[1], queries.shape[2]
        if n <= w:
            raise ValueError(f"{type(self).__name__} needs more keys ({n}) than window queries ({w})")
        # kvpress averages over the window, pools per q head, then averages each group: all
        # linear, so pooling the group's sum is the same.
        a = window_scores(keys, queries, lse, scale)[..., : n - w] / (w * (hq // hk))
        s = torch.nn.functional.avg_pool1d(a, self.kernel, stride=1, padding=self.kernel // 2)
        return _pad_with_max(s, w)


class PyramidKV(SnapKV):
    """SnapKV with a per-layer budget: more tokens in the first layers, fewer in the last,
    the same total (kvpress's pyramid, ``beta`` its steepness)."""

    def __init__(self, ratio: float = 0.5, window: int = 64, kernel: int = 5, beta: int = 20):
        super().__init__(ratio, window, kernel)
        if beta < 1:
            raise ValueError(f"beta must be >= 1, got {beta}")
        self.beta = beta

    def budget(self, n: int, layer: int = 0, n_layers: int = 1) -> int:
        w = self.window
        cap = w + n * (1 - self.ratio)
        lo = (cap - w) / self.beta
        hi = (cap - w) * 2 - lo
        if hi >= n - w:
            hi = n - w
            lo = (cap - w) * 2 - hi
        if not (n >= hi >= lo >= w) or n_layers < 2:
            return round(n * (1 - self.ratio))
        return round(hi - layer * (hi - lo) / (n_layers - 1))


class TOVA(Press):
    """The last query's attention, averaged over every head of the layer; the last token is
    always kept."""

    needs_queries = True

    def score(self, keys, values, queries=None, lse=None, scale=None):
        b, n, hk, _ = keys.shape
        lse = None if lse is None else lse[..., -1:]
        a = window_scores(keys, queries[:, -1:], lse, scale)[..., : n - 1].sum(1, keepdim=True) / queries.shape[2]
        return _pad_with_max(a, 1).expand(b, hk, n)


class ObservedAttention(Press):
    """H2O's accumulated attention: each key's attention from every query at or after it,
    divided by how many there are, averaged per kv head. ``queries`` are all of them (the
    prefill's); the attention is computed in query chunks from their LSE."""

    needs_queries = True

    def score(self, keys, values, queries=None, lse=None, scale=None):
        b, n, hk, d = keys.shape
        nq, hq = queries.shape[1], queries.shape[2]
        if nq != n:
            raise ShapeError(f"ObservedAttention needs every query: got {nq} for {n} keys")
        counts = torch.arange(n, 0, -1, device=keys.device, dtype=torch.float32)  # queries at or after each key
        return window_scores(keys, queries, lse, scale) / counts / (hq // hk)


class ThinK:
    """Key channel pruning: per (batch, kv head) the ``key_ratio`` of channels with the least
    energy ``mean_w(q_c^2) * mean_n(k_c^2)`` (queries of the last ``window``, averaged over the
    group) are removed. Returns the keys with those channels zeroed (kvpress's semantics) and
    the compact form ``ChannelPruned`` (the kept channels and their ids), which attention can
    use with the queries gathered on the same channels: the scores are identical."""

    needs_queries = True

    def __init__(self, key_ratio: float = 0.5, window: int = 32):
        self.key_ratio = _ratio(key_ratio)
        self.window = int(window)

    def channels(self, keys, queries):
        """int64 (batch, heads_kv, kept channels), ascending."""
        b, n, hk, d = keys.shape
        qn = queries[:, -self.window:].float().pow(2).mean(1).view(b, hk, -1, d).mean(2)   # (b, hk, d)
        kn = torch.linalg.vector_norm(keys, dim=1, dtype=torch.float32).pow(2) / n  # (b, hk, d), no float copy
        keep = d - int(d * self.key_ratio)
        return _top(qn * kn, keep)

    def __call__(self, keys, values, queries=None, *, layer: int = 0, n_layers: int = 1, lse=None):
        """(keys with the dropped channels zeroed, ChannelPruned); ``layer``, ``n_layers`` and
        ``lse`` are the presses' call and unused here."""
        _check_kv(keys, values, queries, True, "ThinK")
        ch = self.channels(keys, queries)
        b, n, hk, d = keys.shape
        compact = torch.gather(keys, 3, ch[:, None].expand(b, n, hk, ch.shape[-1]))
        zeroed = torch.zeros_like(keys).scatter_(3, ch[:, None].expand(b, n, hk, ch.shape[-1]), compact)
        return zeroed, ChannelPruned(compact.contiguous(), ch)


@dataclass
class ChannelPruned:
    """Keys on their kept channels: keys ``(batch, seqlen, heads_kv, kept)`` and channel ids
    ``(batch, heads_kv, kept)``. ``queries(q)`` gathers q ``(batch, n, heads_q, head_dim)`` on the
    same channels, so ``q_kept . k_kept`` equals q . k with the dropped channels zeroed."""

    keys: "torch.Tensor"
    channels: "torch.Tensor"

    def queries(self, q):
        b, n, hq, d = q.shape
        hk = self.channels.shape[1]
        ch = self.channels.repeat_interleave(hq // hk, dim=1)                   # (b, hq, kept)
        return torch.gather(q, 3, ch[:, None].expand(b, n, hq, ch.shape[-1]))


@functools.lru_cache(maxsize=64)
def _later_than(q_len: int, m: int, before: int, device) -> "torch.Tensor":
    """bool (q_len, m): new token j is past query t (j > before + t), built once per step shape."""
    t = torch.arange(q_len, device=device)[:, None]
    return torch.arange(m, device=device)[None, :] > before + t


def pruned_attention(q, keys, channels, values, lengths=None, *, k_new=None, v_new=None, new_before: int = 0,
                     scale: Optional[float] = None, softcap: float = 0.0):
    """Attention of q ``(batch, q_len, heads_q, D)`` over a ThinK-pruned prefix plus full new
    tokens, every K/V heads first: scores with the prefix are q on each kv head's kept
    ``channels`` (batch, heads_kv, kept) against ``keys`` ``(batch, heads_kv, P, kept)``, with
    the new tokens q against ``k_new`` ``(batch, heads_kv, M, D)``; one softmax over both, then
    ``values`` ``(batch, heads_kv, P, Dv)`` and ``v_new``. ``lengths`` (batch,) int: a
    sequence's real prefix (the rest is padding, which must be finite: it is weighted by zero;
    None: no padding); query t sees new tokens up to ``new_before + t`` (q_len new tokens after
    ``new_before`` earlier ones, all already in ``k_new``). Equal to attention over the keys
    with the dropped channels zeroed (kvpress's ThinK), without storing them.

    Batched float32-accumulated matmuls (torch), every kept key read once per step; about a
    dozen launches (a decode step is host-bound in eager mode)."""
    b, q_len, hq, d = q.shape
    hk, p_len, kept = keys.shape[1], keys.shape[2], keys.shape[3]
    g, dv = hq // hk, values.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # Rows (group, t) per kv head, scaled once here rather than in both score tensors: one
    # launch into a new tensor (an in-place scale of a reshape could write into q itself).
    qg = torch.empty(b, hk, g, q_len, d, dtype=q.dtype, device=q.device)
    torch.mul(q.view(b, q_len, hk, g, d).permute(0, 2, 3, 1, 4), scale, out=qg)
    qg = qg.view(b * hk, g * q_len, d)
    q_kept = torch.gather(qg.view(b, hk, g * q_len, d), 3, channels[:, :, None, :].expand(b, hk, g * q_len, kept))

    def logits(qs, ks, hidden):  # capped, then masked (a cap would undo -inf)
        s = bmm_f32(qs, ks.transpose(1, 2))
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        s = s.view(b, hk, g, q_len, -1)
        return s if hidden is None else s.masked_fill(hidden, float("-inf"))

    hidden = None
    if lengths is not None:
        hidden = torch.arange(p_len, device=q.device) >= torch.as_tensor(lengths, device=q.device).view(b, 1, 1, 1, 1)
    s = logits(q_kept.reshape(b * hk, g * q_len, kept), keys.reshape(b * hk, p_len, kept), hidden)
    if k_new is not None:
        m = k_new.shape[2]
        s_new = logits(qg, k_new.reshape(b * hk, m, d), _later_than(q_len, m, new_before, q.device))
        s = torch.cat([s, s_new], -1)
    pr = torch.softmax(s, -1).view(b * hk, g * q_len, -1).to(values.dtype)
    out = bmm_f32(pr[..., :p_len], values.reshape(b * hk, p_len, dv))
    if k_new is not None:
        out += bmm_f32(pr[..., p_len:], v_new.reshape(b * hk, m, dv))
    result = torch.empty(b, q_len, hq, dv, dtype=q.dtype, device=q.device)
    result.view(b, q_len, hk, g, dv).permute(0, 2, 3, 1, 4).copy_(out.view(b, hk, g, q_len, dv))  # one launch
    return result


class AdaKV:
    """Head-adaptive budgets (AdaKV): the scores of ``scorer`` compete across all heads of a
    layer for ``heads * budget`` slots, each head keeping at least ``alpha_safeguard`` of the
    uniform budget. Heads end with different lengths (the result is padded to the longest)."""

    def __init__(self, scorer: Press, alpha_safeguard: float = 0.2):
        if not isinstance(scorer, Press):
            raise TypeError(f"scorer must be a ferrokernels.kv.Press, got {type(scorer).__name__}")
        self.scorer, self.alpha = scorer, float(alpha_safeguard)
        self.needs_queries = scorer.needs_queries

    @property
    def ratio(self):
        return self.scorer.ratio

    def kept_mask(self, scores, n_kept):
        """bool (batch, heads_kv, seqlen): the tokens kept (kvpress's AdaKV selection)."""
        b, hk, n = scores.shape
        safe = int(n_kept * self.alpha)
        s = scores.clone()
        if safe > 0:
            s.scatter_(-1, _top(s, safe), torch.finfo(s.dtype).max)
        # kvpress drops the hk * (n - n_kept) lowest of the layer; keeping the hk * n_kept best
        # is the same set (up to ties), and one radix select on CUDA instead of torch's top-k.
        kept = _top(s.reshape(b, 1, hk * n), hk * n_kept).view(b, -1)
        keep = torch.zeros(b, hk * n, dtype=torch.bool, device=s.device).scatter_(1, kept, True)
        return keep.view(b, hk, n)

    def __call__(self, keys, values, queries=None, *, layer: int = 0, n_layers: int = 1, lse=None) -> Compressed:
        _check_kv(keys, values, queries, self.needs_queries, "AdaKV")
        n = keys.shape[1]
        scores = self.scorer.score(keys, values, queries, lse=lse)
        keep = self.kept_mask(scores, min(n, self.scorer.budget(n, layer, n_layers)))
        return _from_mask(keys, values, keep)


def _from_mask(keys, values, keep):
    """Compressed from a per-head kept mask (batch, heads_kv, seqlen): kept positions first,
    ascending, padded with -1 to the longest head (one host sync for that length)."""
    lengths = keep.sum(-1, dtype=torch.int32)
    longest = max(1, int(lengths.max()))
    n = keep.shape[-1]
    # A kept position goes to its rank among its head's kept ones, the rest to a spare column
    # n: a compaction in a few element-wise launches (a sort of the positions was ~85 us at 8K).
    rank = torch.where(keep, keep.cumsum(-1) - 1, n)
    idx = torch.full((*keep.shape[:-1], n + 1), -1, dtype=torch.int64, device=keep.device)
    idx.scatter_(-1, rank, torch.arange(n, device=keep.device).expand_as(rank))
    return _gather(keys, values, idx[..., :longest].contiguous(), lengths, padded=True)


class DuoAttention:
    """Retrieval heads keep every token; streaming heads keep ``sink`` + ``recent`` (DuoAttention,
    RazorAttention). ``head_scores`` ``(heads_kv,)`` or ``(n_layers, heads_kv)``: higher = retrieval;
    the ``1 - streaming_ratio`` best heads of a layer are retrieval heads. Without them they
    are estimated per call from the window's queries: a head whose attention mostly falls
    outside sink + recent is a retrieval head."""

    needs_queries = True

    def __init__(self, streaming_ratio: float = 0.5, sink: int = 64, recent: int = 256, head_scores=None):
        if not 0 <= streaming_ratio <= 1:
            raise ValueError(f"streaming_ratio must be in [0, 1], got {streaming_ratio}")
        self.streaming_ratio, self.sink, self.recent = float(streaming_ratio), int(sink), int(recent)
        self.head_scores = head_scores

    def estimate_head_scores(self, keys, queries, lse=None):
        """(batch, heads_kv): the window's attention mass outside sink + recent."""
        w, g = queries.shape[1], queries.shape[2] // keys.shape[2]
        a = window_scores(keys, queries, lse) / (w * g)                            # (b, hk, n)
        return a.masked_fill(self._local(keys), 0).sum(-1)

    def _local(self, keys):
        """bool (seqlen,): the sink and recent tokens a streaming head keeps."""
        n = keys.shape[1]
        pos = torch.arange(n, device=keys.device)
        return (pos < self.sink) | (pos >= n - self.recent)

    def __call__(self, keys, values, queries=None, *, layer: int = 0, n_layers: int = 1, lse=None) -> Compressed:
        b, n, hk, _ = keys.shape
        if self.head_scores is None:
            _check_kv(keys, values, queries, True, "DuoAttention")
            hs = self.estimate_head_scores(keys, queries, lse)
        else:
            _check_kv(keys, values)
            hs = torch.as_tensor(self.head_scores, dtype=torch.float32, device=keys.device)
            hs = (hs[layer] if hs.ndim == 2 else hs).expand(b, hk)
        n_stream = int(round(hk * self.streaming_ratio))
        stream = torch.zeros(b, hk, dtype=torch.bool, device=keys.device)
        if n_stream:
            stream.scatter_(1, (-hs).topk(n_stream, -1).indices, True)
        return _from_mask(keys, values, ~stream[..., None] | self._local(keys))


class KVMerge:
    """Evicted tokens are merged into the kept token whose key is most similar (cosine), as a
    score-weighted average of keys and of values (KVMerger / EMS style), instead of being
    dropped. ``press`` chooses what is kept; its scores (shifted to be positive) weigh the
    merge."""

    def __init__(self, press: Press):
        if not isinstance(press, Press):
            raise TypeError(f"press must be a ferrokernels.kv.Press, got {type(press).__name__}")
        self.press = press
        self.needs_queries = press.needs_queries

    def __call__(self, keys, values, queries=None, *, layer: int = 0, n_layers: int = 1, lse=None) -> Compressed:
        _check_kv(keys, values, queries, self.needs_queries, "KVMerge")
        b, n, hk, d = keys.shape
        dv = values.shape[3]
        scores = self.press.score(keys, values, queries, lse=lse)
        kept = min(n, self.press.budget(n, layer, n_layers))
        idx = _top(scores, kept)                                                 # (b, hk, kept)
        w = (scores - scores.amin(-1, keepdim=True) + 1e-3).float()             # positive weights
        # Kept tokens merge into themselves; evicted ones into their most similar kept key.
        slot = torch.empty(b, hk, n, dtype=torch.long, device=keys.device)      # every position is one or the other
        slot.scatter_(-1, idx, torch.arange(kept, device=keys.device).expand(b, hk, kept))
        if kept < n:
            keep = torch.zeros(b, hk, n, dtype=torch.bool, device=keys.device).scatter_(-1, idx, True)
            evicted = _top((~keep).float(), n - kept)                            # (b, hk, n - kept)
            slot.scatter_(-1, evicted, self._most_similar(keys, idx, evicted))
        lengths = torch.full((b, hk), kept, dtype=torch.int32, device=keys.device)
        if _merge_kernels(keys, values):
            kout = torch.empty(b, kept, hk, d, dtype=keys.dtype, device=keys.device)
            vout = torch.empty(b, kept, hk, dv, dtype=values.dtype, device=values.device)
            ws = torch.zeros(b * hk * kept * (d + dv + 1), dtype=torch.float32, device=keys.device)
            _native.kv_merge_rows(keys, values, slot, idx, w.contiguous(), ws, kout, vout, stream=stream_of(keys))
            return Compressed(kout, vout, idx, lengths)
        wsum = torch.zeros(b, hk, kept, device=keys.device).scatter_add_(-1, slot, w)
        kf, vf = keys.float().transpose(1, 2), values.float().transpose(1, 2)  # (b, hk, n, d)
        kout = torch.zeros(b, hk, kept, d, device=keys.device).scatter_add_(2, slot[..., None].expand(b, hk, n, d), kf * w[..., None])
        vout = torch.zeros(b, hk, kept, dv, device=keys.device).scatter_add_(2, slot[..., None].expand(b, hk, n, dv), vf * w[..., None])
        kout, vout = kout / wsum[..., None], vout / wsum[..., None]
        return Compressed(kout.transpose(1, 2).to(keys.dtype).contiguous(), vout.transpose(1, 2).to(values.dtype).contiguous(),
                          idx, lengths)

    @staticmethod
    def _most_similar(keys, kept_idx, evicted_idx):
        """(b, hk, evicted): for each evicted token, the slot of the kept key with the highest
        cosine similarity. On CUDA one kernel (kernels/kv_merge.cu: the similarities stay in
        registers, float32); else only evicted rows are compared, a chunk of them at a time (the
        (evicted x kept) matrix is never whole), in float32 (the reference)."""
        b, n, hk, d = keys.shape
        ne = evicted_idx.shape[-1]
        out = torch.empty(b, hk, ne, dtype=torch.long, device=keys.device)
        if _merge_kernels(keys, keys) and d <= 256:
            # argmax_j k_e . k_j / max(|k_j|, eps): F.normalize's division, |k_e| left out.
            norms = torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32).transpose(1, 2)   # (b, hk, n)
            inv = torch.gather(norms, 2, kept_idx).clamp_min_(1e-12).reciprocal_()
            _native.kv_merge_match(keys, kept_idx.contiguous(), evicted_idx.contiguous(), inv, out, stream=stream_of(keys))
            return out
        unit = torch.nn.functional.normalize(keys.float(), dim=-1).transpose(1, 2)  # (b, hk, n, d)
        kk = torch.gather(unit, 2, kept_idx[..., None].expand(*kept_idx.shape, d)).transpose(-1, -2)
        step = max(1, _CHUNK // max(1, b * hk * kept_idx.shape[-1]))
        for r0 in range(0, ne, step):
            rows = evicted_idx[..., r0:r0 + step]
            ke = torch.gather(unit, 2, rows[..., None].expand(*rows.shape, d))
            out[..., r0:r0 + step] = (ke @ kk).argmax(-1)
        return out


def _merge_kernels(keys, values) -> bool:
    """Whether KVMerge runs on its kernels: 16-bit K and V of one dtype on CUDA, rows the
    kernels read in 16-byte pieces."""
    return (_SCORE_KERNEL and keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16)
            and values.dtype == keys.dtype and _rows_copyable(keys) and _rows_copyable(values))


PRESSES = {"streaming_llm": StreamingLLM, "snapkv": SnapKV, "pyramidkv": PyramidKV, "observed_attention": ObservedAttention,
           "h2o": ObservedAttention, "tova": TOVA, "knorm": Knorm}


def make_press(name: str, **kwargs):
    """A press by name: streaming_llm, snapkv, pyramidkv, observed_attention (h2o), tova,
    knorm, think, duo_attention, adakv (``scorer=`` a press name or Press), kvmerge (``press=``)."""
    name = name.lower()
    if name in PRESSES:
        return PRESSES[name](**kwargs)
    if name == "think":
        return ThinK(**kwargs)
    if name in ("duo_attention", "duo", "razor"):
        if "ratio" in kwargs:
            raise ValueError("DuoAttention takes streaming_ratio (the share of heads that keep only sink + recent), "
                             "not ratio")
        return DuoAttention(**kwargs)
    if name in ("adakv", "kvmerge"):
        inner_key = "scorer" if name == "adakv" else "press"
        inner = kwargs.pop(inner_key, "snapkv")
        ratio = kwargs.pop("ratio", 0.5)
        # The scorer's own options (a named scorer's window, kernel, n_sink) go to it.
        own = {k: kwargs.pop(k) for k in ("window", "kernel", "n_sink") if k in kwargs}
        inner = make_press(inner, ratio=ratio, **own) if isinstance(inner, str) else inner
        return AdaKV(inner, **kwargs) if name == "adakv" else KVMerge(inner)
    raise ValueError(f"unknown press {name!r}; known: {sorted(list(PRESSES) + ['think', 'duo_attention', 'adakv', 'kvmerge'])}")


@contextlib.contextmanager
def press(model, press="snapkv", ratio: Optional[float] = None, **kwargs):
    """``with ferrokernels.kv.press(model, "snapkv", ratio=0.5): model.generate(...)``: generation
    in the block uses ``hf.CompressedCache``: each layer's K/V pressed right after the prefill.
    ``press`` is a name for ``make_press`` (with ``ratio``, default the press's own, and
    ``kwargs``) or a Press."""
    from . import hf

    if ratio is not None:
        kwargs["ratio"] = ratio
    p = make_press(press, **kwargs) if isinstance(press, str) else press
    with hf.pressed(model, p):
        yield p


def compressed_attention(q, c: Compressed, *, scale: Optional[float] = None):
    """Attention of q ``(batch, q_len, heads_q, head_dim)`` over a compressed layer, every new
    token seeing every kept key (q_len new tokens past the cache): decode_attention when the
    heads' lengths agree, else attention under each head's length mask."""
    from .attention import _dense
    from .decode import decode_attention
    b, kept, hk, _ = c.keys.shape
    if c.uniform and q.shape[1] == 1:
        lens = torch.full((b,), kept, dtype=torch.int32, device=q.device)
        return decode_attention(q, c.keys, c.values, lens, causal_q=False, scale=scale)
    hq = q.shape[2]
    valid = torch.arange(kept, device=q.device) < c.lengths.long()[..., None]        # (b, hk, kept)
    mask = valid.repeat_interleave(hq // hk, 1)[:, :, None, :].expand(b, hq, q.shape[1], kept)
    out, _ = _dense(q, c.keys, c.values, None, causal=False, scale=scale, window=(-1, -1), softcap=0.0, alibi=None,
                    mask=mask.contiguous(), return_lse=False)
    return out


__all__ = ["Compressed", "Press", "StreamingLLM", "Knorm", "SnapKV", "PyramidKV", "TOVA", "ObservedAttention", "ThinK",
           "ChannelPruned", "pruned_attention", "AdaKV", "DuoAttention", "KVMerge", "make_press", "press", "compressed_attention",
           "QuantizedKV", "quantized_decode"]
