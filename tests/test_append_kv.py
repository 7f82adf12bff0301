"""ferrokernels.append_kv: new tokens land at cache_seqlens[b] + t in contiguous and paged caches,
nothing else changes, and K is rotated exactly like a float64 rotary reference (NeoX halves and
GPT-J pairs, partial rotary_dim)."""

import pytest
import torch

import ferrokernels as fk
from conftest import devices, dtypes_for
from test_decode import to_paged


def rotate_ref(x, cos, sin, pos, interleaved):
    """float64 rotary of x (n, heads, d) at positions pos (n,)."""
    x = x.double().clone()
    rd = 2 * cos.shape[1]
    c, s = cos.double()[pos][:, None], sin.double()[pos][:, None]
    if interleaved:
        x0, x1 = x[..., 0:rd:2].clone(), x[..., 1:rd:2].clone()
        x[..., 0:rd:2], x[..., 1:rd:2] = x0 * c - x1 * s, x0 * s + x1 * c
    else:
        x0, x1 = x[..., : rd // 2].clone(), x[..., rd // 2: rd].clone()
        x[..., : rd // 2], x[..., rd // 2: rd] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


def rope_tables(positions, rd, dtype, device):
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("page_size", [None, 1, 8, 64])
@pytest.mark.parametrize("rotary", [None, ("neox", 64), ("gptj", 32), ("neox", 128)])
def test_append_matches_reference(device, page_size, rotary):
    batch, cap, hk, d, n_new = 3, 130, 2, 128, 3
    for i, dtype in enumerate(dtypes_for(device)):
        g = torch.Generator().manual_seed(i + 17)
        mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        k, v = mk(batch, cap, hk, d), mk(batch, cap, hk, d)
        lens = torch.tensor([0, 61, cap - n_new], dtype=torch.int32, device=device)
        kn, vn = mk(batch, n_new, hk, d), mk(batch, n_new, hk, d)
        kw = {}
        if rotary:
            style, rd = rotary
            cs_dtype = torch.float32 if style == "neox" else dtype
            kw["rotary"] = rope_tables(cap, rd, cs_dtype, device)
            kw["rotary_interleaved"] = style == "gptj"
        expect_k, expect_v = k.clone(), v.clone()
        for b in range(batch):
            pos = torch.arange(n_new, device=device) + int(lens[b])
            new_k = kn[b].double()
            if rotary:
                new_k = rotate_ref(kn[b], *kw["rotary"], pos, kw["rotary_interleaved"])
            expect_k[b, pos] = new_k.to(dtype)
            expect_v[b, pos] = vn[b]
        if page_size is None:
            fk.append_kv(kn, vn, k, v, lens, **kw)
            got_k, got_v = k, v
        else:
            pk, pv, table = to_paged(k, v, lens + n_new, page_size, seed=3)
            fk.append_kv(kn, vn, pk, pv, lens, table, **kw)
            # Back to the contiguous view through the table.
            got_k, got_v = k.clone(), v.clone()
            for b in range(batch):
                for pos in range(int(lens[b]) + n_new):
                    page = int(table[b, pos // page_size])
                    got_k[b, pos], got_v[b, pos] = pk[page, pos % page_size], pv[page, pos % page_size]
        assert torch.equal(got_v, expect_v)
        if rotary is None:
            assert torch.equal(got_k, expect_k)
        else:
            # Rotation in f32 vs float64 then rounding: at most one rounding step apart.
            diff = (got_k.double() - expect_k.double()).abs()
            tol = (expect_k.double().abs() * {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]) + 1e-6
            assert (diff <= tol).all(), f"max diff {diff.max().item()}"


@pytest.mark.parametrize("device", devices())
def test_append_then_decode_equals_attention(device):
    """Prefill a cache with append_kv, then decode the last token: the same as attention over the
    whole sequence's last row."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 50, h, 64, generator=g).to(device, dtype) for h in (8, 2, 2))
    kc = torch.zeros(2, 64, 2, 64, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    lens = torch.zeros(2, dtype=torch.int32, device=device)
    fk.append_kv(k[:, :49], v[:, :49], kc, vc, lens)
    lens += 49
    fk.append_kv(k[:, 49:], v[:, 49:], kc, vc, lens)
    lens += 1
    out = fk.decode_attention(q[:, 49:], kc, vc, lens)
    ref = fk.attention(q, k, v, causal=True)[:, 49:]
    assert (out.float() - ref.float()).abs().max().item() < 2e-3


@pytest.mark.parametrize("device", devices())
def test_append_bad_inputs(device):
    kc = torch.zeros(2, 16, 2, 64, device=device, dtype=torch.float16)
    kn = torch.randn(2, 3, 2, 64, device=device, dtype=torch.float16)
    lens = torch.tensor([13, 2], dtype=torch.int32, device=device)
    fk.append_kv(kn, kn, kc, kc.clone(), lens)  # fits exactly
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] is 14; it plus the 3 new tokens must be in \[0, 16\]"):
        fk.append_kv(kn, kn, kc, kc.clone(), lens + 1)
    pool = torch.zeros(4, 8, 2, 64, device=device, dtype=torch.float16)
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32, device=device)
    fk.append_kv(kn, kn, pool, pool.clone(), torch.tensor([5, 2], dtype=torch.int32, device=device), table)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] is -1"):
        fk.append_kv(kn, kn, pool, pool.clone(), torch.tensor([5, 6], dtype=torch.int32, device=device), table)
    with pytest.raises(fk.ShapeError, match="heads_kv"):
        fk.append_kv(kn[:, :, :1].contiguous(), kn[:, :, :1].contiguous(), kc, kc.clone(), lens)
    cos, sin = rope_tables(10, 32, torch.float32, device)
    with pytest.raises(ValueError, match="rotary cos/sin have 10 positions but the new tokens reach position 15"):
        fk.append_kv(kn, kn, kc, kc.clone(), lens, rotary=(cos, sin))
    cos, sin = rope_tables(20, 24, torch.float32, device)
    with pytest.raises(fk.ShapeError, match="rotary_dim 24; it must be a multiple of 16"):
        fk.append_kv(kn, kn, kc, kc.clone(), lens, rotary=(cos, sin))
    with pytest.raises(fk.DTypeError, match="k_cache must have the same dtype|same dtype"):
        fk.append_kv(kn, kn, kc.bfloat16(), kc.bfloat16(), lens)
