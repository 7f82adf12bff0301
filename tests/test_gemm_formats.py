"""Quantized-checkpoint loaders: each format's tensors are built here the way the tool writes
them (GPTQ / AWQ / compressed-tensors packers re-implemented from their formats; GGUF by the
gguf package itself), loaded into the canonical QuantizedWeight, and dequantized bit for bit
like the tool's own dequantization."""

import gguf  # the [test] extra installs it
import numpy as np
import pytest
import torch

import ferrokernels as fk
from ferrokernels import checkpoints as ck
from ferrokernels.gemm import dequantize, pack_int4, quantize, unpack_int4


def codes(shape, seed, hi=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, shape, generator=g, dtype=torch.int32)


def scales_like(shape, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 0.02 + 0.001).to(dtype)


def pack_rows(v):
    """int32 (R, C) codes -> (R/8, C): word i of a column holds rows 8i..8i+7, row 8i+j at 4j."""
    r, c = v.shape
    v = v.view(r // 8, 8, c)
    return sum((v[:, j] << (4 * j)) for j in range(8)).to(torch.int32)


def pack_cols(v, order=tuple(range(8))):
    """int32 (R, C) codes -> (R, C/8): field i of word j holds column 8j + order[i]."""
    r, c = v.shape
    v = v.view(r, c // 8, 8)
    return sum((v[:, :, order[i]] << (4 * i)) for i in range(8)).to(torch.int32)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k,n,group", [(256, 64, 128), (384, 96, 32), (128, 40 * 8, 128)])
def test_gptq(version, act_order, k, n, group):
    groups = k // group
    w, z = codes((k, n), 1), codes((groups, n), 2)
    s = scales_like((groups, n), 3)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(4))]
    stored_z = (z - 1) & 0xF if version == 1 else z
    qw = ck.from_gptq(pack_rows(w), pack_cols(stored_z), s, g_idx if act_order else None, version=version)
    # GPTQ's dequantization: scales[g_idx] * (w - zeros[g_idx]) in fp16, W^T of (K, N).
    ref = (s[g_idx.long()] * (w - z[g_idx.long()]).to(torch.float16)).t()
    assert torch.equal(dequantize(qw), ref)
    assert (qw.perm is not None) == (act_order and groups > 1)  # one group: nothing to regroup


def test_awq():
    k, n, group = 256, 128, 64
    w, z = codes((k, n), 5), codes((k // group, n), 6)
    s = scales_like((k // group, n), 7)
    qw = ck.from_awq(pack_cols(w, ck.AWQ_ORDER), pack_cols(z, ck.AWQ_ORDER), s)
    gi = torch.arange(k) // group
    ref = ((w - z[gi]).to(torch.float16) * s[gi]).t()
    assert torch.equal(dequantize(qw), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_point", [False, True])
def test_compressed_tensors(dtype, zero_point):
    n, k, group = 96, 256, 128
    value = codes((n, k), 8) - 8  # signed int4
    packed = pack_cols(value + 8)  # pack_to_int32: offset by 8, eight fields per int32 along K
    s = scales_like((n, k // group), 9, dtype)
    zp = (codes((n, k // group), 10) - 8).to(torch.int8) if zero_point else None
    qw = ck.from_compressed_tensors(packed, s, torch.tensor([n, k]), zp)
    gi = torch.arange(k) // group
    ref = (value - (zp.long()[:, gi] if zero_point else 0)).to(dtype) * s[:, gi]
    assert torch.equal(dequantize(qw), ref)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_match_gguf_py(qtype):
    n, k = 48, 320
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    blocks = gguf.quants.quantize(w, t)
    qw = ck.from_gguf(torch.from_numpy(blocks), qtype, (n, k))
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, t)).reshape(n, k)
    assert torch.equal(dequantize(qw, torch.float32), ref)


def test_read_gguf_file(tmp_path):
    n, k = 64, 256
    w = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    q41 = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_q.weight", q41, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("output_norm.weight", w[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = ck.read_gguf(path)
    ref = gguf.quants.dequantize(q41, gguf.GGMLQuantizationType.Q4_1).reshape(n, k)
    assert torch.equal(dequantize(tensors["blk.0.attn_q.weight"], torch.float32), torch.from_numpy(ref))
    assert torch.equal(tensors["output_norm.weight"], torch.from_numpy(w[0]))


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_round_to_nearest(bits, sym, group):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qw = quantize(w, bits=bits, group_size=group, sym=sym)
    back = dequantize(qw, torch.float32)
    g = 256 if group == -1 else group
    # Error per element within half a step of its group (plus the scale's own rounding to
    # bf16, which can stretch the extreme code by a few percent of a step).
    steps = qw.scales.to(torch.float32).repeat_interleave(g, dim=1)
    err = (back - w.float()).abs()
    assert (err <= steps * 0.6).all(), (err / steps).max()
    assert (err / steps).mean() < 0.3
    if bits == 4:
        assert torch.equal(pack_int4(unpack_int4(qw.qweight)), qw.qweight)


def test_malformed_inputs():
    k, n = 256, 64
    w, z, s = pack_rows(codes((k, n), 1)), pack_cols(codes((2, n), 2)), scales_like((2, n), 3)
    with pytest.raises(TypeError, match="qweight must have dtype torch.int32, got torch.int64"):
        ck.from_gptq(w.long(), z, s)
    with pytest.raises(ValueError, match=r"qzeros must have shape \(2, 8\)"):
        ck.from_gptq(w, z[:, :4], s)
    with pytest.raises(ValueError, match="scales has 3 groups, which must divide in_features 256"):
        ck.from_gptq(w, pack_cols(codes((3, n), 2)), scales_like((3, n), 3))
    bad_g_idx = torch.zeros(k, dtype=torch.int32)
    with pytest.raises(ValueError, match="every group of g_idx must hold 128"):
        ck.from_gptq(w, z, s, bad_g_idx)
    with pytest.raises(NotImplementedError, match="GPTQ with 8-bit"):
        ck.from_gptq(w, z, s, bits=8)
    with pytest.raises(ValueError, match="needs 18432 bytes"):
        ck.from_gguf(torch.zeros(100, dtype=torch.uint8), "Q4_0", (64, 512))
    with pytest.raises(NotImplementedError, match="GGUF type Q5_K"):
        ck.from_gguf(torch.zeros(100, dtype=torch.uint8), "Q5_K", (64, 512))
    with pytest.raises(ValueError, match="group_size 100 must divide in_features 256"):
        quantize(torch.randn(8, 256), group_size=100)
    with pytest.raises(ValueError, match="weight_shape .* does not match"):
        ck.from_compressed_tensors(pack_cols(codes((8, 64), 1)), scales_like((8, 1), 1), (8, 60))
    assert fk.gemm.QuantizedWeight is not None


def test_hqq_fits_zero_points_better_than_min_max():
    """Heavy-tailed weights (a few outliers per group, as in real LLM layers): HQQ's zero-point
    search lowers the mean absolute reconstruction error below min/max RTN, and the result is
    an ordinary canonical weight (float minimums) that dequantizes consistently."""
    from ferrokernels.gemm import quantize_hqq

    g = torch.Generator().manual_seed(5)
    w = torch.randn(128, 512, generator=g) * 0.02
    w += (torch.rand(128, 512, generator=g) < 0.01) * torch.randn(128, 512, generator=g) * 0.2
    w = w.to(torch.bfloat16)
    rtn = quantize(w, bits=4, group_size=64, sym=False)
    hqq = quantize_hqq(w, group_size=64)
    assert hqq.zeros.is_floating_point()
    err = lambda qw: (dequantize(qw, torch.float32) - w.float()).abs().mean().item()  # noqa: E731
    assert err(hqq) < 0.97 * err(rtn), (err(hqq), err(rtn))
    lin = torch.nn.Linear(512, 128)
    assert fk.nn.QuantLinear.from_linear(lin, "w4a16", 64, method="hqq").zeros.is_floating_point()
    with pytest.raises(NotImplementedError, match="method 'hqq' is not supported for w8a16"):
        fk.nn.QuantLinear.from_linear(lin, "w8a16", method="hqq")
