"""ferrokernels.decode_attention against float64 on fresh random caches: contiguous and paged
(page sizes 1 to 256, pages shuffled in the pool), ragged lengths including 0 and 1, q_len 1 to
16, GQA/MQA, windows, softcap, and the split-KV path on the GPU."""

import math

import pytest
import torch

import ferrokernels as fk
from conftest import ERR_FLOOR, devices, dtypes_for, rel_err


def make_cache(batch, capacity, heads_q, heads_kv, d, q_len, dtype, device, seed, lens=None):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q = mk(batch, q_len, heads_q, d)
    k, v = mk(batch, capacity, heads_kv, d), mk(batch, capacity, heads_kv, d)
    if lens is None:
        lens = torch.randint(q_len, capacity + 1, (batch,), generator=g).tolist()
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, seqlens


def to_paged(k, v, seqlens, page_size, seed):
    """The same cache as pages of `page_size` rows in a shuffled pool, plus a block table; the
    pool has spare pages and the table's unused entries point at -1."""
    batch, capacity, hk, d = k.shape
    max_pages = -(-capacity // page_size)
    num_pages = batch * max_pages + 3
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)[: batch * max_pages].view(batch, max_pages)
    pad = max_pages * page_size - capacity
    pool_k = torch.randn(num_pages, page_size, hk, d, generator=g).to(k.device, k.dtype)
    pool_v = torch.randn(num_pages, page_size, hk, d, generator=g).to(k.device, k.dtype)
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(batch, max_pages, page_size, hk, d)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(batch, max_pages, page_size, hk, d)
    pool_k[perm.reshape(-1)] = kp.reshape(-1, page_size, hk, d)
    pool_v[perm.reshape(-1)] = vp.reshape(-1, page_size, hk, d)
    table = perm.to(torch.int32).clone()
    for b, n in enumerate(seqlens.tolist()):
        table[b, -(-n // page_size):] = -1  # pages past the length are never read
    return pool_k, pool_v, table.to(k.device)


def visible(length, q_len, capacity, causal_q=True, window=None):
    """(q_len, capacity) bool: new token i sits at length - q_len + i."""
    left, right = (-1, -1) if window is None else ((window, -1) if isinstance(window, int) else window)
    pos = torch.arange(q_len)[:, None] + length - q_len
    key = torch.arange(capacity)[None]
    ok = (key < length).expand(q_len, capacity).clone()
    if causal_q:
        ok &= key <= pos
    elif right >= 0:
        ok &= key <= pos + right
    if left >= 0:
        ok &= key >= pos - left
    return ok


def reference(q, k, v, seqlens, causal_q=True, window=None, softcap=None, scale=None, dtype=torch.float64):
    """Dense per-sequence attention in `dtype`; (out, lse) with 0 / -inf for rows that see
    nothing. With a low-precision dtype this is torch's own error on the same inputs."""
    batch, q_len, hq, d = q.shape
    hk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs, lses = [], []
    for b in range(batch):
        qq = q[b].to(dtype).transpose(0, 1)
        kk = k[b].to(dtype).repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        vv = v[b].to(dtype).repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        s = (qq @ kk.transpose(-1, -2)).double() * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        mask = visible(int(seqlens[b]), q_len, k.shape[1], causal_q, window).to(q.device)
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs.append((p.to(dtype) @ vv).double().transpose(0, 1))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def check(q, k, v, seqlens, out, lse, **mods):
    ref, ref_lse = reference(q, k, v, seqlens, **mods)
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    err = rel_err(out, ref)
    torch_err = rel_err(reference(q, k, v, seqlens, dtype=q.dtype, **mods)[0], ref) if q.dtype != torch.float32 else 0
    budget = max(2 * torch_err, ERR_FLOOR[q.dtype])
    assert err <= budget, f"rel err {err:.2e} > budget {budget:.2e} (torch {torch_err:.2e})"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE -inf rows differ"
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 2e-3
    # Rows that see no key are exactly zero.
    assert (out[~finite.permute(0, 2, 1)] == 0).all()


# (batch, capacity, heads_q, heads_kv, head_dim, q_len)
CASES = [
    (3, 77, 4, 4, 64, 1),
    (2, 300, 8, 2, 128, 1),
    (4, 129, 6, 1, 64, 3),
    (1, 200, 16, 2, 128, 16),
    (2, 150, 2, 2, 256, 2),
    (2, 90, 4, 2, 80, 1),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("page_size", [None, 1, 16, 64, 256])
def test_decode_matches_float64(device, case, page_size):
    batch, cap, hq, hk, d, q_len = case
    for i, dtype in enumerate(dtypes_for(device)):
        seed = hash((case, page_size, i)) % 2**31
        q, k, v, seqlens = make_cache(batch, cap, hq, hk, d, q_len, dtype, device, seed)
        out = torch.full_like(q, float("nan"))
        kwargs = {}
        kc, vc = k, v
        if page_size is not None:
            kc, vc, table = to_paged(k, v, seqlens, page_size, seed)
            kwargs["block_table"] = table
        res, lse = fk.decode_attention(q, kc, vc, seqlens, return_lse=True, out=out, **kwargs)
        assert res.data_ptr() == out.data_ptr()
        check(q, k, v, seqlens, out, lse)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mods", [
    {"window": 40},
    {"window": (20, 0)},
    {"softcap": 5.0},
    {"causal_q": False},
    {"causal_q": False, "window": (10, 3)},
    {"scale": 0.3},
])
def test_decode_options(device, mods):
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v, seqlens = make_cache(2, 200, 8, 2, 128, 4, dtype, device, seed=77 + i)
        out = torch.full_like(q, float("nan"))
        _, lse = fk.decode_attention(q, k, v, seqlens, return_lse=True, out=out, **mods)
        check(q, k, v, seqlens, out, lse, **mods)


@pytest.mark.parametrize("device", devices())
def test_ragged_lengths_including_empty(device):
    """Lengths 0 and 1: an empty cache gives 0 and LSE -inf; with q_len 2 a length of 1
    leaves the first new token nothing to see."""
    for q_len in (1, 2):
        for i, dtype in enumerate(dtypes_for(device)):
            lens = [0, 1, 5, 64, 65]
            q, k, v, seqlens = make_cache(5, 70, 4, 2, 64, q_len, dtype, device, seed=5 + i, lens=lens)
            for page_size in (None, 4):
                kc, vc, kw = k, v, {}
                if page_size:
                    kc, vc, kw["block_table"] = to_paged(k, v, seqlens, page_size, seed=9)
                out = torch.full_like(q, float("nan"))
                _, lse = fk.decode_attention(q, kc, vc, seqlens, return_lse=True, out=out, **kw)
                check(q, k, v, seqlens, out, lse)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 20000, 32, 8), (2, 9000, 64, 8), (1, 5000, 8, 1), (3, 3000, 4, 4)])
def test_split_kv_long_sequences(shape):
    """Few sequences, long caches: the plan splits the keys over CTAs and merges by LSE."""
    batch, cap, hq, hk = shape
    splits, _ = fk._native.decode_plan(0, "bfloat16", batch, 1, hq, hk, 128, cap)
    assert splits > 1
    for i, dtype in enumerate([torch.bfloat16, torch.float16]):
        q, k, v, seqlens = make_cache(batch, cap, hq, hk, 128, 1, dtype, "cuda", seed=300 + i,
                                      lens=[cap - 17 * b for b in range(batch)])
        out = torch.full_like(q, float("nan"))
        _, lse = fk.decode_attention(q, k, v, seqlens, return_lse=True, out=out)
        check(q, k, v, seqlens, out, lse)
        # Paged (page 16) reads the same keys in the same order: bit-identical.
        kc, vc, table = to_paged(k, v, seqlens, 16, seed=1)
        paged = fk.decode_attention(q, kc, vc, seqlens, block_table=table)
        assert torch.equal(paged, out)


@pytest.mark.cuda
def test_decode_in_a_cuda_graph():
    q, k, v, seqlens = make_cache(1, 8000, 16, 4, 128, 1, torch.bfloat16, "cuda", seed=3, lens=[7000])
    out = torch.empty_like(q)
    fk.decode_attention(q, k, v, seqlens, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fk.decode_attention(q, k, v, seqlens, out=out)
    seqlens.fill_(6000)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(q, k, v, seqlens, out, fk.decode_attention(q, k, v, seqlens, return_lse=True)[1])


def qkv(device="cpu", dtype=torch.float16):
    q = torch.randn(2, 1, 4, 64, device=device, dtype=dtype)
    k = torch.randn(2, 32, 2, 64, device=device, dtype=dtype)
    return q, k, k.clone(), torch.tensor([32, 5], dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", devices())
def test_bad_inputs(device):
    q, k, v, sl = qkv(device)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] is 33; it must be in \[0, 32\]"):
        fk.decode_attention(q, k, v, torch.tensor([33, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] is -1"):
        fk.decode_attention(q, k, v, torch.tensor([3, -1], dtype=torch.int32, device=device))
    with pytest.raises(fk.DTypeError, match="cache_seqlens must have dtype int32, got int64"):
        fk.decode_attention(q, k, v, sl.long(), validate=False)
    with pytest.raises(fk.DTypeError, match="k_cache must have the same dtype as q|q and k_cache must have the same dtype"):
        fk.decode_attention(q, k.bfloat16(), v, sl)
    with pytest.raises(fk.ShapeError, match="multiple of k_cache's 3 heads"):
        fk.decode_attention(q, k[:, :, :1].expand(2, 32, 3, 64).contiguous(), v[:, :, :1].expand(2, 32, 3, 64).contiguous(), sl)
    with pytest.raises(fk.ShapeError, match="k_cache.*head_dim"):
        fk.decode_attention(q, k[..., :32].contiguous(), v[..., :32].contiguous(), sl)
    with pytest.raises(fk.ShapeError, match="q has q_len 0"):
        fk.decode_attention(q[:, :0], k, v, sl)
    pool = torch.randn(10, 16, 2, 64, device=device, dtype=q.dtype)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    fk.decode_attention(q, pool, pool, sl, block_table=table)  # fine
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] is 10, outside the cache's 10 pages"):
        fk.decode_attention(q, pool, pool, sl, block_table=torch.tensor([[0, 10], [2, 3]], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] is -1"):
        fk.decode_attention(q, pool, pool, sl, block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32, device=device))
    # Entries past a sequence's pages are never read, so they may be anything.
    fk.decode_attention(q, pool, pool, sl, block_table=torch.tensor([[0, 1], [2, -7]], dtype=torch.int32, device=device))
    bad_pool = torch.randn(10, 12, 2, 64, device=device, dtype=q.dtype)
    with pytest.raises(fk.ShapeError, match="page size 12 .* powers of two"):
        fk.decode_attention(q, bad_pool, bad_pool, torch.tensor([20, 5], dtype=torch.int32, device=device),
                            block_table=table, validate=False)
    with pytest.raises(ValueError, match="window left must be >= 0"):
        fk.decode_attention(q, k, v, sl, window=(-3, 0))
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        fk.decode_attention(q, k, v, sl, softcap=-1.0)


def test_torch_compile_fullgraph_of_a_decode_step():
    """append_kv (mutating the cache) and decode_attention are custom ops: no graph breaks."""
    q, k, v, seqlens = make_cache(2, 64, 4, 2, 64, 1, torch.float32, "cpu", seed=8, lens=[10, 30])
    kn, vn = torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)

    def step(q, kn, vn, k, v, lens):
        fk.append_kv(kn, vn, k, v, lens)
        return fk.decode_attention(q, k, v, lens + 1, window=(16, 0))

    kc, vc = k.clone(), v.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, kn, vn, k, v, seqlens)
    want = step(q, kn, vn, kc, vc, seqlens)
    assert torch.equal(k, kc) and torch.equal(v, vc)  # the cache was written in both runs
    assert (got - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("page_size", [16, 64])
def test_per_head_block_tables(device, page_size):
    """A (batch, heads_kv, max_pages) block table: each kv head reads its own pages (sparse
    decode's layout). Head h's tokens live on pages of its own in one pool; other heads' slots
    on those pages hold noise that must not be read."""
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v, seqlens = make_cache(2, 150, 6, 2, 64, 2, dtype, device, seed=70 + i)
        pools, tables = [], []
        for h in range(2):
            pk, pv, t = to_paged(k, v, seqlens, page_size, seed=80 + h)
            n = pk.shape[0]
            pk[:, :, 1 - h] = torch.randn_like(pk[:, :, 1 - h]) * 50  # the other head's slots: noise
            pools.append((pk, pv))
            tables.append(torch.where(t >= 0, t + h * n, -1))  # head h's pages: the h-th part of the pool
        pool_k = torch.cat([pools[0][0], pools[1][0]])
        pool_v = torch.cat([pools[0][1], pools[1][1]])
        table = torch.stack(tables, 1).to(torch.int32).contiguous()
        out = torch.full_like(q, float("nan"))
        _, lse = fk.decode_attention(q, pool_k, pool_v, seqlens, block_table=table, return_lse=True, out=out)
        check(q, k, v, seqlens, out, lse)
    with pytest.raises(ValueError, match="block_table"):
        fk.append_kv(k[:, :1], v[:, :1], pool_k, pool_v, seqlens, table)


def reference_leftpad(q, k, v, seqlens, starts, **mods):
    """`reference` per (sequence, kv head) over keys [start, len): window distances and the
    causal bound are unchanged by the shift, so the tail of the cache is a sequence of its own."""
    batch, q_len, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    out = torch.zeros(batch, q_len, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, hq, q_len), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(batch):
        n = int(seqlens[b])
        for h in range(hk):
            s = int(starts[b, h])
            qs = q[b:b + 1, :, h * g:(h + 1) * g]
            lens = torch.tensor([n - s])
            o, l = reference(qs, k[b:b + 1, s:n, h:h + 1], v[b:b + 1, s:n, h:h + 1], lens, **mods)
            out[b, :, h * g:(h + 1) * g], lse[b, h * g:(h + 1) * g] = o[0], l[0]
    return out, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("page_size", [None, 16, 64])
@pytest.mark.parametrize("mods", [{}, {"window": 40}])
def test_cache_leftpad(device, per_head, page_size, mods):
    """Keys before cache_leftpad (per sequence or per kv head) are not attended: they hold loud
    noise here, so reading one would show. Starts include 0, mid-tile ones and the whole length
    (a head with no keys: zeros and LSE -inf)."""
    cases = [(3, 200, 6, 2, 64, 1), (2, 300, 8, 4, 128, 3)]
    for c, (batch, cap, hq, hk, d, q_len) in enumerate(cases):
        for i, dtype in enumerate(dtypes_for(device)):
            q, k, v, seqlens = make_cache(batch, cap, hq, hk, d, q_len, dtype, device, seed=90 + 10 * c + i)
            g = torch.Generator().manual_seed(5 + c)
            lens = seqlens.tolist()
            starts = torch.stack([torch.randint(0, n + 1, (hk,), generator=g) for n in lens]).to(torch.int32)
            starts[0, 0], starts[-1, -1] = 0, lens[-1]
            if not per_head:
                starts = starts[:, :1].expand(batch, hk).contiguous()
            noisy_k = k.clone()
            for b in range(batch):
                for h in range(hk):
                    noisy_k[b, :int(starts[b, h]), h] *= 50
            kc, vc, kwargs = noisy_k, v, {}
            if page_size is not None:
                kc, vc, kwargs["block_table"] = to_paged(noisy_k, v, seqlens, page_size, seed=3)
            lp = (starts if per_head else starts[:, 0].contiguous()).to(device)
            out = torch.full_like(q, float("nan"))
            _, lse = fk.decode_attention(q, kc, vc, seqlens, cache_leftpad=lp, return_lse=True, out=out, **mods,
                                         **kwargs)
            ref, ref_lse = reference_leftpad(q, k, v, seqlens, starts, **mods)
            assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
            torch_err = 0 if dtype == torch.float32 else rel_err(
                reference_leftpad(q.to(dtype), k, v, seqlens, starts, dtype=dtype, **mods)[0], ref)
            err = rel_err(out, ref)
            assert err <= max(2 * torch_err, ERR_FLOOR[dtype]), (err, torch_err)
            finite = torch.isfinite(ref_lse)
            assert torch.equal(torch.isfinite(lse), finite)
            assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 2e-3
            assert (out[~finite.permute(0, 2, 1)] == 0).all()


@pytest.mark.cuda
def test_cache_leftpad_with_split_kv():
    """A long sequence splits its keys across CTAs; splits that lie wholly before a head's start
    are empty and must drop out of the merge."""
    q, k, v, seqlens = make_cache(2, 9000, 16, 4, 128, 1, torch.bfloat16, "cuda", seed=11, lens=[9000, 7000])
    starts = torch.tensor([[0, 4500, 8999, 9000], [100, 6990, 64, 3000]], dtype=torch.int32)
    noisy_k = k.clone()
    for b in range(2):
        for h in range(4):
            noisy_k[b, :int(starts[b, h]), h] *= 50
    out = torch.full_like(q, float("nan"))
    _, lse = fk.decode_attention(q, noisy_k, v, seqlens, cache_leftpad=starts.cuda(), return_lse=True, out=out)
    ref, ref_lse = reference_leftpad(q, k, v, seqlens, starts)
    assert rel_err(out, ref) <= max(2 * rel_err(reference_leftpad(q, k, v, seqlens, starts, dtype=q.dtype)[0], ref),
                                    ERR_FLOOR[q.dtype])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 2e-3


@pytest.mark.parametrize("device", devices())
def test_cache_leftpad_bad_inputs(device):
    q, k, v, sl = qkv(device)
    with pytest.raises(ValueError, match=r"cache_leftpad\[1\] is 6; it must be in \[0, cache_seqlens\[1\] = 5\]"):
        fk.decode_attention(q, k, v, sl, cache_leftpad=torch.tensor([0, 6], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"cache_leftpad\[0, 1\] is -2"):
        fk.decode_attention(q, k, v, sl, cache_leftpad=torch.tensor([[0, -2], [0, 0]], dtype=torch.int32,
                                                                    device=device))
    with pytest.raises(fk.DTypeError, match="cache_leftpad must have dtype int32"):
        fk.decode_attention(q, k, v, sl, cache_leftpad=torch.zeros(2, dtype=torch.int64, device=device),
                            validate=False)
    with pytest.raises(fk.ShapeError, match="cache_leftpad"):
        fk.decode_attention(q, k, v, sl, cache_leftpad=torch.zeros(2, 3, dtype=torch.int32, device=device),
                            validate=False)
    with pytest.raises(fk.ShapeError, match="cache_leftpad"):
        fk.decode_attention(q, k, v, sl, cache_leftpad=torch.zeros(3, dtype=torch.int32, device=device),
                            validate=False)
