"""torch.nn modules on ferrokernels ops: ``QuantLinear`` (a drop-in for nn.Linear with low-bit
weights) and ``quantize_model`` to swap a model's Linear layers in place."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

from . import checkpoints
from ._runtime import torch
from .gemm import QuantizedWeight, dequantize, linear, quantize

FORMATS = {"w4a16": 4, "w8a16": 8}


class QuantLinear(torch.nn.Module):
    """``y = x W^T + b`` with W stored as a QuantizedWeight (buffers, so ``.to()`` and
    ``state_dict`` carry them)."""

    def __init__(self, qw: QuantizedWeight, bias: Optional["torch.Tensor"] = None):
        super().__init__()
        qw.check()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size = qw.bits, qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("perm", qw.perm)
        self.register_buffer("bias", bias)

    @property
    def weight_q(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size, self.bits, self.in_features,
                               self.perm)

    @classmethod
    def from_linear(cls, module: "torch.nn.Linear", fmt: str = "w4a16", group_size: int = 128,
                    sym: bool = True) -> "QuantLinear":
        """Round-to-nearest quantization of an nn.Linear's weight (scales in its dtype)."""
        if fmt not in FORMATS:
            raise NotImplementedError(f"QuantLinear format {fmt!r} is not supported yet (supported: {list(FORMATS)})")
        qw = quantize(module.weight, bits=FORMATS[fmt], group_size=group_size, sym=sym)
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls(qw, bias)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, *, version: int = 1) -> "QuantLinear":
        return cls(checkpoints.from_gptq(qweight, qzeros, scales, g_idx, version=version), bias)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None) -> "QuantLinear":
        return cls(checkpoints.from_awq(qweight, qzeros, scales), bias)

    def dequantized_weight(self, dtype=None) -> "torch.Tensor":
        return dequantize(self.weight_q, dtype)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        bias = self.bias if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight_q, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize_model(model: "torch.nn.Module", fmt: str = "w4a16", *, group_size: int = 128, sym: bool = True,
                   skip: Iterable[str] = ("lm_head",)) -> "torch.nn.Module":
    """Replaces every nn.Linear of `model` (in place) by a QuantLinear, except modules whose
    qualified name matches a pattern in `skip` (fnmatch, e.g. "lm_head", "*.gate"). Returns
    the model."""
    skip = list(skip)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and not any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in skip)]
    for name, mod in targets:
        if mod.in_features % (group_size if group_size > 0 else mod.in_features):
            continue  # a group size that does not divide K: leave the layer in full precision
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(mod, fmt, group_size, sym))
    return model
