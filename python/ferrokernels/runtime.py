"""Runtime facts and kernel pre-compilation (``python -m ferrokernels info|warmup``)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, List, Optional

from . import _native
from ._runtime import torch


def kernel_names(arch: Optional[str] = None) -> List[str]:
    """Every kernel variant the library can JIT (for `arch`, those that target it)."""
    return list(_native.kernel_names(arch))


def _dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def info() -> dict:
    """Version, devices, NVRTC and header locations, cache folder and size."""
    d = dict(_native.runtime_info())
    d["version"] = _native.__version__
    d["cache_bytes"] = _dir_size(d["cache_dir"]) if os.path.isdir(d["cache_dir"]) else 0
    d["devices"] = []
    for i in range(d.get("device_count", 0)):
        try:
            d["devices"].append(dict(_native.device_info(i)))
        except Exception as e:  # a device we cannot use is still worth listing
            d["devices"].append({"ordinal": i, "error": str(e)})
    if torch is not None:
        d["torch"] = torch.__version__
    return d


def default_archs() -> List[str]:
    n = _native.runtime_info().get("device_count", 0)
    return sorted({_native.device_arch(i) for i in range(n)}) or ["sm_80", "sm_90a"]


def compile_all(archs: Optional[Iterable[str]] = None, progress: bool = False) -> List[dict]:
    """Compiles every kernel variant for each arch (default: the GPUs present, else sm_80 and
    sm_90a) into the disk cache; returns each variant's resource report."""
    archs = list(archs or default_archs())
    jobs = [(n, a) for a in archs for n in kernel_names(a)]
    reports = []
    bar = progress_bar(jobs, "NVRTC compile", disable=not progress)
    for name, arch in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{name} {arch}")
        reports.append(dict(_native.compile_kernel(name, arch)))
    return reports


def progress_bar(items, desc: str, disable: bool = False):
    """tqdm over items when tqdm is installed (a plain iterator otherwise)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iter(items)
    return tqdm(items, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True)
