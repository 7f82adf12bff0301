"""ferrokernels.gemm.linear and nn.QuantLinear against the float32 matmul of the dequantized
weight, for every canonical format (4-bit symmetric, integer zero points, float minimums,
act-order permutation, int8), odd group counts, many M, with and without bias."""

import copy

import pytest
import torch

import ferrokernels as fk
from ferrokernels import checkpoints as ck
from ferrokernels.gemm import QuantizedWeight, dequantize, linear, pack_int4, quantize

MS = [1, 2, 3, 7, 16, 33, 64]


def weights(kind, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "sym":
        return quantize(w, bits=4, group_size=32)
    if kind == "zeros":
        return quantize(w, bits=4, group_size=64, sym=False)
    if kind == "int8":
        return quantize(w, bits=8, group_size=k)
    if kind == "mins":  # GGUF Q4_1-style: codes * scale + min, 32 per block
        codes = torch.randint(0, 16, (n, k), generator=g)
        s = (torch.rand(n, k // 32, generator=g) * 0.01).half()
        m = (torch.randn(n, k // 32, generator=g) * 0.05).half()
        return QuantizedWeight(pack_int4(codes), s, m, 32, 4, k).check()
    if kind == "act_order":  # GPTQ with g_idx: groups regrouped by a permutation
        codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
        packed = sum((codes.view(k // 8, 8, n)[:, j] << (4 * j)) for j in range(8)).to(torch.int32)
        zeros = torch.randint(0, 16, (k // 64, n), generator=g, dtype=torch.int32)
        qz = sum((zeros.view(k // 64, n // 8, 8)[:, :, j] << (4 * j)) for j in range(8)).to(torch.int32)
        s = (torch.rand(k // 64, n, generator=g) * 0.01).half()
        g_idx = (torch.arange(k) // 64)[torch.randperm(k, generator=g)].to(torch.int32)
        return ck.from_gptq(packed, qz, s, g_idx, version=2)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["sym", "zeros", "int8", "mins", "act_order"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_matches_dequantized_matmul(kind, dtype):
    n, k = 72, 320  # 320 / 32 = 10 and 320 / 64 = 5 groups (odd counts)
    qw = weights(kind, n, k, seed=hash((kind, str(dtype))) % 2**31)
    bias = torch.randn(n).to(dtype)
    w = dequantize(qw, torch.float32)
    for m in MS:
        x = torch.randn(m, k).to(dtype)
        ref = x.float() @ w.t() + bias.float()
        out = torch.full((m, n), float("nan"), dtype=dtype)
        fk._native.gemm_fwd(x, qw.qweight, qw.scales, out, zeros=qw.zeros, perm=qw.perm, bias=bias, bits=qw.bits,
                            group_size=qw.group_size)
        assert not out.isnan().any()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (m, err)
        assert torch.equal(linear(x, qw, bias), out)


def test_quant_linear_and_quantize_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model.add_module("lm_head", torch.nn.Linear(64, 10))
    x = torch.randn(4, 7, 128)
    reference = copy.deepcopy(model)
    fk.quantize_model(model, "w4a16", group_size=64)
    assert isinstance(model[0], fk.nn.QuantLinear) and isinstance(model[2], fk.nn.QuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear)  # skipped by default
    with torch.no_grad():
        full = reference(x)
        for i in (0, 2):  # the same model with the dequantized weights
            reference[i].weight.copy_(model[i].dequantized_weight(torch.float32))
        want, got = reference(x), model(x)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((got - full).norm() / full.norm()).item() < 0.15  # 4-bit RTN of uniform random weights
    # Buffers travel with the module.
    assert set(model[0].state_dict()) >= {"qweight", "scales"}
    with pytest.raises(NotImplementedError, match="format 'fp8'"):
        fk.nn.QuantLinear.from_linear(torch.nn.Linear(64, 64), "fp8")


def test_bad_inputs():
    qw = quantize(torch.randn(64, 128), bits=4, group_size=32)
    with pytest.raises(fk.ShapeError, match="x has 100 input features; the weight expects 128"):
        linear(torch.randn(2, 100), qw)
    out = torch.empty(2, 64)
    with pytest.raises(fk.ShapeError, match="group_size 48 must divide K = 128"):
        fk._native.gemm_fwd(torch.randn(2, 128), qw.qweight, qw.scales, out, bits=4, group_size=48)
    with pytest.raises(fk.DTypeError, match="qweight must have dtype uint8"):
        fk._native.gemm_fwd(torch.randn(2, 128), qw.qweight.to(torch.int8), qw.scales, out, bits=4, group_size=32)
    with pytest.raises(fk.ShapeError, match="scales must have shape"):
        fk._native.gemm_fwd(torch.randn(2, 128), qw.qweight, qw.scales[:, :2], out, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        fk._native.gemm_fwd(torch.randn(2, 128), qw.qweight, qw.scales, out, bits=3, group_size=32)


def w8a8_reference(x, qw, bias):
    """Per-token activation quantization and the product, simulated in float64 from the
    quantized values (exact products; the kernel's f32/i32 sums differ only in order)."""
    qmax = 127.0 if qw.act == "int8" else 448.0
    xf = x.float()  # scales and codes in float32, as the kernel forms them
    s = qw.act_scale.reshape(1, 1) if qw.act_scale is not None else (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    t = xf / s
    xq = torch.round(t).clamp(-127, 127) if qw.act == "int8" else t.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    w = qw.qweight.double() if qw.act == "int8" else qw.qweight.float().double()
    return (xq.double() @ w.t()) * s.double() * qw.scales.double().t() + (0 if bias is None else bias.double())


@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_matches_simulated_quantization(act, dtype, static):
    n, k = 48, 192
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    qw = fk.gemm.quantize_w8a8(w, act)
    if static:
        qw = fk.gemm.replace(qw, act_scale=torch.tensor([0.08]))  # |x| < 10: no clipping
    bias = torch.randn(n).to(dtype)
    for m in MS:
        x = (torch.randn(m, k) * 2).to(dtype)
        ref = w8a8_reference(x, qw, bias)
        out = linear(x, qw, bias)
        assert not out.isnan().any()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (m, err)
        # And close to the unquantized product (W8A8 keeps ~2-3 significant digits).
        full = x.double() @ w.double().t() + bias.double()
        assert ((out.double() - full).norm() / full.norm()).item() < (0.02 if act == "int8" else 0.06)


def test_fp8_checkpoint_loader():
    n, k = 32, 64
    w = torch.randn(n, k)
    per_tensor = (w.abs().max() / 448).reshape(1)
    q = (w / per_tensor).to(torch.float8_e4m3fn)
    qw = ck.from_compressed_tensors_fp8(q, per_tensor)
    assert torch.equal(dequantize(qw, torch.float32), q.float() * per_tensor)
    lin = fk.nn.QuantLinear(qw)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    assert torch.equal(lin(x), linear(x, qw))
    with pytest.raises(TypeError, match="weight must be float8_e4m3fn"):
        ck.from_compressed_tensors_fp8(w, per_tensor)
    for fmt in ("w8a16", "w8a8_int8", "w8a8_fp8"):
        m = fk.nn.QuantLinear.from_linear(torch.nn.Linear(k, n), fmt)
        assert m(torch.randn(2, k)).shape == (2, n)


@pytest.mark.parametrize("kind", ["sym", "zeros", "int8", "mins", "act_order", "w8a8_int8", "w8a8_fp8"])
def test_dequantized_path_agrees_with_the_kernel(kind):
    """The CUDA path (until the fused kernels land) dequantizes with torch ops and does one
    matmul; run on the CPU it must agree with the rayon kernel."""
    n, k = 64, 256
    if kind.startswith("w8a8"):
        qw = fk.gemm.quantize_w8a8(torch.randn(n, k) * 0.05, kind.removeprefix("w8a8_"))
    else:
        qw = weights(kind, n, k, seed=11)
    bias = torch.randn(n)
    for m in (1, 5, 32):
        x = torch.randn(m, k)
        got = fk.gemm._linear_dequantized(x, qw, bias)
        want = linear(x, qw, bias)
        assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["sym", "zeros", "mins", "act_order", "int8"])
def test_linear_on_cuda(kind):
    qw = weights(kind, 96, 256, seed=12)
    x = torch.randn(7, 256).to(torch.bfloat16)
    want = linear(x, qw)  # the CPU kernel
    got = linear(x.cuda(), qw.to("cuda")).cpu()
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
