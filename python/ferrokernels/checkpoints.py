"""Loaders from real quantized-checkpoint tensors into the canonical ``QuantizedWeight``
(python/ferrokernels/gemm.py). Each takes the tensors exactly as the tool wrote them:

* GPTQ (AutoGPTQ / GPTQModel, 4-bit): ``qweight`` int32 (K/8, N) packed along K, ``qzeros``
  int32 (G, N/8) packed along N, ``scales`` (G, N), optional ``g_idx`` (K,) (act-order); format
  v1 stores zero points minus one, v2 stores them as they are.
* AWQ GEMM (AutoAWQ ``WQLinear_GEMM``): ``qweight`` int32 (K, N/8) and ``qzeros`` int32
  (G, N/8) packed along N in the order [0, 2, 4, 6, 1, 3, 5, 7], ``scales`` (G, N).
* compressed-tensors ``pack-quantized`` W4A16: ``weight_packed`` int32 (N, K/8) of signed int4
  offset by 8, ``weight_scale`` (N, G), optional ``weight_zero_point``.
* GGUF Q4_0 / Q4_1 / Q8_0: blocks of 32 weights along K with an f16 scale (and an f16 minimum
  for Q4_1), from raw block bytes or straight from a ``.gguf`` file.
"""

from __future__ import annotations

from ._runtime import torch
from .gemm import QuantizedWeight, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of an AWQ int32 holds column AWQ_ORDER[i]
GGUF_BLOCK = 32


def _nibbles_along(packed: "torch.Tensor", dim: int) -> "torch.Tensor":
    """int32 words of eight 4-bit fields (field i at bits 4i) -> uint8 codes, the eight fields
    of each word consecutive along `dim`."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed 4-bit tensors must be int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & 0xF  # (..., 8) along a new last axis
    fields = fields.to(torch.uint8)
    if dim in (-1, packed.dim() - 1):
        return fields.flatten(-2)
    moved = fields.movedim(-1, dim + 1)  # (.., words, 8, ..) along dim
    return moved.flatten(dim, dim + 1)


def _expect(t, name, shape, dtypes):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _groups_from_g_idx(g_idx, k, groups):
    """The permutation that makes act-order groups contiguous (None if they already are)."""
    g_idx = g_idx.to(torch.int64)
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"g_idx entries must be in [0, {groups})")
    counts = torch.bincount(g_idx, minlength=groups)
    if not bool((counts == k // groups).all()):
        raise ValueError(f"every group of g_idx must hold {k // groups} input channels")
    trivial = torch.arange(k, device=g_idx.device) // (k // groups)
    if torch.equal(g_idx, trivial):
        return None
    return torch.argsort(g_idx, stable=True)


def from_gptq(qweight, qzeros, scales, g_idx=None, *, bits: int = 4, version: int = 1) -> QuantizedWeight:
    if bits != 4:
        raise NotImplementedError(f"GPTQ with {bits}-bit weights is not supported (4-bit only)")
    if version not in (1, 2):
        raise ValueError(f"GPTQ checkpoint format version must be 1 or 2, got {version}")
    groups, n = (int(x) for x in scales.shape)
    k = int(qweight.shape[0]) * 8
    if groups == 0 or k % groups:
        raise ValueError(f"scales has {groups} groups, which must divide in_features {k}")
    _expect(qweight, "qweight", (k // 8, n), (torch.int32,))
    _expect(qzeros, "qzeros", (groups, n // 8), (torch.int32,))
    _expect(scales, "scales", (groups, n), (torch.float16, torch.bfloat16, torch.float32))
    codes = _nibbles_along(qweight, 0).t()  # (N, K)
    zeros = _nibbles_along(qzeros, 1).to(torch.int16)  # (G, N)
    if version == 1:
        zeros = (zeros + 1) & 0xF  # v1 stores z - 1 (15 wraps back to 0 as the tools do)
    perm = None if g_idx is None else _groups_from_g_idx(g_idx, k, groups)
    if perm is not None:
        codes = codes[:, perm]
    return QuantizedWeight(pack_int4(codes), scales.t().contiguous(), zeros.to(torch.uint8).t().contiguous(),
                           k // groups, 4, k, perm).check()


def from_awq(qweight, qzeros, scales) -> QuantizedWeight:
    groups, n = (int(x) for x in scales.shape)
    k = int(qweight.shape[0])
    if groups == 0 or k % groups:
        raise ValueError(f"scales has {groups} groups, which must divide in_features {k}")
    _expect(qweight, "qweight", (k, n // 8), (torch.int32,))
    _expect(qzeros, "qzeros", (groups, n // 8), (torch.int32,))
    _expect(scales, "scales", (groups, n), (torch.float16, torch.bfloat16, torch.float32))
    # Field i of word j holds column 8j + AWQ_ORDER[i].
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)], device=qweight.device)

    def columns(packed):
        f = _nibbles_along(packed, -1).view(*packed.shape, 8)
        return f[..., inverse].flatten(-2)

    codes = columns(qweight).t()  # (N, K)
    zeros = columns(qzeros).t()   # (N, G)
    return QuantizedWeight(pack_int4(codes), scales.t().contiguous(), zeros.contiguous(), k // groups, 4, k).check()


def from_compressed_tensors(weight_packed, weight_scale, weight_shape=None, weight_zero_point=None) -> QuantizedWeight:
    """``pack-quantized`` 4-bit weights (symmetric, or with int zero points (N, G))."""
    n, k8 = (int(x) for x in weight_packed.shape)
    k = k8 * 8
    if weight_shape is not None:
        shape = tuple(int(x) for x in (weight_shape.tolist() if hasattr(weight_shape, "tolist") else weight_shape))
        if shape != (n, k):
            raise ValueError(f"weight_shape {shape} does not match weight_packed's ({n}, {k}) (K not a multiple of 8?)")
    groups = int(weight_scale.shape[1]) if weight_scale.dim() == 2 else 1
    if groups == 0 or k % groups:
        raise ValueError(f"weight_scale has {groups} groups, which must divide in_features {k}")
    _expect(weight_packed, "weight_packed", (n, k // 8), (torch.int32,))
    _expect(weight_scale, "weight_scale", (n, groups), (torch.float16, torch.bfloat16, torch.float32))
    codes = _nibbles_along(weight_packed, 1)  # signed value + 8
    zeros = None
    if weight_zero_point is not None:
        _expect(weight_zero_point, "weight_zero_point", (n, groups), (torch.int8, torch.int32, torch.int64))
        zp = weight_zero_point.to(torch.int16) + 8
        if int(zp.min()) < 0 or int(zp.max()) > 15:
            raise ValueError("weight_zero_point must be in [-8, 7]")
        zeros = zp.to(torch.uint8)
    return QuantizedWeight(pack_int4(codes), weight_scale.contiguous(), zeros, k // groups, 4, k).check()


def from_compressed_tensors_fp8(weight, weight_scale, input_scale=None) -> QuantizedWeight:
    """``float-quantized`` FP8 W8A8: ``weight`` float8_e4m3fn (N, K), ``weight_scale`` float32
    per tensor (a scalar or (1,)) or per channel (N, 1); ``input_scale`` (one value) for static
    activation scaling, else activations are scaled per token at run time."""
    n, k = (int(x) for x in weight.shape)
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    ws = weight_scale.to(torch.float32)
    if ws.numel() == 1:
        ws = ws.reshape(1, 1).expand(n, 1)
    if tuple(ws.shape) not in ((n, 1), (n,)):
        raise ValueError(f"weight_scale must be per tensor or per channel ({n}, 1), got {tuple(weight_scale.shape)}")
    act_scale = None
    if input_scale is not None:
        if input_scale.numel() != 1:
            raise NotImplementedError("only a per-tensor static input_scale is supported")
        act_scale = input_scale.to(torch.float32).reshape(1)
    return QuantizedWeight(weight.contiguous(), ws.reshape(n, 1).contiguous(), None, k, 8, k, act="fp8",
                           act_scale=act_scale).check()


GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # ggml type ids
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def from_gguf(blocks, qtype: str, shape) -> QuantizedWeight:
    """Raw GGUF block bytes (uint8, any shape holding N * K/32 blocks) of a weight of logical
    ``shape`` (N, K) -- GGUF lists it innermost first, as (K, N)."""
    if qtype not in GGUF_BLOCK_BYTES:
        raise NotImplementedError(f"GGUF type {qtype} is not supported (Q4_0, Q4_1 and Q8_0 are)")
    n, k = (int(x) for x in shape)
    if k % GGUF_BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of the GGUF block size {GGUF_BLOCK}")
    raw = torch.as_tensor(blocks).reshape(-1)
    if raw.dtype != torch.uint8:
        raise TypeError(f"GGUF blocks must be raw uint8 bytes, got {raw.dtype}")
    nbytes = GGUF_BLOCK_BYTES[qtype]
    if raw.numel() != n * (k // GGUF_BLOCK) * nbytes:
        raise ValueError(f"{qtype} weight of shape ({n}, {k}) needs {n * (k // GGUF_BLOCK) * nbytes} bytes, "
                         f"got {raw.numel()}")
    b = raw.view(n, k // GGUF_BLOCK, nbytes)
    scale = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # (N, K/32)
    if qtype == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedWeight(q, scale, None, GGUF_BLOCK, 8, k).check()
    qs = b[..., 4:] if qtype == "Q4_1" else b[..., 2:]
    # Byte j of a block holds element j (low nibble) and element j + 16 (high nibble).
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)
    zeros = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if qtype == "Q4_1" else None
    return QuantizedWeight(pack_int4(codes), scale, zeros, GGUF_BLOCK, 4, k).check()


def read_gguf(path: str, names=None) -> dict:
    """{tensor name: QuantizedWeight (Q4_0/Q4_1/Q8_0) or torch.Tensor (other types)} from a
    ``.gguf`` file (needs the ``gguf`` package); ``names`` selects a subset."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - exercised without gguf installed
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from e
    reader = GGUFReader(path)
    out = {}
    by_id = {v: k for k, v in GGUF_TYPES.items()}
    for t in reader.tensors:
        if names is not None and t.name not in names:
            continue
        shape = [int(x) for x in t.shape][::-1]  # GGUF lists dims innermost first
        qtype = by_id.get(int(t.tensor_type))
        if qtype is not None and len(shape) == 2:
            out[t.name] = from_gguf(torch.from_numpy(t.data.copy()), qtype, shape)
        else:
            out[t.name] = torch.from_numpy(t.data.copy()).reshape(shape)
    return out
