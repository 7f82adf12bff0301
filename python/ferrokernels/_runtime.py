"""Plumbing shared by every op module: the native module, CUDA search roots, streams, output
allocation with the caller's framework, and the small argument checks Python needs before it
can allocate."""

from __future__ import annotations

import os
import sys

from . import _native

try:  # torch is optional: numpy arrays work on the CPU path without it
    import torch
except ImportError:  # pragma: no cover - exercised only on torch-less installs
    torch = None

ShapeError = _native.ShapeError


def _register_cuda_search_roots() -> None:
    """Let the Rust side find the CUDA headers and libnvrtc that pip-installed torch brings
    (site-packages/nvidia/cu13 or cu12)."""
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    _native.add_cuda_search_roots(roots)


_register_cuda_search_roots()


def is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def stream_of(x) -> int:
    """The raw CUstream the op launches on: torch's current stream for x's device."""
    if is_torch(x) and x.is_cuda:
        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def shape_str(shape) -> str:
    s = tuple(int(d) for d in shape)
    return str(s)


def expect_rank(x, rank: int, name: str, layout: str) -> None:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(
            f"{name} must be a tensor that supports DLPack (torch.Tensor, numpy.ndarray, ...), "
            f"got {type(x).__name__}"
        )
    if len(shape) != rank:
        raise ShapeError(f"{name} must be {rank}-D {layout}, got shape {shape_str(shape)}")


def empty(like, shape, dtype=None):
    """An uninitialised output on like's device, in like's framework."""
    if is_torch(like):
        return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    import numpy as np

    return np.empty(shape, dtype=dtype or like.dtype)


def float32_of(like):
    if is_torch(like):
        return torch.float32
    import numpy as np

    return np.float32


_BMM_OUT_DTYPE = True  # torch's bmm(out_dtype=float32) for 16-bit inputs (CUDA, torch >= 2.8)


def bmm_f32(a, b):
    """a (n, M, K) @ b (n, K, N) in float32 with no float copy of the inputs where torch can
    (16-bit inputs on the GPU accumulate and return float32 themselves)."""
    global _BMM_OUT_DTYPE
    if _BMM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _BMM_OUT_DTYPE = False
    return torch.bmm(a.float(), b.float())
