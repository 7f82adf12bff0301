"""Hugging Face transformers integration, through transformers' own extension points.

- ``attn_implementation="ferrokernels"``: ``AttentionInterface`` runs our prefill kernel (dense
  caches) or our paged decode kernel (``PagedCache``); ``AttentionMaskInterface`` gives it masks it
  can run without materialising them: ``None`` for plain causal / sliding-window attention, a
  bool key-padding mask ``(batch, 1, 1, kv_len)`` when the batch is padded (causal and the window
  are applied by the kernel, bottom-right aligned), and for anything else (packed sequences,
  static caches, custom mask functions) a complete additive float32 mask.
- ``PagedCache``: a ``transformers.Cache`` on ``PagedKVCache`` pages. Padding tokens are never
  stored, so every decode step is one ``decode_attention`` over exact per-sequence lengths.
- ``QuantizedKVCache``: K/V stored quantized (``kv_quant.QuantizedKV``: int8, fp8, KIVI int4 /
  int2); the prefill attends in full precision, decode steps run the quantized-cache kernel.
- ``CompressedCache``: a ``kv`` press compresses each layer's K/V right after its prefill (the
  memory of the evicted tokens is never kept); decode steps run the decode kernel over the kept
  tokens plus the new ones. ``ferrokernels.kv.press(model, "snapkv", ratio=0.5)`` wraps
  ``model.generate`` with one.
- ``patch(model, ...)`` / ``unpatch(model)``; ``generate(...)``: greedy decoding with the decode
  step captured once in a CUDA graph and replayed.

Importing this module registers the backend (``import ferrokernels`` does too when transformers
is already imported).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Dict, List, Optional, Sequence

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from .attention import _dense
from .decode import append_kv, decode_attention
from .kvcache import PagedKVCache
from .nn import FORMATS, quantize_linears, replace_module

NAME = "ferrokernels"
MAX_DECODE_Q = 16  # decode_attention takes up to 16 new tokens per sequence


# --- masks -------------------------------------------------------------------------------------

def _is_causal_or_sliding(fn) -> bool:
    """transformers' plain causal mask function, or its sliding-window one
    (``and_masks(sliding_window_overlay(w), causal_mask_function)``): both are what our kernel
    computes from (causal, window) alone."""
    if fn is causal_mask_function:
        return True
    if torch.compiler.is_compiling():  # dynamo cannot trace closure cells: the dense mask is always right
        return False
    cells = getattr(fn, "__closure__", None) or ()
    parts = [c.cell_contents for c in cells if isinstance(c.cell_contents, tuple)]
    return (len(parts) == 1 and len(parts[0]) == 2 and parts[0][1] is causal_mask_function
            and getattr(parts[0][0], "__qualname__", "").startswith("sliding_window_overlay."))


def _checking_is_free() -> bool:
    """Whether reading mask values on the host is allowed (not while tracing or capturing)."""
    return not (torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=causal_mask_function, attention_mask=None, local_size=None, use_vmap: bool = False,
                   device="cpu", **kwargs):
    """The mask for ``attention_forward`` (see the module docstring for the three forms)."""
    aligned = not isinstance(q_offset, torch.Tensor) and q_offset + q_length == kv_offset + kv_length
    if aligned and not use_vmap and _is_causal_or_sliding(mask_function):
        if attention_mask is None:
            return None
        pad = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if _checking_is_free() and bool(pad.all()):
            return None
        return pad[:, None, None, :].to(torch.bool)
    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                      local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                      use_vmap=use_vmap, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=dense.device)
    return torch.where(dense, zero, float("-inf"))


def _is_complete(mask, q_len: int) -> bool:
    """A mask that already holds causality and the window (ours is additive float; a user's
    4-D mask is bool with a query axis)."""
    return mask is not None and (mask.dtype != torch.bool or (mask.shape[2] != 1 and q_len > 1))


# --- attention ---------------------------------------------------------------------------------

def _window(sliding_window) -> tuple:
    """transformers' sliding window W keeps keys ``kv > q - W``: W - 1 keys on the left."""
    return (int(sliding_window) - 1, -1) if sliding_window else (-1, -1)


QUANT_KEY = "_ferrokernels_quant"  # on an attention module: "int8" or "fp8", set by patch


def _quantized(module, mask, window, softcap) -> Optional[str]:
    """The quantized kind this layer runs ("int8": quant_attention, "fp8": fp8_attention), or
    None. Only plain causal attention is quantized; a layer with padding, a window or a softcap
    raises rather than silently running at full precision."""
    kind = getattr(module, QUANT_KEY, None)
    if kind is None:
        return None
    if mask is not None or window != (-1, -1) or softcap:
        raise NotImplementedError(f"quantized attention (layer {getattr(module, 'layer_idx', '?')}) takes plain "
                                  "causal attention: no padding, sliding window or softcap; leave this layer out "
                                  "of quant_layers")
    return kind


def _run_quantized(kind, q, k, v, scale):
    """q (b, n, heads_q, D), k/v (b, n_k, heads_kv, D) views: the quantized op, causal."""
    from .quant_attention import fp8_attention, quant_attention

    if kind == "int8":
        return quant_attention(q, k, v, causal=True, scale=scale)
    return fp8_attention(q, k, v, causal=True, scale=scale).to(q.dtype)


# While a ``sparse.prefill`` block runs: (build(q, k, layer_idx) -> a sparse mask, min_len).
_SPARSE_PREFILL = None


def _sparse_prefill(layer, q, k, v, padded: bool, scale, window, softcap):
    """A fresh causal prefill through ``sparse_attention`` under the ``sparse.prefill`` block's
    pattern: q / k / v ``(b, n, heads, D)`` views of the whole sequences. None (run dense) without
    a block, below its ``min_len`` tokens, with padding, a sliding window or a softcap (the
    patterns are defined on unpadded causal attention)."""
    if _SPARSE_PREFILL is None:
        return None
    build, min_len = _SPARSE_PREFILL
    n = q.shape[1]
    if padded or window != (-1, -1) or softcap or n != k.shape[1] or n < min_len:
        return None
    from .sparse import sparse_attention
    return sparse_attention(q, k, v, build(q, k, layer), scale=scale)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """``AttentionInterface`` entry: query ``(b, heads_q, q_len, D)``, key/value ``(b, heads_kv,
    kv_len, D)`` (transformers' layout, read through transposed views) or the handle a
    ``PagedCache`` returns. Returns ``((b, q_len, heads_q, D), None)``."""
    if dropout:
        raise NotImplementedError("the ferrokernels attention backend is inference-only (dropout must be 0); "
                                  "call model.eval()")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("the ferrokernels attention backend does not return attention weights; "
                                  "use attn_implementation='eager' for output_attentions=True")
    softcap = float(softcap) if softcap else 0.0
    if isinstance(key, _CacheStep):
        return key.cache._attend(key, query, attention_mask, scaling, _window(sliding_window), softcap, module), None
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q_len = query.shape[2]
    window = _window(sliding_window)
    kind = _quantized(module, attention_mask, window, softcap) if causal else None
    if kind is not None:
        return _run_quantized(kind, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling), None
    if causal and attention_mask is None:
        out = _sparse_prefill(getattr(module, "layer_idx", 0), query.transpose(1, 2), key.transpose(1, 2),
                              value.transpose(1, 2), False, scaling, window, softcap)
        if out is not None:
            return out, None
    if _is_complete(attention_mask, q_len):
        causal, window = False, (-1, -1)
    out, _ = _dense(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, causal=causal,
                    scale=scaling, window=window, softcap=softcap, alibi=None, mask=attention_mask, return_lse=False)
    return out, None


def register() -> None:
    """Registers ``"ferrokernels"`` with transformers' attention and mask interfaces."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)


register()


# --- the paged cache ---------------------------------------------------------------------------

class _CacheStep:
    """What ``update`` of our caches (``PagedCache``, ``QuantizedKVCache``, ``CompressedCache``)
    hands the attention function: the layer's new K/V, written into the cache by the attention
    call itself, which also sees the padding mask."""

    __slots__ = ("cache", "layer", "k", "v")

    def __init__(self, cache, layer, k, v):
        self.cache, self.layer, self.k, self.v = cache, layer, k, v


class _PagedLayer(CacheLayerMixin):
    """Per-layer view transformers' Cache base class iterates over; the state lives in the cache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "PagedCache"):
        super().__init__()
        self._cache = weakref.proxy(cache)  # no reference cycle: the pages go when the cache does
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PagedCache layers are updated through PagedCache.update")

    def get_mask_sizes(self, query_length: int):
        return self._cache._seen + query_length, 0

    def get_seq_length(self) -> int:
        return self._cache._seen

    def get_max_length(self) -> int:
        return self._cache.token_slots

    def reset(self) -> None:
        pass


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class _HandleCache(Cache):
    """What our caches share (needs ``attn_implementation="ferrokernels"``, which ``patch``
    sets): the model's attention geometry, and transformers' Cache interface where ``update``
    returns a handle the attention function passes back with the query and mask. ``_seen``
    counts the positions processed, padding included (transformers' notion of length)."""

    def _read_config(self, config) -> None:
        cfg = _text_config(config)
        if getattr(cfg, "_attn_implementation", NAME) != NAME:
            raise ValueError(f"{type(self).__name__} runs with attn_implementation='{NAME}', this model uses "
                             f"'{cfg._attn_implementation}' (ferrokernels.patch(model) sets it)")
        heads = cfg.num_attention_heads
        self.heads_kv = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.num_layers = cfg.num_hidden_layers

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        step = _CacheStep(self, layer_idx, key_states, value_states)
        return step, step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx=None) -> int:
        return self.token_slots

    @property
    def is_compileable(self) -> bool:
        return False

    def _step_valid(self, mask, q_len: int):
        """(batch, q_len) bool on the host: which of the step's tokens are real (None: all). A
        decode token is always a real one; a custom or packed mask is refused."""
        if _is_complete(mask, q_len):
            raise NotImplementedError(f"{type(self).__name__} takes causal or sliding-window attention with padding; "
                                      "this call has a custom / packed-sequence mask (use a DynamicCache)")
        if mask is None or q_len == 1:
            return None
        valid = mask[:, 0, 0, -q_len:].cpu()
        return None if bool(valid.all()) else valid


class PagedCache(_HandleCache):
    """A ``transformers.Cache`` whose K/V live in ``PagedKVCache`` pages (needs
    ``attn_implementation="ferrokernels"``, which ``patch`` sets).

    ``max_batch_size`` sequences of up to ``max_cache_len`` tokens each (padding excluded);
    ``num_pages`` defaults to enough for all of them. Prefill runs the prefill kernel on the new
    tokens (or, with earlier tokens cached, on the sequence gathered from its pages); steps of up to
    16 tokens without padding run the paged decode kernel. Padding tokens (zeros in the 2-D
    ``attention_mask``) are not stored. Block tables and lengths live in fixed device buffers,
    so a decode step can be captured in a CUDA graph (see ``generate``)."""

    def __init__(self, config, max_batch_size: int, max_cache_len: int, *, page_size: int = 16,
                 num_pages: Optional[int] = None, dtype=None, device=None):
        self._read_config(config)
        # Not `max_batch_size` / `max_cache_len`: some transformers versions define those as properties.
        self.batch_slots, self.token_slots = int(max_batch_size), int(max_cache_len)
        self.max_pages = -(-self.token_slots // page_size)
        self.pages = PagedKVCache(self.num_layers, num_pages or self.batch_slots * self.max_pages, page_size,
                                  self.heads_kv, self.head_dim, dtype=dtype or torch.float32, device=device)
        super().__init__(layers=[_PagedLayer(self) for _ in range(self.num_layers)])
        dev = self.pages.device
        self.block_table = torch.full((self.batch_slots, self.max_pages), -1, dtype=torch.int32, device=dev)
        self.before = torch.zeros(self.batch_slots, dtype=torch.int32, device=dev)
        self.seqlens = torch.zeros(self.batch_slots, dtype=torch.int32, device=dev)
        self.seqs: Optional[List[int]] = None
        self._seen = 0  # positions processed, padding included (transformers' notion of length)
        self._done: set = set()  # layers that ran in the current step
        self._external_step = False
        self._step = None

    # transformers' Cache interface (the rest is _HandleCache's) ---------------------------------
    def reset(self) -> None:
        if self.seqs is not None:
            self.pages.free(self.seqs)
        self.seqs, self._seen, self._done, self._step = None, 0, set(), None

    def batch_repeat_interleave(self, repeats: int) -> None:
        """num_return_sequences: every sequence is forked (its pages shared, copied on write)."""
        if self.seqs is None:
            return
        self._check_batch(len(self.seqs) * repeats)
        self.seqs = [s if r == 0 else self.pages.fork(s) for s in self.seqs for r in range(repeats)]

    def reorder_cache(self, beam_idx) -> None:
        """Beam search: sequence i continues old sequence beam_idx[i] (a fork: pages shared, the
        partly filled last page copied when written)."""
        if self.seqs is None:
            return
        old = self.seqs
        self.seqs = [self.pages.fork(old[int(j)]) for j in beam_idx.tolist()]
        self.pages.free(old)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("PagedCache cannot be cropped yet (assisted / speculative generation); "
                                  "use a DynamicCache")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("PagedCache does not support batch_select_indices (contrastive search) yet")

    # the step ----------------------------------------------------------------------------------
    def _check_batch(self, batch: int) -> None:
        if batch > self.batch_slots:
            raise ValueError(f"batch of {batch} sequences; this PagedCache was made with max_batch_size={self.batch_slots}")

    def begin_step(self, counts: Sequence[int], q_len: int, valid=None) -> None:
        """Makes room for ``counts[b]`` new tokens of sequence b (``valid`` (b, q_len) bool on
        the host says which of the step's tokens they are; None: all of them), updating the
        device block table and lengths in place."""
        counts = [int(c) for c in counts]
        if self.seqs is None:
            self._check_batch(len(counts))
            self.seqs = [self.pages.allocate() for _ in counts]
        elif len(counts) != len(self.seqs):
            raise ValueError(f"the cache holds {len(self.seqs)} sequences, the step has {len(counts)}")
        before = self.pages.lengths(self.seqs)
        for b, (n0, n) in enumerate(zip(before, counts)):
            if n0 + n > self.token_slots:
                raise ValueError(f"sequence {b} would hold {n0 + n} tokens; the cache was made with max_cache_len="
                                 f"{self.token_slots}")
        table, before_dev = self.pages.extend(self.seqs, counts, width=self.max_pages)
        b = len(counts)
        self.block_table[:b].copy_(table, non_blocking=True)
        self.before[:b].copy_(before_dev, non_blocking=True)
        self.seqlens[:b].copy_(torch.tensor([x + n for x, n in zip(before, counts)], dtype=torch.int32),
                               non_blocking=True)
        self._seen += q_len
        self._done = set()
        self._step = (before, counts, valid)

    def _begin_from_mask(self, batch: int, q_len: int, mask) -> None:
        valid = self._step_valid(mask, q_len)
        counts = [q_len] * batch if valid is None else valid.sum(1).tolist()
        self.begin_step(counts, q_len, valid)

    def _write(self, step: _CacheStep, k_pages, v_pages, valid) -> None:
        k, v = step.k.transpose(1, 2), step.v.transpose(1, 2)  # (b, q_len, heads_kv, D) views
        b = k.shape[0]
        if valid is None:
            append_kv(k, v, k_pages, v_pages, self.before[:b], self.block_table[:b], validate=False)
            return
        for i in range(b):
            idx = valid[i].nonzero().flatten()
            if len(idx):
                idx = idx.to(k.device)
                append_kv(k[i:i + 1, idx], v[i:i + 1, idx], k_pages, v_pages, self.before[i:i + 1],
                          self.block_table[i:i + 1], validate=False)

    def _attend(self, step: _CacheStep, query, mask, scale, window, softcap, module=None):
        b, _, q_len, _ = query.shape
        if not self._external_step and (self._step is None or step.layer in self._done):
            self._begin_from_mask(b, q_len, mask)
        self._done.add(step.layer)
        before, counts, valid = self._step
        k_pages, v_pages = self.pages.layer(step.layer)
        self._write(step, k_pages, v_pages, valid)
        q = query.transpose(1, 2)
        if valid is None and q_len <= MAX_DECODE_Q:
            return decode_attention(q, k_pages, v_pages, self.seqlens[:b], block_table=self.block_table[:b],
                                    scale=scale, softcap=softcap, window=window, validate=False)
        if not any(before):  # a fresh prefill: the new tokens are the whole sequence (padding masked)
            kind = _quantized(module, None if valid is None else mask, window, softcap)
            if kind is not None:
                return _run_quantized(kind, q, step.k.transpose(1, 2), step.v.transpose(1, 2), scale)
            out = _sparse_prefill(step.layer, q, step.k.transpose(1, 2), step.v.transpose(1, 2), valid is not None,
                                  scale, window, softcap)
            if out is not None:
                return out
            out, _ = _dense(q, step.k.transpose(1, 2), step.v.transpose(1, 2), None, causal=True, scale=scale,
                            window=window, softcap=softcap, alibi=None, mask=None if valid is None else mask,
                            return_lse=False)
            return out
        return self._attend_gathered(q, k_pages, v_pages, before, counts, valid, scale, window, softcap)

    def _attend_gathered(self, q, k_pages, v_pages, before, counts, valid, scale, window, softcap):
        """Padded or chunked prefill: each sequence's real queries against its keys gathered from
        the pages; padding rows of the output are 0."""
        out = torch.zeros_like(q)
        page = self.pages.page_size
        table = self.block_table[:len(counts)]
        for i, (n0, n) in enumerate(zip(before, counts)):
            if n == 0:
                continue
            total = n0 + n
            pages = table[i, :-(-total // page)].long()
            k = k_pages[pages].flatten(0, 1)[None, :total]
            v = v_pages[pages].flatten(0, 1)[None, :total]
            rows = slice(q.shape[1] - n, None) if valid is None else valid[i].nonzero().flatten().to(q.device)
            o, _ = _dense(q[i:i + 1, rows], k, v, None, causal=True, scale=scale, window=window, softcap=softcap,
                          alibi=None, mask=None, return_lse=False)
            out[i:i + 1, rows] = o
        return out


# --- caches that attend themselves: quantized and compressed --------------------------------------

def _compact(k, v, valid):
    """k, v (b, n, heads_kv, D) -> the real tokens of each sequence first, and their counts."""
    if valid is None:
        return k, v, None
    counts = valid.sum(1).tolist()
    kc, vc = torch.zeros_like(k), torch.zeros_like(v)
    for i in range(k.shape[0]):
        idx = valid[i].nonzero().flatten().to(k.device)
        kc[i, :len(idx)], vc[i, :len(idx)] = k[i, idx], v[i, idx]
    return kc, vc, counts


class _SelfAttendingCache(_HandleCache):
    """A cache whose attention runs in ``_attend_layer``, once per layer and step."""

    def __init__(self, config, max_cache_len: int, dtype, device):
        self._read_config(config)
        self.token_slots = int(max_cache_len)
        self.dtype, self.device = dtype or torch.float32, torch.device(device or "cpu")
        super().__init__(layers=[_PagedLayer(self) for _ in range(self.num_layers)])
        self._seen = 0
        self._done: set = set()
        self._valid = None

    def reset(self) -> None:
        self._seen, self._done, self._valid = 0, set(), None
        self._reset_layers()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be cropped (assisted generation); use a DynamicCache")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support batch_select_indices (contrastive search)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support beam search; use a PagedCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError(f"{type(self).__name__} does not support num_return_sequences > 1")

    def _attend(self, step: _CacheStep, query, mask, scale, window, softcap, module=None):
        q_len = query.shape[2]
        if step.layer in self._done or not self._done:  # the first layer of a new step
            self._valid = self._step_valid(mask, q_len)
            self._seen += q_len
            self._done = set()
        self._done.add(step.layer)
        q, k, v = query.transpose(1, 2), step.k.transpose(1, 2), step.v.transpose(1, 2)
        return self._attend_layer(step.layer, q, k, v, mask, self._valid, scale, window, softcap)

    def _prefill(self, layer, q, k, v, mask, valid, scale, window, softcap, return_lse=False):
        """Full-precision causal attention over a fresh prefill's own tokens (padding masked), or
        sparse in a ``sparse.prefill`` block: (out, lse (b, heads_q, n) with `return_lse`, else
        None)."""
        out = _sparse_prefill(layer, q, k, v, valid is not None, scale, window, softcap)
        if out is not None:
            # No LSE: a sparse prefill's is over its mask's keys, and the presses score against
            # every key (they compute their own).
            return out, None
        return _dense(q, k, v, None, causal=True, scale=scale, window=window, softcap=softcap, alibi=None,
                      mask=None if valid is None else mask, return_lse=return_lse)


class QuantizedKVCache(_SelfAttendingCache):
    """K/V stored quantized per layer (``ferrokernels.kv_quant.QuantizedKV``): ``format`` "int8",
    "fp8", "int4" or "int2" (KIVI: ``group_size``, ``residual`` recent tokens in full precision).
    The prefill attends in full precision over its own tokens, then stores them quantized
    (padding tokens are not stored); decode steps of up to 16 tokens run the quantized-cache
    decode kernel over exact per-sequence lengths; a later prefill chunk attends over the
    dequantized history. Batch > 1 with padding works."""

    def __init__(self, config, max_cache_len: int, *, format: str = "int4", group_size: int = 32,
                 residual: int = 128, dtype=None, device=None):
        super().__init__(config, max_cache_len, dtype, device)
        from .kv_quant import _format

        self.format, self.group_size, self.residual = _format(format), int(group_size), int(residual)
        self.kv: List = [None] * self.num_layers

    def _reset_layers(self) -> None:
        self.kv = [None] * self.num_layers

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.kv if c is not None)

    def _attend_layer(self, layer, q, k, v, mask, valid, scale, window, softcap):
        from .kv_quant import QuantizedKV

        b, q_len = q.shape[:2]
        cache = self.kv[layer]
        if cache is None:
            cache = self.kv[layer] = QuantizedKV(b, self.heads_kv, self.head_dim, self.token_slots,
                                                 format=self.format, group_size=self.group_size,
                                                 residual=self.residual, dtype=k.dtype, device=k.device)
        if cache.batch != b:
            raise ValueError(f"the cache holds {cache.batch} sequences, this step has {b}")
        fresh = not any(cache.lengths)
        kc, vc, counts = _compact(k, v, valid)
        cache.append(kc, vc, counts)
        if valid is None and q_len <= MAX_DECODE_Q and not fresh:
            return cache.decode(q, scale=scale, softcap=softcap or None, window=window, validate=False)
        if fresh:
            return self._prefill(layer, q, k, v, mask, valid, scale, window, softcap)[0]
        out = torch.zeros_like(q)  # a later chunk: each sequence's real queries over its dequantized keys
        for i in range(b):
            rows = (torch.arange(q_len - (counts[i] if counts else q_len), q_len, device=q.device) if valid is None
                    else valid[i].nonzero().flatten().to(q.device))
            if len(rows) == 0:
                continue
            ki, vi = cache.dequantize(i)
            o, _ = _dense(q[i:i + 1, rows], ki[None].to(q.dtype), vi[None].to(q.dtype), None, causal=True,
                          scale=scale, window=window, softcap=softcap, alibi=None, mask=None, return_lse=False)
            out[i:i + 1, rows] = o
        return out


class CompressedCache(_SelfAttendingCache):
    """A press (``ferrokernels.kv``) compresses each layer's K/V right after its prefill: the
    layer then holds the kept tokens plus room for ``max_new_tokens`` (the evicted tokens'
    memory is never kept), and decode steps run the decode kernel over them. The prefill
    attends over all of its tokens in full precision; the press scores with the prefill's
    queries (the last ``window`` of them, or all for ObservedAttention). Sequences of a padded
    batch are pressed one by one.

    Presses that keep one count per sequence store it densely, (batch, kept + new, heads_kv,
    D). Presses that keep a different count per kv head (AdaKV, DuoAttention) store every
    (sequence, kv head) as a sequence of its own in pages of ``page_size`` tokens, so a
    streaming head really holds only its sink and recent tokens; a decode step attends with
    the q heads of each kv head as that sequence's group.

    ThinK keeps every token but only its chosen key channels: a layer holds the prefill's
    pruned keys ``(batch, heads_kv, P, kept)``, its values, the channel ids, and the new tokens'
    full K/V (ThinK prunes the prefill's keys); decode steps run ``kv.pruned_attention``."""

    def __init__(self, config, press, max_new_tokens: int, *, dtype=None, device=None, page_size: int = 64):
        super().__init__(config, 0, dtype, device)
        from .kv import ThinK

        self.think = isinstance(press, ThinK)
        if page_size < 1 or page_size & (page_size - 1) or page_size > 256:
            raise ValueError(f"page_size must be a power of two up to 256, got {page_size}")
        self.press, self.max_new, self.page_size = press, int(max_new_tokens), int(page_size)
        self._reset_layers()

    def _reset_layers(self) -> None:
        self.k: List = [None] * self.num_layers
        self.v: List = [None] * self.num_layers
        self.lengths: List = [None] * self.num_layers    # per sequence, or per (sequence, kv head) when paged
        self.capacity: List = [None] * self.num_layers   # room of each of those, new tokens included
        self.seqlens: List = [None] * self.num_layers    # int32 per sequence (ThinK: the prefill's tokens)
        self.tables: List = [None] * self.num_layers     # block table of a per-head layer, else None
        self.seen_tokens: Optional[List[int]] = None  # real tokens per sequence before compression
        self.channels: List = [None] * self.num_layers   # ThinK: kept key channels (b, heads_kv, kept)
        self.k_new: List = [None] * self.num_layers      # ThinK: the new tokens' full K/V (b, heads_kv, max_new, D)
        self.v_new: List = [None] * self.num_layers
        self.new_len = [0] * self.num_layers

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_new + self.v_new if t is not None)

    def _queries(self, q):
        from .kv import ObservedAttention

        return q if isinstance(self.press, ObservedAttention) else q[:, -getattr(self.press, "window", 64):]

    def _lse_reusable(self, q, scale, window, softcap) -> bool:
        """The prefill's LSE is what the press would compute: plain causal attention at the
        default scale (the presses score that way), so the press can skip its own pass."""
        from .kv import KVMerge, Press

        inner = self.press.press if isinstance(self.press, KVMerge) else getattr(self.press, "scorer", self.press)
        return (isinstance(inner, Press) and inner.needs_queries and tuple(window) == (-1, -1) and not softcap
                and (scale is None or abs(scale * math.sqrt(q.shape[-1]) - 1) < 1e-6))

    def _press_each(self, layer, q, k, v, valid, lse):
        """The press's Compressed of each sequence (of the whole batch when nothing is padded)."""
        pieces = []
        for i in range(k.shape[0]) if valid is not None else [None]:
            sl = slice(None) if i is None else slice(i, i + 1)
            qi, ki, vi = q[sl], k[sl], v[sl]
            li = None if lse is None else lse[sl]
            if i is not None:
                idx = valid[i].nonzero().flatten().to(k.device)
                qi, ki, vi = qi[:, idx], ki[:, idx], vi[:, idx]
                li = None if li is None else li[..., idx]
            qw = self._queries(qi)
            li = None if li is None else li[..., li.shape[-1] - qw.shape[1]:]
            pieces.append(self.press(ki, vi, qw, layer=layer, n_layers=self.num_layers, lse=li))
        return pieces

    def _store(self, layer, pieces) -> None:
        if all(c.uniform for c in pieces):
            self._store_dense(layer, pieces)
        else:
            self._store_per_head(layer, pieces)

    def _store_dense(self, layer, pieces) -> None:
        """(b, kept_max + max_new, heads_kv, D), each sequence's kept tokens first."""
        kept = [c.keys.shape[1] for c in pieces for _ in range(c.keys.shape[0])]
        cap = max(kept) + self.max_new
        k0 = pieces[0].keys
        kc = k0.new_zeros(len(kept), cap, self.heads_kv, self.head_dim)
        vc = torch.zeros_like(kc)
        at = 0
        for c in pieces:
            n = c.keys.shape[0]
            kc[at:at + n, :c.keys.shape[1]], vc[at:at + n, :c.values.shape[1]] = c.keys, c.values
            at += n
        self.k[layer], self.v[layer], self.tables[layer] = kc, vc, None
        self.lengths[layer], self.capacity[layer] = kept, [cap] * len(kept)
        self.seqlens[layer] = torch.tensor(kept, dtype=torch.int32, device=kc.device)

    def _store_per_head(self, layer, pieces) -> None:
        """Every (sequence, kv head) in pages of its own: a pool (pages, page_size, 1, D) and a
        block table (batch * heads_kv, max_pages); each keeps its length plus max_new."""
        ps, d = self.page_size, self.head_dim
        device = pieces[0].keys.device
        lens = torch.cat([c.lengths.reshape(-1) for c in pieces]).to(torch.int64)      # (b * hk,)
        counts = lens.tolist()
        pages = (lens + self.max_new + ps - 1) // ps
        first = torch.cumsum(pages, 0) - pages
        total = int(pages.sum())
        j = torch.arange(int(pages.max()), device=device)
        table = torch.where(j < pages[:, None], first[:, None] + j, -1).to(torch.int32)
        pool_k = pieces[0].keys.new_zeros(total, ps, 1, d)
        pool_v = torch.zeros_like(pool_k)
        row = 0
        for c in pieces:  # each head's kept rows to the start of its pages
            n, longest = c.keys.shape[0] * c.keys.shape[2], c.keys.shape[1]
            keep = torch.arange(longest, device=device) < lens[row:row + n, None]        # (n, longest)
            dest = first[row:row + n, None] * ps + torch.arange(longest, device=device)
            pool_k.view(-1, d)[dest[keep]] = c.keys.transpose(1, 2).reshape(n, longest, d)[keep]
            pool_v.view(-1, d)[dest[keep]] = c.values.transpose(1, 2).reshape(n, longest, d)[keep]
            row += n
        self.k[layer], self.v[layer], self.tables[layer] = pool_k, pool_v, table
        self.lengths[layer], self.capacity[layer] = counts, (pages * ps).tolist()
        self.seqlens[layer] = lens.to(torch.int32)

    def _store_think(self, layer, q, k, v, valid) -> None:
        """ThinK: each sequence's real prefill tokens with their keys on the press's channels,
        padded to the longest, (b, heads_kv, P, kept) and (b, heads_kv, P, D); room for
        max_new full new tokens (b, heads_kv, max_new, D)."""
        b = k.shape[0]
        rows = [None] * b if valid is None else [valid[i].nonzero().flatten().to(k.device) for i in range(b)]
        lens = [k.shape[1] if r is None else len(r) for r in rows]
        kept = self.head_dim - int(self.head_dim * self.press.key_ratio)
        kc = k.new_zeros(b, self.heads_kv, max(lens), kept)
        vc = v.new_zeros(b, self.heads_kv, max(lens), v.shape[-1])
        ch = torch.empty(b, self.heads_kv, kept, dtype=torch.int64, device=k.device)
        for i, r in enumerate(rows):
            ki, vi, qi = (t[i:i + 1] if r is None else t[i:i + 1, r] for t in (k, v, q))
            ch[i:i + 1] = self.press.channels(ki, self._queries(qi))
            idx = ch[i:i + 1, None].expand(1, lens[i], self.heads_kv, kept)
            kc[i, :, :lens[i]] = torch.gather(ki, 3, idx)[0].transpose(0, 1)
            vc[i, :, :lens[i]] = vi[0].transpose(0, 1)
        self.k[layer], self.v[layer], self.channels[layer] = kc, vc, ch
        self.k_new[layer] = k.new_zeros(b, self.heads_kv, self.max_new, self.head_dim)  # heads first, as kept
        self.v_new[layer] = v.new_zeros(b, self.heads_kv, self.max_new, v.shape[-1])
        self.new_len[layer] = 0
        self.lengths[layer], self.capacity[layer] = lens, [n + self.max_new for n in lens]
        self.seqlens[layer] = torch.tensor(lens, dtype=torch.int32, device=k.device)

    def _attend_think(self, layer, q, k, v, scale, window, softcap):
        """A decode step over a ThinK layer: the new tokens stored in full, attention over the
        pruned prefill and every new token."""
        from .kv import pruned_attention

        if tuple(window) != (-1, -1):
            raise NotImplementedError("CompressedCache with ThinK does not take sliding-window layers")
        n0, q_len = self.new_len[layer], q.shape[1]
        self.k_new[layer][:, :, n0:n0 + q_len] = k.transpose(1, 2)
        self.v_new[layer][:, :, n0:n0 + q_len] = v.transpose(1, 2)
        self.new_len[layer] = n0 + q_len
        prefix = [n - n0 for n in self.lengths[layer]]  # the prefill's tokens per sequence
        self.lengths[layer] = [n + q_len for n in self.lengths[layer]]
        padded = any(n != self.k[layer].shape[2] for n in prefix)  # known on the host: no mask without padding
        return pruned_attention(q, self.k[layer], self.channels[layer], self.v[layer],
                                self.seqlens[layer] if padded else None, k_new=self.k_new[layer][:, :, :n0 + q_len],
                                v_new=self.v_new[layer][:, :, :n0 + q_len], new_before=n0, scale=scale,
                                softcap=softcap or 0.0)

    def _attend_layer(self, layer, q, k, v, mask, valid, scale, window, softcap):
        b, q_len = q.shape[:2]
        if self.k[layer] is None:  # the prefill: attend in full, then keep the press's choice
            out, lse = self._prefill(layer, q, k, v, mask, valid, scale, window, softcap,
                                     return_lse=not self.think and self._lse_reusable(q, scale, window, softcap))
            if self.think:
                self._store_think(layer, q, k, v, valid)
            else:
                self._store(layer, self._press_each(layer, q, k, v, valid, lse))
            return out
        if valid is not None or q_len > MAX_DECODE_Q:
            raise NotImplementedError("CompressedCache takes one prefill, then decode steps of up to 16 tokens")
        if any(n + q_len > c for n, c in zip(self.lengths[layer], self.capacity[layer])):
            raise ValueError(f"the compressed cache has room for {self.max_new} new tokens (max_new_tokens)")
        if self.think:
            return self._attend_think(layer, q, k, v, scale, window, softcap)
        table = self.tables[layer]
        if table is not None:  # per head: each kv head is a sequence whose group is its q heads
            hk = self.heads_kv
            q, k, v = (t.view(b, q_len, hk, -1, t.shape[-1]).transpose(1, 2).reshape(b * hk, q_len, -1, t.shape[-1])
                       for t in (q, k, v))
        append_kv(k, v, self.k[layer], self.v[layer], self.seqlens[layer], table, validate=False)
        self.lengths[layer] = [n + q_len for n in self.lengths[layer]]
        self.seqlens[layer] += q_len
        out = decode_attention(q, self.k[layer], self.v[layer], self.seqlens[layer], block_table=table, scale=scale,
                               softcap=softcap or None, window=window, validate=False)
        if table is None:
            return out
        return out.view(b, self.heads_kv, q_len, -1, out.shape[-1]).transpose(1, 2).reshape(b, q_len, -1, out.shape[-1])


def _cache_generate(model, original, make_cache):
    """``model.generate`` that passes ``make_cache(batch, max_len, new_tokens)`` as its cache
    unless the caller gives one."""
    @functools.wraps(original)
    def generate(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("past_key_values") is None and isinstance(ids, torch.Tensor):
            gc = kwargs.get("generation_config") or model.generation_config
            per_prompt = max(kwargs.get("num_beams", gc.num_beams) or 1,
                             kwargs.get("num_return_sequences", gc.num_return_sequences) or 1)
            total = _max_len(model, ids, kwargs)
            kwargs["past_key_values"] = make_cache(ids.shape[0] * per_prompt, total, total - int(ids.shape[1]))
        return original(*args, **kwargs)

    return generate


@contextlib.contextmanager
def pressed(model, press):
    """``model.generate`` inside the block uses a ``CompressedCache`` with ``press`` (the model is
    patched for the block if it was not)."""
    patched = model.config._attn_implementation == NAME
    if not patched:
        patch(model, kv_cache=None)
    before = model.__dict__.get("generate")
    original = model.generate
    model.generate = _cache_generate(model, original, lambda b, total, new: CompressedCache(
        model.config, press, new, dtype=model.dtype, device=model.device))
    try:
        yield press
    finally:
        if before is None:
            model.__dict__.pop("generate", None)
        else:
            model.generate = before
        if not patched:
            unpatch(model)


# --- patch / unpatch ---------------------------------------------------------------------------

ATTENTION = ("flash", "quant", "fp8")
KV_CACHES = ("paged", "int8", "fp8", "int4", "int2")
_STATE = "_ferrokernels_patch"


def _max_len(model, input_ids, kwargs) -> int:
    gc = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
    if new is not None:
        return int(input_ids.shape[1]) + int(new)
    length = kwargs.get("max_length", getattr(gc, "max_length", None))
    return int(length or _text_config(model.config).max_position_embeddings)


def _paged_generate(model, original):
    return _cache_generate(model, original, lambda b, total, new: PagedCache(model.config, b, total, dtype=model.dtype,
                                                                             device=model.device))


def _quantized_generate(model, original, format):
    return _cache_generate(model, original, lambda b, total, new: QuantizedKVCache(
        model.config, total, format=format, dtype=model.dtype, device=model.device))


def _attention_modules(model):
    """The self-attention modules: those transformers gives a layer index and GQA group count."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def patch(model, attention: Optional[str] = "flash", kv_cache: Optional[str] = "paged",
          linear: Optional[str] = None, *, group_size: int = 128, skip: Sequence[str] = ("lm_head",),
          quant_layers: Optional[Sequence[int]] = None):
    """Switches a transformers model to ferrokernels, in place; returns it.

    attention : "flash" sets ``attn_implementation="ferrokernels"`` (None leaves it); "quant"
        (INT8 Q·Kᵀ / FP8 P̃·V, ``quant_attention``) or "fp8" (``fp8_attention``) also run the
        prefill of the layers in ``quant_layers`` (all when None; leave sensitive layers out)
        quantized. Decode steps on the paged cache stay on the decode kernel. On the GPU the
        quantized layers need a Hopper (sm_90) device; on the CPU they run the references.
    kv_cache : "paged": ``model.generate`` uses a ``PagedCache`` unless given ``past_key_values``;
        "int8", "fp8", "int4", "int2": a ``QuantizedKVCache`` of that format (KIVI defaults).
    linear : a ``QuantLinear`` format ("w4a16", "w8a16", "w8a8_int8", "w8a8_fp8") every nn.Linear
        is quantized to (round to nearest), except names matching ``skip``.
    ``unpatch(model)`` undoes all of it."""
    if attention not in (None,) + ATTENTION:
        raise NotImplementedError(f"attention={attention!r}: supported {ATTENTION} (a sparse backend is not built "
                                  "yet)")
    if kv_cache not in (None,) + KV_CACHES:
        raise NotImplementedError(f"kv_cache={kv_cache!r}: supported {KV_CACHES}")
    if linear is not None and linear not in FORMATS:
        raise NotImplementedError(f"linear={linear!r}: supported {list(FORMATS)}")
    if kv_cache and not attention and model.config._attn_implementation != NAME:
        raise ValueError(f"kv_cache={kv_cache!r} needs the ferrokernels attention backend (attention='flash')")
    state: Dict = model.__dict__.setdefault(_STATE, {})
    if attention:
        state.setdefault("attn", model.config._attn_implementation)
        model.set_attn_implementation(NAME)
        layers = None if quant_layers is None else {int(i) for i in quant_layers}
        for mod in _attention_modules(model):
            chosen = attention != "flash" and (layers is None or mod.layer_idx in layers)
            setattr(mod, QUANT_KEY, ("int8" if attention == "quant" else "fp8") if chosen else None)
    if kv_cache and "generate" not in state:
        state["generate"] = True
        model.generate = (_paged_generate(model, model.generate) if kv_cache == "paged"
                          else _quantized_generate(model, model.generate, kv_cache))
    if linear:
        replaced = state.setdefault("linears", {})
        for name, mod in quantize_linears(model, linear, group_size=group_size, skip=skip).items():
            replaced.setdefault(name, mod)
    return model


def unpatch(model):
    """Restores what ``patch`` changed: attention implementation, generate, Linear modules."""
    state = model.__dict__.pop(_STATE, None)
    if not state:
        return model
    for name, mod in state.get("linears", {}).items():
        replace_module(model, name, mod)
    if state.get("generate"):
        model.__dict__.pop("generate", None)
    if "attn" in state:
        model.set_attn_implementation(state["attn"])
        for mod in _attention_modules(model):
            mod.__dict__.pop(QUANT_KEY, None)
    return model


# --- greedy generation with a CUDA-graphed decode step ------------------------------------------

def _positions(attention_mask) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, eos_token_id=None,
             pad_token_id=None, cuda_graph: Optional[bool] = None, page_size: int = 16, stats: Optional[dict] = None):
    """Greedy decoding on a ``PagedCache`` (the model must be patched). The decode step runs in a
    CUDA graph (captured on the second step, replayed after) when on the GPU, unless
    ``cuda_graph=False``. Returns ``(batch, prompt + max_new_tokens)`` token ids; after a
    sequence's ``eos_token_id`` come ``pad_token_id``. ``stats`` (a dict) receives
    ``prefill_s`` and ``decode_s`` (synchronised wall times)."""
    import time

    if model.config._attn_implementation != NAME:
        raise ValueError("ferrokernels.hf.generate needs a patched model (ferrokernels.patch(model))")
    b, n = input_ids.shape
    dev = input_ids.device
    graph = (dev.type == "cuda") if cuda_graph is None else bool(cuda_graph)
    if graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = PagedCache(model.config, b, n + max_new_tokens, page_size=page_size, dtype=model.dtype, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    ids = torch.empty((b, max_new_tokens), dtype=input_ids.dtype, device=dev)
    ids[:, 0] = logits[:, -1].argmax(-1)
    pos = _positions(attention_mask)[:, -1:] + 1
    sync()
    t1 = time.perf_counter()
    step = _DecodeStep(model, cache, ids[:, :1], pos, graph)
    for t in range(1, max_new_tokens):
        ids[:, t] = step()
    sync()
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
    if eos_token_id is not None:
        eos = torch.as_tensor(eos_token_id, device=dev).flatten()
        done = torch.isin(ids, eos).long().cumsum(1) - torch.isin(ids, eos).long() > 0
        ids = ids.masked_fill(done, pad_token_id if pad_token_id is not None else int(eos[0]))
    cache.reset()
    return torch.cat([input_ids, ids], 1)


class _DecodeStep:
    """One greedy token per sequence: eager for the first step (which compiles kernels and sizes
    workspaces), then a CUDA graph over static input/position buffers."""

    def __init__(self, model, cache: PagedCache, first_ids, pos, graph: bool):
        self.model, self.cache, self.use_graph = model, cache, graph
        self.ids = first_ids.clone()
        self.pos = pos.clone()
        self.graph = None
        self.calls = 0

    def _forward(self):
        logits = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)
        return nxt

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        self.cache.begin_step([1] * self.ids.shape[0], 1)
        self.cache._external_step = True  # the step was begun above, not by the first layer
        try:
            if not self.use_graph or self.calls == 1:
                return self._forward().clone()
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = self._forward()
            self.graph.replay()
            return self.out.clone()
        finally:
            self.cache._external_step = False


from .hf_quantizer import FerrokernelsConfig, load_quantized  # noqa: E402,F401  (registers the quantizer)
