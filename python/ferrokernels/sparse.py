"""Block-sparse attention.

A :class:`BlockMask` says, per (batch, head, query block), which key blocks a block of queries
attends to, in FlexAttention's layout: ``kv_num_blocks`` / ``kv_indices`` list the *partial*
blocks (masked element by element with ``mask_mod``), ``full_kv_num_blocks`` /
``full_kv_indices`` the *full* ones (every key visible to every query, nothing evaluated).
Blocks are 64 or 128 tokens square. ``sparse_attention`` computes exact attention under that
mask: the cost follows the listed blocks, not the sequence length squared.

On an sm_90 GPU (head dims up to 128, float16/bfloat16) the Hopper attention kernel walks, per
128-row query block, a list of 128-key tiles built once per mask (``BlockMask.tiles``): whole
tiles need no masking, partial ones carry a 128 x 128 bitmap (identical bitmaps are stored
once: the diagonal tiles of a causal mask share one). Elsewhere (CPU, other GPUs) the mask is
expanded to a dense boolean mask and the dense kernel runs under it; that is exact but costs
memory of seqlen_q x seqlen_k per distinct (batch, head) of the mask.

``mask_mod(b, h, q_idx, kv_idx) -> bool`` is called with broadcastable int64 tensors (as a
vectorised torch function, not per element), so write it with tensor operations:
``lambda b, h, q, kv: q >= kv`` is causal.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable, Optional, Tuple

from . import _native
from ._runtime import ShapeError, bmm_f32, empty, expect_rank, float32_of, is_torch, stream_of, torch
from .attention import LAYOUT, _dense

TILE = 128        # the kernel's query block and key tile (src/ops/sparse.rs: TILE)
_CHUNK = 1 << 24  # mask elements evaluated at once
_DIAG_MAX_W = 256  # src/ops/window_scores.rs: DIAG_MAX_W


def _check_int32(x, name, rank):
    if not is_torch(x) or x.dtype != torch.int32 or x.ndim != rank:
        raise ShapeError(f"{name} must be a {rank}-D int32 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def _listed(num, idx):
    """bool, idx's shape: the entries of each list within its count."""
    return torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()


def _present(idx, keep, n_kv):
    """(B, H, QB, KB) bool with the blocks of `idx` where `keep` is set."""
    out = torch.zeros(idx.shape[:-1] + (n_kv + 1,), dtype=torch.bool, device=idx.device)
    # Entries not kept go to a spare column that is dropped.
    out.scatter_(-1, torch.where(keep, idx.long(), n_kv), True)
    return out[..., :n_kv]


class BlockMask:
    """Key blocks per (batch, head, query block), as FlexAttention's ``BlockMask``.

    Parameters
    ----------
    kv_num_blocks, kv_indices : int32 ``(B, H, QB)`` and ``(B, H, QB, K)``
        The partial blocks of each query block (ascending or not); their elements are masked
        with ``mask_mod`` (all visible when it is None).
    full_kv_num_blocks, full_kv_indices : optional, the same shapes
        Blocks with every element visible. A block in both lists counts as full.
    seq_lengths : (q_len, kv_len)
        ``QB = ceil(q_len / block_size)``; indices lie in ``[0, ceil(kv_len / block_size))``.
    block_size : 64 or 128
        Square blocks.
    mask_mod : callable, optional
        ``mask_mod(b, h, q_idx, kv_idx)`` on broadcastable int64 tensors, True = attend.
    validate : bool
        Check that counts and indices are in range (one host sync). Masks built by this
        module's functions skip it; pass False only for lists you know are right: the kernel
        trusts them.

    ``B`` and ``H`` may be 1: the mask is shared by every batch entry / head.
    """

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None, *,
                 seq_lengths: Tuple[int, int], block_size: int = 128, mask_mod: Optional[Callable] = None,
                 validate: bool = True):
        if block_size not in (64, 128):
            raise ValueError(f"block_size must be 64 or 128, got {block_size!r}")
        if (not isinstance(seq_lengths, (tuple, list)) or len(seq_lengths) != 2
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in seq_lengths)):
            raise ValueError(f"seq_lengths must be (q_len, kv_len) of ints >= 0, got {seq_lengths!r}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        self.block_size = block_size
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.mask_mod = mask_mod
        qb, kb = (math.ceil(n / block_size) for n in self.seq_lengths)
        lists = [("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices)]
        if full_kv_num_blocks is not None:
            lists.append(("full_kv_num_blocks", full_kv_num_blocks, "full_kv_indices", full_kv_indices))
        for num_name, num, idx_name, idx in lists:
            _check_int32(num, num_name, 3)
            _check_int32(idx, idx_name, 4)
            if num.shape[2] != qb or tuple(idx.shape[:3]) != tuple(num.shape) or idx.device != num.device:
                raise ShapeError(f"{num_name} must be (B, H, {qb}) and {idx_name} (B, H, {qb}, K) on one device "
                                 f"for q_len {self.seq_lengths[0]} in blocks of {block_size}; got "
                                 f"{tuple(num.shape)} and {tuple(idx.shape)}")
            if tuple(num.shape[:2]) != tuple(kv_num_blocks.shape[:2]) or num.device != kv_num_blocks.device:
                raise ShapeError(f"{num_name} must have kv_num_blocks' (B, H) {tuple(kv_num_blocks.shape[:2])} "
                                 f"and device, got {tuple(num.shape[:2])} on {num.device}")
            # One host sync, once per mask: the kernel trusts these bounds.
            if not validate:
                continue
            if num.numel() and (int(num.min()) < 0 or int(num.max()) > idx.shape[-1]):
                raise ValueError(f"{num_name} must lie in [0, {idx.shape[-1]}] (the length of {idx_name})")
            used = _listed(num, idx)
            if used.any() and (int(idx[used].min()) < 0 or int(idx[used].max()) >= kb):
                raise ValueError(f"{idx_name} must lie in [0, {kb}) for kv_len {self.seq_lengths[1]} "
                                 f"in blocks of {block_size}")
        self._lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
        self._tiles = None

    @classmethod
    def _from_tiles(cls, tiles, *, seq_lengths, mask_mod=None) -> "BlockMask":
        """A 128-block mask that starts as the kernel's lists (estimate_blocks on the GPU); its
        FlexAttention lists are derived when first read."""
        bm = cls.__new__(cls)
        bm.block_size, bm.seq_lengths, bm.mask_mod = TILE, tuple(seq_lengths), mask_mod
        bm._lists, bm._tiles = None, tuple(tiles)
        return bm

    def _flex_lists(self):
        if self._lists is None:
            count, index, bitmap, _ = self._tiles
            kt = math.ceil(self.seq_lengths[1] / TILE)
            used = _listed(count, index)
            partial, present = _present(index, used & (bitmap >= 0), kt), _present(index, used, kt)
            self._lists = _to_lists(partial) + _to_lists(present & ~partial)
        return self._lists

    kv_num_blocks = property(lambda self: self._flex_lists()[0], doc="int32 (B, H, QB): partial blocks per query block")
    kv_indices = property(lambda self: self._flex_lists()[1], doc="int32 (B, H, QB, K): the partial blocks")
    full_kv_num_blocks = property(lambda self: self._flex_lists()[2], doc="int32 (B, H, QB): full blocks, or None")
    full_kv_indices = property(lambda self: self._flex_lists()[3], doc="int32 (B, H, QB, K): the full blocks, or None")

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(B, H, q_len, kv_len), B and H possibly 1 (shared)."""
        first = self._lists[0] if self._lists is not None else self._tiles[0]
        return tuple(first.shape[:2]) + self.seq_lengths

    @property
    def device(self):
        return (self._lists[0] if self._lists is not None else self._tiles[0]).device

    def __repr__(self):
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, density={self.density():.3f}, "
                f"mask_mod={'set' if self.mask_mod else None})")

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def from_blocks(cls, blocks, *, seq_lengths, block_size: int = 128, full=None,
                    mask_mod: Optional[Callable] = None) -> "BlockMask":
        """From a bool ``(B, H, QB, KB)`` matrix of attended blocks. ``full`` (same shape)
        marks those whose elements are all visible; the others are masked with ``mask_mod``.
        Without ``full`` and ``mask_mod`` every attended block is full."""
        if not is_torch(blocks) or blocks.dtype != torch.bool or blocks.ndim != 4:
            raise ShapeError(f"blocks must be a 4-D bool tensor (B, H, QB, KB), got "
                             f"{getattr(blocks, 'dtype', type(blocks).__name__)} {tuple(getattr(blocks, 'shape', ()))}")
        if full is None:
            full = blocks if mask_mod is None else torch.zeros_like(blocks)
        elif not is_torch(full) or full.shape != blocks.shape or full.dtype != torch.bool:
            raise ShapeError(f"full must be a bool tensor shaped like blocks {tuple(blocks.shape)}")
        full = full & blocks
        partial = blocks & ~full
        num, idx = _to_lists(partial)
        fnum, fidx = _to_lists(full)
        # Lists built here are in range by construction: no host sync.
        return cls(num, idx, fnum, fidx, seq_lengths=tuple(seq_lengths), block_size=block_size, mask_mod=mask_mod,
                   validate=False)

    @classmethod
    def from_mask_mod(cls, mask_mod: Callable, B: Optional[int], H: Optional[int], q_len: int, kv_len: int, *,
                      block_size: int = 128, device="cpu", candidates=None) -> "BlockMask":
        """Evaluates ``mask_mod`` on every (query, key) pair of every block (vectorised, in
        chunks, on ``device``) and classifies each block as empty, partial or full. ``B`` / ``H``
        None: the mask does not depend on them and is shared (as FlexAttention's
        ``create_block_mask``). ``candidates``, a bool ``(B | 1, H | 1, QB, KB)`` superset of
        the attended blocks, limits the evaluation to those blocks (the pattern builders
        below pass one, so long sequences cost their blocks, not q_len x kv_len)."""
        nb, nh = B or 1, H or 1
        qb, kb = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
        if candidates is None:
            candidates = torch.ones((1, 1, qb, kb), dtype=torch.bool, device=device)
        candidates = candidates.to(device).expand(nb, nh, qb, kb)
        anyb = torch.zeros((nb, nh, qb, kb), dtype=torch.bool, device=device)
        allb = torch.zeros_like(anyb)
        for w, rows, cols, qi, ki in _block_chunks(candidates.nonzero(), block_size, q_len, kv_len):
            inside = (rows < q_len)[:, :, None] & (cols < kv_len)[:, None, :]
            m = _eval_mod(mask_mod, w[:, 0, None, None], w[:, 1, None, None], qi, ki, device)
            m = m.expand(len(w), block_size, block_size)
            # Padding past the sequence: absent for "any", visible for "all".
            at = (w[:, 0], w[:, 1], w[:, 2], w[:, 3])
            anyb[at] = (m & inside).flatten(1).any(1)
            allb[at] = (m | ~inside).flatten(1).all(1)
        return cls.from_blocks(anyb, seq_lengths=(q_len, kv_len), block_size=block_size, full=allb,
                               mask_mod=mask_mod)

    # --- views ---------------------------------------------------------------------------------

    def to_blocks(self):
        """(attended, full): bool ``(B, H, QB, KB)``."""
        kb = math.ceil(self.seq_lengths[1] / self.block_size)
        present = _present(self.kv_indices, _listed(self.kv_num_blocks, self.kv_indices), kb)
        full = torch.zeros_like(present)
        if self.full_kv_num_blocks is not None:
            full = _present(self.full_kv_indices, _listed(self.full_kv_num_blocks, self.full_kv_indices), kb)
        return present | full, full

    def density(self) -> float:
        """The fraction of (query block, key block) pairs attended."""
        present, _ = self.to_blocks()
        return float(present.float().mean()) if present.numel() else 0.0

    def to_dense(self):
        """bool ``(B, H, q_len, kv_len)``, True = attend: the element mask this BlockMask means."""
        present, full = self.to_blocks()
        nq, nk = self.seq_lengths
        rows = torch.arange(nq, device=self.device) // self.block_size
        cols = torch.arange(nk, device=self.device) // self.block_size
        p = present[:, :, rows][..., cols]
        f = full[:, :, rows][..., cols]
        if self.mask_mod is None:
            return p
        b, h = p.shape[:2]
        m = self._mod(torch.arange(b, device=self.device).view(b, 1, 1, 1),
                      torch.arange(h, device=self.device).view(1, h, 1, 1),
                      torch.arange(nq, device=self.device).view(1, 1, nq, 1),
                      torch.arange(nk, device=self.device).view(1, 1, 1, nk))
        return f | (p & m)

    def _mod(self, b, h, q, kv):
        return _eval_mod(self.mask_mod, b, h, q, kv, self.device)

    def tiles(self, device=None):
        """The kernel's lists at 128 x 128 tiles (built once, cached): per (B, H, 128-row query
        block) the count, the ascending key tiles and their bitmap indices (-1 = whole), and
        the bitmaps, int32 ``(n, 128, 4)``."""
        device = torch.device(device) if device is not None else self.device
        if self._tiles is None:
            # Built where the mask lives (its mask_mod may hold tensors there), then moved.
            self._tiles = self._build_tiles()
        if self._tiles[0].device != device:
            self._move_tiles(device)
        return self._tiles

    def _build_tiles(self):
        return _kernel_tiles(self, self.device)

    def _move_tiles(self, device):
        self._tiles = tuple(t.to(device) for t in self._tiles)

    def to_flex(self):
        """The same mask as torch's FlexAttention ``BlockMask`` (for comparisons)."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
        mod = self.mask_mod
        kwargs = dict(BLOCK_SIZE=self.block_size, seq_lengths=self.seq_lengths)
        if mod is not None:
            kwargs["mask_mod"] = mod
        return FlexBlockMask.from_kv_blocks(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                                            self.full_kv_indices, **kwargs)


def _eval_mod(mask_mod, b, h, q, kv, device):
    """mask_mod on broadcastable index tensors, as a bool tensor on `device`."""
    return torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool)


def _block_chunks(where, size, q_len, kv_len):
    """The elements of blocks `where` (rows of (b, h, q block, kv block)), size x size each, a
    chunk of at most _CHUNK elements at a time: (blocks, their rows (P, size), their keys
    (P, size), and the query / key indices to ask a mask_mod, broadcastable to (P, size, size)).
    Positions past the sequence (a block's padding) are asked as the last one, so a mask_mod
    that indexes per-token tensors stays in bounds."""
    arange = torch.arange(size, device=where.device)
    step = max(1, _CHUNK // (size * size))
    for c0 in range(0, len(where), step):
        w = where[c0: c0 + step]
        rows = w[:, 2, None] * size + arange
        cols = w[:, 3, None] * size + arange
        yield (w, rows, cols, rows.clamp(max=max(q_len - 1, 0))[:, :, None],
               cols.clamp(max=max(kv_len - 1, 0))[:, None, :])


def _to_lists(blocks):
    """(count, indices) int32 from a bool (B, H, QB, KB) block matrix: each row's attended
    blocks ascending, then zeros. A cumulative sum places them (no sort)."""
    kb = blocks.shape[-1]
    col = torch.arange(kb, device=blocks.device).expand(blocks.shape)
    slot = torch.where(blocks, blocks.cumsum(-1) - 1, kb)  # unattended blocks land in a spare slot
    idx = torch.zeros(blocks.shape[:-1] + (kb + 1,), dtype=torch.int64, device=blocks.device)
    idx.scatter_(-1, slot, col)
    return blocks.sum(-1).to(torch.int32), idx[..., :kb].to(torch.int32).contiguous()


def _coarsen(x, f, fill):
    """Merges f x f blocks of the last two axes (with `all` for fill=True, `any` for False)."""
    if f == 1:
        return x
    pq, pk = (-x.shape[2]) % f, (-x.shape[3]) % f
    x = torch.nn.functional.pad(x, (0, pk, 0, pq), value=fill)
    b, h, qb, kb = x.shape
    x = x.view(b, h, qb // f, f, kb // f, f)
    return x.all(5).all(3) if fill else x.any(5).any(3)


def _pack_bits(m):
    """bool (..., 32 n) -> int32 (..., n): bit c of word w = column 32 w + c."""
    weights = (1 << torch.arange(32, device=m.device, dtype=torch.int64))
    words = (m.reshape(m.shape[:-1] + (m.shape[-1] // 32, 32)).to(torch.int64) * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


class CausalMod:
    """The causal mask_mod, ``kv <= q + offset`` (offset = kv_len - q_len: bottom-right), as an
    object the tile builder recognises: its partial 128-tiles need no evaluation (one shared
    lower-triangular bitmap where the diagonal is tile-aligned), so masks made per input
    (``estimate_blocks``) reach the kernel without a host sync."""

    def __init__(self, offset: int = 0):
        self.offset = int(offset)

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


def _causal_bitmaps(p_t, f_t, offset, device):
    """Bitmaps of a CausalMod mask whose diagonal falls on tile edges, without evaluating it:
    a partial tile is the diagonal one (bitmap 0, lower-triangular), one below it (1, all
    visible) or above (2, nothing); whole tiles -1."""
    qt, kt = p_t.shape[2:]
    rel = torch.arange(kt, device=device)[None, :] - torch.arange(qt, device=device)[:, None] - offset // TILE
    kind = torch.where(rel == 0, 0, torch.where(rel < 0, 1, 2)).to(torch.int32)
    bitmap_of = torch.where(p_t & ~f_t, kind, -1).to(torch.int32)
    tri = torch.ones(TILE, TILE, dtype=torch.bool, device=device).tril()
    return bitmap_of, _pack_bits(torch.stack([tri, torch.ones_like(tri), torch.zeros_like(tri)]))


def _tile_lists(p_t, bitmap_of, bits, sized):
    """(count, index, bitmap, bits) from the attended tiles and each tile's bitmap. `sized`:
    lists as long as the longest one (reading the counts back: a sync); else KT long."""
    count, order = _to_lists(p_t)
    if sized:
        order = order[..., :max(1, int(count.max()) if count.numel() else 1)].contiguous()
    return count.contiguous(), order, torch.gather(bitmap_of, -1, order.long()).contiguous(), bits


def _kernel_tiles(bm: BlockMask, device):
    present, full = (x.to(device) for x in bm.to_blocks())
    if isinstance(bm.mask_mod, CausalMod) and bm.block_size == TILE and bm.mask_mod.offset % TILE == 0:
        return _tile_lists(present, *_causal_bitmaps(present, full & present, bm.mask_mod.offset, device), sized=False)
    f = TILE // bm.block_size
    p_t = _coarsen(present, f, False)
    # Sub-blocks past the sequence (padding to whole tiles) hide nothing: whole for `all`.
    f_t = _coarsen(full, f, True) & p_t
    partial = p_t & ~f_t
    b, h, qt, kt = p_t.shape
    bitmap_of = torch.full((b, h, qt, kt), -1, dtype=torch.int32, device=device)
    where = partial.nonzero()
    bits = torch.zeros((1, TILE, TILE // 32), dtype=torch.int32, device=device)
    if len(where):
        words = []
        for w, rows, cols, qi, ki in _block_chunks(where, TILE, *bm.seq_lengths):
            rs = (rows // bm.block_size).clamp(max=present.shape[2] - 1)
            cs = (cols // bm.block_size).clamp(max=present.shape[3] - 1)
            bi, hi = w[:, 0, None, None], w[:, 1, None, None]
            sub_p = present[bi, hi, rs[:, :, None], cs[:, None, :]]
            sub_f = full[bi, hi, rs[:, :, None], cs[:, None, :]]
            m = sub_f | sub_p
            if bm.mask_mod is not None:
                m = sub_f | (sub_p & bm._mod(bi, hi, qi, ki).to(device))
            words.append(_pack_bits(m))
        words = torch.cat(words)
        bits, inverse = torch.unique(words.view(len(words), -1), dim=0, return_inverse=True)
        bits = bits.view(-1, TILE, TILE // 32).contiguous()
        bitmap_of[where[:, 0], where[:, 1], where[:, 2], where[:, 3]] = inverse.to(torch.int32)
    return _tile_lists(p_t, bitmap_of, bits, sized=True)


def _check(q, k, v, block_mask):
    expect_rank(q, 4, "q", LAYOUT)
    expect_rank(k, 4, "k", LAYOUT)
    expect_rank(v, 4, "v", LAYOUT)
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a ferrokernels.BlockMask, got {type(block_mask).__name__}")
    mb, mh, mq, mk = block_mask.shape
    b, nq, hq, _ = q.shape
    if (mq, mk) != (nq, k.shape[1]):
        raise ShapeError(f"block_mask covers {mq} queries x {mk} keys, but q has {nq} and k {k.shape[1]}")
    if mb not in (1, b) or mh not in (1, hq):
        raise ShapeError(f"block_mask's (B, H) = ({mb}, {mh}) must be (1 or {b}, 1 or {hq}) for q's batch and heads")


def _hopper(q, v) -> bool:
    return (is_torch(q) and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and max(q.shape[-1], v.shape[-1]) <= TILE and torch.cuda.get_device_capability(q.device) == (9, 0))


def sparse_attention(q, k, v, block_mask: BlockMask, *, scale: Optional[float] = None, return_lse: bool = False,
                     out=None):
    """Exact attention ``softmax(scale * q @ k^T + mask) @ v`` under ``block_mask``.

    q ``(batch, seqlen_q, heads_q, head_dim)``, k / v ``(batch, seqlen_k, heads_kv, head_dim)``
    (GQA: ``heads_q`` a multiple of ``heads_kv``). ``block_mask`` covers ``(seqlen_q,
    seqlen_k)``, with a batch / head axis of the inputs' size or 1. Rows that see no key
    return 0 (LSE ``-inf``). Returns out ``(batch, seqlen_q, heads_q, head_dim_v)``, and with
    ``return_lse`` the float32 natural-log LSE ``(batch, heads_q, seqlen_q)``.
    """
    _check(q, k, v, block_mask)
    if not _hopper(q, v):
        mask = block_mask.to_dense().to(q.device) if is_torch(q) else block_mask.to_dense().numpy()
        o, lse = _dense(q, k, v, out, causal=False, scale=scale, window=(-1, -1), softcap=0.0, alibi=None,
                        mask=mask, return_lse=return_lse)
        return (o, lse) if return_lse else o
    if out is None:
        out = empty(q, tuple(q.shape[:-1]) + (v.shape[-1],))
    lse = empty(q, (q.shape[0], q.shape[2], q.shape[1]), float32_of(q)) if return_lse else None
    count, index, bitmap, bits = block_mask.tiles(q.device)
    columns = None
    if isinstance(block_mask, VerticalSlashMask):
        columns = block_mask.gather_columns(k, v, q.shape[2]) + (block_mask.column_bits(q.device),)
    workspace = torch.empty(1, dtype=torch.int32, device=q.device)
    _native.sparse_attention_fwd(q, k, v, out, lse, count, index, bitmap, bits,
                                 scale=None if scale is None else float(scale), workspace=workspace,
                                 columns=columns, stream=stream_of(q))
    return (out, lse) if return_lse else out


# --- patterns --------------------------------------------------------------------------------
# Each builder returns a BlockMask for (q_len, kv_len) with the causal diagonal aligned
# bottom-right (query i sits at key position i + kv_len - q_len), as ferrokernels.attention's
# causal. Blocks are classified exactly (partial blocks keep the element mask); only the
# blocks a cheap block-level bound admits are evaluated.

def _grid(q_len, kv_len, block_size, device):
    """Per block (QB, KB): the least and largest distance (query position - key) inside it and
    the first key, for the block-level bounds."""
    off = kv_len - q_len
    qb = torch.arange(math.ceil(q_len / block_size), device=device)[:, None] * block_size
    kb = torch.arange(math.ceil(kv_len / block_size), device=device)[None, :] * block_size
    d_min = qb + off - (kb + block_size - 1)
    d_max = qb + block_size - 1 + off - kb
    return d_min, d_max, kb


def _pattern(mod, q_len, kv_len, candidates, block_size, device, heads=None):
    return BlockMask.from_mask_mod(mod, None, heads, q_len, kv_len, block_size=block_size, device=device,
                                   candidates=candidates[None, None] if candidates.ndim == 2 else candidates)


def causal_mask(q_len: int, kv_len: int, *, block_size: int = 128, device="cpu") -> BlockMask:
    """Causal attention (bottom-right): the blocks below the diagonal full, the diagonal ones
    masked per element."""
    d_min, d_max, _ = _grid(q_len, kv_len, block_size, device)
    return _pattern(CausalMod(kv_len - q_len), q_len, kv_len, d_max >= 0, block_size, device)


def sliding_window(q_len: int, kv_len: int, window: int, *, causal: bool = True, block_size: int = 128,
                   device="cpu") -> BlockMask:
    """Local attention (Longformer / Mistral's sliding window): a query sees the ``window``
    keys ending at its own position (causal), or the keys within ``window - 1`` of it on both
    sides (``causal=False``)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    off = kv_len - q_len
    d_min, d_max, _ = _grid(q_len, kv_len, block_size, device)
    if causal:
        mod = lambda b, h, q, kv: (kv <= q + off) & (q + off - kv < window)  # noqa: E731
        cand = (d_max >= 0) & (d_min < window)
    else:
        mod = lambda b, h, q, kv: (q + off - kv).abs() < window  # noqa: E731
        cand = (d_max > -window) & (d_min < window)
    return _pattern(mod, q_len, kv_len, cand, block_size, device)


def streaming(q_len: int, kv_len: int, sink: int = 128, recent: int = 1024, *, block_size: int = 128,
              device="cpu") -> BlockMask:
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention
    Sinks"): causal, each query sees the first ``sink`` keys and the ``recent`` keys up to
    itself."""
    off = kv_len - q_len
    d_min, d_max, k0 = _grid(q_len, kv_len, block_size, device)
    mod = lambda b, h, q, kv: (kv <= q + off) & ((kv < sink) | (q + off - kv < recent))  # noqa: E731
    return _pattern(mod, q_len, kv_len, (d_max >= 0) & ((k0 < sink) | (d_min < recent)), block_size, device)


def a_shape(q_len: int, kv_len: int, sink_blocks: int = 1, local_blocks: int = 4, *, block_size: int = 64,
            device="cpu") -> BlockMask:
    """MInference's A-shape head (Jiang et al., 2024, "MInference 1.0"): the first
    ``sink_blocks`` key blocks and the ``local_blocks`` blocks up to the query's own, in whole
    blocks (causal inside the diagonal block)."""
    off = kv_len - q_len

    def mod(b, h, q, kv):
        qb, kb = (q + off) // block_size, kv // block_size
        return (kv <= q + off) & ((kb < sink_blocks) | (qb - kb < local_blocks))
    d_min, d_max, k0 = _grid(q_len, kv_len, block_size, device)
    cand = (d_max >= 0) & ((k0 < sink_blocks * block_size) | (d_min < (local_blocks + 1) * block_size))
    return _pattern(mod, q_len, kv_len, cand, block_size, device)


def duo_attention(q_len: int, kv_len: int, retrieval_heads, sink: int = 128, recent: int = 1024, *,
                  block_size: int = 128, device="cpu") -> BlockMask:
    """DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with
    Retrieval and Streaming Heads"): per head, retrieval heads (``retrieval_heads[h]`` True)
    attend causally to everything, streaming heads to sink + recent keys as StreamingLLM."""
    ret = torch.as_tensor(retrieval_heads, dtype=torch.bool, device=device).flatten()
    off = kv_len - q_len

    def mod(b, h, q, kv):
        return (kv <= q + off) & (ret[h] | (kv < sink) | (q + off - kv < recent))
    d_min, d_max, k0 = _grid(q_len, kv_len, block_size, device)
    cand = (d_max >= 0)[None, None] & (ret.view(1, -1, 1, 1) | ((k0 < sink) | (d_min < recent))[None, None])
    return _pattern(mod, q_len, kv_len, cand, block_size, device, heads=len(ret))


def strided(q_len: int, kv_len: int, heads: int, local_blocks: int = 4, stride: int = 8, *,
            block_size: int = 128, device="cpu") -> BlockMask:
    """S2-Attention (Lin et al., 2024, "S2-Attention: Hardware-Aware Context Sharding Among
    Attention Heads"): each head sees its ``local_blocks`` nearest key blocks and every
    ``stride``-th block from a head-dependent offset (``h % stride``), so the heads together
    cover the whole context. Causal."""
    off = kv_len - q_len

    def mod(b, h, q, kv):
        qb, kb = (q + off) // block_size, kv // block_size
        return (kv <= q + off) & ((qb - kb < local_blocks) | (kb % stride == h % stride))
    d_min, d_max, k0 = _grid(q_len, kv_len, block_size, device)
    shard = (k0 // block_size % stride)[None] == (torch.arange(heads, device=device) % stride).view(-1, 1, 1)
    cand = (d_max >= 0) & (shard | (d_min < (local_blocks + 1) * block_size))
    return _pattern(mod, q_len, kv_len, cand[None], block_size, device, heads=heads)


def power(q_len: int, kv_len: int, *, block_size: int = 128, device="cpu") -> BlockMask:
    """PowerAttention (Chen et al., 2025, "PowerAttention: Exponentially Scaling of Receptive
    Fields for Effective Sparse Attention"): a query block sees its own block and the blocks
    2^k blocks before it (k = 0, 1, 2, ...), so any key is reached within log2(n) layers.
    Causal."""
    off = kv_len - q_len

    def mod(b, h, q, kv):
        d = (q + off) // block_size - kv // block_size
        return (kv <= q + off) & ((d == 0) | ((d > 0) & ((d & (d - 1)) == 0)))
    qb = torch.arange(math.ceil(q_len / block_size), device=device)[:, None]
    kb = torch.arange(math.ceil(kv_len / block_size), device=device)[None, :]
    # Block distances of the keys a query block can hold (its rows may straddle two key blocks).
    lo = (qb * block_size + off) // block_size - kb
    hi = ((qb + 1) * block_size - 1 + off) // block_size - kb
    pow2 = lambda d: (d == 0) | ((d > 0) & ((d & (d - 1)) == 0))  # noqa: E731
    cand = (hi >= 0) & (pow2(lo) | pow2(hi) | (hi - lo > 1))
    return _pattern(mod, q_len, kv_len, cand, block_size, device)


# --- blocks chosen from the input ------------------------------------------------------------

_SELECT_KERNEL = True  # tests turn it off to compare the kernel with the torch path on one device
_SELECT_MAX_TILES = 2048  # key tiles per row the selection kernel takes (src/ops/sparse.rs: SELECT_MAX_TILES)
_VS_MAX_COLUMN_TILES = 256  # column tiles per head the vertical-slash list kernel takes (src/ops/sparse.rs)


def _select_on_gpu(q, causal, off, block_size, kb) -> bool:
    """The selection kernel takes 128-blocks with the causal diagonal on tile edges."""
    return (_SELECT_KERNEL and is_torch(q) and q.is_cuda and block_size == TILE and kb <= _SELECT_MAX_TILES
            and (not causal or off % TILE == 0))


_CAUSAL_TILE_BITS = {}


def _causal_tile_bits(device):
    """The one bitmap of the selection kernel's lists (the causal diagonal tile), built once
    per device: a per-call mask pays no torch ops for it."""
    if device not in _CAUSAL_TILE_BITS:
        _CAUSAL_TILE_BITS[device] = _pack_bits(torch.ones(TILE, TILE, dtype=torch.bool, device=device).tril()[None])
    return _CAUSAL_TILE_BITS[device]


def _select_gpu(scores, nq, nk, *, causal, off, softmax, top_k, threshold, sink_blocks, local_blocks):
    """The kernel's tile lists straight from the block scores (kernels/sparse.cu), no sync."""
    scores = scores.float().contiguous()
    b, h, qt, kt = scores.shape
    count = torch.empty((b, h, qt), dtype=torch.int32, device=scores.device)
    index = torch.empty((b, h, qt, kt), dtype=torch.int32, device=scores.device)
    bitmap = torch.empty_like(index)
    _native.sparse_select_blocks(scores, count, index, bitmap, diag=off // TILE, causal=causal, softmax=softmax,
                                 top_k=top_k or 0, threshold=threshold if threshold is not None else 1.0,
                                 sink_blocks=sink_blocks, local_blocks=local_blocks, stream=stream_of(scores))
    tiles = (count, index, bitmap, _causal_tile_bits(scores.device))
    return BlockMask._from_tiles(tiles, seq_lengths=(nq, nk), mask_mod=CausalMod(off) if causal else None)


def _pieces_on_gpu(x) -> bool:
    """x a 16-bit CUDA tensor the estimate kernels can read in 16-byte pieces (kernels on)."""
    return (_SELECT_KERNEL and is_torch(x) and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in x.stride()[:3]))


def _pool_on_gpu(x) -> bool:
    return _pieces_on_gpu(x) and x.shape[-1] in (64, 128, 256)  # the pooling kernel's head dims


def _pool(x, block_size, mul=1.0, dtype=None):
    """Mean over blocks of tokens, times ``mul``: (B, N, H, D) -> (B, H, ceil(N / bs), D) in
    float32 (or x's dtype with ``dtype=x.dtype`` on the kernel path), the last block averaged
    over its real tokens. One read of x either way."""
    b, n, h, d = x.shape
    if _pool_on_gpu(x):
        out = torch.empty((b, h, -(-n // block_size), d), dtype=dtype or torch.float32, device=x.device)
        _native.sparse_pool_blocks(x, out, block=block_size, mul=float(mul), stream=stream_of(x))
        return out
    pad = (-n) % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    xs = x.view(b, -1, block_size, h, d).sum(2, dtype=torch.float32)  # no float copy of x
    if pad:
        xs[:, -1] *= block_size / (block_size - pad)
    return (xs * (mul / block_size)).transpose(1, 2)


def _grouped_scores(a, b):
    """a (B, Hq, M, E) against b (B, Hk, N, E): (B, Hq, M, N), each q head against its kv head
    (q head i reads kv head i // (Hq / Hk)), without repeating b per q head."""
    bs, hq, m, e = a.shape
    hk, n = b.shape[1], b.shape[2]
    return (a.reshape(bs, hk, hq // hk * m, e) @ b.transpose(-1, -2)).view(bs, hq, m, n)


def _strided_on_gpu(x) -> bool:
    return _pieces_on_gpu(x) and x.shape[-1] % 8 == 0


def _strided(q, k, block_size, stride):
    """The operands of XAttention's strided matmul: the rows i = s (mod stride) of q meet the
    keys j = stride - 1 - s (mod stride) of k, so q (B, N, Hq, D) -> (B, Hq, N / stride,
    stride * D) and k (B, Nk, Hk, D) -> (B, Hk, Nk / stride, stride * D), each padded to whole
    blocks (one copy each)."""
    b, n, h, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    if _strided_on_gpu(q) and _strided_on_gpu(k):  # one copy kernel each (torch: pad, flip, permute)
        def rows(x, reverse):
            out = torch.empty(b, x.shape[2], -(-x.shape[1] // block_size) * block_size // stride, stride * d,
                              dtype=x.dtype, device=x.device)
            _native.sparse_strided_rows(x, out, stride=stride, reverse=reverse, stream=stream_of(x))
            return out

        return rows(q, False), rows(k, True)
    if n % block_size:
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, (-n) % block_size))
    if nk % block_size:
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, (-nk) % block_size))
    qs = q.view(b, -1, stride, h, d).permute(0, 3, 1, 2, 4).reshape(b, h, -1, stride * d)
    ks = k.view(b, -1, stride, hk, d).flip(2).permute(0, 3, 1, 2, 4).reshape(b, hk, -1, stride * d)
    return qs, ks


def _antidiagonal(q, k, block_size, stride):
    """XAttention's block scores before the softmax: per block, the scores of every stride-th
    antidiagonal (query rows i and keys j with (i + j) % stride == stride - 1), as one strided
    matmul. (B, Hq, N / stride, Nk / stride), float32."""
    return _grouped_scores(*_strided(q, k, block_size, stride)).float()


def _antidiagonal_torch(q, k, block_size, stride, scale, causal):
    """The antidiagonal block scores (B, Hq, QB, KB) float32: each antidiagonal row's softmax
    summed per key block and averaged over the block's rows (sparse_antidiag's reference)."""
    b, nq, hq, _ = q.shape
    nk = k.shape[1]
    r = block_size // stride
    s = _antidiagonal(q, k, block_size, stride) * scale
    # Antidiagonal row i / col j stand for query i * stride + s and key j * stride + ...;
    # causal at that granularity, and keys past the sequence out.
    qi = torch.arange(s.shape[-2], device=q.device)[:, None] * stride + stride - 1 + nk - nq
    kj = torch.arange(s.shape[-1], device=q.device)[None, :] * stride
    keep = kj < nk
    if causal:
        keep = keep & (kj <= qi)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return p.view(b, hq, s.shape[-2] // r, r, s.shape[-1] // r, r).sum((3, 5)) / r


_ANTIDIAG_CHUNKS = 4  # causal: the strided matmul in this many row chunks, each up to its last visible key


def _antidiagonal_gpu(q, k, block_size, stride, scale, causal):
    """The antidiagonal block scores on CUDA: the strided matmul in 16-bit (float32
    accumulation) in row chunks that stop at the chunk's last visible key, each chunk's softmax
    and block sums in one kernel (kernels/sparse.cu: sparse_antidiag). (B, Hq, QB, KB) float32,
    each row's probabilities summed per key block."""
    b, nq, hq, _ = q.shape
    nk = k.shape[1]
    r, off = block_size // stride, nk - nq
    qs, ks = _strided(q, k, block_size, stride)
    rows, cols = qs.shape[2], ks.shape[2]
    qb, kb = rows // r, cols // r
    if cols % 8:  # the scores kernel reads 16-byte pieces of logit rows: zero keys up to a multiple of 8
        ks = torch.nn.functional.pad(ks, (0, 0, 0, (-cols) % 8))
        cols = ks.shape[2]
    out = torch.empty(b * hq, qb, kb, dtype=torch.float32, device=q.device)
    cols_valid = -(-nk // stride)
    per = -(-qb // (_ANTIDIAG_CHUNKS if causal else 1)) * r
    for row0 in range(0, rows, per):
        row1 = min(rows, row0 + per)
        last = (row1 - 1) * stride + stride - 1 + off  # the chunk's last query
        ld = min(cols, cols_valid, last // stride + 1) if causal else min(cols, cols_valid)
        if ld <= 0:
            out[:, row0 // r:row1 // r] = 0
            continue
        ld = min(cols, -(-ld // 8) * 8)  # 16-byte logit rows
        logits = _grouped_scores(qs[:, :, row0:row1], ks[:, :, :ld])
        _native.sparse_antidiag_scores(logits.view(b * hq, row1 - row0, ld), out, row0=row0, cols_valid=cols_valid,
                                       causal=causal, off=off, stride=stride, r=r, scale=scale,
                                       stream=stream_of(q))
    return out.view(b, hq, qb, kb)


def estimate_blocks(q, k, *, method: str = "pooled", threshold: Optional[float] = None, top_k: Optional[int] = None,
                    causal: bool = True, scale: Optional[float] = None, stride: int = 16, block_size: int = 128,
                    sink_blocks: int = 1, local_blocks: int = 1) -> BlockMask:
    """A per-(batch, head) BlockMask chosen from the inputs, without training:

    - ``method="pooled"`` (SeerAttention's gate without its learned projections, Gao et al.,
      2024): block scores = softmax over key blocks of mean-pooled q . mean-pooled k.
    - ``method="antidiagonal"`` (XAttention, Xu et al., 2025): the attention of every
      ``stride``-th antidiagonal of each block, softmaxed over each query row, summed per block.

    Each query block keeps the fewest key blocks whose scores add up to ``threshold`` of the
    row (default 0.9), or its ``top_k`` best, plus the first ``sink_blocks`` and the ``local_blocks`` up to
    its own (so no row is empty). q ``(batch, seqlen_q, heads_q, D)``, k ``(batch, seqlen_k,
    heads_kv, D)``, GQA allowed; with ``causal`` the diagonal is bottom-right and the mask is
    causal inside the diagonal blocks. No host sync: it can run per call.
    """
    expect_rank(q, 4, "q", LAYOUT)
    expect_rank(k, 4, "k", LAYOUT)
    if method not in ("pooled", "antidiagonal"):
        raise ValueError(f"method must be 'pooled' or 'antidiagonal', got {method!r}")
    if threshold is not None and top_k is not None:
        raise ValueError("give threshold (0 < t <= 1) or top_k (>= 1), not both")
    if threshold is None and top_k is None:
        threshold = 0.9
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if block_size not in (64, 128) or block_size % stride:
        raise ValueError(f"block_size must be 64 or 128 and a multiple of stride, got {block_size} / {stride}")
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    if hk == 0 or hq % hk:
        raise ShapeError(f"q has {hq} heads, which must be a multiple of k's {hk} heads (GQA/MQA)")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qb, kb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    off = nk - nq
    on_gpu = _select_on_gpu(q, causal, off, block_size, kb)
    if method == "pooled":
        if on_gpu and _pool_on_gpu(q) and _pool_on_gpu(k):
            # 16-bit means and a 16-bit matmul accumulating in float32: the float32 one was 19 us at 32K.
            qp, kp = _pool(q, block_size, scale, q.dtype), _pool(k, block_size, 1.0, k.dtype)
            s = bmm_f32(qp.view(b * hk, -1, d), kp.view(b * hk, kb, d).transpose(1, 2)).view(b, hq, qb, kb)
        else:
            s = _grouped_scores(_pool(q, block_size, scale), _pool(k, block_size))  # logits
        if on_gpu:  # the selection kernel softmaxes the visible logits itself
            return _select_gpu(s, nq, nk, causal=causal, off=off, softmax=True, top_k=top_k, threshold=threshold,
                               sink_blocks=sink_blocks, local_blocks=local_blocks)
    else:
        scorer = _antidiagonal_gpu if on_gpu and q.dtype in (torch.float16, torch.bfloat16) else _antidiagonal_torch
        score = scorer(q, k, block_size, stride, scale, causal)
        if on_gpu:
            return _select_gpu(score, nq, nk, causal=causal, off=off, softmax=False, top_k=top_k,
                               threshold=threshold, sink_blocks=sink_blocks, local_blocks=local_blocks)
    if method == "pooled":
        if causal:  # blocks past the diagonal out
            s = s.masked_fill(_grid(nq, nk, block_size, q.device)[1] < 0, float("-inf"))
        score = torch.softmax(s, -1).nan_to_num(0.0)
    return _select_torch(score, nq, nk, causal=causal, block_size=block_size, top_k=top_k, threshold=threshold,
                         sink_blocks=sink_blocks, local_blocks=local_blocks)


def _select_torch(score, nq, nk, *, causal, block_size, top_k, threshold, sink_blocks, local_blocks):
    """The selection kernel's reference: the BlockMask of ``score`` (B, H, QB, KB), each row's
    probabilities over its visible blocks."""
    d_min, d_max, k0 = _grid(nq, nk, block_size, score.device)
    visible = d_max >= 0 if causal else torch.ones_like(d_max, dtype=torch.bool)
    if threshold is not None:
        val, order = score.sort(-1, descending=True)
        # Keep a block while the mass before it is short of the threshold.
        before = val.cumsum(-1) - val
        # (threshold 1 keeps every visible block, whatever float32 rounding does to the sums)
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, (before < threshold) | (threshold >= 1))
    else:
        idx = score.topk(min(top_k, score.shape[-1]), -1).indices
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)
    qpos = torch.arange(score.shape[-2], device=score.device)[:, None] * block_size + nk - nq  # a query block's first position
    always = (k0 < sink_blocks * block_size) | ((qpos - k0 >= 0) & (qpos - k0 < local_blocks * block_size))
    always = always | ((d_max >= 0) & (d_min < 0))  # the diagonal blocks
    blocks = (chosen | always) & visible
    if not causal:
        return BlockMask.from_blocks(blocks, seq_lengths=(nq, nk), block_size=block_size)
    return BlockMask.from_blocks(blocks, full=blocks & (d_min >= 0), seq_lengths=(nq, nk), block_size=block_size,
                                 mask_mod=CausalMod(nk - nq))


# --- MInference vertical-slash ---------------------------------------------------------------
# MInference (Jiang et al., 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context
# LLMs via Dynamic Sparse Attention"): most heads attend to a few key columns (vertical lines:
# sinks, delimiters) and a few distances (slash lines: local and periodic). The last queries'
# attention over all keys is computed online, the top columns and diagonals kept per head. The
# diagonals become whole 128 x 128 tiles (each diagonal crosses at most two tiles per query
# block); the columns are gathered into per-head K/V and attended as extra tiles, each
# column masked out of the query blocks whose tiles already hold it.

class _VerticalSlashMod:
    """mask_mod of a VerticalSlashMask: causal, and the key's tile listed or the key a column."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, b, h, q, kv):
        tiles, is_col = self.mask._views()[:2]
        return (tiles[b, h, q // TILE, kv // TILE] | is_col[b, h, kv]) & (kv <= q + self.mask._off)


_VS_CUT_BITS = {}  # (off % 128, device) -> VerticalSlashMask._bitmaps


class VerticalSlashMask(BlockMask):
    """MInference's vertical-slash pattern for one (q_len, kv_len) causal (bottom-right) call:
    query at position ``p`` (row + kv_len - q_len) attends key ``c <= p`` when ``c`` is one of its
    head's ``columns`` or ``c``'s 128-tile is crossed, within the query's 128-row block (its
    128 rows, also those past q_len), by one of the head's ``diagonals`` (distances p - c).
    Diagonal 0 is always included.

    columns : int ``(B, H, V)`` key positions (any order, duplicates allowed; ids outside
    [0, kv_len) are dropped).
    diagonals : int ``(B, H, S)`` distances in [0, kv_len) (others dropped).

    Built without a host sync, and on CUDA its kernel lists come from one launch, so it can be
    made per call (``vertical_slash``). A ``BlockMask`` for every view (``to_dense``,
    ``to_flex``, ``density``), derived when first read: the column tiles count as partial
    blocks there.
    """

    def __init__(self, columns, diagonals, *, seq_lengths: Tuple[int, int], _distinct_sorted: bool = False):
        nq, nk = (int(n) for n in seq_lengths)
        if nk < nq or nq < 1:
            raise ValueError(f"vertical-slash masks need 1 <= q_len <= kv_len, got {seq_lengths!r}")
        for name, x in (("columns", columns), ("diagonals", diagonals)):
            if not is_torch(x) or x.ndim != 3 or x.dtype not in (torch.int32, torch.int64) or x.shape[-1] < 1:
                raise ShapeError(f"{name} must be an int tensor (B, H, n >= 1), got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if tuple(columns.shape[:2]) != tuple(diagonals.shape[:2]) or columns.device != diagonals.device:
            raise ShapeError(f"columns and diagonals must share (B, H) and device, got {tuple(columns.shape[:2])} "
                             f"and {tuple(diagonals.shape[:2])}")
        self.block_size, self.seq_lengths = TILE, (nq, nk)
        self._off = nk - nq
        dev = columns.device
        b, h = columns.shape[:2]
        # Columns sorted, duplicates and ids out of range turned into `nk` (never visible), padded
        # to whole tiles with it. (`_distinct_sorted`: vertical_slash's top-k gives ascending,
        # distinct, in-range ids already; the two sorts cost more host time than its kernels.)
        pad = (-columns.shape[-1]) % TILE
        if _distinct_sorted:
            self.columns = torch.nn.functional.pad(columns.long(), (0, pad), value=nk)
        else:
            cols = torch.where((columns >= 0) & (columns < nk), columns.long(), nk)
            cols = torch.cat([cols, torch.full((b, h, pad), nk, device=dev)], -1).sort(-1).values
            dup = torch.cat([torch.zeros_like(cols[..., :1], dtype=torch.bool), cols[..., 1:] == cols[..., :-1]], -1)
            self.columns = torch.where(dup, nk, cols).sort(-1).values
        # Diagonal d crosses, in query block i, key tiles i + floor((off - d) / 128) and
        # i + floor((off - d + 127) / 128): the relative tiles r, stored at r - r_min (one
        # spare slot at the end for the dropped ones).
        diag = torch.where((diagonals >= 0) & (diagonals < nk), diagonals.long(), nk)
        diag = torch.cat([diag, torch.zeros((b, h, 1), dtype=torch.long, device=dev)], -1)
        self._r_min = (self._off - nk + 1) // TILE
        rel = torch.zeros((b, h, (self._off + TILE - 1) // TILE - self._r_min + 2), dtype=torch.bool, device=dev)
        for shift in (0, TILE - 1):
            r = torch.div(self._off - diag + shift, TILE, rounding_mode="floor") - self._r_min
            rel.scatter_(-1, torch.where(diag < nk, r, rel.shape[-1] - 1), True)
        rel[..., -1] = False
        self._rel = rel
        self.mask_mod = _VerticalSlashMod(self)
        self._lists = self._tiles = self._col_bits = self._view_cache = None

    shape = property(lambda self: tuple(self.columns.shape[:2]) + self.seq_lengths)
    device = property(lambda self: self.columns.device)

    def _views(self):
        """(listed tiles (B, H, QT, KT), is-column (B, H, kv_len), full tiles), built once."""
        if self._view_cache is None:
            nq, nk = self.seq_lengths
            b, h, nrel = self._rel.shape
            qt, kt = math.ceil(nq / TILE), math.ceil(nk / TILE)
            d_min, d_max, _ = _grid(nq, nk, TILE, self.device)
            i = torch.arange(qt, device=self.device)[:, None]
            j = torch.arange(kt, device=self.device)[None, :]
            at = (j - i - self._r_min).clamp(0, nrel - 1).expand(b, h, qt, kt)
            tiles = torch.gather(self._rel[:, :, None, :].expand(b, h, qt, nrel), -1, at) & (d_max >= 0)
            is_col = torch.zeros((b, h, nk + 1), dtype=torch.bool, device=self.device)
            is_col = is_col.scatter_(-1, self.columns, True)[..., :nk]
            self._view_cache = (tiles, is_col, tiles & (d_min >= 0))
        return self._view_cache

    def _flex_lists(self):
        if self._lists is None:
            tiles, _, full = self._views()
            kt = tiles.shape[-1]
            _, d_max, _ = _grid(*self.seq_lengths, TILE, self.device)
            col_tiles = torch.zeros(tiles.shape[:2] + (kt + 1,), dtype=torch.bool, device=self.device).scatter_(
                -1, torch.div(self.columns, TILE, rounding_mode="floor").clamp(max=kt), True)[..., :kt]
            blocks = tiles | (col_tiles[:, :, None, :] & (d_max >= 0))
            self._lists = _to_lists(blocks & ~full) + _to_lists(full)
        return self._lists

    # tiles(): the diagonals' tiles, then the column tiles each query block needs as entries
    # -1 - t whose bitmap entries -2 - r name a 128-bit row of ``column_bits`` (the columns
    # this block takes from tile t).

    def _build_tiles(self):
        gpu = (_SELECT_KERNEL and self.device.type == "cuda" and math.ceil(self.seq_lengths[1] / TILE) <= _SELECT_MAX_TILES
               and self.columns.shape[-1] // TILE <= _VS_MAX_COLUMN_TILES)
        tiles, self._col_bits = self._gpu_tiles() if gpu else self._torch_tiles()
        return tiles

    def _move_tiles(self, device):
        super()._move_tiles(device)
        self._col_bits = self._col_bits.to(device)

    def column_bits(self, device=None):
        """int32 ``(rows, 4)``: the column bit rows the lists' negative entries name."""
        self.tiles(device)
        return self._col_bits

    def _bitmaps(self):
        """The two causal bitmaps of a diagonal cut: key tile j = i + off // 128 + t of query
        block i, row r sees key c iff 128 t + c <= r + off % 128. Built once per (off % 128,
        device)."""
        key = (self._off % TILE, self.device)
        if key not in _VS_CUT_BITS:
            r = torch.arange(TILE, device=self.device)[:, None] + self._off % TILE
            c = torch.arange(TILE, device=self.device)[None, :]
            _VS_CUT_BITS[key] = _pack_bits(torch.stack([c <= r, TILE + c <= r]))
        return _VS_CUT_BITS[key]

    def _gpu_tiles(self):
        nq, nk = self.seq_lengths
        b, h, nrel = self._rel.shape
        qt, kt, ct = math.ceil(nq / TILE), math.ceil(nk / TILE), self.columns.shape[-1] // TILE
        dev = self.device
        count = torch.empty((b, h, qt), dtype=torch.int32, device=dev)
        index = torch.empty((b, h, qt, kt + ct), dtype=torch.int32, device=dev)
        bitmap = torch.empty_like(index)
        col_bits = torch.empty((b * h * qt * ct, TILE // 32), dtype=torch.int32, device=dev)
        _native.sparse_vs_lists(self._rel.view(b * h, nrel).to(torch.uint8), self.columns.view(b * h, -1).to(torch.int32),
                                count.view(b * h, qt), index.view(b * h, qt, -1), bitmap.view(b * h, qt, -1), col_bits,
                                key_tiles=kt, r_min=self._r_min, off=self._off, stream=stream_of(self.columns))
        return (count, index, bitmap, self._bitmaps()), col_bits

    def _torch_tiles(self):
        """The lists of _gpu_tiles (kernels/sparse.cu: sparse_vs_lists) in torch."""
        nq, nk = self.seq_lengths
        off, dev = self._off, self.device
        tiles, _, full = self._views()
        b, h, qt, kt = tiles.shape
        j = torch.arange(kt, device=dev)
        kind = (j[None, :] - torch.arange(qt, device=dev)[:, None] - off // TILE).to(torch.int32)
        count, index = _to_lists(tiles)
        bitmap = torch.gather(torch.where(full, -1, kind).expand(b, h, qt, kt), -1, index.long())
        cols = self.columns
        ct = cols.shape[-1] // TILE
        first = (torch.arange(qt, device=dev) * TILE + off)[:, None]                    # (qt, 1)
        kt_of = torch.div(cols, TILE, rounding_mode="floor").clamp(max=kt - 1)
        listed = torch.gather(tiles, -1, kt_of[:, :, None, :].expand(b, h, qt, cols.shape[-1]))
        take = (cols[:, :, None, :] < first) & ~listed                                  # (b, h, qt, V)
        n_ct = (cols[:, :, None, ::TILE] < first).sum(-1).to(torch.int32)              # (b, h, qt)
        t = torch.arange(kt + ct, device=dev) - count[..., None].long()
        is_col = (t >= 0) & (t < n_ct[..., None])
        row0 = (torch.arange(b * h * qt, device=dev) * ct).view(b, h, qt, 1)
        pad = (0, ct)
        index = torch.where(is_col, -1 - t, torch.nn.functional.pad(index, pad))
        bitmap = torch.where(is_col, -2 - (row0 + t), torch.nn.functional.pad(bitmap, pad, value=-1))
        tiles = (count + n_ct, index.to(torch.int32).contiguous(), bitmap.to(torch.int32).contiguous(), self._bitmaps())
        return tiles, _pack_bits(take).reshape(-1, TILE // 32).contiguous()

    def gather_columns(self, k, v, heads_q: int):
        """The columns' keys and values per query head, ``(batch, V, heads_q, D)``, for the
        kernel (a mask shared over batch or heads is expanded)."""
        b, hk = k.shape[0], k.shape[2]
        cols = self.columns.clamp(max=self.seq_lengths[1] - 1).expand(b, heads_q, -1)
        bi = torch.arange(b, device=k.device).view(b, 1, 1)
        hi = (torch.arange(heads_q, device=k.device) // (heads_q // hk)).view(1, heads_q, 1)
        return k[bi, cols, hi].transpose(1, 2).contiguous(), v[bi, cols, hi].transpose(1, 2).contiguous()


def _diagonal_sums(a):
    """(..., L, N) -> (..., N): entry d sums a[r, c] over the cells with (N - L + r) - c = d
    (row r at position N - L + r, bottom-right). Each row shifted left by its index through a
    strided view of a left-padded copy, so diagonals become columns (no index tensor)."""
    L, n = a.shape[-2:]
    lead = a.shape[:-2]
    w = n + L - 1
    padded = torch.nn.functional.pad(a, (L - 1, 0)).reshape(-1, L * w)
    # Row r of the view starts at r * (w + 1): column x holds a[r, x + r - L + 1].
    shifted = padded.as_strided((padded.shape[0], L, n), (L * w, w + 1, 1))
    # Column x is the diagonal d = N - 1 - x.
    return shifted.sum(1).flip(-1).view(lead + (n,))


def vertical_slash_scores(q, k, *, last_q: int = 64, scale: Optional[float] = None):
    """The scores ``vertical_slash`` ranks by, float32 ``(batch, heads_q, kv_len)`` each: the
    last ``last_q`` queries' causal softmax attention (bottom-right) summed per key column, and
    per diagonal (entry d sums the cells with position - key = d). On CUDA (16-bit, head_dim 64 /
    128 / 256, last_q <= 256) the window's LSE (kv._window_lse), then the window_scores kernel
    with diagonal sums, once per q head of a kv head: the (heads, last_q, kv_len) probabilities
    never exist. Elsewhere torch, in chunks of kv heads (scores in the inputs' precision, as
    MInference; softmax in float32)."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    L, g = min(last_q, nq), hq // hk
    from .kv import _SCORE_HEAD_DIMS, _window_lse
    if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and d in _SCORE_HEAD_DIMS
            and L <= _DIAG_MAX_W and L <= nk):
        ql = q[:, nq - L:]
        lse = _window_lse(ql, k, scale)
        vert = torch.empty(g, b, hk, nk, dtype=torch.float32, device=q.device)
        slash = torch.zeros(g, b, hk, nk, dtype=torch.float32, device=q.device)
        for gi in range(g):  # q heads gi, g + gi, ...: one of each kv head's group
            _native.window_scores(ql[:, :, gi::g], k, lse[:, gi::g].contiguous(), vert[gi], diag=slash[gi], scale=scale,
                                  stream=stream_of(q))
        return tuple(x.permute(1, 2, 0, 3).reshape(b, hq, nk) for x in (vert, slash))
    vert, slash = [], []
    # kv heads in chunks: a chunk's (g L, nk) float32 scores stay within _CHUNK elements.
    step = max(1, _CHUNK // max(1, b * g * L * nk))
    for h0 in range(0, hk, step):
        h1 = min(hk, h0 + step)
        # Scores in the inputs' precision (as MInference), softmax in float32.
        qh = q[:, nq - L:, h0 * g:h1 * g].reshape(b, L, h1 - h0, g, d)
        s = torch.einsum("bqhgd,bkhd->bhgqk", qh, k[:, :, h0:h1]).float()
        s[..., nk - L:].masked_fill_(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        a = torch.softmax(s.mul_(scale), -1).view(b, (h1 - h0) * g, L, nk)
        vert.append(a.sum(2))
        slash.append(_diagonal_sums(a))
    return torch.cat(vert, 1), torch.cat(slash, 1)


def vertical_slash(q, k, *, vertical_size: int = 1000, slash_size: int = 6096, last_q: int = 64,
                   sink: int = 30, local: int = 100, scale: Optional[float] = None) -> VerticalSlashMask:
    """MInference's online estimate: the last ``last_q`` queries' causal attention over all
    keys, per head; the ``vertical_size`` key columns with the most attention (the first
    ``sink`` always) and the ``slash_size`` diagonals with the most (the ``local`` nearest
    always) form a ``VerticalSlashMask`` (MInference's defaults). q ``(batch, q_len, heads_q,
    D)``, k ``(batch, kv_len, heads_kv, D)``, GQA allowed. No host sync."""
    expect_rank(q, 4, "q", LAYOUT)
    expect_rank(k, 4, "k", LAYOUT)
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    if hk == 0 or hq % hk:
        raise ShapeError(f"q has {hq} heads, which must be a multiple of k's {hk} heads (GQA/MQA)")
    for name, val in (("vertical_size", vertical_size), ("slash_size", slash_size), ("last_q", last_q)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    vert, slash = vertical_slash_scores(q, k, last_q=last_q, scale=scale)  # (b, hq, nk) each
    vert[..., :sink] = float("inf")
    slash[..., :local] = float("inf")
    # The best positions per row in ascending order (one radix-select launch each on CUDA,
    # kernels/kv_select.cu; torch's topk of 6096 of 32K cost more than the scores).
    from .kv import _top
    columns = _top(vert, min(vertical_size, nk))
    diagonals = _top(slash, min(slash_size, nk))
    return VerticalSlashMask(columns, diagonals, seq_lengths=(nq, nk), _distinct_sorted=True)


# --- transformers: sparse prefill ---------------------------------------------------------------

# The patterns a ``prefill`` block takes by name: each builds a mask for a layer's q, k
# ``(b, n, heads, D)`` with the block's keyword arguments.
_PREFILL_PATTERNS = {
    "vertical_slash": (vertical_slash, lambda q, k, kw: vertical_slash(q, k, **kw)),
    "estimate": (estimate_blocks, lambda q, k, kw: estimate_blocks(q, k, **kw)),
    "streaming": (streaming, lambda q, k, kw: streaming(q.shape[1], k.shape[1], device=q.device, **kw)),
    "sliding_window": (sliding_window, lambda q, k, kw: sliding_window(q.shape[1], k.shape[1], device=q.device, **kw)),
    "a_shape": (a_shape, lambda q, k, kw: a_shape(q.shape[1], k.shape[1], device=q.device, **kw)),
    "strided": (strided, lambda q, k, kw: strided(q.shape[1], k.shape[1], q.shape[2], device=q.device, **kw)),
    "power": (power, lambda q, k, kw: power(q.shape[1], k.shape[1], device=q.device, **kw)),
}


@contextlib.contextmanager
def prefill(model, pattern="vertical_slash", *, min_len: int = 1024, **kwargs):
    """``with ferrokernels.sparse.prefill(model, "vertical_slash"): model.generate(...)``: every
    fresh prefill of at least ``min_len`` tokens in the block runs ``sparse_attention`` under a
    mask built per layer from its q and k (MInference's use; decode steps stay dense). The model
    must be on the ferrokernels attention backend (``ferrokernels.patch(model)``); with its paged
    cache, ``hf.CompressedCache`` / ``QuantizedKVCache`` or none. ``pattern``: a name of
    ``_PREFILL_PATTERNS`` ("vertical_slash", "estimate", "streaming", "sliding_window",
    "a_shape", "strided", "power"; ``kwargs`` go to that builder, the lengths, heads and device
    come from the layer) or a callable ``(q, k, layer_idx) -> BlockMask | VerticalSlashMask``.
    Prefills with padding, a sliding window or a softcap run dense (the patterns are defined on
    unpadded causal attention). The setting is process-wide while the block runs."""
    from . import hf

    if getattr(getattr(model, "config", None), "_attn_implementation", None) != hf.NAME:
        raise ValueError("sparse.prefill needs the model on the ferrokernels attention backend: call "
                         "ferrokernels.patch(model) first")
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 1:
        raise ValueError(f"min_len must be an int >= 1, got {min_len!r}")
    if callable(pattern):
        if kwargs:
            raise TypeError(f"a callable pattern takes no keyword arguments here, got {sorted(kwargs)}")
        build = pattern
    elif pattern in _PREFILL_PATTERNS:
        fn, make = _PREFILL_PATTERNS[pattern]
        inspect.signature(fn).bind_partial(**kwargs)  # an unknown keyword fails here, not mid-model
        build = lambda q, k, layer: make(q, k, kwargs)  # noqa: E731
    else:
        raise ValueError(f"pattern must be one of {sorted(_PREFILL_PATTERNS)} or a callable (q, k, layer_idx) -> "
                         f"mask, got {pattern!r}")
    saved = hf._SPARSE_PREFILL
    hf._SPARSE_PREFILL = (build, min_len)
    try:
        yield
    finally:
        hf._SPARSE_PREFILL = saved


# --- sparse decode -----------------------------------------------------------------------------
# Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
# Inference"): each page of the paged KV cache is summarised by the channel-wise min and max of
# its keys; q . k over a page is at most sum_d max(q_d min_d, q_d max_d), and the pages with the
# highest bound are the ones attended. The selection gives every kv head its own pages, which
# decode_attention reads through a (batch, heads_kv, max_pages) block table.

def page_summaries(k_cache, pages=None, out=None):
    """Channel-wise (min, max) of each page's keys per kv head, ``(num_pages, heads_kv,
    head_dim)`` each in the cache's dtype (a min or max of its values is exact there, at half
    float32's bytes for 16-bit caches), from a paged cache ``(num_pages, page_size, heads_kv,
    head_dim)``. With
    ``pages`` (int tensor of page ids) and ``out`` (the two tensors) only those pages are
    recomputed, in place: call it after append_kv with the pages the new tokens went to. A
    page's unused slots count too (the page holding a sequence's last tokens is always
    attended, so its bound does not matter)."""
    expect_rank(k_cache, 4, "k_cache", "(num_pages, page_size, heads_kv, head_dim)")
    if pages is None:
        return k_cache.amin(1), k_cache.amax(1)
    if out is None:
        raise ValueError("pass out=(page_min, page_max) to update some pages in place")
    sel = k_cache[pages.long()]
    out[0][pages.long()] = sel.amin(1).to(out[0].dtype)
    out[1][pages.long()] = sel.amax(1).to(out[1].dtype)
    return out


def select_pages(q, summaries, cache_seqlens, block_table, page_size: int, budget: int):
    """Per (batch, kv head) the pages of highest Quest bound, at most ``budget`` tokens per head:
    the pages holding the q_len new tokens always, then the best of the rest (the bound summed
    over the head's query heads and new tokens). Returns the per-head block table int32
    ``(batch, heads_kv, pages)`` (pages in their sequence order, so positions keep their order)
    and the int32 lengths of the selected sequences, for ``decode_attention``. Sequences within
    the budget keep every page. No host sync."""
    page_min, page_max = summaries
    b, q_len, hq, d = q.shape
    hk = page_min.shape[1]
    if hq % hk:
        raise ShapeError(f"q has {hq} heads, which must be a multiple of the cache's {hk} heads")
    if budget < page_size:
        raise ValueError(f"budget must be at least one page ({page_size} tokens), got {budget}")
    mp = block_table.shape[-1]
    keep = min(mp, budget // page_size)
    bounds, new_lens = _page_bounds(q, summaries, cache_seqlens, block_table, page_size, keep)
    if _SELECT_KERNEL and bounds.is_cuda and block_table.dtype == torch.int32:
        # The radix top-k kernel writes the chosen pages' table entries, in sequence order.
        table = torch.empty(b, hk, keep, dtype=torch.int32, device=q.device)
        _native.kv_select_topk(bounds.view(b * hk, mp), table.view(b * hk, keep), lookup=block_table,
                               stream=stream_of(q))
        return table, new_lens
    chosen = bounds.topk(keep, -1).indices.sort(-1).values            # (b, hk, keep)
    return torch.gather(block_table[:, None].expand(b, hk, mp), -1, chosen).to(torch.int32), new_lens


def _page_bounds(q, summaries, cache_seqlens, block_table, page_size, keep):
    """Quest's bound of every table page per (sequence, kv head), float32 (b, heads_kv,
    max_pages): +inf for the pages holding the q_len new tokens, -inf past the sequence; and
    the selected sequences' int32 lengths (``keep`` pages, the last one the sequence's own).
    One kernel on CUDA (kernels/sparse.cu), else torch."""
    page_min, page_max = summaries
    b, q_len, hq, d = q.shape
    hk, mp = page_min.shape[1], block_table.shape[-1]
    if (_SELECT_KERNEL and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 4 == 0 and d <= 256
            and page_min.dtype == q.dtype and page_min.stride() == page_max.stride()):
        bounds = torch.empty(b, hk, mp, dtype=torch.float32, device=q.device)
        new_lens = torch.empty(b, dtype=torch.int32, device=q.device)
        _native.sparse_page_bounds(q, page_min, page_max, block_table, cache_seqlens, bounds, new_lens,
                                   page_size=page_size, keep=keep, stream=stream_of(q))
        return bounds, new_lens
    lens = cache_seqlens.long()
    n_pages = (lens + page_size - 1) // page_size                       # (b,)
    first_new = (lens - q_len).clamp(min=0) // page_size                # pages from here hold new tokens
    qg = q.float().view(b, q_len, hk, hq // hk, d).permute(0, 2, 1, 3, 4).reshape(b, hk, -1, d)
    # sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min; summed over the group's rows it
    # needs only the rows' sums of q+ and q-. Bounds of every pool page (one read of the
    # summaries, no gathered copies), then the table's pages picked out.
    pos, neg = qg.clamp(min=0).sum(2), qg.clamp(max=0).sum(2)          # (b, hk, d)
    every = (torch.einsum("bhd,phd->bhp", pos, page_max.float()) + torch.einsum("bhd,phd->bhp", neg, page_min.float()))
    bound = torch.gather(every, -1, block_table.long().clamp(min=0)[:, None].expand(b, hk, mp))
    page = torch.arange(mp, device=q.device)
    bound = bound.masked_fill((page >= n_pages[:, None])[:, None], float("-inf"))
    bound = bound.masked_fill(((page >= first_new[:, None]) & (page < n_pages[:, None]))[:, None], float("inf"))
    last = lens - (n_pages - 1) * page_size
    new_lens = torch.where(n_pages > keep, (keep - 1) * page_size + last, lens).to(torch.int32)
    return bound, new_lens


def sparse_decode(q, k_cache, v_cache, cache_seqlens, block_table, *, budget: int, summaries=None, **kwargs):
    """decode_attention over the ``budget`` most relevant tokens per kv head (Quest page
    selection, ``select_pages``). ``summaries`` = ``page_summaries(k_cache)``, kept up to date
    by the caller (recomputed here when omitted: a full read of the cache). Other keyword
    arguments go to ``decode_attention`` (scale, softcap, return_lse, ...)."""
    from .decode import decode_attention
    if summaries is None:
        summaries = page_summaries(k_cache)
    table, lens = select_pages(q, summaries, cache_seqlens, block_table, int(k_cache.shape[1]), budget)
    return decode_attention(q, k_cache, v_cache, lens, block_table=table, **kwargs)
