"""Quantized KV cache with a fused decode kernel.

Formats (``format=``):

- ``"int8"``: symmetric int8 codes, one float32 scale per token and kv head (K and V alike).
- ``"fp8"``: e4m3 codes, one float32 scale per token and kv head (amax / 448); sm_89 or newer.
- ``"int4"`` / ``"int2"``: KIVI (Liu et al., 2024): asymmetric codes, keys quantized per
  channel over groups of ``group_size`` tokens, values per token over groups of ``group_size``
  channels, float16 scale and min per group; the most recent tokens stay in full precision in a
  ring of ``residual + group_size`` slots, and a group of keys is quantized once ``residual``
  newer tokens exist.

Storage is head-major and contiguous: codes ``(batch, heads_kv, capacity, head_dim * bits / 8)``
uint8, bit-packed (a chunk of 8 channels is ``8 * bits`` bits: even channels in the low half,
odd channels in the high half, channel ``2k + h`` at bit ``h * 4 * bits + k * bits``). The
decode kernel (``kernels/kv_quant.cu``) reads codes and scales and dequantizes each 64-key tile
in shared memory; on the CPU the cache is dequantized and the CPU decode runs.
"""

from __future__ import annotations

from typing import Optional

from . import _native
from ._runtime import ShapeError, empty, expect_rank, float32_of, stream_of, torch
from .decode import _decode_window
from .attention import _softcap

FORMATS = ("int8", "fp8", "int4", "int2")
BITS = {"int8": 8, "fp8": 8, "int4": 4, "int2": 2}
TILE = 64  # the capacity is a whole number of the kernel's 64-key tiles
FP8_MAX = 448.0


def _format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


# --- packing ----------------------------------------------------------------------------------

def pack_codes(codes, bits: int):
    """(..., D) uint8 codes below 2**bits -> (..., D * bits / 8) uint8 in the kernel's chunk
    layout (8-bit codes are returned as they are)."""
    if bits == 8:
        return codes
    *lead, d = codes.shape
    c = codes.reshape(*lead, d // 8, 4, 2).to(torch.int32)  # (chunk, k, h): channel 2k + h
    shift = torch.arange(4, device=codes.device, dtype=torch.int32) * bits
    half = (c << shift[:, None]).sum(-2)  # (chunk, h): the k's of one half OR-ed (disjoint bits)
    word = half[..., 0] | (half[..., 1] << (4 * bits))
    nbytes = bits  # 8 * bits bits per chunk
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], -1)
    return out.to(torch.uint8).reshape(*lead, d * bits // 8)


def unpack_codes(packed, bits: int, head_dim: int):
    """The inverse of ``pack_codes``."""
    if bits == 8:
        return packed
    *lead, _ = packed.shape
    b = packed.reshape(*lead, head_dim // 8, bits).to(torch.int32)
    word = sum(b[..., i] << (8 * i) for i in range(bits))
    mask = (1 << bits) - 1
    k = torch.arange(4, device=packed.device, dtype=torch.int32) * bits
    lo = (word[..., None] >> k) & mask
    hi = (word[..., None] >> (k + 4 * bits)) & mask
    return torch.stack([lo, hi], -1).reshape(*lead, head_dim).to(torch.uint8)


# --- quantizers (torch; the reference the kernel is tested against) ----------------------------

def quantize_tokens(x, format: str):
    """Per-token symmetric 8-bit codes of x (..., D): (codes uint8, scale float32 (...))."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    if format == "int8":
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        codes = torch.round(xf / scale[..., None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        codes = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale


def dequantize_tokens(codes, scale, format: str, dtype=torch.float32):
    if format == "int8":
        v = codes.view(torch.int8).float()
    else:
        v = codes.view(torch.float8_e4m3fn).float()
    return (v * scale[..., None]).to(dtype)


def _asym(x, bits: int, dim: int):
    """Asymmetric min/max codes of x along `dim`, with float16 scale and min (the stored values
    are the ones used to round, so dequantization is exact to them)."""
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    top = (1 << bits) - 1
    scale = ((hi - lo) / top).half()
    mn = lo.half()
    s = scale.float()
    codes = torch.round((xf - mn.float()) / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, top)
    return codes.to(torch.uint8), scale, mn


def quantize_keys_per_channel(k, bits: int, group: int):
    """k (..., n, D) with n a multiple of `group` -> codes (..., n, D) uint8 and meta
    (..., n / group, 2, D) float16 (scales, then mins)."""
    *lead, n, d = k.shape
    g = k.reshape(*lead, n // group, group, d)
    codes, scale, mn = _asym(g, bits, -2)
    meta = torch.cat([scale, mn], -2)  # (..., groups, 2, D)
    return codes.reshape(*lead, n, d), meta


def dequantize_keys_per_channel(codes, meta, group: int, dtype=torch.float32):
    *lead, n, d = codes.shape
    c = codes.reshape(*lead, n // group, group, d).float()
    out = c * meta[..., 0:1, :].float() + meta[..., 1:2, :].float()
    return out.reshape(*lead, n, d).to(dtype)


def quantize_values_per_token(v, bits: int, group: int):
    """v (..., D) -> codes (..., D) uint8 and meta (..., D / group, 2) float16 (scale, min)."""
    *lead, d = v.shape
    g = v.reshape(*lead, d // group, group)
    codes, scale, mn = _asym(g, bits, -1)
    return codes.reshape(*lead, d), torch.cat([scale, mn], -1)


def dequantize_values_per_token(codes, meta, group: int, dtype=torch.float32):
    *lead, d = codes.shape
    c = codes.reshape(*lead, d // group, group).float()
    out = c * meta[..., 0:1].float() + meta[..., 1:2].float()
    return out.reshape(*lead, d).to(dtype)


# --- the cache ----------------------------------------------------------------------------------

class QuantizedKV:
    """One layer's quantized KV for ``batch`` sequences of up to ``capacity`` tokens.

    ``append(k, v)`` adds tokens ``(batch, n, heads_kv, head_dim)`` (``counts`` per sequence:
    only the first ``counts[b]`` tokens of sequence b are real); ``decode(q)`` is
    ``decode_attention`` over everything appended so far. ``lengths`` / ``quant_lengths`` are
    host lists mirrored in the int32 device tensors ``seqlens`` / ``quant_lens``.
    """

    def __init__(self, batch: int, heads_kv: int, head_dim: int, capacity: int, *, format: str = "int8",
                 group_size: int = 32, residual: int = 128, dtype=None, device=None):
        self.format = _format(format)
        self.bits = BITS[format]
        if head_dim not in (64, 128, 256):
            raise ShapeError(f"head_dim is {head_dim}; the quantized cache supports 64, 128 and 256")
        self.grouped = format in ("int4", "int2")
        if self.grouped:
            if group_size not in (32, 64, 128) or head_dim % group_size:
                raise ValueError(f"group_size is {group_size}; int4 / int2 groups are 32, 64 or 128 and must "
                                 f"divide head_dim {head_dim}")
            if residual < 0:
                raise ValueError(f"residual must be >= 0, got {residual}")
        self.batch, self.heads_kv, self.head_dim = int(batch), int(heads_kv), int(head_dim)
        self.group, self.residual = int(group_size), int(residual)
        self.capacity = -(-int(capacity) // TILE) * TILE
        if self.grouped and self.capacity % self.group:
            self.capacity = -(-self.capacity // self.group) * self.group
        self.dtype = dtype or torch.bfloat16
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.device = dev
        b, h, cap, d = self.batch, self.heads_kv, self.capacity, self.head_dim
        u8 = dict(dtype=torch.uint8, device=dev)
        self.k_codes = torch.zeros(b, h, cap, d * self.bits // 8, **u8)
        self.v_codes = torch.zeros(b, h, cap, d * self.bits // 8, **u8)
        if self.grouped:
            self.k_meta = torch.zeros(b, h, cap // self.group, 2, d, dtype=torch.float16, device=dev)
            self.v_meta = torch.zeros(b, h, cap, d // self.group, 2, dtype=torch.float16, device=dev)
            self.res_cap = self.residual + self.group
            self.k_res = torch.zeros(b, h, self.res_cap, d, dtype=self.dtype, device=dev)
            self.v_res = torch.zeros(b, h, self.res_cap, d, dtype=self.dtype, device=dev)
        else:
            self.k_meta = torch.zeros(b, h, cap, dtype=torch.float32, device=dev)
            self.v_meta = torch.zeros(b, h, cap, dtype=torch.float32, device=dev)
            self.res_cap, self.k_res, self.v_res = 0, None, None
        self.lengths = [0] * b
        self.quant_lengths = [0] * b
        self.seqlens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.quant_lens = torch.zeros(b, dtype=torch.int32, device=dev)

    # bytes ------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the storage (codes, scales, ring)."""
        ts = [self.k_codes, self.v_codes, self.k_meta, self.v_meta, self.k_res, self.v_res]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # writing ----------------------------------------------------------------------------------
    def append(self, k, v, counts=None) -> None:
        """Appends ``k``, ``v`` (batch, n, heads_kv, head_dim); ``counts[b]`` of sequence b's n
        tokens are real (the first ones; default all)."""
        expect_rank(k, 4, "k", "(batch, n, heads_kv, head_dim)")
        want = (self.batch, k.shape[1], self.heads_kv, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ShapeError(f"k and v must have shape {want} (batch, n, heads_kv, head_dim), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        n = int(k.shape[1])
        counts = [n] * self.batch if counts is None else [int(c) for c in counts]
        if len(counts) != self.batch or any(c < 0 or c > n for c in counts):
            raise ValueError(f"counts must give 0..{n} tokens for each of the {self.batch} sequences, got {counts}")
        for b, c in enumerate(counts):
            if self.lengths[b] + c > self.capacity:
                raise ValueError(f"sequence {b} would hold {self.lengths[b] + c} tokens; the capacity is "
                                 f"{self.capacity}")
        k = k.to(self.device).transpose(1, 2)  # (batch, heads_kv, n, D)
        v = v.to(self.device).transpose(1, 2)
        # Sequences in the same state take one batched write.
        groups = {}
        for b, c in enumerate(counts):
            if c:
                groups.setdefault((self.lengths[b], self.quant_lengths[b], c), []).append(b)
        for (start, qstart, c), bs in groups.items():
            idx = torch.tensor(bs, device=self.device)
            if self.grouped:
                self._append_kivi(idx, k[idx, :, :c], v[idx, :, :c], start, qstart)
            else:
                self._append_tokens(idx, k[idx, :, :c], v[idx, :, :c], start)
            for b in bs:
                self.lengths[b] += c
                if not self.grouped:
                    self.quant_lengths[b] = self.lengths[b]
        self._sync_lengths()

    def _sync_lengths(self):
        self.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        self.quant_lens.copy_(torch.tensor(self.quant_lengths, dtype=torch.int32))

    def _append_tokens(self, idx, k, v, start):
        c = k.shape[2]
        for x, codes, meta in ((k, self.k_codes, self.k_meta), (v, self.v_codes, self.v_meta)):
            q, s = quantize_tokens(x, self.format)
            codes[idx, :, start:start + c] = q
            meta[idx, :, start:start + c] = s

    def _append_kivi(self, idx, k, v, start, qstart):
        """Tokens [qstart, start) are in the ring; after adding c more, whole groups are quantized
        while more than `residual` tokens would stay, the rest go (back) to the ring."""
        c = k.shape[2]
        total = start + c
        q_new = max(qstart, (total - self.residual) // self.group * self.group)
        slots_old = torch.arange(qstart, start, device=self.device) % self.res_cap
        k_all = torch.cat([self.k_res[idx][:, :, slots_old], k.to(self.dtype)], 2)  # positions qstart..total
        v_all = torch.cat([self.v_res[idx][:, :, slots_old], v.to(self.dtype)], 2)
        nq = q_new - qstart
        if nq:
            kc, km = quantize_keys_per_channel(k_all[:, :, :nq], self.bits, self.group)
            vc, vm = quantize_values_per_token(v_all[:, :, :nq], self.bits, self.group)
            self.k_codes[idx, :, qstart:q_new] = pack_codes(kc, self.bits)
            self.v_codes[idx, :, qstart:q_new] = pack_codes(vc, self.bits)
            self.k_meta[idx, :, qstart // self.group:q_new // self.group] = km
            self.v_meta[idx, :, qstart:q_new] = vm
        slots = torch.arange(q_new, total, device=self.device) % self.res_cap
        kr, vr = self.k_res[idx], self.v_res[idx]
        kr[:, :, slots] = k_all[:, :, nq:]
        vr[:, :, slots] = v_all[:, :, nq:]
        self.k_res[idx], self.v_res[idx] = kr, vr
        for b in idx.tolist():
            self.quant_lengths[b] = q_new

    # reading ----------------------------------------------------------------------------------
    def dequantize(self, b: int, as_kernel: bool = False):
        """Sequence b's keys and values (lengths[b], heads_kv, head_dim), float32. ``as_kernel``:
        rounded as the GPU kernel holds them: float16 values, except 8-bit keys, whose exact codes
        meet Q before their float32 scale multiplies the score (8-bit V: code times the scale
        rounded to float16, rounded)."""
        n, nq = self.lengths[b], self.quant_lengths[b]
        kc, vc = self.k_codes[b, :, :nq], self.v_codes[b, :, :nq]
        if self.grouped:
            k = dequantize_keys_per_channel(unpack_codes(kc, self.bits, self.head_dim),
                                            self.k_meta[b, :, :nq // self.group], self.group)
            v = dequantize_values_per_token(unpack_codes(vc, self.bits, self.head_dim), self.v_meta[b, :, :nq],
                                            self.group)
            slots = torch.arange(nq, n, device=self.device) % self.res_cap
            k = torch.cat([k, self.k_res[b][:, slots].float()], 1)
            v = torch.cat([v, self.v_res[b][:, slots].float()], 1)
            if as_kernel:
                k, v = k.half().float(), v.half().float()
        else:
            vs = self.v_meta[b, :, :nq]
            k = dequantize_tokens(kc, self.k_meta[b, :, :nq], self.format)
            v = dequantize_tokens(vc, vs.half().float() if as_kernel else vs, self.format)
            if as_kernel:
                v = v.half().float()
        return k.transpose(0, 1), v.transpose(0, 1)

    def dense(self, as_kernel: bool = False):
        """(k, v, seqlens): every sequence dequantized into float32 CPU tensors (batch, longest,
        heads_kv, head_dim) and their int32 lengths, the layout ``decode_attention`` takes."""
        n = max(max(self.lengths, default=0), 1)
        k = torch.zeros(self.batch, n, self.heads_kv, self.head_dim)
        v = torch.zeros_like(k)
        for i in range(self.batch):
            ki, vi = self.dequantize(i, as_kernel)
            k[i, :ki.shape[0]], v[i, :vi.shape[0]] = ki.float().cpu(), vi.float().cpu()
        return k, v, torch.tensor(self.lengths, dtype=torch.int32)

    def decode(self, q, *, causal_q: bool = True, scale: Optional[float] = None, softcap: Optional[float] = None,
               window=None, return_lse: bool = False, out=None, validate: bool = True):
        """``decode_attention(q, ...)`` over this cache: q (batch, q_len, heads_q, head_dim), whose
        q_len tokens are the last ones appended."""
        return quantized_decode(q, self, causal_q=causal_q, scale=scale, softcap=softcap, window=window,
                                return_lse=return_lse, out=out, validate=validate)


def quantized_decode(q, cache: QuantizedKV, *, causal_q: bool = True, scale: Optional[float] = None,
                     softcap: Optional[float] = None, window=None, return_lse: bool = False, out=None,
                     validate: bool = True):
    """Decode attention of ``q`` (batch, q_len, heads_q, head_dim) over a ``QuantizedKV``: the
    fused kernel on CUDA, dequantize + the CPU decode elsewhere. Arguments as
    ``decode_attention``."""
    expect_rank(q, 4, "q", "(batch, q_len, heads_q, head_dim)")
    if int(q.shape[0]) != cache.batch or int(q.shape[3]) != cache.head_dim or int(q.shape[2]) % cache.heads_kv:
        raise ShapeError(f"q {tuple(q.shape)} must have the cache's batch {cache.batch} and head_dim "
                         f"{cache.head_dim}, with heads_q a multiple of its {cache.heads_kv} kv heads")
    window = list(_decode_window(window))
    softcap = _softcap(softcap)
    if q.device.type != "cuda":
        return _decode_cpu(q, cache, causal_q, scale, softcap, window, return_lse, out)
    if q.device != cache.k_codes.device:
        raise ValueError(f"q is on {q.device}, the cache on {cache.k_codes.device}")
    if validate:
        _native.kv_quant_check_lengths(torch.tensor(cache.lengths, dtype=torch.int32),
                                       torch.tensor(cache.quant_lengths, dtype=torch.int32), cache.capacity,
                                       cache.res_cap)
    batch, q_len, heads_q, head_dim = (int(x) for x in q.shape)
    if out is None:
        out = empty(q, tuple(q.shape))
    lse = empty(q, (batch, heads_q, q_len), float32_of(q)) if return_lse else None
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    splits, floats = _native.kv_quant_plan(index, str(q.dtype).removeprefix("torch."), cache.format, batch, q_len,
                                           heads_q, cache.heads_kv, head_dim, cache.capacity)
    workspace = torch.empty(floats, dtype=torch.float32, device=q.device) if floats else None
    _native.kv_quant_decode_fwd(q, cache.k_codes, cache.v_codes, cache.k_meta, cache.v_meta, cache.seqlens,
                                cache.quant_lens, out, lse, k_res=cache.k_res, v_res=cache.v_res,
                                format=cache.format, group=cache.group, causal_q=causal_q,
                                scale=None if scale is None else float(scale), softcap=softcap,
                                window=tuple(window), workspace=workspace, splits=splits, stream=stream_of(q))
    return (out, lse) if return_lse else out


def _decode_cpu(q, cache, causal_q, scale, softcap, window, return_lse, out):
    """The CPU path: each sequence dequantized, then the CPU decode kernel in float32."""
    from .decode import decode_attention

    k, v, lens = cache.dense()
    res = decode_attention(q.float().cpu(), k, v, lens, causal_q=causal_q, scale=scale, softcap=softcap or None,
                           window=tuple(window), return_lse=return_lse)
    o, lse = res if return_lse else (res, None)
    o = o.to(q.dtype)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_lse else o
