"""KV cache memory for decoding.

``PagedKVCache`` keeps every layer's K and V in pools of fixed-size pages (torch tensors) and
the bookkeeping -- per-sequence page lists, lengths, reference counts for copy-on-write prefix
sharing, the free list -- in Rust (``_native.PagePool``). A decode step::

    table, before = cache.extend(seqs, 1)           # room for one token per sequence
    for layer in range(num_layers):
        k_pages, v_pages = cache.layer(layer)
        fk.append_kv(k_new, v_new, k_pages, v_pages, before, table, validate=False)
        out = fk.decode_attention(q, k_pages, v_pages, before + 1, block_table=table, validate=False)

The tables this class builds are valid by construction, hence ``validate=False``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

from . import _native
from ._runtime import torch

Seqs = Union[int, Sequence[int]]


def _ids(seqs: Seqs) -> List[int]:
    return [int(seqs)] if isinstance(seqs, int) else [int(s) for s in seqs]


class PagedKVCache:
    """Paged K/V for ``num_layers`` layers: ``k[layer]`` and ``v[layer]`` are
    (num_pages, page_size, heads_kv, head_dim) pools, shared by every sequence."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, heads_kv: int, head_dim: int, *,
                 dtype=None, device=None):
        if torch is None:
            raise ImportError("PagedKVCache allocates its pages with torch; install torch")
        self.pool = _native.PagePool(num_pages, page_size)
        shape = (num_layers, num_pages, page_size, heads_kv, head_dim)
        dtype = dtype or torch.bfloat16
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size

    @property
    def device(self):
        return self.k.device

    @property
    def free_pages(self) -> int:
        return self.pool.free_pages

    def layer(self, i: int) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """The K and V page pools of layer i (views, no copy)."""
        return self.k[i], self.v[i]

    def allocate(self) -> int:
        """A new empty sequence; returns its id."""
        return self.pool.allocate()

    def fork(self, seq: int) -> int:
        """A new sequence sharing `seq`'s tokens (pages are copied only when one of them writes
        into a shared, partly filled page)."""
        return self.pool.fork(int(seq))

    def free(self, seqs: Seqs) -> None:
        for s in _ids(seqs):
            self.pool.free(s)

    def lengths(self, seqs: Seqs) -> List[int]:
        return [self.pool.len(s) for s in _ids(seqs)]

    def seqlens(self, seqs: Seqs) -> "torch.Tensor":
        """int32 lengths on the cache's device."""
        return torch.tensor(self.lengths(seqs), dtype=torch.int32, device=self.device)

    def block_table(self, seqs: Seqs, width: int = 0) -> "torch.Tensor":
        """int32 (len(seqs), max(width, pages of the longest)) on the cache's device; -1 past
        each sequence's pages."""
        ids = _ids(seqs)
        flat, w = self.pool.block_table(ids, int(width))
        return torch.tensor(flat, dtype=torch.int32, device=self.device).view(len(ids), w)

    def extend(self, seqs: Seqs, n: Union[int, Sequence[int]] = 1) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Makes room for n more tokens per sequence (pages from the free list; a private copy of
        a shared partial page first) and advances their lengths. Returns the block table and
        the lengths *before* the extension (where append_kv writes), both on the device.
        Raises ValueError, changing nothing, when the pool runs out of pages."""
        ids = _ids(seqs)
        counts = [int(n)] * len(ids) if isinstance(n, int) else [int(x) for x in n]
        before = self.lengths(ids)
        copies = self.pool.extend(ids, counts)
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
        return self.block_table(ids), torch.tensor(before, dtype=torch.int32, device=self.device)
