"""The flash-attn feature set against float64 references with explicit masks: sliding window,
softcap, ALiBi, head_dim_v != head_dim, varlen (vs a per-sequence loop), sdpa attn_mask."""

import math

import pytest
import torch

import ferrokernels as fk
from conftest import ERR_FLOOR, check_against_reference, devices, dtypes_for, make, reference, rel_err

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)
WINDOW_SHAPES = [(2, 100, 100, 4, 2, 64), (1, 70, 300, 2, 1, 128), (1, 257, 129, 3, 3, 96)]
WINDOWS = [(16, 0), (0, 0), (40, 8), (-1, 5), (100, None), (3, 200)]


def poisoned(q, dv=None):
    shape = tuple(q.shape[:-1]) + (dv or q.shape[-1],)
    return torch.full(shape, float("nan"), dtype=q.dtype, device=q.device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_sliding_window(device, causal, window, shape):
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=hash((shape, window, causal, i)) % 2**31)
        out = poisoned(q)
        _, lse = fk.attention(q, k, v, causal=causal, window=window, return_lse=True, out=out)
        check_against_reference(q, k, v, out, lse, causal, window=window)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("softcap", [2.0, 30.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(device, softcap, causal):
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make((2, 150, 170, 4, 2, 128), dtype, device, seed=20 + i)
        q = q * 3  # scores large enough for the cap to bite
        out = poisoned(q)
        _, lse = fk.attention(q, k, v, causal=causal, softcap=softcap, return_lse=True, out=out)
        check_against_reference(q, k, v, out, lse, causal, softcap=softcap)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(device, per_batch, causal):
    b, h = 2, 4
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float32)
    if per_batch:
        slopes = torch.stack([slopes, slopes.flip(0) * 3])
    slopes = slopes.to(device)
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make((b, 90, 200, h, 2, 64), dtype, device, seed=30 + i)
        out = poisoned(q)
        _, lse = fk.attention(q, k, v, causal=causal, alibi_slopes=slopes, return_lse=True, out=out)
        check_against_reference(q, k, v, out, lse, causal, alibi=slopes)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dims", [(192, 128), (64, 128), (128, 64), (40, 72), (256, 16)])
def test_head_dim_v(device, dims):
    d, dv = dims
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make((2, 130, 97, 4, 1, d), dtype, device, seed=40 + i, dv=dv)
        out = poisoned(q, dv)
        res, lse = fk.attention(q, k, v, causal=True, return_lse=True, out=out)
        assert res.shape == (2, 130, 4, dv)
        check_against_reference(q, k, v, out, lse, True)


@pytest.mark.parametrize("device", devices())
def test_everything_at_once(device):
    """Window + softcap + ALiBi + GQA + head_dim_v + custom scale + strided q."""
    slopes = torch.rand(6, device=device) * 0.2
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make((2, 200, 260, 6, 2, 96), dtype, device, seed=50 + i, dv=64)
        q = torch.cat([q, q], dim=-1)[..., :96]  # a strided view of a wider tensor
        out = poisoned(q, 64)
        mods = dict(scale=0.2, window=(50, 10), softcap=8.0, alibi=slopes)
        _, lse = fk.attention(q, k, v, causal=False, scale=0.2, window=(50, 10), softcap=8.0,
                              alibi_slopes=slopes, return_lse=True, out=out)
        check_against_reference(q, k, v, out, lse, False, **mods)


def random_lengths(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def cu_of(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("same_lengths", [False, True])
def test_varlen_matches_per_sequence_loop(device, causal, same_lengths):
    """Each packed sequence equals attention on that sequence alone (and float64)."""
    hq, hk, d = 4, 2, 64
    lens_q = random_lengths(7, 0, 150, seed=1) + [1, 64]
    lens_k = lens_q if same_lengths else random_lengths(9, 1, 200, seed=2)
    for i, dtype in enumerate(dtypes_for(device)):
        g = torch.Generator().manual_seed(60 + i)
        q = torch.randn(sum(lens_q) + 3, hq, d, generator=g).to(device, dtype)  # 3 rows past the end
        k = torch.randn(sum(lens_k), hk, d, generator=g).to(device, dtype)
        v = torch.randn(sum(lens_k), hk, d, generator=g).to(device, dtype)
        cu_q, cu_k = cu_of(lens_q, device), cu_of(lens_k, device)
        out = poisoned(q)
        _, lse = fk.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                     window=(30, -1), return_lse=True, out=out)
        assert lse.shape == (hq, q.shape[0])
        assert out[-3:].isnan().all(), "rows past cu_seqlens_q[-1] must not be written"
        for b in range(len(lens_q)):
            qs, ks = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
            if lens_q[b] == 0:
                continue
            one, one_lse = fk.attention(q[None, qs], k[None, ks], v[None, ks], causal=causal, window=(30, -1),
                                        return_lse=True)
            assert torch.equal(out[qs], one[0]), f"sequence {b} differs from its own call"
            assert torch.equal(lse[:, qs], one_lse[0])
            if lens_k[b] > 0:
                check_against_reference(q[None, qs], k[None, ks], v[None, ks], out[None, qs], lse[None, :, qs],
                                        causal, window=(30, -1))


@pytest.mark.parametrize("device", devices())
def test_varlen_options(device):
    """Softcap, ALiBi, GQA and head_dim_v through the varlen entry point."""
    lens = [33, 100, 7]
    q = torch.randn(sum(lens), 4, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(sum(lens), 1, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn(sum(lens), 1, 64, device=device, dtype=torch.bfloat16)
    cu = cu_of(lens, device)
    # ALiBi per batch: sequence b uses row b of the slopes.
    slopes = torch.rand(3, 4, device=device)
    out = fk.attention_varlen(q, k, v, cu, cu, 100, 100, causal=True, softcap=5.0, alibi_slopes=slopes)
    for b in range(3):
        s = slice(cu[b].item(), cu[b + 1].item())
        ref, _ = reference(q[None, s], k[None, s], v[None, s], True, softcap=5.0, alibi=slopes[b:b + 1])
        assert rel_err(out[s], ref[0]) < ERR_FLOOR[torch.bfloat16]


def sdpa_ref(q, k, v, mask, causal=False):
    """float64 reference in sdpa layout (top-left causal)."""
    mask4 = mask
    while mask4 is not None and mask4.ndim < 4:
        mask4 = mask4[None]
    out, _ = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, offset=0,
                       mask=None if mask4 is None else mask4.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return out.transpose(1, 2)


def tiled_bool_mask(b, h, nq, nk, seed, device):
    """Whole 64x64 tiles empty, whole tiles full, and tiles with random holes: every tile class."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, 3, (b, h, math.ceil(nq / 64), math.ceil(nk / 64)), generator=g)
    cls = tiles.repeat_interleave(64, 2).repeat_interleave(64, 3)[:, :, :nq, :nk]
    noise = torch.rand(b, h, nq, nk, generator=g) < 0.7
    mask = (cls == 2) | ((cls == 1) & noise)
    mask[..., 0] = True  # no row without keys: torch's NaN rows are not what we compare
    return mask.to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["bool_tiles", "bool_padding", "bool_2d", "add_f32", "add_same", "add_neginf", "key_padding"])
def test_sdpa_masks(device, kind):
    b, h, hk, nq, nk, d = 2, 4, 2, 200, 330, 64
    for i, dtype in enumerate(dtypes_for(device)):
        g = torch.Generator().manual_seed(70 + i)
        q = torch.randn(b, h, nq, d, generator=g).to(device, dtype)
        k = torch.randn(b, hk, nk, d, generator=g).to(device, dtype)
        v = torch.randn(b, hk, nk, d, generator=g).to(device, dtype)
        if kind == "bool_tiles":
            mask = tiled_bool_mask(b, h, nq, nk, 5 + i, device)
        elif kind == "bool_padding":  # HF style: (b, 1, nq, nk), causal with left padding
            lens = torch.tensor([nk, nk - 90])
            j = torch.arange(nk)
            pad = j[None, :] >= (nk - lens)[:, None]
            causal = torch.arange(nq)[:, None] + (nk - nq) >= j[None, :]
            mask = (pad[:, None, None, :] & causal[None, None]).to(device)
        elif kind == "bool_2d":
            mask = (torch.rand(nq, nk, generator=g) < 0.5).to(device)
            mask[:, 3] = True
        elif kind == "key_padding":
            mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)
            mask[1, ..., 200:] = False
            mask = mask.to(device)
        else:
            mdt = torch.float32 if kind != "add_same" else dtype
            mask = (torch.randn(b, 1, nq, nk, generator=g) * 2).to(device, mdt)
            if kind == "add_neginf":
                mask = mask.masked_fill(tiled_bool_mask(b, 1, nq, nk, 9, device).logical_not(), float("-inf"))
                mask[:, :, :, :128] = 0  # whole zero tiles: the unread class
        o = fk.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
        ref = sdpa_ref(q, k, v, mask)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask).nan_to_num(0.0)
        budget = max(2 * rel_err(want, ref), ERR_FLOOR[dtype])
        assert not o.isnan().any()
        assert rel_err(o, ref) <= budget, f"{kind} {dtype}: {rel_err(o, ref):.2e} > {budget:.2e}"


@pytest.mark.parametrize("device", devices())
def test_sdpa_mask_with_causal_and_fully_masked_rows(device):
    """is_causal and a mask combine; rows that see no key come back as 0."""
    q, k, v = (torch.randn(1, 2, 80, 32, device=device, dtype=torch.float16) for _ in range(3))
    mask = torch.ones(80, 80, dtype=torch.bool, device=device)
    mask[10] = False
    o = fk.sdpa(q, k, v, attn_mask=mask, is_causal=True)
    assert (o[:, :, 10] == 0).all()
    ref = sdpa_ref(q, k, v, mask, causal=True)
    assert rel_err(o, ref) < ERR_FLOOR[torch.float16]


def test_torch_compile_of_the_feature_ops():
    def f(q, k, v, cu, mask):
        a = fk.attention(q, k, v, causal=True, window=(4, None), softcap=3.0)
        b = fk.attention_varlen(q[0], k[0], v[0], cu, cu, 16, 16)
        c = fk.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
        return a + b[None] + c

    q, k, v = make((1, 16, 16, 2, 2, 32), torch.float32, "cpu", seed=2)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    mask = torch.rand(16, 16) < 0.8
    mask[:, 0] = True
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(q, k, v, cu, mask), f(q, k, v, cu, mask)) < 1e-6
