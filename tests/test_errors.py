"""Bad inputs raise a clear exception naming the argument; none crashes the process."""

import pytest
import torch

import ferrokernels as fk
from conftest import devices


def qkv(device="cpu", dtype=torch.float16, b=1, n=8, h=2, hk=2, d=32):
    return (torch.randn(b, n, h, d, device=device, dtype=dtype),
            torch.randn(b, n, hk, d, device=device, dtype=dtype),
            torch.randn(b, n, hk, d, device=device, dtype=dtype))


@pytest.mark.parametrize("device", devices())
def test_rank(device):
    q, k, v = qkv(device)
    with pytest.raises(fk.ShapeError, match=r"q must be 4-D \(batch, seqlen, heads, head_dim\), got shape \(1, 8, 2\)"):
        fk.attention(q[..., 0], k, v)
    with pytest.raises(fk.ShapeError, match="k must be 4-D"):
        fk.attention(q, k[0], v)


@pytest.mark.parametrize("device", devices())
def test_dtypes(device):
    q, k, v = qkv(device)
    with pytest.raises(fk.DTypeError, match="q and k must have the same dtype, got float16 and bfloat16"):
        fk.attention(q, k.bfloat16(), v)
    with pytest.raises(fk.DTypeError, match="q must have dtype float16 or bfloat16 or float32, got int32"):
        fk.attention(q.int(), k.int(), v.int())
    with pytest.raises(fk.DTypeError, match="q must have dtype float16 or bfloat16 or float32, got float64"):
        fk.attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="q has an unsupported dtype"):
        fk.attention(q.to(torch.complex64), k, v)


def test_isinstance_of_builtin_exceptions():
    assert issubclass(fk.ShapeError, ValueError) and issubclass(fk.DTypeError, TypeError)
    assert issubclass(fk.LayoutError, ValueError) and issubclass(fk.CudaError, RuntimeError)


@pytest.mark.parametrize("device", devices())
def test_shapes(device):
    q, k, v = qkv(device, h=3, hk=2)
    with pytest.raises(fk.ShapeError, match="q has 3 heads, which must be a multiple of k's 2 heads"):
        fk.attention(q, k, v)
    q, k, v = qkv(device, d=12)
    with pytest.raises(fk.ShapeError, match="head_dim 12; supported head dims are multiples of 8"):
        fk.attention(q, k, v)
    q, k, v = qkv(device, d=264)
    with pytest.raises(fk.ShapeError, match="head_dim 264"):
        fk.attention(q, k, v)
    q, k, v = qkv(device)
    with pytest.raises(fk.ShapeError, match="v has seqlen"):
        fk.attention(q, k, v[:, :5])
    with pytest.raises(fk.ShapeError, match="k has batch"):
        fk.attention(q, torch.cat([k, k]), v)
    with pytest.raises(fk.ShapeError, match=r"out must have shape \(1, 8, 2, 64\)"):
        fk.attention(q, k, torch.randn(1, 8, 2, 64, device=device, dtype=q.dtype), out=torch.empty_like(q))
    with pytest.raises(fk.ShapeError, match="v has head_dim 20"):
        fk.attention(q, k, torch.randn(1, 8, 2, 20, device=device, dtype=q.dtype))
    with pytest.raises(fk.ShapeError, match="out must have shape"):
        fk.attention(q, k, v, out=torch.empty(1, 8, 2, 16, device=device, dtype=q.dtype))


@pytest.mark.parametrize("device", devices())
def test_layout(device):
    q, k, v = qkv(device)
    with pytest.raises(fk.LayoutError, match="q must be contiguous in its last dimension"):
        fk.attention(q.transpose(1, 3).contiguous().transpose(1, 3), k, v)
    expanded = torch.empty(1, 1, 2, 32, device=device, dtype=q.dtype).expand(1, 8, 2, 32)
    with pytest.raises(fk.LayoutError, match="out has stride 0 in dimension 1"):
        fk.attention(q, k, v, out=expanded)


@pytest.mark.parametrize("device", devices())
def test_values(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="scale must be finite"):
        fk.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="q must be a tensor that supports DLPack"):
        fk.attention([1, 2], k, v)


def test_sdpa_arguments():
    q, k, v = (x.transpose(1, 2) for x in qkv())
    with pytest.raises(fk.ShapeError, match="attn_mask has shape"):
        fk.sdpa(q, k, v, attn_mask=torch.ones(8, 5, dtype=torch.bool))
    with pytest.raises(fk.ShapeError, match="attn_mask must be 2-D to 4-D"):
        fk.sdpa(q, k, v, attn_mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(fk.DTypeError, match="attn_mask has dtype int32"):
        fk.sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(fk.DTypeError, match="attn_mask has dtype bfloat16"):
        fk.sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fk.sdpa(q, k, v, dropout_p=0.1)
    q, k, v = (x.transpose(1, 2) for x in qkv(h=4, hk=2))
    with pytest.raises(fk.ShapeError, match="enable_gqa=True"):
        fk.sdpa(q, k, v)


def test_read_only_output_is_refused():
    np = pytest.importorskip("numpy")
    q = np.random.standard_normal((1, 8, 2, 32)).astype(np.float32)
    out = np.empty_like(q)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fk._native.attention_fwd(q, q, q, out)


@pytest.mark.cuda
def test_cuda_only_checks():
    q, k, v = qkv("cuda")
    with pytest.raises(fk.DeviceError, match="k is on cpu but q is on cuda:0"):
        fk.attention(q, k.cpu(), v)
    with pytest.raises(fk.DTypeError, match="float32 runs on the CPU path"):
        fk.attention(q.float(), k.float(), v.float())
    buf = torch.randn(1 * 8 * 2 * 32 + 1, device="cuda", dtype=torch.float16)
    misaligned = buf[1:].view(1, 8, 2, 32)
    with pytest.raises(fk.LayoutError, match="q data pointer .* is not 16-byte aligned"):
        fk.attention(misaligned, k, v)
    odd = torch.randn(1, 8, 2, 36, device="cuda", dtype=torch.float16)[..., :32]
    with pytest.raises(fk.LayoutError, match="stride 36 of dimension 2 is not a multiple of 16 bytes"):
        fk.attention(odd, k, v)


@pytest.mark.parametrize("device", devices())
def test_option_values(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="window left must be >= 0"):
        fk.attention(q, k, v, window=(-5, 0))
    with pytest.raises(ValueError, match="window must be a"):
        fk.attention(q, k, v, window=3)
    with pytest.raises(ValueError, match="window right must be an int"):
        fk.attention(q, k, v, window=(3, 1.5))
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        fk.attention(q, k, v, softcap=-1.0)
    with pytest.raises(fk.ShapeError, match=r"alibi_slopes must have shape \(2,\) or \(1, 2\)"):
        fk.attention(q, k, v, alibi_slopes=torch.ones(3, device=device))
    with pytest.raises(fk.DTypeError, match="alibi_slopes must have dtype float32"):
        fk.attention(q, k, v, alibi_slopes=torch.ones(2, device=device, dtype=torch.float16))


def varlen_inputs(device, lens=(3, 5)):
    total = sum(lens)
    q, k, v = (torch.randn(total, 2, 32, device=device, dtype=torch.float16) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("device", devices())
def test_varlen_offsets(device):
    q, k, v, cu = varlen_inputs(device)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        fk.attention_varlen(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32, device=device), cu, 8, 8)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        fk.attention_varlen(q, k, v, cu, cu + 1, 8, 8)
    with pytest.raises(ValueError, match="more than max_seqlen 4"):
        fk.attention_varlen(q, k, v, cu, cu, 4, 8)
    with pytest.raises(ValueError, match="ends at 8 but the tensor has only 6 rows"):
        fk.attention_varlen(q[:6], k, v, cu, cu, 8, 8)
    with pytest.raises(fk.DTypeError, match="cu_seqlens_q must have dtype int32"):
        fk.attention_varlen(q, k, v, cu.long(), cu, 8, 8)
    with pytest.raises(fk.ShapeError, match="cu_seqlens_k has length"):
        fk.attention_varlen(q, k, v, cu, cu[:2], 8, 8)
    with pytest.raises(fk.ShapeError, match=r"q must be 3-D \(total_tokens, heads, head_dim\)"):
        fk.attention_varlen(q[None], k, v, cu, cu, 8, 8)


@pytest.mark.parametrize("device", devices())
def test_native_workspace(device):
    """The tile-counter workspace that the Python layer allocates is checked like any input."""
    q, k, v = qkv(device)
    out = torch.empty_like(q)
    with pytest.raises(fk.DTypeError, match="workspace must have dtype int32, got float32"):
        fk._native.attention_fwd(q, k, v, out, workspace=torch.zeros(1, device=device))
    with pytest.raises(fk.ShapeError, match="workspace must be a contiguous 1-D int32 tensor"):
        fk._native.attention_fwd(q, k, v, out, workspace=torch.zeros(0, dtype=torch.int32, device=device))
