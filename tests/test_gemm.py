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


def scales_of(xf, qmax):
    """Per-token scales as the kernels form them: max|x| / qmax by true division (torch would
    multiply by the reciprocal of a Python-number divisor on CUDA)."""
    amax = xf.abs().amax(-1, keepdim=True)
    return (amax / torch.full_like(amax, qmax)).clamp_min(1e-12)


def w8a8_codes(x, qw):
    """The reference pre-pass: the codes (int8 or float8_e4m3fn, (M, K)) and per-token (or
    static) scales (M,), formed in float32 as the kernels form them."""
    qmax = 127.0 if qw.act == "int8" else 448.0
    xf = x.float()
    s = qw.act_scale.reshape(1, 1).expand(x.shape[0], 1) if qw.act_scale is not None else scales_of(xf, qmax)
    t = xf * (torch.ones_like(s) / s)
    q = torch.round(t).clamp(-127, 127).to(torch.int8) if qw.act == "int8" else t.clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s.reshape(-1)


def w8a8_reference(x, qw, bias):
    """Per-token activation quantization and the product, simulated in float64 from the
    quantized values (exact products; the kernel's f32/i32 sums differ only in order)."""
    q, s = w8a8_codes(x, qw)
    w = qw.qweight.float().double()
    return (q.float().double() @ w.t()) * s.double()[:, None] * qw.scales.double().t() + (
        0 if bias is None else bias.double())


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
    """The CUDA fallback (shapes the kernels do not tile, W8A8 off Hopper) dequantizes with torch
    ops and does one matmul; run on the CPU it must agree with the rayon kernel."""
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


KERNEL_KINDS = ["sym", "zeros", "mins", "act_order", "int8", "g128", "channel4"]


def kernel_weights(kind, n, k, seed):
    if kind == "g128":
        return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05, group_size=128,
                        sym=False)
    if kind == "channel4":
        return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05, group_size=-1)
    return weights(kind, n, k, seed)


def kernel_view_of_packed(pw, n, k, dtype):
    """W (N, K) float32 as kernels/gemm.cu computes it from the packed tensors, written from the
    kernel's side: lane l = 4g + t, 16-channel step i, fragment register p, half e holds row
    g + 8 (p % 2), channel 16 i + 8 (p // 2) + 2 t + e of its 16 x 64 tile."""
    nt, kt = n // 16, k // 64
    lane = torch.arange(32).view(32, 1, 1, 1)
    i, p, e = torch.arange(4).view(1, 4, 1, 1), torch.arange(4).view(1, 1, 4, 1), torch.arange(2).view(1, 1, 1, 2)
    if pw.bits == 4:
        words = pw.w.view(nt, kt, 32, 4, 4).to(torch.int64)
        words = (words * (256 ** torch.arange(4))).sum(-1)  # little-endian u32 per step
        word = words[:, :, lane, i]
        codes = (word >> (4 * p + 16 * e)) & 0xF
    else:
        b = pw.w.view(nt, kt, 32, 4, 2, 4).to(torch.int64)  # [lane][step][word][byte]
        codes = b[:, :, lane, i, p // 2, 2 * (p % 2) + e] - 128
    row = (lane // 4) + 8 * (p % 2)
    col = 16 * i + 8 * (p // 2) + 2 * (lane % 4) + e
    rows = (torch.arange(nt).view(nt, 1, 1, 1, 1, 1) * 16 + row).expand(nt, kt, 32, 4, 4, 2)
    cols = (torch.arange(kt).view(1, kt, 1, 1, 1, 1) * 64 + col).expand(nt, kt, 32, 4, 4, 2)
    c = torch.zeros(n, k, dtype=torch.float32)
    c[rows.reshape(-1), cols.reshape(-1)] = codes.reshape(-1).float()
    grp = torch.arange(k) // pw.group_size
    meta = pw.meta.float()
    magic = fk.gemm._MAGIC[dtype]
    if pw.zeros == "sym":
        s = meta.t()[:, grp]
        return c * s if pw.bits == 8 else (c - 8) * s
    s, second = meta[..., 0].t()[:, grp], meta[..., 1].t()[:, grp]
    return (c + magic - second) * s if pw.zeros == "points" else c * s + second


@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_layout_is_what_the_kernel_reads(kind, dtype):
    """The repack for the CUDA kernel, decoded the way the kernel decodes it (runs on the CPU)."""
    n, k = 192, 640
    qw = kernel_weights(kind, n, k, seed=5)
    pw = fk.gemm.pack(qw, dtype)
    got = kernel_view_of_packed(pw, n, k, dtype)
    w = dequantize(qw, torch.float32)
    if qw.perm is not None:
        w = w[:, qw.perm]  # the kernel multiplies permuted activations
    want = w.to(dtype).float() if kind != "mins" else w
    # Scales (and minimums) are rounded to the activation dtype once, at pack time.
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((got - want).norm() / want.norm()).item() < tol
    assert (got - want).abs().max().item() <= tol * w.abs().max().item() * 2


def test_pack_rejects_what_the_kernel_cannot_tile():
    qw = weights("sym", 72, 320, seed=1)  # N = 72 is not a multiple of 64
    assert "multiples of 64" in fk.gemm.kernel_supports(qw, torch.float16)
    with pytest.raises(NotImplementedError, match="multiples of 64"):
        fk.gemm.pack(qw, torch.float16)
    assert fk.gemm.kernel_supports(fk.gemm.quantize_w8a8(torch.randn(64, 64)), torch.float16) is None
    assert "multiples of 64" in fk.gemm.kernel_supports(fk.gemm.quantize_w8a8(torch.randn(64, 96)), torch.float16)
    assert "float16 or bfloat16" in fk.gemm.kernel_supports(weights("sym", 64, 64, 1), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_dequantized_matmul(kind, dtype):
    n, k = 192, 640  # 10 / 5 groups of 64 / 128: odd counts
    qw = kernel_weights(kind, n, k, seed=13).to("cuda")
    w = dequantize(qw, torch.float32)
    bias = torch.randn(n, device="cuda").to(dtype)
    for m in (1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64, 65, 100, 257):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.float() @ w.t() + bias.float()
        out = linear(x, qw, bias)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.isfinite(out).all()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err <= {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (m, err)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_dequantize_kernel(kind, dtype):
    """The large-M path's dequantization kernel reproduces the packed weight exactly as the
    CPU decoding of the layout does."""
    n, k = 192, 640
    qw = kernel_weights(kind, n, k, seed=14)
    pw = fk.gemm.pack(qw.to("cuda"), dtype)
    got = fk.gemm.dequantize_packed(pw, n, k, dtype).cpu().float()
    want = kernel_view_of_packed(fk.gemm.pack(qw, dtype), n, k, dtype)
    # The kernel rounds (code - zero) * scale (+ min) once to dtype.
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_split_k_is_repeatable_and_graph_safe(bits):
    """A long K splits across CTAs; the tickets reset themselves, so calls repeat exactly and a
    captured graph replays."""
    n, k = 128, 8192
    qw = quantize(torch.randn(n, k) * 0.05, bits=bits, group_size=128 if bits == 4 else -1).to("cuda")
    splits, _, _ = fk._native.gemm_plan(0, 1, n, k, bits)
    assert splits > 1
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.float() @ dequantize(qw, torch.float32).t()
    first = linear(x, qw)
    assert ((first.float() - ref).norm() / ref.norm()).item() < 2e-3
    assert_repeatable_and_graph_safe(lambda: linear(x, qw), x, first)


def assert_repeatable_and_graph_safe(call, x, first):
    """Calls repeat `first` exactly, and a captured call replays on new inputs like a fresh one."""
    for _ in range(3):
        assert torch.equal(call(), first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, call())


@pytest.mark.cuda
def test_linear_names_a_device_mismatch():
    qw = quantize(torch.randn(128, 256) * 0.05, group_size=64)  # stays on the CPU
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(fk.DeviceError, match="quantized weight on cpu"):
        fk.gemm.linear(x, qw)


@pytest.mark.cuda
def test_cuda_packed_entry_rejects_bad_tensors():
    qw = quantize(torch.randn(128, 256) * 0.05, group_size=64).to("cuda")
    pw = fk.gemm.pack(qw, torch.float16)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    out = torch.empty(2, 128, device="cuda", dtype=torch.float16)
    call = fk._native.gemm_packed_fwd
    with pytest.raises(TypeError, match="packed scales"):
        call(x, pw.w, pw.meta.to(torch.bfloat16), out, group_size=64)
    with pytest.raises(ValueError, match="group_size 48"):
        call(x, pw.w, pw.meta, out, group_size=48)
    with pytest.raises(ValueError, match="packed weight"):
        call(x, pw.w[:, :2], pw.meta, out, group_size=64)
    with pytest.raises(ValueError, match="out"):
        call(x, pw.w, pw.meta, out[:, :64], group_size=64)
    with pytest.raises(ValueError, match="zeros must be"):
        call(x, pw.w, pw.meta, out, group_size=64, zeros="asym")
    call(x, pw.w, pw.meta, out, group_size=64)
    ref = x.float() @ dequantize(qw, torch.float32).t()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3


# --- W8A8 on Hopper (kernels/gemm_w8a8.cu) ------------------------------------------------------

def hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_hopper = pytest.mark.skipif(not hopper(), reason="the W8A8 kernel uses Hopper's wgmma")


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_cuda_w8a8_matches_simulated_quantization(act, dtype, static):
    # N = 192: a half-empty 128-row tile; K = 704: a half-empty 128-channel block.
    n, k = 192, 704
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(21)) * 0.05
    qw = fk.gemm.quantize_w8a8(w, act).to("cuda")
    if static:
        qw = fk.gemm.replace(qw, act_scale=torch.tensor([0.08], device="cuda"))  # |x| < 10: no clipping
    bias = torch.randn(n, device="cuda").to(dtype)
    torch.manual_seed(22)
    for m in (1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64, 65, 100, 129, 257, 300):
        x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
        ref = w8a8_reference(x, qw, bias)
        out = linear(x, qw, bias)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.isfinite(out).all()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (m, err)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_w8a8_prepass_codes_are_the_references(act, dtype):
    """The pre-pass computes the reference's scales and codes exactly (same operations, same
    rounding), into buffers poisoned beforehand; the GEMM's output overwrites a poisoned one."""
    n, k, m = 128, 1024, 37
    qw = fk.gemm.quantize_w8a8(torch.randn(n, k) * 0.05, act).to("cuda")
    pw = fk.gemm.pack(qw, dtype)
    x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
    x[5] = 0  # an all-zero row: scale clamps to 1e-12, codes 0
    x[7, 3] = 1e4 if dtype == torch.float16 else 1e30  # one outlier dominates its row
    xq = torch.full((m, k), 0xAA, dtype=torch.uint8, device="cuda")
    xs = torch.full((m,), float("nan"), device="cuda")
    out = torch.full((m, n), float("nan"), device="cuda").to(dtype)
    splits, floats, tickets = fk._native.gemm_plan(0, m, n, k, 8, act=act)
    assert splits > 1  # the reduction writes the output too
    with pytest.raises(ValueError, match="workspace is required"):
        fk._native.gemm_w8a8_fwd(x, pw.w, pw.meta, out, xq=xq, x_scale=xs, act=act)
    ws = torch.full((floats,), float("nan"), device="cuda")
    counters = torch.zeros(tickets, dtype=torch.int32, device="cuda")
    fk._native.gemm_w8a8_fwd(x, pw.w, pw.meta, out, xq=xq, x_scale=xs, workspace=ws, counters=counters, act=act)
    want_q, want_s = w8a8_codes(x, qw)
    assert torch.equal(xs, want_s)
    assert torch.equal(xq, want_q.view(torch.uint8))
    assert torch.isfinite(out).all()


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_cuda_w8a8_split_k_is_repeatable_and_graph_safe(act):
    n, k = 256, 8192
    qw = fk.gemm.quantize_w8a8(torch.randn(n, k) * 0.05, act).to("cuda")
    splits, _, _ = fk._native.gemm_plan(0, 1, n, k, 8, act=act)
    assert splits > 1
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    first = linear(x, qw)
    ref = w8a8_reference(x, qw, None)
    assert ((first.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert_repeatable_and_graph_safe(lambda: linear(x, qw), x, first)


@pytest.mark.cuda
@needs_hopper
def test_cuda_w8a8_entry_rejects_bad_tensors():
    n, k, m = 128, 256, 4
    qw = fk.gemm.quantize_w8a8(torch.randn(n, k) * 0.05, "fp8").to("cuda")
    pw = fk.gemm.pack(qw, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    xq = torch.empty(m, k, dtype=torch.uint8, device="cuda")
    xs = torch.empty(m, device="cuda")

    def call(**kw):
        a = dict(x=x, qweight=pw.w, w_scale=pw.meta, out=out, xq=xq, x_scale=xs, act="fp8")
        a.update(kw)
        fk._native.gemm_w8a8_fwd(a.pop("x"), a.pop("qweight"), a.pop("w_scale"), a.pop("out"), **a)

    with pytest.raises(TypeError, match="qweight"):
        call(act="int8")  # e4m3 codes passed as int8
    with pytest.raises(TypeError, match="w_scale"):
        call(w_scale=pw.meta.half())
    with pytest.raises(ValueError, match="xq"):
        call(xq=xq[:, :128])
    with pytest.raises(ValueError, match="x_scale"):
        call(x_scale=xs[:2])
    with pytest.raises(ValueError, match="multiples of 64"):
        call(qweight=pw.w[:, :96].contiguous(), x=x[:, :96].contiguous(), xq=xq[:, :96].contiguous())
    with pytest.raises(ValueError, match="act must be"):
        call(act="int4")
    with pytest.raises(ValueError, match="act_scale"):
        call(act_scale=torch.ones(2, device="cuda"))
    call()
    assert torch.isfinite(out).all()
