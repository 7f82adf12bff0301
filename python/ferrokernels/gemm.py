"""Low-bit weights: the canonical quantized-weight layout every loader produces and every GEMM
kernel reads (after its own one-time repack), its dequantization, and round-to-nearest
quantization.

Canonical layout of a weight ``W`` (out_features N, in_features K), ``QuantizedWeight``:

* ``qweight`` -- 4-bit: uint8 ``(N, K/2)``, two codes per byte, even k in the low nibble;
  8-bit: int8 ``(N, K)``.
* ``scales`` -- ``(N, K/group_size)``, float16/bfloat16/float32 as the checkpoint stored them.
* ``zeros`` -- how codes become values, per group:
  ``None``: symmetric, ``w = (q - 8) * s`` for 4-bit codes in [0, 15], ``w = q * s`` for int8;
  uint8 ``(N, K/group_size)`` integer zero points: ``w = (q - z) * s`` (GPTQ, AWQ);
  floating ``(N, K/group_size)`` minimums: ``w = q * s + m`` (GGUF Q4_1).
* ``perm`` -- int64 ``(K,)`` or None: canonical column c holds input channel ``perm[c]``
  (GPTQ act-order, regrouped so each group is contiguous); activations are permuted to match.
* ``act`` -- None for weight-only formats; "int8" or "fp8" for W8A8: ``qweight`` is int8 or
  float8_e4m3fn (N, K) with per-channel ``scales`` (N, 1) (group_size K), and activations are
  quantized per token on the fly (``act_scale`` None: dynamic, ``s = max|x_m| / 127`` or ``/ 448``)
  or with one static float32 ``act_scale``, codes ``round(x * (1 / s))`` in float32; products
  accumulate exactly (int32) or in f32 (fp8).

Dequantization follows each format's own arithmetic, so it reproduces the tools' dequantized
weights bit for bit (tests/test_gemm_formats.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace  # noqa: F401  (replace is part of the API)
from typing import Optional

from . import _native
from ._runtime import stream_of, torch


@dataclass(frozen=True)
class QuantizedWeight:
    qweight: "torch.Tensor"
    scales: "torch.Tensor"
    zeros: Optional["torch.Tensor"]
    group_size: int
    bits: int
    in_features: int
    perm: Optional["torch.Tensor"] = None
    act: Optional[str] = None
    act_scale: Optional["torch.Tensor"] = None

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def groups(self) -> int:
        return int(self.scales.shape[1])

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, qweight=move(self.qweight), scales=move(self.scales), zeros=move(self.zeros),
                       perm=move(self.perm), act_scale=move(self.act_scale))

    def check(self) -> "QuantizedWeight":
        """Raises ValueError/TypeError naming the field when the tensors do not fit together."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if g <= 0 or k % g:
            raise ValueError(f"group_size {g} must divide in_features {k}")
        if self.act not in (None, "int8", "fp8"):
            raise ValueError(f"act must be None, 'int8' or 'fp8', got {self.act!r}")
        if self.act is not None and (self.bits != 8 or g != k or self.zeros is not None or self.perm is not None):
            raise ValueError("W8A8 weights are 8-bit, per output channel (group_size = in_features), symmetric")
        want_q = (n, k // 2) if self.bits == 4 else (n, k)
        want_dtype = torch.uint8 if self.bits == 4 else (torch.float8_e4m3fn if self.act == "fp8" else torch.int8)
        if tuple(self.qweight.shape) != want_q or self.qweight.dtype != want_dtype:
            raise ValueError(f"qweight must be {want_dtype} {want_q} for {self.bits}-bit codes, got "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}")
        if tuple(self.scales.shape) != (n, k // g):
            raise ValueError(f"scales must have shape {(n, k // g)}, got {tuple(self.scales.shape)}")
        if not self.scales.is_floating_point():
            raise TypeError(f"scales must be floating point, got {self.scales.dtype}")
        if self.zeros is not None and tuple(self.zeros.shape) != (n, k // g):
            raise ValueError(f"zeros must have shape {(n, k // g)}, got {tuple(self.zeros.shape)}")
        if self.zeros is not None and not (self.zeros.dtype == torch.uint8 or self.zeros.is_floating_point()):
            raise TypeError(f"zeros must be uint8 zero points or floating minimums, got {self.zeros.dtype}")
        if self.perm is not None and tuple(self.perm.shape) != (k,):
            raise ValueError(f"perm must have shape ({k},), got {tuple(self.perm.shape)}")
        return self


def permute_rows(qw: QuantizedWeight, idx: "torch.Tensor") -> QuantizedWeight:
    """The same weight with output features reordered: row r of the result is row idx[r]."""
    pick = lambda t: None if t is None else t[idx].contiguous()  # noqa: E731
    return replace(qw, qweight=pick(qw.qweight), scales=pick(qw.scales), zeros=pick(qw.zeros)).check()


def unpack_int4(packed: "torch.Tensor") -> "torch.Tensor":
    """uint8 (..., K/2) -> uint8 codes (..., K), even k from the low nibble."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_int4(codes: "torch.Tensor") -> "torch.Tensor":
    """uint8 codes in [0, 15] (..., K) -> uint8 (..., K/2), even k in the low nibble."""
    c = codes.to(torch.uint8)
    # contiguous: codes are often a transposed view (GPTQ / AWQ unpacking), the kernels read rows
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def dequantize(qw: QuantizedWeight, dtype=None) -> "torch.Tensor":
    """W (N, K) in input-channel order, computed in float32 with each format's arithmetic and
    rounded once to ``dtype`` (default: the scales' dtype)."""
    qw.check()
    n, k, g = qw.out_features, qw.in_features, qw.group_size
    q = unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight
    q = q.to(torch.float32).view(n, k // g, g)  # fp8 codes decode exactly
    s = qw.scales.to(torch.float32).unsqueeze(-1)
    if qw.zeros is None:
        w = (q - 8.0) * s if qw.bits == 4 else q * s
    elif qw.zeros.dtype == torch.uint8:
        w = (q - qw.zeros.to(torch.float32).unsqueeze(-1)) * s
    else:
        w = q * s + qw.zeros.to(torch.float32).unsqueeze(-1)
    w = w.view(n, k)
    if qw.perm is not None:
        out = torch.empty_like(w)
        out[:, qw.perm] = w
        w = out
    return w.to(dtype or qw.scales.dtype)


def _grouped(weight: "torch.Tensor", group_size: Optional[int]):
    """weight (N, K) as float32 (N, K/g, g) groups of input channels, with N, K and g
    (``group_size`` -1 or None: one group per output channel)."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    g = k if group_size in (-1, None) else int(group_size)
    if g <= 0 or k % g:
        raise ValueError(f"group_size {g} must divide in_features {k}")
    return w.view(n, k // g, g), n, k, g


def quantize(weight: "torch.Tensor", *, bits: int = 4, group_size: int = 128, sym: bool = True,
             scale_dtype=None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` (N, K) per group of ``group_size`` input
    channels (``group_size=-1``: per output channel). 4-bit: symmetric codes around 8, or
    asymmetric with integer zero points; 8-bit: symmetric int8."""
    wg, n, k, g = _grouped(weight, group_size)
    scale_dtype = scale_dtype or (weight.dtype if weight.is_floating_point() and weight.dtype != torch.float64
                                  else torch.float16)
    zeros = None
    if bits == 8:
        s = (wg.abs().amax(-1) / 127.0).clamp_min(1e-10).to(scale_dtype)
        q = torch.round(wg / s.to(torch.float32).unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(n, k)
        return QuantizedWeight(q, s, None, g, 8, k).check()
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if sym:
        # Codes 1..15 around 8 (+-7 steps); code 0 stays unused so +amax is exact.
        s = (wg.abs().amax(-1) / 7.0).clamp_min(1e-10).to(scale_dtype)
        q = torch.round(wg / s.to(torch.float32).unsqueeze(-1) + 8.0).clamp(0, 15)
    else:
        lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
        s = ((hi - lo) / 15.0).clamp_min(1e-10).to(scale_dtype)
        sf = s.to(torch.float32)
        zeros = torch.round(-lo / sf).clamp(0, 15).to(torch.uint8)
        q = torch.round(wg / sf.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, 15)
    return QuantizedWeight(pack_int4(q.view(n, k)), s, zeros, g, 4, k).check()


def quantize_hqq(weight: "torch.Tensor", *, group_size: int = 64, iters: int = 20, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, scale_dtype=None) -> QuantizedWeight:
    """4-bit asymmetric quantization with HQQ's calibration-free zero-point search
    (half-quadratic splitting: the error is shrunk under an l_p<1 norm, so outliers stop
    dragging the zero point, and the zero re-fitted to what remains), starting from min/max
    RTN. The fitted zero is fractional, so it is stored as a float minimum (w = q * s + m)."""
    wg, n, k, g = _grouped(weight, group_size)
    scale_dtype = scale_dtype or (weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / 15.0).clamp_min(1e-10).to(scale_dtype).to(torch.float32)
    z = -lo / s  # fractional zero point
    best, best_z = float("inf"), z
    for _ in range(iters):
        q = torch.round(wg / s + z).clamp(0, 15)
        err = wg - (q - z) * s
        current = err.abs().mean().item()
        if current >= best:
            break
        best, best_z = current, z
        # Shrink the error under the l_p norm, then refit the zero to the rest.
        e = torch.sign(err) * torch.relu(err.abs() - err.abs().clamp_min(1e-12).pow(lp_norm - 1) / beta)
        z = (q - (wg - e) / s).mean(-1, keepdim=True)
        beta *= kappa
    q = torch.round(wg / s + best_z).clamp(0, 15)
    mins = (-best_z * s).to(scale_dtype)
    return QuantizedWeight(pack_int4(q.view(n, k)), s.squeeze(-1).to(scale_dtype), mins.squeeze(-1), g, 4, k).check()


def quantize_w8a8(weight: "torch.Tensor", act: str = "int8") -> QuantizedWeight:
    """Per-output-channel symmetric int8 or float8_e4m3fn weights for W8A8 (activations are
    quantized per token at run time)."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    amax = w.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    if act == "int8":
        s = amax / 127.0
        q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
    elif act == "fp8":
        s = amax / 448.0
        q = (w / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    else:
        raise ValueError(f"act must be 'int8' or 'fp8', got {act!r}")
    return QuantizedWeight(q, s, None, k, 8, k, act=act).check()


def _quantize_activations(x2: "torch.Tensor", qw: QuantizedWeight) -> "torch.Tensor":
    """W8A8: x rounded through its per-token (or static) int8 / e4m3 codes, as float32."""
    qmax = 127.0 if qw.act == "int8" else 448.0
    xf = x2.float()
    if qw.act_scale is not None:
        s = qw.act_scale.reshape(1, 1)
    else:
        # Divided by a tensor, not a Python number: torch turns a scalar divisor into a
        # multiply by its reciprocal on CUDA, off by an ulp from the kernels' division.
        amax = xf.abs().amax(-1, keepdim=True)
        s = (amax / torch.full_like(amax, qmax)).clamp_min(1e-12)
    t = xf * (torch.ones_like(s) / s)  # by the reciprocal, as the kernels do
    q = torch.round(t).clamp(-127, 127) if qw.act == "int8" else t.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return q * s


def _linear_dequantized(x2: "torch.Tensor", qw: QuantizedWeight, bias) -> "torch.Tensor":
    """The GPU path where no kernel applies (shapes the kernels do not tile, W8A8 off Hopper):
    the weight dequantized by torch ops, then one matmul. W8A8 activations go
    through their codes first, and the product runs in float32 like the CPU path's."""
    w = dequantize(qw, torch.float32)
    xs = _quantize_activations(x2, qw) if qw.act is not None else x2
    out = xs @ (w.t() if xs.dtype == torch.float32 else w.t().to(xs.dtype))
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x2.dtype)


# --- the CUDA weight-only kernel's packed layout (kernels/gemm.cu) -----------------------------

_MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the layout kernels/gemm.cu reads: ``w`` uint8 (N/16, K/64, 32, 16 | 32), each
    lane's MMA fragments of a 16 x 64 tile contiguous; ``meta`` in the activation dtype, (G, N)
    scales (``zeros`` "sym") or (G, N, 2) {scale, magic + zero point} ("points") / {scale,
    minimum} ("mins"). W8A8 (kernels/gemm_w8a8.cu): ``w`` the (N, K) codes themselves, ``meta``
    their float32 channel scales (N,)."""
    w: "torch.Tensor"
    meta: "torch.Tensor"
    zeros: str
    bits: int
    group_size: int
    perm: Optional["torch.Tensor"]


def kernel_supports(qw: QuantizedWeight, dtype) -> Optional[str]:
    """None when a CUDA kernel (weight-only, or W8A8 on Hopper) takes this weight for
    activations of ``dtype``, else why not (the caller falls back to dequantize + matmul)."""
    n, k, g = qw.out_features, qw.in_features, qw.group_size
    if dtype not in _MAGIC:
        return f"activations are {dtype}; the kernel takes float16 or bfloat16"
    if n % 64 or k % 64:
        return f"N = {n} and K = {k} must be multiples of 64"
    if qw.act is not None:
        return None  # the W8A8 kernel (Hopper: see _kernel_runs_on)
    if not (g == 32 or g % 64 == 0):
        return f"group_size {g} must be 32 or a multiple of 64"
    if qw.bits == 8 and qw.zeros is not None:
        return "8-bit weights must be symmetric"
    return None


def pack(qw: QuantizedWeight, dtype) -> PackedWeight:
    """Repacks a canonical weight for the CUDA kernel with activations of ``dtype`` (float16 or
    bfloat16), on the weight's device. Done once per weight (``linear`` caches it)."""
    why = kernel_supports(qw.check(), dtype)
    if why is not None:
        raise NotImplementedError(f"the CUDA low-bit kernel does not take this weight: {why}")
    n, k = qw.out_features, qw.in_features
    if qw.act is not None:
        # The W8A8 kernel reads the codes as they are (through TMA) and float32 channel scales.
        return PackedWeight(qw.qweight.contiguous(), qw.scales.to(torch.float32).reshape(n).contiguous(), "sym", 8, k,
                            None)
    if qw.bits == 4:
        c = unpack_int4(qw.qweight)
        # row = nt*16 + rh*8 + g, k = kt*64 + i*16 + kh*8 + t*2 + e; lane = g*4 + t;
        # nibble rh + 2*kh + 4*e of the lane's word i.
        c = c.view(n // 16, 2, 8, k // 64, 4, 2, 4, 2).permute(0, 3, 2, 6, 4, 7, 5, 1)
        c = c.reshape(n // 16, k // 64, 32, 4, 4, 2)
        w = (c[..., 0] | (c[..., 1] << 4)).reshape(n // 16, k // 64, 32, 16)
    else:
        c = qw.qweight.view(torch.uint8) ^ 0x80  # codes + 128
        # byte kh*4 + rh*2 + e of the lane's 8 bytes for step i.
        c = c.view(n // 16, 2, 8, k // 64, 4, 2, 4, 2).permute(0, 3, 2, 6, 4, 5, 1, 7)
        w = c.reshape(n // 16, k // 64, 32, 32)
    scales = qw.scales.to(dtype).t()
    if qw.zeros is None:
        zeros, meta = "sym", scales
    elif qw.zeros.dtype == torch.uint8:
        zeros, meta = "points", torch.stack([scales, (qw.zeros.to(torch.float32) + _MAGIC[dtype]).to(dtype).t()], -1)
    else:
        zeros, meta = "mins", torch.stack([scales, qw.zeros.to(dtype).t()], -1)
    return PackedWeight(w.contiguous(), meta.contiguous(), zeros, qw.bits, qw.group_size, qw.perm)


def _packed_for(qw: QuantizedWeight, dtype) -> PackedWeight:
    """pack(qw, dtype), cached on the QuantizedWeight object and redone if its tensors were
    modified in place (``load_state_dict``)."""
    versions = tuple(None if t is None else t._version for t in (qw.qweight, qw.scales, qw.zeros))
    cache = qw.__dict__.setdefault("_packed", {})
    hit = cache.get(dtype)
    if hit is None or hit[0] != versions:
        hit = (versions, pack(qw, dtype))
        cache[dtype] = hit
    return hit[1]


_COUNTERS: dict = {}


def _counters(device, stream: int, size: int) -> "torch.Tensor":
    """The split-K tickets of one (device, stream): zeroed once, and left zeroed by every launch
    (the last CTA of a tile resets its ticket), so no memset runs per call."""
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def fused_max_m() -> int:
    """Above this many tokens the weight is dequantized once by a kernel and multiplied by a
    dense cuBLAS GEMM (tensor-core bound there), below it the fused kernel streams it once.
    FERROKERNELS_GEMM_FUSED_MAX_M overrides (for A/B timing)."""
    return int(os.environ.get("FERROKERNELS_GEMM_FUSED_MAX_M", "64"))


def dequantize_packed(pw: PackedWeight, out_features: int, in_features: int, dtype) -> "torch.Tensor":
    """W (N, K) in ``dtype`` from the packed layout, by the CUDA dequantization kernel (columns
    in the packed order: permuted by ``pw.perm`` where there is one)."""
    w = torch.empty(out_features, in_features, dtype=dtype, device=pw.w.device)
    _native.gemm_dequantize(pw.w, pw.meta, w, bits=pw.bits, group_size=pw.group_size, zeros=pw.zeros,
                            stream=stream_of(w))
    return w


def _kernel_runs_on(qw: QuantizedWeight, device) -> bool:
    """The weight-only kernel runs on sm_80 and later; the W8A8 one uses Hopper's wgmma."""
    cap = torch.cuda.get_device_capability(device)
    return cap[0] == 9 if qw.act is not None else cap >= (8, 0)


def _split_k_buffers(x2: "torch.Tensor", n: int, k: int, bits: int, act: Optional[str]):
    """The split-K workspace and tickets the kernel's plan for this problem needs (or None)."""
    splits, floats, tickets = _native.gemm_plan(x2.device.index, x2.shape[0], n, k, bits, act=act or "")
    if splits == 1:
        return None, None
    ws = torch.empty(floats, dtype=torch.float32, device=x2.device)
    return ws, _counters(x2.device, stream_of(x2), tickets)


def _linear_w8a8(x2: "torch.Tensor", qw: QuantizedWeight, bias) -> "torch.Tensor":
    """The Hopper W8A8 kernel: a pre-pass quantizes x per token into ``xq`` / ``xs``, then one
    GEMM over the codes of both operands."""
    pw = _packed_for(qw, x2.dtype)
    m, n, k = x2.shape[0], qw.out_features, qw.in_features
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    xq = torch.empty(m, k, dtype=torch.uint8, device=x2.device)
    xs = torch.empty(m, dtype=torch.float32, device=x2.device)
    ws, counters = _split_k_buffers(x2, n, k, 8, qw.act)
    act_scale = None if qw.act_scale is None else qw.act_scale.to(device=x2.device, dtype=torch.float32)
    _native.gemm_w8a8_fwd(x2, pw.w, pw.meta, out, xq=xq, x_scale=xs, bias=bias, act_scale=act_scale, workspace=ws,
                          counters=counters, act=qw.act, stream=stream_of(x2))
    return out


def _linear_cuda(x2: "torch.Tensor", qw: QuantizedWeight, bias) -> "torch.Tensor":
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(x2.dtype).contiguous()
    if qw.act is not None:
        return _linear_w8a8(x2, qw, bias)
    pw = _packed_for(qw, x2.dtype)
    if pw.perm is not None:
        x2 = x2.index_select(1, pw.perm)
    m, n, k = x2.shape[0], qw.out_features, qw.in_features
    if m > fused_max_m():
        w = dequantize_packed(pw, n, k, x2.dtype)
        return x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    ws, counters = _split_k_buffers(x2, n, k, qw.bits, None)
    _native.gemm_packed_fwd(x2, pw.w, pw.meta, out, bias=bias, workspace=ws, counters=counters, bits=pw.bits,
                            group_size=pw.group_size, zeros=pw.zeros, stream=stream_of(x2))
    return out


def linear(x: "torch.Tensor", qw: QuantizedWeight, bias: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """``x @ W^T (+ bias)`` for x (..., K) float16/bfloat16 (CPU also float32) and W quantized;
    output in x's dtype. CPU: rayon, f32 accumulation (dequantize a block of rows, multiply).
    CUDA: weight-only formats run the fused low-bit kernel (the weight repacked once and cached
    on ``qw``), W8A8 formats the Hopper W8A8 kernel; shapes they do not tile
    (``kernel_supports``) and W8A8 off Hopper dequantize and matmul."""
    if x.shape[-1] != qw.in_features:
        raise _native.ShapeError(f"x has {x.shape[-1]} input features; the weight expects {qw.in_features}")
    if qw.qweight.device != x.device:
        raise _native.DeviceError(f"x is on {x.device} but the quantized weight on {qw.qweight.device}; "
                                  "move the module (or QuantizedWeight.to) first")
    x2 = x.reshape(-1, qw.in_features)
    if x.is_cuda:
        if x2.shape[0] == 0:
            out = torch.empty(0, qw.out_features, dtype=x.dtype, device=x.device)
        elif kernel_supports(qw, x.dtype) is None and _kernel_runs_on(qw, x.device):
            out = _linear_cuda(x2, qw, bias)
        else:
            out = _linear_dequantized(x2, qw, bias).to(x.dtype)
        return out.view(*x.shape[:-1], qw.out_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], qw.out_features, dtype=x.dtype, device=x.device)
    _native.gemm_fwd(x2, qw.qweight, qw.scales, out, zeros=qw.zeros, perm=qw.perm, bias=bias, bits=qw.bits,
                     group_size=qw.group_size, act=qw.act or "", act_scale=qw.act_scale, stream=stream_of(x))
    return out.view(*x.shape[:-1], qw.out_features)
