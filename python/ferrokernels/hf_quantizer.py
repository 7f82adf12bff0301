"""A transformers quantizer (``quant_method: "ferrokernels"``) that puts our ``QuantLinear`` into a
model while ``from_pretrained`` builds it:

- from a full-precision checkpoint: ``from_pretrained(path, quantization_config=FerrokernelsConfig(
  format="w4a16", group_size=128))`` quantizes every Linear but ``lm_head`` after loading (round
  to nearest, or ``method="hqq"``);
- from a pre-quantized GPTQ or AWQ checkpoint: ``load_quantized(path)`` reads its
  ``quantization_config``, swaps it for ours with ``checkpoint_format="gptq"|"awq"``, and the
  quantizer gives each Linear slots named like the checkpoint's tensors (``qweight``,
  ``qzeros``, ``scales``, ``g_idx``), which transformers fills, then repacks them into our layout
  (``checkpoints.from_gptq`` / ``from_awq``): 4-bit weights stay 4-bit from disk to kernel.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .nn import FORMATS, QuantLinear, linear_modules, quantize_model, replace_module

METHOD = "ferrokernels"
CHECKPOINT_FORMATS = ("gptq", "awq")


@register_quantization_config(METHOD)
class FerrokernelsConfig(QuantizationConfigMixin):
    """``format``: a QuantLinear format (w4a16, w8a16, w8a8_int8, w8a8_fp8) to quantize a
    full-precision checkpoint to; ``checkpoint_format``: "gptq" or "awq" when the checkpoint is
    already 4-bit (then ``bits``, ``group_size``, ``desc_act`` and ``version`` (GPTQ v1 stores
    zero - 1) describe it). ``modules_to_not_convert``: fnmatch patterns of module names kept in
    full precision (default ``["lm_head"]``)."""

    def __init__(self, format: str = "w4a16", group_size: int = 128, checkpoint_format: Optional[str] = None,
                 bits: int = 4, sym: bool = True, desc_act: bool = False, version: int = 1, method: str = "rtn",
                 modules_to_not_convert: Optional[List[str]] = None, **kwargs):
        self.quant_method = METHOD
        self.format, self.group_size, self.checkpoint_format = format, int(group_size), checkpoint_format
        self.bits, self.sym, self.desc_act, self.version, self.method = int(bits), bool(sym), bool(desc_act), int(version), method
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else ["lm_head"]
        self.post_init()

    def post_init(self):
        if self.checkpoint_format is not None:
            if self.checkpoint_format not in CHECKPOINT_FORMATS:
                raise NotImplementedError(f"checkpoint_format={self.checkpoint_format!r}: supported {CHECKPOINT_FORMATS}")
            if self.bits != 4:
                raise NotImplementedError(f"{self.checkpoint_format} checkpoints with {self.bits}-bit weights are not "
                                          "supported (4-bit only)")
        elif self.format not in FORMATS:
            raise NotImplementedError(f"format={self.format!r}: supported {list(FORMATS)}")


class PackedSlots(torch.nn.Module):
    """Where transformers loads one GPTQ / AWQ layer's tensors, shaped as each tool writes them;
    replaced by a QuantLinear once they are in."""

    def __init__(self, linear: torch.nn.Linear, cfg: FerrokernelsConfig):
        super().__init__()
        k, n = linear.in_features, linear.out_features
        group = cfg.group_size if cfg.group_size > 0 else k
        if k % group or k % 8 or n % 8:
            raise ValueError(f"a {n}x{k} layer does not fit {cfg.checkpoint_format} packing with group size {group}")
        groups = k // group
        i32 = dict(dtype=torch.int32)
        if cfg.checkpoint_format == "gptq":
            self.register_buffer("qweight", torch.zeros(k // 8, n, **i32))
            self.register_buffer("g_idx", torch.arange(k, dtype=torch.int32) // group)
        else:
            self.register_buffer("qweight", torch.zeros(k, n // 8, **i32))
        self.register_buffer("qzeros", torch.zeros(groups, n // 8, **i32))
        self.register_buffer("scales", torch.zeros(groups, n, dtype=torch.float16))
        self.register_buffer("bias", None if linear.bias is None else torch.zeros(n, dtype=torch.float16))
        self.cfg = cfg

    def to_quant_linear(self) -> QuantLinear:
        c = self.cfg
        if c.checkpoint_format == "gptq":
            return QuantLinear.from_gptq(self.qweight, self.qzeros, self.scales,
                                         self.g_idx if c.desc_act else None, self.bias, version=c.version)
        return QuantLinear.from_awq(self.qweight, self.qzeros, self.scales, self.bias)

    def forward(self, x):
        raise RuntimeError("a quantized layer's tensors were not converted after loading")


@register_quantizer(METHOD)
class FerrokernelsQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized and cfg.checkpoint_format:
            for name, mod in linear_modules(model, cfg.modules_to_not_convert):
                replace_module(model, name, PackedSlots(mod, cfg))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized and cfg.checkpoint_format:
            for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, PackedSlots)]:
                replace_module(model, name, mod.to_quant_linear())
            return model
        return quantize_model(model, cfg.format, group_size=cfg.group_size, sym=cfg.sym, method=cfg.method,
                              skip=cfg.modules_to_not_convert)

    def is_serializable(self, **kwargs):
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def config_from_checkpoint(quantization_config: dict) -> FerrokernelsConfig:
    """Our config for a checkpoint's GPTQ / AWQ ``quantization_config`` dict."""
    q = dict(quantization_config)
    method = str(q.get("quant_method", "")).lower()
    if method not in CHECKPOINT_FORMATS:
        raise NotImplementedError(f"quant_method {method!r}: ferrokernels loads {CHECKPOINT_FORMATS} checkpoints")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise NotImplementedError(f"AWQ version {q.get('version')!r}: only the GEMM packing is supported")
    version = 2 if str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1
    return FerrokernelsConfig(checkpoint_format=method, bits=q.get("bits", 4), group_size=q.get("group_size", 128),
                              sym=q.get("sym", True), desc_act=q.get("desc_act", False), version=version,
                              modules_to_not_convert=q.get("modules_to_not_convert") or ["lm_head"])


def load_quantized(path: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` for a GPTQ or AWQ checkpoint, its
    4-bit layers loaded straight into QuantLinear (no gptqmodel / autoawq needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    q = getattr(config, "quantization_config", None)
    if q is None:
        raise ValueError(f"{path} has no quantization_config; pass quantization_config=FerrokernelsConfig(...) "
                         "to from_pretrained to quantize a full-precision checkpoint")
    q = q if isinstance(q, dict) else q.to_dict()
    config.quantization_config = config_from_checkpoint(q).to_dict()
    return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)


__all__ = ["FerrokernelsConfig", "FerrokernelsQuantizer", "PackedSlots", "config_from_checkpoint",
           "load_quantized"]
