"""The quantized KV cache (ferrokernels.kv_quant): the bit layout, the quantizers' error bounds,
KIVI's group/ring bookkeeping under any chunking of appends, and decode over the cache against
float64 attention over the dequantized keys and values (which is what the kernel must compute
exactly), for every format, on the CPU and the GPU."""

import pytest
import torch

import ferrokernels as fk
from ferrokernels import kv_quant as kq
from conftest import devices
from test_decode import check

FORMATS_FOR = {"cpu": kq.FORMATS, "cuda": kq.FORMATS}


def rand(g, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# --- layout and quantizers ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4])
def test_pack_layout_matches_the_documented_bits(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = kq.pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(kq.unpack_codes(packed, bits, 64), codes)
    # Channel 2k + h of a chunk sits at bit h * 4 * bits + k * bits of the chunk's little-endian word.
    chunk = codes[1, 2, 8:16].tolist()
    word = sum(int(b) << (8 * i) for i, b in enumerate(packed[1, 2, bits:2 * bits].tolist()))
    for c in range(8):
        k, h = divmod(c, 2)
        assert (word >> (h * 4 * bits + k * bits)) & ((1 << bits) - 1) == chunk[c]


@pytest.mark.parametrize("format", ["int8", "fp8"])
def test_token_quantizer_error_bound(format):
    g = torch.Generator().manual_seed(1)
    x = rand(g, 4, 50, 128) * torch.rand(4, 50, 1, generator=g) * 10
    x[0, 0] = 0  # an all-zero token
    codes, scale = kq.quantize_tokens(x, format)
    back = kq.dequantize_tokens(codes, scale, format)
    amax = x.abs().amax(-1, keepdim=True)
    # int8: half a step of amax / 127; e4m3: 3 mantissa bits, 2^-4 relative (plus subnormals).
    bound = amax / 254 + 1e-6 if format == "int8" else x.abs() / 16 + amax / 448 * 2**-9 + 1e-6
    assert ((back - x).abs() <= bound * 1.001).all()
    assert (back[0, 0] == 0).all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kivi_quantizers_error_bound(bits, group):
    g = torch.Generator().manual_seed(bits * group)
    k = rand(g, 2, 3, 256, 128) + rand(g, 1, 1, 1, 128) * 5  # outlier channels
    codes, meta = kq.quantize_keys_per_channel(k, bits, group)
    assert meta.shape == (2, 3, 256 // group, 2, 128) and meta.dtype == torch.float16
    back = kq.dequantize_keys_per_channel(codes, meta, group)
    step = meta[..., 0:1, :].float().repeat_interleave(group, -3).reshape(2, 3, 256, 128)
    # Half a step, plus the float16 rounding of the stored min (codes clamp at its edge).
    assert ((back - k).abs() <= step * 0.51 + k.abs().amax() * 2**-10).all()
    v = rand(g, 2, 3, 256, 128)
    codes, meta = kq.quantize_values_per_token(v, bits, group)
    back = kq.dequantize_values_per_token(codes, meta, group)
    step = meta[..., 0:1].float().repeat_interleave(group, -1).reshape(2, 3, 256, 128)
    assert ((back - v).abs() <= step * 0.51 + v.abs().amax() * 2**-10).all()


# --- the cache's bookkeeping --------------------------------------------------------------------

def fill(cache, k, v, chunks, counts_fn=None):
    """Appends k, v (batch, n, hk, d) in chunks of the given sizes."""
    at = 0
    for c in chunks:
        cache.append(k[:, at:at + c], v[:, at:at + c], counts_fn(at, c) if counts_fn else None)
        at += c


@pytest.mark.parametrize("format", kq.FORMATS)
def test_chunking_does_not_change_the_cache(format):
    g = torch.Generator().manual_seed(5)
    k, v = rand(g, 2, 333, 2, 64), rand(g, 2, 333, 2, 64)
    a = kq.QuantizedKV(2, 2, 64, 400, format=format, group_size=32, residual=40, dtype=torch.float32)
    b = kq.QuantizedKV(2, 2, 64, 400, format=format, group_size=32, residual=40, dtype=torch.float32)
    fill(a, k, v, [333])
    fill(b, k, v, [100, 1, 1, 31, 7] + [1] * 193)
    assert a.lengths == b.lengths == [333, 333]
    if a.grouped:
        assert a.quant_lengths == [(333 - 40) // 32 * 32] * 2
    for x, y in zip(a.dequantize(1), b.dequantize(1)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("format", kq.FORMATS)
def test_dequantized_cache_is_close_and_the_ring_exact(format):
    g = torch.Generator().manual_seed(6)
    k, v = rand(g, 3, 200, 2, 128), rand(g, 3, 200, 2, 128)
    cache = kq.QuantizedKV(3, 2, 128, 256, format=format, group_size=64, residual=50, dtype=torch.float32)
    # Ragged: sequence b takes only some of each chunk's tokens (padding left out).
    counts = {0: [80, 1, 1], 1: [120, 1, 0], 2: [3, 0, 1]}
    kept = [[], [], []]
    at = 0
    for step, c in enumerate([150, 25, 25]):
        cnt = [counts[b][step] if counts[b][step] <= c else c for b in range(3)]
        cache.append(k[:, at:at + c], v[:, at:at + c], cnt)
        for b in range(3):
            kept[b].extend(range(at, at + cnt[b]))
        at += c
    for b in range(3):
        kb, vb = cache.dequantize(b)
        ref_k, ref_v = k[b, kept[b]], v[b, kept[b]]
        assert kb.shape == ref_k.shape
        nq = cache.quant_lengths[b]
        tol = {"int8": 0.02, "fp8": 0.1, "int4": 0.35, "int2": 1.6}[format]
        if nq:
            assert (kb[:nq] - ref_k[:nq]).abs().max() <= tol * ref_k.abs().max()
            assert (vb[:nq] - ref_v[:nq]).abs().max() <= tol * ref_v.abs().max()
        assert torch.equal(kb[nq:], ref_k[nq:]) and torch.equal(vb[nq:], ref_v[nq:])
        if cache.grouped:
            n = len(kept[b])
            assert nq == max(0, (n - 50) // 64 * 64)


def test_memory_is_a_fraction_of_the_dense_cache():
    dense = 2 * 4 * 8 * 8192 * 128 * 2  # bf16 K and V
    for format, most in [("int8", 0.53), ("fp8", 0.53), ("int4", 0.36), ("int2", 0.24)]:
        c = kq.QuantizedKV(4, 8, 128, 8192, format=format, group_size=32, residual=128, device="meta")
        assert c.nbytes() <= most * dense, (format, c.nbytes() / dense)


# --- decode ---------------------------------------------------------------------------------------

def dense_of(cache, device="cpu"):
    """(k, v, seqlens) float32 dense copies of what the cache holds, rounded as the kernel on
    `device` holds them (float16 values on the GPU)."""
    return cache.dense(as_kernel=device == "cuda")


# (batch, heads_q, heads_kv, head_dim, lengths, q_len, group, residual)
CASES = [
    (1, 8, 2, 128, [1000], 1, 32, 128),
    (3, 4, 4, 64, [77, 1, 130], 1, 64, 0),
    (2, 32, 8, 128, [300, 129], 2, 128, 40),
    (2, 6, 2, 256, [90, 200], 3, 32, 64),
    (1, 4, 1, 64, [5000], 1, 32, 128),
    # More than 16 rows (q_len x group): 8-bit codes take the shared-memory path, 2 and 4 row groups.
    (1, 16, 2, 128, [700], 3, 32, 0),
    (2, 32, 1, 64, [150, 333], 2, 64, 16),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES)
def test_decode_matches_float64_over_the_dequantized_cache(device, case):
    batch, hq, hk, d, lengths, q_len, group, residual = case
    for format in FORMATS_FOR[device]:
        for i, dtype in enumerate([torch.float16, torch.bfloat16]):
            g = torch.Generator().manual_seed(hash((tuple(lengths), format, i)) % 2**31)
            n = max(lengths)
            cache = kq.QuantizedKV(batch, hk, d, n + 7, format=format, group_size=group, residual=residual,
                                   dtype=dtype, device=device)
            k, v = rand(g, batch, n, hk, d, dtype=dtype, device=device), rand(g, batch, n, hk, d, dtype=dtype,
                                                                                    device=device)
            # A prefill of most tokens, then single tokens, sequences of their own lengths.
            first = max(0, n - 3)
            cache.append(k[:, :first], v[:, :first], [min(x, first) for x in lengths])
            for t in range(first, n):
                cache.append(k[:, t:t + 1], v[:, t:t + 1], [1 if x > t else 0 for x in lengths])
            assert cache.lengths == lengths
            q = rand(g, batch, q_len, hq, d, dtype=dtype, device=device)
            out = torch.full_like(q, float("nan"))
            res, lse = cache.decode(q, return_lse=True, out=out)
            assert res.data_ptr() == out.data_ptr()
            kd, vd, lens = dense_of(cache, device)
            check(q.cpu(), kd, vd, lens, out.cpu(), lse.cpu())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mods", [{"window": 40}, {"softcap": 5.0}, {"causal_q": False, "window": (10, 3)},
                                  {"scale": 0.3}])
def test_decode_options(device, mods):
    g = torch.Generator().manual_seed(9)
    for format in ("int8", "int4"):
        cache = kq.QuantizedKV(2, 2, 128, 256, format=format, group_size=32, residual=32, dtype=torch.bfloat16,
                               device=device)
        k, v = rand(g, 2, 250, 2, 128, dtype=torch.bfloat16, device=device), rand(g, 2, 250, 2, 128,
                                                                                    dtype=torch.bfloat16,
                                                                                    device=device)
        cache.append(k, v, [250, 170])
        q = rand(g, 2, 4, 8, 128, dtype=torch.bfloat16, device=device)
        out, lse = cache.decode(q, return_lse=True, **mods)
        kd, vd, lens = dense_of(cache, device)
        check(q.cpu(), kd, vd, lens, out.cpu(), lse.cpu(), **mods)


@pytest.mark.cuda
@pytest.mark.parametrize("format", kq.FORMATS)
def test_quantized_decode_is_close_to_the_full_precision_decode(format):
    """The whole path's error against bf16 decode on the original cache, with real tolerances
    per format (random Gaussian K/V, so no outlier channels help KIVI here)."""
    g = torch.Generator().manual_seed(11)
    b, n, hq, hk, d = 2, 3000, 32, 8, 128
    k, v = rand(g, b, n, hk, d, dtype=torch.bfloat16, device="cuda"), rand(g, b, n, hk, d, dtype=torch.bfloat16,
                                                                           device="cuda")
    q = rand(g, b, 1, hq, d, dtype=torch.bfloat16, device="cuda")
    cache = kq.QuantizedKV(b, hk, d, n, format=format, group_size=32, residual=128, dtype=torch.bfloat16,
                           device="cuda")
    cache.append(k, v)
    ours = cache.decode(q).float()
    full = fk.decode_attention(q, k, v, torch.full((b,), n, dtype=torch.int32, device="cuda")).float()
    err = ((ours - full).norm() / full.norm()).item()
    assert err < {"int8": 0.02, "fp8": 0.08, "int4": 0.3, "int2": 0.9}[format], err


# --- bad inputs -----------------------------------------------------------------------------------

def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="format"):
        kq.QuantizedKV(1, 1, 64, 64, format="int3")
    with pytest.raises(ValueError, match="group_size"):
        kq.QuantizedKV(1, 1, 64, 64, format="int4", group_size=128)
    with pytest.raises(fk.ShapeError, match="head_dim"):
        kq.QuantizedKV(1, 1, 80, 64)
    c = kq.QuantizedKV(2, 2, 64, 64, format="int4", group_size=32, residual=16)
    with pytest.raises(fk.ShapeError, match="k and v"):
        c.append(torch.zeros(2, 3, 1, 64), torch.zeros(2, 3, 1, 64))
    with pytest.raises(ValueError, match="capacity"):
        c.append(torch.zeros(2, 65, 2, 64), torch.zeros(2, 65, 2, 64))
    with pytest.raises(ValueError, match="counts"):
        c.append(torch.zeros(2, 3, 2, 64), torch.zeros(2, 3, 2, 64), [4, 1])
    with pytest.raises(fk.ShapeError, match="head_dim"):
        c.decode(torch.zeros(2, 1, 2, 128))


@pytest.mark.cuda
def test_bad_storage_raises_on_the_gpu():
    c = kq.QuantizedKV(1, 2, 64, 64, format="int8", device="cuda", dtype=torch.float16)
    c.append(torch.randn(1, 10, 2, 64), torch.randn(1, 10, 2, 64))
    q = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    args = (q, c.k_codes, c.v_codes, c.k_meta, c.v_meta, c.seqlens, c.quant_lens, out)
    with pytest.raises(fk.ShapeError, match="v_codes"):
        fk._native.kv_quant_decode_fwd(q, c.k_codes, c.v_codes[:, :, :, :32], *args[3:], format="int8")
    with pytest.raises(fk.DTypeError, match="k_meta"):
        fk._native.kv_quant_decode_fwd(*args[:3], c.k_meta.half(), *args[4:], format="int8")
    with pytest.raises(ValueError, match="format"):
        fk._native.kv_quant_decode_fwd(*args, format="int5")
    c4 = kq.QuantizedKV(1, 2, 64, 64, format="int4", group_size=32, residual=0, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="group"):
        fk._native.kv_quant_decode_fwd(q, c4.k_codes, c4.v_codes, c4.k_meta, c4.v_meta, c4.seqlens, c4.quant_lens,
                                       out, format="int4", group=48)
    with pytest.raises(ValueError, match="quant_lens"):
        fk._native.kv_quant_check_lengths(torch.tensor([10], dtype=torch.int32),
                                          torch.tensor([11], dtype=torch.int32), 64, 0)
