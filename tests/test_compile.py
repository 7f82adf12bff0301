"""Every kernel variant compiles through NVRTC for the archs it targets (sm_80 and sm_90a), with
no register spills; the Hopper kernels really use warpgroup MMA.
Needs no GPU: CI runs it with the NVRTC that `pip install torch` brings."""

import os

import pytest

import ferrokernels as fk
from conftest import nvrtc_available

pytestmark = pytest.mark.skipif(
    not nvrtc_available() and not os.environ.get("CI"),
    reason="NVRTC not found (pip install torch brings it)")


def test_nvrtc_is_found_in_ci():
    """CI installs torch, so NVRTC must be there: this test is what keeps the compile tests from
    silently skipping in CI."""
    info = fk.info()
    assert "nvrtc_version" in info, info.get("nvrtc_error")
    assert any(os.path.exists(os.path.join(d, "cuda_bf16.h")) for d in info["include_dirs"])


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_variant_compiles_without_spills(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("FERROKERNELS_CACHE", str(tmp_path))
    reports = fk.compile_all([arch])
    assert len(reports) == len(fk.kernel_names(arch)) > 0
    hopper = [r for r in reports if "_sm90_" in r["name"]]
    assert bool(hopper) == (arch == "sm_90a"), "the wgmma kernels compile for sm_90a only"
    for r in reports:
        assert r["cubin_bytes"] > 1000, r["name"]
        assert 0 < r["registers"] <= 255, r["name"]
        # The Hopper kernels run their producer warpgroup on 24 registers (what is left beside
        # two 240-register consumers); its per-tile scalars (tile index, ring position, rows)
        # live in L1, 20-60 bytes by head dim. The 8-bit consumers sit at 240 registers too and
        # park four 64-bit loop invariants in L1, reloaded once per key tile (measured faster
        # than the variants that avoided it: NOTES, quant v2). The sm_80 kernels, which have no
        # such split, must not spill at all: 16 bytes of spill in a consumer's hot loop cost
        # 20% (benchmarks/NOTES.md, v4), which the bench shows.
        budget = 96 if "_sm90_" in r["name"] else 0
        assert r["spill_stores"] <= budget and r["spill_loads"] <= budget, f"{r['name']} spills on {arch}:\n{r['log']}"


def test_compile_error_carries_the_nvrtc_log():
    with pytest.raises(KeyError):
        fk._native.compile_kernel("no_such_kernel", "sm_90a")
    with pytest.raises(fk.CompileError, match="sm_99"):
        fk._native.compile_kernel(fk.kernel_names()[0], "sm_99")


def test_hopper_kernels_use_wgmma_and_setmaxnreg(tmp_path, monkeypatch):
    """ptxas drops setmaxnreg when the kernel has no register cap at entry (warning C7508)."""
    monkeypatch.setenv("FERROKERNELS_CACHE", str(tmp_path))
    name = next(n for n in fk.kernel_names("sm_90a") if "_sm90_" in n)
    r = fk._native.compile_kernel(name, "sm_90a")
    assert "C7508" not in r["log"] and "setmaxnreg" not in r["log"].lower(), r["log"]
    with pytest.raises(ValueError, match="not sm_80"):
        fk._native.compile_kernel(name, "sm_80")
