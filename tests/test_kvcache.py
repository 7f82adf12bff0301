"""PagedKVCache: page bookkeeping (extend, fork with copy-on-write, free, out of pages) and a
generation loop on it that matches attention over the whole sequences."""

import pytest
import torch

import ferrokernels as fk
from conftest import devices


def test_pool_bookkeeping():
    cache = fk.PagedKVCache(2, num_pages=6, page_size=4, heads_kv=1, head_dim=8, dtype=torch.float32)
    a = cache.allocate()
    table, before = cache.extend(a, 6)
    assert before.tolist() == [0] and table.tolist() == [[0, 1]]
    b = cache.fork(a)
    assert cache.lengths([a, b]) == [6, 6] and cache.free_pages == 4
    cache.k[:, 1] = 7.0
    # b writes into the shared, half-full page 1: it gets a copy of it first.
    table, before = cache.extend(b, 1)
    assert table.tolist() == [[0, 2]] and before.tolist() == [6]
    assert (cache.k[:, 2] == 7.0).all()
    cache.free(a)
    assert cache.free_pages == 4  # page 0 is still b's; page 1 went back
    with pytest.raises(ValueError, match="out of pages: 5 needed, 4 free of 6"):
        cache.extend(b, 20)
    assert cache.lengths(b) == [7]  # unchanged by the failed extend
    with pytest.raises(ValueError, match="sequence 0 is not allocated"):
        cache.extend(a, 1)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        fk.PagedKVCache(1, 4, 12, 1, 8)
    assert cache.block_table([b], width=5).tolist() == [[0, 2, -1, -1, -1]]


@pytest.mark.parametrize("device", devices())
def test_generation_on_paged_cache_matches_attention(device):
    """Three sequences of different prompt lengths, one forked mid-way: prefill through
    append_kv, then token-by-token decode; every step's output equals causal attention over
    that sequence's tokens so far."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    hq, hk, d, steps = 4, 2, 64, 5
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    prompts = [9, 20, 3]
    total = [p + steps for p in prompts]
    q = [mk(1, n, hq, d) for n in total]
    k = [mk(1, n, hk, d) for n in total]
    v = [mk(1, n, hk, d) for n in total]
    cache = fk.PagedKVCache(1, num_pages=40, page_size=4, heads_kv=hk, head_dim=d, dtype=dtype, device=device)
    seqs = [cache.allocate() for _ in prompts]
    for s, n in zip(seqs, prompts):
        table, before = cache.extend(s, n)
        fk.append_kv(k[s][:, :n], v[s][:, :n], *cache.layer(0), before, table)
    # Sequence 3 forks sequence 0 after its prompt (9 tokens: a shared, partly filled third
    # page that the first extend must copy) and continues with sequence 0's own tokens.
    fork = cache.fork(seqs[0])
    seqs.append(fork)
    q.append(q[0]), k.append(k[0]), v.append(v[0]), prompts.append(prompts[0])
    for t in range(steps):
        table, before = cache.extend(seqs, 1)
        pos = [p + t for p in prompts]
        kn = torch.cat([k[i][:, pos[i]:pos[i] + 1] for i in range(len(seqs))])
        vn = torch.cat([v[i][:, pos[i]:pos[i] + 1] for i in range(len(seqs))])
        qn = torch.cat([q[i][:, pos[i]:pos[i] + 1] for i in range(len(seqs))])
        fk.append_kv(kn, vn, *cache.layer(0), before, table)
        out = fk.decode_attention(qn, *cache.layer(0), before + 1, block_table=table)
        for i in range(len(seqs)):
            n = pos[i] + 1
            ref = fk.attention(q[i][:, :n], k[i][:, :n], v[i][:, :n], causal=True)[:, -1:]
            assert (out[i:i + 1].float() - ref.float()).abs().max().item() < 2e-3, (t, i)
    cache.free(seqs)
    assert cache.free_pages == 40


def test_virtual_cache_needs_cuda():
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        fk.VirtualKVCache(1, 2, 64, 1, 64, device="cpu")


@pytest.mark.cuda
def test_virtual_cache_maps_on_demand_and_decodes_like_a_tensor():
    layers, slots, max_len, hk, d = 2, 3, 20000, 2, 128
    cache = fk.VirtualKVCache(layers, slots, max_len, hk, d, dtype=torch.bfloat16)
    assert cache.mapped_bytes == 0
    assert cache.k[0].shape == (slots, max_len, hk, d) and cache.k[0].is_cuda
    a, b = cache.allocate(), cache.allocate()
    before = cache.extend([a, b], [5000, 100])
    assert before.tolist() == [0, 0, 0]
    # Rows of 512 bytes: 5000 rows need 2 chunks of 2 MiB per layer and K/V, 100 rows 1.
    assert cache.mapped_bytes == layers * 2 * (2 + 1) * (2 << 20)
    g = torch.Generator().manual_seed(0)
    kn = torch.randn(slots, 5000, hk, d, generator=g).cuda().bfloat16()
    vn = torch.randn(slots, 5000, hk, d, generator=g).cuda().bfloat16()
    q = torch.randn(slots, 1, 8, d, generator=g).cuda().bfloat16()
    lens = cache.seqlens()
    # Write each slot's prefix (append at position 0), then decode against the lengths.
    for layer in range(layers):
        k, v = cache.layer(layer)
        k[a, :5000], v[a, :5000] = kn[a], vn[a]
        k[b, :100], v[b, :100] = kn[b, :100], vn[b, :100]
        out = fk.decode_attention(q, k, v, lens)
        # The same data in ordinary tensors: bit-identical (same kernel, only the batch stride differs).
        ref_k = torch.zeros(slots, max_len, hk, d, device="cuda", dtype=torch.bfloat16)
        ref_v = torch.zeros_like(ref_k)
        ref_k[a, :5000], ref_v[a, :5000] = kn[a], vn[a]
        ref_k[b, :100], ref_v[b, :100] = kn[b, :100], vn[b, :100]
        assert torch.equal(out, fk.decode_attention(q, ref_k, ref_v, lens))
        assert (out[2] == 0).all()  # the free slot has length 0
    cache.free(a)
    assert cache.mapped_bytes == layers * 2 * 1 * (2 << 20)
    with pytest.raises(ValueError, match="max_len is 20000"):
        cache.extend(b, 20000)
