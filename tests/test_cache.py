"""The on-disk cubin cache: reuse, corrupt entries, and concurrent cold builds."""

import glob
import os
import subprocess
import sys

import pytest

import ferrokernels as fk
from conftest import nvrtc_available

pytestmark = pytest.mark.skipif(
    not nvrtc_available() and not os.environ.get("CI"),
    reason="NVRTC not found (pip install torch brings it)")

KERNEL = "attention_fwd_bf16_d64"

# Each subprocess starts with an empty in-memory cache, so it must go to the disk.
COMPILE = f"""
import sys, ferrokernels as fk
r = fk._native.compile_kernel({KERNEL!r}, "sm_90a")
assert r["cubin_bytes"] > 1000 and r["registers"] > 0
print(r["cubin_bytes"])
"""


def compile_in_subprocess(cache, extra_env=None):
    env = dict(os.environ, FERROKERNELS_CACHE=str(cache), **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-c", COMPILE], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def entries(cache):
    return glob.glob(os.path.join(str(cache), "sm_90a", "nvrtc-*", f"{KERNEL}-*.cubin"))


def cubin_of(entry: bytes) -> bytes:
    """The cubin inside a cache entry (magic, cubin length, log length, sha256, cubin, log);
    the log after it carries compile times, so whole entries differ between builds."""
    assert entry[:8] == b"FKCUBIN1"
    n = int.from_bytes(entry[8:16], "little")
    return entry[56:56 + n]


def finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return out


def test_entry_is_written_once_and_reused(tmp_path):
    finish(compile_in_subprocess(tmp_path))
    (entry,) = entries(tmp_path)
    mtime = os.stat(entry).st_mtime_ns
    # FERROKERNELS_NO_JIT: the second process must be served from disk, never compile.
    finish(compile_in_subprocess(tmp_path, {"FERROKERNELS_NO_JIT": "1"}))
    assert os.stat(entry).st_mtime_ns == mtime


def test_no_jit_fails_clearly_on_a_cold_cache(tmp_path):
    p = compile_in_subprocess(tmp_path, {"FERROKERNELS_NO_JIT": "1"})
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "FERROKERNELS_NO_JIT" in err


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_entry_is_recompiled(tmp_path, damage):
    finish(compile_in_subprocess(tmp_path))
    (entry,) = entries(tmp_path)
    good = open(entry, "rb").read()
    bad = {"truncate": good[: len(good) // 2],
           "flip": good[:-1] + bytes([good[-1] ^ 0xFF]),
           "garbage": b"not a cubin at all" * 10,
           "empty": b""}[damage]
    open(entry, "wb").write(bad)
    finish(compile_in_subprocess(tmp_path))
    assert cubin_of(open(entry, "rb").read()) == cubin_of(good)


def test_two_processes_compiling_at_once(tmp_path):
    procs = [compile_in_subprocess(tmp_path) for _ in range(3)]
    sizes = {finish(p) for p in procs}
    assert len(sizes) == 1
    (entry,) = entries(tmp_path)
    leftovers = [f for f in os.listdir(os.path.dirname(entry)) if ".tmp." in f]
    assert not leftovers, leftovers
