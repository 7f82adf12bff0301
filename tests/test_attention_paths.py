"""Both GPU kernel families (FERROKERNELS_ATTENTION_PATH=sm80|sm90) against float64 on the same
inputs; on a Hopper GPU the default (auto) runs the sm90 kernel, so the other attention tests
cover it too."""

import pytest
import torch

import ferrokernels as fk
from conftest import check_against_reference, make

pytestmark = pytest.mark.cuda


def is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


CASES = [
    # (shape, causal, mods, dv)
    ((2, 1000, 1000, 8, 2, 128), True, {}, None),
    ((1, 300, 513, 4, 4, 64), False, {}, None),
    ((1, 257, 700, 2, 1, 256), True, {}, None),
    ((2, 129, 129, 4, 2, 96), True, {"window": (40, 0)}, None),
    ((1, 200, 333, 4, 4, 128), False, {"softcap": 10.0}, None),
    ((1, 190, 190, 2, 2, 192), True, {}, 128),
    ((1, 64, 1000, 4, 2, 128), True, {"window": (100, 20)}, None),
]


@pytest.mark.parametrize("path", ["sm80", "sm90"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_each_path_matches_float64(path, case, monkeypatch):
    if path == "sm90" and not is_hopper():
        pytest.skip("the sm90 kernel needs a Hopper GPU")
    monkeypatch.setenv("FERROKERNELS_ATTENTION_PATH", path)
    shape, causal, mods, dv = CASES[case]
    for i, dtype in enumerate([torch.float16, torch.bfloat16]):
        q, k, v = make(shape, dtype, "cuda", seed=100 + case * 7 + i, dv=dv)
        out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=dtype, device="cuda")
        _, lse = fk.attention(q, k, v, causal=causal, return_lse=True, out=out, **mods)
        check_against_reference(q, k, v, out, lse, causal, **mods)


def test_forcing_sm90_off_hopper_is_an_error(monkeypatch):
    if is_hopper():
        pytest.skip("this GPU runs the sm90 kernel")
    monkeypatch.setenv("FERROKERNELS_ATTENTION_PATH", "sm90")
    q, k, v = make((1, 8, 8, 1, 1, 64), torch.float16, "cuda", seed=1)
    with pytest.raises(ValueError, match="needs an sm_90 GPU"):
        fk.attention(q, k, v)


def test_bad_path_name(monkeypatch):
    monkeypatch.setenv("FERROKERNELS_ATTENTION_PATH", "fastest")
    q, k, v = make((1, 8, 8, 1, 1, 64), torch.float16, "cuda", seed=1)
    with pytest.raises(ValueError, match="must be auto, sm80 or sm90"):
        fk.attention(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_persistent_schedule_matches_one_cta_per_tile(causal, monkeypatch):
    """The sm90 kernel's persistent CTAs walk more tiles than there are SMs, in rounds: without
    a mask in L2-sized head groups (8 MB of K/V per head here: groups of 3, 3 and 1 of the 7
    heads), causal in longest-first order over all heads. Every tile's arithmetic is the same
    as with one CTA per tile, so the outputs must be bit-identical, and right against float64."""
    if not is_hopper():
        pytest.skip("the persistent scheduler is in the sm90 kernel")
    shape = (1, 4000, 16384, 7, 7, 128)
    for i, dtype in enumerate([torch.bfloat16, torch.float16]):
        q, k, v = make(shape, dtype, "cuda", seed=900 + i + 2 * causal)
        runs = []
        for persistent in ["1", "0"]:
            monkeypatch.setenv("FERROKERNELS_ATTENTION_PERSISTENT", persistent)
            out = torch.full_like(q, float("nan"))
            _, lse = fk.attention(q, k, v, causal=causal, return_lse=True, out=out)
            runs.append((out, lse))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        if i == 0:
            rows = slice(-1000, None)
            check_against_reference(q[:, rows], k, v, runs[0][0][:, rows], runs[0][1][..., rows], causal=causal)
