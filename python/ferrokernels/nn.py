"""torch.nn modules on ferrokernels ops: ``QuantLinear`` (a drop-in for nn.Linear with low-bit
weights) and ``quantize_model`` to swap a model's Linear layers in place."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional

from . import checkpoints
from ._runtime import torch
from .gemm import QuantizedWeight, dequantize, linear, permute_rows, quantize, quantize_hqq, quantize_w8a8

FORMATS = ("w4a16", "w8a16", "w8a8_int8", "w8a8_fp8")


class QuantLinear(torch.nn.Module):
    """``y = x W^T + b`` with W stored as a QuantizedWeight (buffers, so ``.to()`` and
    ``state_dict`` carry them)."""

    def __init__(self, qw: QuantizedWeight, bias: Optional["torch.Tensor"] = None):
        super().__init__()
        qw.check()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size, self.act = qw.bits, qw.group_size, qw.act
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("act_scale", qw.act_scale)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("perm", qw.perm)
        self.register_buffer("bias", bias)

    @property
    def weight_q(self) -> QuantizedWeight:
        # One object per set of buffers, so the GPU kernel's packed copy (cached on it) is made
        # once; .to() / .cuda() replace the buffers and with them this object.
        parts = (self.qweight, self.scales, self.zeros, self.perm, self.act_scale)
        cached = self.__dict__.get("_weight_q")
        if cached is None or any(a is not b for a, b in zip(cached[0], parts)):
            qw = QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size, self.bits, self.in_features,
                                 self.perm, self.act, self.act_scale)
            cached = (parts, qw)
            self.__dict__["_weight_q"] = cached
        return cached[1]

    @classmethod
    def from_linear(cls, module: "torch.nn.Linear", fmt: str = "w4a16", group_size: int = 128,
                    sym: bool = True, method: str = "rtn") -> "QuantLinear":
        """Round-to-nearest quantization of an nn.Linear's weight: w4a16 (groups of
        `group_size`), w8a16 (int8 per channel), w8a8_int8 / w8a8_fp8 (per-channel weights,
        activations quantized per token at run time). ``method="hqq"`` (w4a16) fits each
        group's zero point with HQQ's calibration-free search instead of plain min/max."""
        if fmt not in FORMATS:
            raise NotImplementedError(f"QuantLinear format {fmt!r} is not supported yet (supported: {list(FORMATS)})")
        if method not in ("rtn", "hqq") or (method == "hqq" and fmt != "w4a16"):
            raise NotImplementedError(f"method {method!r} is not supported for {fmt} (rtn; hqq for w4a16)")
        if fmt == "w4a16" and method == "hqq":
            qw = quantize_hqq(module.weight, group_size=group_size)
        elif fmt == "w4a16":
            qw = quantize(module.weight, bits=4, group_size=group_size, sym=sym)
        elif fmt == "w8a16":
            qw = quantize(module.weight, bits=8, group_size=-1)
        else:
            qw = quantize_w8a8(module.weight, fmt.removeprefix("w8a8_"))
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
        act = f", act={self.act}" if self.act else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}{act}, bias={self.bias is not None}")


def linear_modules(model: "torch.nn.Module", skip: Iterable[str]):
    """(name, module) of every nn.Linear of `model` whose qualified name matches no pattern in
    `skip` (fnmatch, e.g. "lm_head", "*.gate"; a bare name also matches the last component)."""
    skip = list(skip)
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            and not any(fnmatch.fnmatch(name, p) or name.split(".")[-1] == p for p in skip)]


def replace_module(model: "torch.nn.Module", name: str, new: "torch.nn.Module") -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_linears(model: "torch.nn.Module", fmt: str = "w4a16", *, group_size: int = 128, sym: bool = True,
                     method: str = "rtn", skip: Iterable[str] = ("lm_head",)) -> dict:
    """``quantize_model``'s work; returns the replaced modules by name (so they can be put back)."""
    replaced = {}
    for name, mod in linear_modules(model, skip):
        if fmt == "w4a16" and mod.in_features % (group_size if group_size > 0 else mod.in_features):
            continue  # a group size that does not divide K: leave the layer in full precision
        replace_module(model, name, QuantLinear.from_linear(mod, fmt, group_size, sym, method))
        replaced[name] = mod
    return replaced


def quantize_model(model: "torch.nn.Module", fmt: str = "w4a16", *, group_size: int = 128, sym: bool = True,
                   method: str = "rtn", skip: Iterable[str] = ("lm_head",)) -> "torch.nn.Module":
    """Replaces every nn.Linear of `model` (in place) by a QuantLinear, except modules whose
    qualified name matches a pattern in `skip` (fnmatch, e.g. "lm_head", "*.gate"). Returns
    the model."""
    quantize_linears(model, fmt, group_size=group_size, sym=sym, method=method, skip=skip)
    return model


# GGUF tensor names of a llama-family block -> the Hugging Face module path inside a layer.
GGUF_LLAMA_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_rotary_rows(n: int, heads: int) -> "torch.Tensor":
    """llama.cpp's converter interleaves each q/k head's rotary halves; transformers undoes
    it on load. The same row order for a quantized weight: HF row (h, j, i) is GGUF row (h, i, j)."""
    dim = n // heads // 2
    return torch.arange(n).view(heads, dim, 2).transpose(1, 2).reshape(n)


def load_gguf_linears(model: "torch.nn.Module", path: str) -> int:
    """Replaces the attention and MLP Linear layers of a llama-family Hugging Face model by
    QuantLinear layers read straight from the quantized tensors of its ``.gguf`` file (Q4_0,
    Q4_1, Q8_0; the model itself may come from ``from_pretrained(..., gguf_file=...)``, which
    dequantizes). Returns the number of layers replaced."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    wanted = {f"blk.{i}.{g}.weight" for i in range(cfg.num_hidden_layers) for g in GGUF_LLAMA_LINEARS}
    tensors = checkpoints.read_gguf(path, wanted)
    layers = model.get_submodule("model.layers")
    replaced = 0
    for name, qw in tensors.items():
        if not isinstance(qw, QuantizedWeight):
            continue  # stored unquantized: leave the dense layer
        _, i, kind, _ = name.split(".")
        if kind in ("attn_q", "attn_k"):
            qw = permute_rows(qw, _gguf_rotary_rows(qw.out_features, heads if kind == "attn_q" else kv_heads))
        parent_path, _, child = GGUF_LLAMA_LINEARS[kind].rpartition(".")
        parent = layers[int(i)].get_submodule(parent_path)
        old = getattr(parent, child)
        if (old.out_features, old.in_features) != (qw.out_features, qw.in_features):
            raise ValueError(f"{name} is {qw.out_features}x{qw.in_features}, the model's layer "
                             f"{old.out_features}x{old.in_features}")
        bias = None if old.bias is None else old.bias.detach().clone()
        setattr(parent, child, QuantLinear(qw, bias))
        replaced += 1
    return replaced
