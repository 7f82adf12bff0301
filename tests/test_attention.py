"""Accuracy of ferrokernels.attention / sdpa against float64 on fresh random inputs."""

import pytest
import torch

import ferrokernels as fk
from conftest import ERR_FLOOR, check_against_reference, devices, dtypes_for, make, reference, rel_err

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim): odd sizes, GQA/MQA, Nq != Nk.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 37, 37, 4, 4, 64),
    (1, 130, 67, 6, 2, 40),
    (2, 65, 300, 8, 1, 128),
    (1, 3, 129, 4, 2, 96),
    (1, 200, 200, 2, 2, 256),
    (1, 77, 77, 2, 1, 80),
]
GPU_SHAPES = SHAPES + [
    (2, 1024, 1024, 8, 2, 128),
    (1, 513, 2000, 4, 4, 64),
    (3, 257, 257, 3, 3, 192),
    (1, 1000, 999, 2, 2, 32),
    (1, 127, 129, 4, 1, 144),
    (2, 300, 300, 2, 2, 256),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_attention_matches_float64(device, causal, shape):
    if device == "cpu" and shape not in SHAPES:
        pytest.skip("large shapes run on the GPU only")
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=hash((shape, causal, i)) % 2**31)
        out = torch.full_like(q, float("nan"))  # poison: an unwritten element fails
        res, lse = fk.attention(q, k, v, causal=causal, return_lse=True, out=out)
        assert res.data_ptr() == out.data_ptr()
        check_against_reference(q, k, v, out, lse, causal)


@pytest.mark.parametrize("device", devices())
def test_lse_is_written_everywhere(device):
    """Poisoned LSE through the native entry point: every row gets a value, -inf where empty."""
    q, k, v = make((2, 50, 20, 4, 2, 64), torch.bfloat16, device, seed=7)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 4, 50), float("nan"), device=device)
    fk._native.attention_fwd(q, k, v, out, lse, causal=True, stream=fk._runtime.stream_of(q))
    assert not lse.isnan().any()
    assert (lse[:, :, :30] == float("-inf")).all()  # bottom-right: the first 30 queries see nothing
    assert (out[:, :30] == 0).all()
    check_against_reference(q, k, v, out, lse, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_custom_scale(device, scale):
    q, k, v = make((1, 70, 90, 2, 2, 64), torch.float16, device, seed=11)
    out = torch.full_like(q, float("nan"))
    fk.attention(q, k, v, causal=True, scale=scale, out=out)
    check_against_reference(q, k, v, out, None, True, scale=scale)


@pytest.mark.parametrize("device", devices())
def test_strided_packed_qkv_without_copies(device):
    """q/k/v as slices of a packed (batch, seqlen, 3, heads, dim) tensor."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 150, 3, 4, 64, generator=g).to(device=device, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = torch.full_like(q, float("nan"))
    fk.attention(q, k, v, causal=True, out=out)
    check_against_reference(q, k, v, out, None, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch_semantics(device, causal):
    """sdpa uses torch's layout and top-left causal alignment (Nq != Nk)."""
    g = torch.Generator().manual_seed(5)
    dt = torch.bfloat16
    q = torch.randn(2, 8, 40, 64, generator=g).to(device=device, dtype=dt)
    k = torch.randn(2, 2, 90, 64, generator=g).to(device=device, dtype=dt)
    v = torch.randn(2, 2, 90, 64, generator=g).to(device=device, dtype=dt)
    o = fk.sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    assert o.shape == (2, 8, 40, 64) and o.is_contiguous()
    ref, _ = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, offset=0)
    assert rel_err(o.transpose(1, 2), ref) < ERR_FLOOR[dt]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)
    assert rel_err(o, want) < ERR_FLOOR[dt]


def test_sdpa_three_dim_inputs():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, 33, 32, generator=g) for _ in range(3))
    o = fk.sdpa(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert o.shape == want.shape and rel_err(o, want) < 1e-5


def test_numpy_inputs_on_cpu():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 20, 2, 32)).astype(np.float32) for _ in range(3))
    o = fk.attention(q, k, v, causal=True)
    assert isinstance(o, np.ndarray)
    ref, _ = reference(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), True)
    assert rel_err(torch.from_numpy(o), ref) < 1e-5


@pytest.mark.parametrize("device", devices())
def test_empty_and_keyless(device):
    q, k, v = make((2, 0, 5, 2, 2, 32), torch.float16, device, seed=1)
    assert fk.attention(q, k, v).shape == (2, 0, 2, 32)
    q, k, v = make((1, 4, 0, 2, 2, 32), torch.float16, device, seed=1)
    out, lse = fk.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_torch_compile_fullgraph_has_no_graph_breaks():
    def f(q, k, v):
        return fk.attention(q, k, v, causal=True) * 2 + fk.sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    q, k, v = make((1, 16, 16, 2, 2, 32), torch.float32, "cpu", seed=2)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    assert rel_err(got, f(q, k, v)) < 1e-6


@pytest.mark.cuda
def test_launches_on_the_current_stream():
    q, k, v = make((1, 512, 512, 4, 4, 64), torch.bfloat16, "cuda", seed=4)
    s = torch.cuda.Stream()
    out = torch.full_like(q, float("nan"))
    with torch.cuda.stream(s):
        q2, k2, v2 = q * 1, k * 1, v * 1  # produced on s
        fk.attention(q2, k2, v2, out=out)
    s.synchronize()
    check_against_reference(q, k, v, out, None, False)


@pytest.mark.parametrize("device", devices())
def test_broadcast_kv_heads(device):
    """k/v expanded over heads (stride 0): TMA cannot address it, so the GPU falls back to the
    portable kernel; the result must still be exact."""
    q, k, v = make((2, 150, 150, 4, 1, 64), torch.bfloat16, device, seed=12)
    k4, v4 = k.expand(2, 150, 4, 64), v.expand(2, 150, 4, 64)
    assert k4.stride(2) == 0
    out = torch.full_like(q, float("nan"))
    fk.attention(q, k4, v4, causal=True, out=out)
    check_against_reference(q, k, v, out, None, True)
