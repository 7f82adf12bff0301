"""ferrokernels: fast attention and GEMM kernels for PyTorch, in Rust + CUDA (NVRTC JIT)."""

import sys

from . import _native
from ._native import (
    CompileError,
    CudaError,
    DeviceError,
    DTypeError,
    LayoutError,
    ShapeError,
)
from . import _runtime  # noqa: F401  (registers the pip CUDA search roots)
from . import checkpoints, gemm, kv, kv_quant  # noqa: F401

if _runtime.torch is not None:  # the nn modules need torch
    from . import nn  # noqa: F401
    from .nn import quantize_model
from .attention import attention, attention_varlen, sdpa
from .decode import append_kv, decode_attention
from .kvcache import PagedKVCache, VirtualKVCache
from .quant_attention import fp8_attention, quant_attention, quant_attention_varlen
from .runtime import compile_all, info, kernel_names
from .sparse import BlockMask, sparse_attention

__version__ = _native.__version__


def patch(model, *args, **kwargs):
    """Switches a Hugging Face transformers model to ferrokernels in place (see ferrokernels.hf.patch)."""
    from . import hf

    return hf.patch(model, *args, **kwargs)


def unpatch(model):
    """Undoes ``patch`` (see ferrokernels.hf.unpatch)."""
    from . import hf

    return hf.unpatch(model)


if "transformers" in sys.modules:  # make attn_implementation="ferrokernels" work right away
    from . import hf  # noqa: F401

__all__ = [
    "attention",
    "attention_varlen",
    "sdpa",
    "decode_attention",
    "quant_attention",
    "quant_attention_varlen",
    "fp8_attention",
    "BlockMask",
    "sparse_attention",
    "append_kv",
    "PagedKVCache",
    "VirtualKVCache",
    "quantize_model",
    "patch",
    "unpatch",
    "info",
    "compile_all",
    "kernel_names",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "LayoutError",
    "CudaError",
    "CompileError",
    "__version__",
]
