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

    def extend(self, seqs: Seqs, n: Union[int, Sequence[int]] = 1, width: int = 0) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Makes room for n more tokens per sequence (pages from the free list; a private copy of
        a shared partial page first) and advances their lengths. Returns the block table (at
        least `width` columns) and the lengths *before* the extension (where append_kv writes),
        both on the device. Raises ValueError, changing nothing, when the pool runs out of pages."""
        ids = _ids(seqs)
        counts = [int(n)] * len(ids) if isinstance(n, int) else [int(x) for x in n]
        before = self.lengths(ids)
        copies = self.pool.extend(ids, counts)
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
        return self.block_table(ids, width), torch.tensor(before, dtype=torch.int32, device=self.device)


_CHUNK = 2 << 20  # CUDA's VMM allocation granularity on NVIDIA GPUs (checked at reservation)


class VirtualKVCache:
    """vAttention-style contiguous KV cache: every layer's K and V are ordinary
    ``(max_batch, max_len, heads_kv, head_dim)`` CUDA tensors, views of one reserved range of
    device addresses (``cuMemAddressReserve``); a sequence slot's rows are backed by physical
    memory (``cuMemCreate``/``cuMemMap``, 2 MiB chunks) only up to its length, and given back
    when the slot is freed. The dense decode kernels run on it unchanged: pass
    ``cache.seqlens()`` (0 for free slots) and a q of ``max_batch`` rows.

    Only rows below a slot's length are backed: touching others (``cache.k[0].zero_()``,
    printing a whole layer) faults. Raises CudaError where the driver has no VMM support;
    ``PagedKVCache`` works everywhere.
    """

    def __init__(self, num_layers: int, max_batch: int, max_len: int, heads_kv: int, head_dim: int, *,
                 dtype=None, device="cuda"):
        if torch is None:
            raise ImportError("VirtualKVCache exposes its memory as torch tensors; install torch")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"VirtualKVCache maps CUDA virtual memory; device must be a CUDA device, got {dev}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self.dtype = dtype or torch.bfloat16
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.row_bytes = heads_kv * head_dim * elem
        self.slot_bytes = -(-max_len * self.row_bytes // _CHUNK) * _CHUNK
        self.max_batch, self.max_len, self.num_layers = max_batch, max_len, num_layers
        self.buffer = _native.VirtualBuffer(index, num_layers * 2 * max_batch * self.slot_bytes)
        if self.slot_bytes % self.buffer.granularity:
            raise RuntimeError(f"VMM granularity {self.buffer.granularity} does not divide the slot size")
        name = str(self.dtype).removeprefix("torch.")
        shape = [max_batch, max_len, heads_kv, head_dim]
        strides = [self.slot_bytes // elem, heads_kv * head_dim, head_dim, 1]

        def view(layer, which):
            return torch.from_dlpack(self.buffer.tensor(name, shape, strides, self._offset(layer, which, 0)))

        self.k = [view(layer, 0) for layer in range(num_layers)]
        self.v = [view(layer, 1) for layer in range(num_layers)]
        self._lengths = [0] * max_batch
        self._free = list(range(max_batch - 1, -1, -1))
        self.device = torch.device("cuda", index)

    def _offset(self, layer: int, which: int, slot: int) -> int:
        return ((layer * 2 + which) * self.max_batch + slot) * self.slot_bytes

    @property
    def mapped_bytes(self) -> int:
        return self.buffer.mapped_bytes

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def allocate(self) -> int:
        """A free slot (its row in every layer's tensors), length 0."""
        if not self._free:
            raise ValueError(f"all {self.max_batch} sequence slots are in use")
        return self._free.pop()

    def lengths(self, slots: Seqs) -> List[int]:
        return [self._lengths[s] for s in _ids(slots)]

    def seqlens(self) -> "torch.Tensor":
        """int32 (max_batch,) lengths of every slot (0 for free ones), on the device."""
        return torch.tensor(self._lengths, dtype=torch.int32, device=self.device)

    def extend(self, slots: Seqs, n: Union[int, Sequence[int]] = 1) -> "torch.Tensor":
        """Backs n more rows of each slot in every layer and advances the lengths. Returns every
        slot's length before the extension (int32 (max_batch,), where append_kv writes)."""
        ids = _ids(slots)
        counts = [int(n)] * len(ids) if isinstance(n, int) else [int(x) for x in n]
        before = self.seqlens()
        for s, k in zip(ids, counts):
            if self._lengths[s] + k > self.max_len:
                raise ValueError(f"slot {s} would hold {self._lengths[s] + k} tokens; max_len is {self.max_len}")
        for s, k in zip(ids, counts):
            new = self._lengths[s] + k
            for layer in range(self.num_layers):
                for which in (0, 1):
                    self.buffer.map(self._offset(layer, which, s), new * self.row_bytes)
            self._lengths[s] = new
        return before

    def free(self, slots: Seqs) -> None:
        """Returns the slots' physical memory (after the current stream's work on it is done)."""
        torch.cuda.current_stream(self.device).synchronize()
        for s in _ids(slots):
            for layer in range(self.num_layers):
                for which in (0, 1):
                    self.buffer.unmap(self._offset(layer, which, s), self.slot_bytes)
            self._lengths[s] = 0
            self._free.append(s)
