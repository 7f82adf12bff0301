"""Block-sparse attention against float64 attention under the dense mask the BlockMask means:
masks from mask_mods, from block matrices with and without full lists, shared and per-head,
blocks of 64 and 128, ragged ends, GQA, empty rows; the kernel's tile lists against the dense
mask; and bad input."""

import pytest
import torch

import ferrokernels as fk
import ferrokernels.sparse as sp
from conftest import check_against_reference, devices, dtypes_for, make

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)
SHAPES = [(2, 300, 300, 4, 2, 64), (1, 257, 500, 2, 1, 128), (1, 384, 384, 3, 3, 64), (2, 64, 129, 2, 2, 128)]


def causal(b, h, q, kv):
    return q >= kv


def window(size):
    return lambda b, h, q, kv: (q >= kv) & (q - kv < size)


def head_stride(b, h, q, kv):
    """A mask that differs per head and per batch entry: local keys plus every (h + 2)-th."""
    return ((q - kv).abs() < 40) | ((kv % (h + 2)) == b)


def random_blocks(b, h, nq, nk, bs, density, seed):
    g = torch.Generator().manual_seed(seed)
    qb, kb = -(-nq // bs), -(-nk // bs)
    blocks = torch.rand(b, h, qb, kb, generator=g) < density
    full = blocks & (torch.rand(b, h, qb, kb, generator=g) < 0.5)
    return blocks, full


def poisoned(q, dv=None):
    shape = tuple(q.shape[:-1]) + (dv or q.shape[-1],)
    return torch.full(shape, float("nan"), dtype=q.dtype, device=q.device)


def run(q, k, v, bm):
    out = poisoned(q)
    _, lse = fk.sparse_attention(q, k, v, bm, return_lse=True, out=out)
    check_against_reference(q, k, v, out, lse, mask=bm.to_dense().to(q.device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("mod", [causal, window(100), head_stride], ids=["causal", "window", "per-head"])
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_mod_masks(device, block_size, mod, shape):
    b, nq, nk, hq = shape[:4]
    per_head = mod is head_stride
    bm = fk.BlockMask.from_mask_mod(mod, b if per_head else None, hq if per_head else None, nq, nk,
                                    block_size=block_size, device=device)
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=hash((shape, block_size, i)) % 2**31)
        run(q, k, v, bm)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_block_matrices(device, block_size, density):
    """Random per-(batch, head) block matrices, half the blocks full and half masked by a
    mask_mod; also every block full (no mask_mod)."""
    shape = (2, 333, 400, 4, 2, 64)
    b, nq, nk, hq = shape[:4]
    blocks, full = random_blocks(b, hq, nq, nk, block_size, density, seed=block_size)
    masks = [fk.BlockMask.from_blocks(blocks.to(device), seq_lengths=(nq, nk), block_size=block_size),
             fk.BlockMask.from_blocks(blocks.to(device), full=full.to(device), seq_lengths=(nq, nk),
                                      block_size=block_size, mask_mod=lambda b, h, q, kv: (q + kv) % 3 != 0)]
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=100 + i)
        for bm in masks:
            run(q, k, v, bm)


@pytest.mark.parametrize("device", devices())
def test_rows_without_keys_and_scale(device):
    """Query blocks whose lists are empty give 0 and LSE -inf; a custom scale."""
    shape = (1, 256, 256, 2, 1, 128)
    blocks = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    blocks[0, 0, 1, 0] = True  # head 0: second query block sees the first key block; the rest nothing
    bm = fk.BlockMask.from_blocks(blocks.to(device), seq_lengths=(256, 256))
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=7 + i)
        out = poisoned(q)
        _, lse = fk.sparse_attention(q, k, v, bm, scale=0.3, return_lse=True, out=out)
        check_against_reference(q, k, v, out, lse, scale=0.3, mask=bm.to_dense().to(device))
        assert torch.equal(out[:, :128], torch.zeros_like(out[:, :128]))
        assert torch.isinf(lse[0, 1]).all()


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("mod", [causal, window(70), head_stride], ids=["causal", "window", "per-head"])
def test_kernel_tiles_spell_the_mask(block_size, mod):
    """The kernel's 128 x 128 lists (ascending tiles, whole or bitmap) expanded back give
    exactly the mask; identical bitmaps are stored once."""
    nq, nk = 333, 530
    per_head = mod is head_stride
    bm = fk.BlockMask.from_mask_mod(mod, 2 if per_head else None, 3 if per_head else None, nq, nk,
                                    block_size=block_size)
    count, index, bitmap, bits = bm.tiles()
    dense = torch.zeros(count.shape[0], count.shape[1], count.shape[2] * 128, -(-nk // 128) * 128, dtype=torch.bool)
    unpacked = ((bits[..., None] >> torch.arange(32)) & 1).bool().view(bits.shape[0], 128, 128)
    for b in range(count.shape[0]):
        for h in range(count.shape[1]):
            for qt in range(count.shape[2]):
                tiles = index[b, h, qt, : count[b, h, qt]].tolist()
                assert tiles == sorted(set(tiles))
                for j, kt in enumerate(tiles):
                    m = bitmap[b, h, qt, j]
                    block = torch.ones(128, 128, dtype=torch.bool) if m < 0 else unpacked[m]
                    dense[b, h, qt * 128:(qt + 1) * 128, kt * 128:(kt + 1) * 128] = block
    assert torch.equal(dense[..., :nq, :nk], bm.to_dense())
    assert len(torch.unique(bits.view(bits.shape[0], -1), dim=0)) == bits.shape[0]


def test_block_mask_layout_and_density():
    bm = fk.BlockMask.from_mask_mod(causal, None, None, 1024, 1024, block_size=128)
    assert bm.shape == (1, 1, 1024, 1024)
    present, full = bm.to_blocks()
    assert torch.equal(present, torch.ones(8, 8, dtype=torch.bool).tril()[None, None])
    assert torch.equal(full, torch.ones(8, 8, dtype=torch.bool).tril(-1)[None, None])
    assert bm.density() == pytest.approx(36 / 64)
    assert int(bm.kv_num_blocks.sum()) == 8 and int(bm.full_kv_num_blocks.sum()) == 28


def test_bad_input():
    q, k, v = make((1, 100, 100, 2, 2, 64), torch.float32, "cpu", seed=1)
    bm = fk.BlockMask.from_mask_mod(causal, None, None, 100, 100)
    with pytest.raises(TypeError, match="block_mask"):
        fk.sparse_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask covers 100 queries"):
        fk.sparse_attention(q[:, :50], k, v, bm)
    with pytest.raises(ValueError, match=r"\(B, H\)"):
        fk.sparse_attention(q, k, v, fk.BlockMask.from_mask_mod(causal, 3, None, 100, 100))
    with pytest.raises(ValueError, match="block_size"):
        fk.BlockMask.from_mask_mod(causal, None, None, 100, 100, block_size=32)
    num = torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indices must lie in"):
        fk.BlockMask(num, torch.full((1, 1, 1, 1), 5, dtype=torch.int32), seq_lengths=(100, 100))
    with pytest.raises(ValueError, match="kv_num_blocks must lie in"):
        fk.BlockMask(num * 3, torch.zeros((1, 1, 1, 1), dtype=torch.int32), seq_lengths=(100, 100))
    with pytest.raises(ValueError, match="int32"):
        fk.BlockMask(num.long(), torch.zeros((1, 1, 1, 1), dtype=torch.int32), seq_lengths=(100, 100))
    with pytest.raises(ValueError, match=r"\(B, H, 1\)"):
        fk.BlockMask(torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros((1, 1, 2, 1), dtype=torch.int32),
                     seq_lengths=(100, 100))


PATTERNS = [
    ("causal", lambda: sp.causal_mask(300, 500, block_size=64), lambda b, h, q, kv: kv <= q + 200, None),
    ("window", lambda: sp.sliding_window(700, 700, 100), lambda b, h, q, kv: (kv <= q) & (q - kv < 100), None),
    ("window-both-sides", lambda: sp.sliding_window(700, 650, 100, causal=False),
     lambda b, h, q, kv: (q - 50 - kv).abs() < 100, None),
    ("streaming", lambda: sp.streaming(900, 900, 64, 200, block_size=64),
     lambda b, h, q, kv: (kv <= q) & ((kv < 64) | (q - kv < 200)), None),
    ("a-shape", lambda: sp.a_shape(900, 900, 1, 3),
     lambda b, h, q, kv: (kv <= q) & ((kv // 64 < 1) | (q // 64 - kv // 64 < 3)), None),
    ("duo", lambda: sp.duo_attention(600, 600, [True, False, False], 64, 100),
     lambda b, h, q, kv: (kv <= q) & ((h == 0) | (kv < 64) | (q - kv < 100)), 3),
    ("strided", lambda: sp.strided(1000, 1000, 4, 2, 3),
     lambda b, h, q, kv: (kv <= q) & ((q // 128 - kv // 128 < 2) | (kv // 128 % 3 == h % 3)), 4),
    ("power", lambda: sp.power(2000, 2000, block_size=64),
     lambda b, h, q, kv: (kv <= q) & ((q // 64 - kv // 64 == 0) | ((q // 64 - kv // 64) & (q // 64 - kv // 64 - 1) == 0)),
     None),
]


@pytest.mark.parametrize("name,build,mod,heads", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_patterns_match_their_definition(name, build, mod, heads):
    """Each builder evaluates only the blocks its block-level bound admits: the result must be
    the mask of its definition evaluated everywhere, block for block and element for element."""
    bm = build()
    everywhere = fk.BlockMask.from_mask_mod(mod, None, heads, *bm.seq_lengths, block_size=bm.block_size)
    assert torch.equal(bm.to_blocks()[0], everywhere.to_blocks()[0])
    assert torch.equal(bm.to_blocks()[1], everywhere.to_blocks()[1])
    assert torch.equal(bm.to_dense(), everywhere.to_dense())
    assert 0 < bm.density() < 1


@pytest.mark.parametrize("device", devices())
def test_patterns_attend(device):
    """The per-head patterns (DuoAttention, S2 strides) through sparse_attention, GQA."""
    shape = (1, 520, 520, 4, 2, 128)
    masks = [sp.duo_attention(520, 520, [True, False, True, False], 64, 100, device=device),
             sp.strided(520, 520, 4, 1, 2, device=device), sp.sliding_window(520, 520, 130, device=device)]
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=60 + i)
        for bm in masks:
            run(q, k, v, bm)


@pytest.mark.parametrize("q_len,kv_len,block_size", [(1000, 1000, 128), (300, 556, 128), (300, 500, 128), (333, 333, 64)])
def test_causal_tiles_spell_the_mask(q_len, kv_len, block_size):
    """causal_mask's fast tile lists (shared triangular bitmap where the diagonal is
    tile-aligned; evaluated bitmaps otherwise) expand back to the causal mask."""
    bm = sp.causal_mask(q_len, kv_len, block_size=block_size)
    count, index, bitmap, bits = bm.tiles()
    unpacked = ((bits[..., None] >> torch.arange(32)) & 1).bool().view(bits.shape[0], 128, 128)
    dense = torch.zeros(count.shape[2] * 128, index.shape[-1] * 0 + -(-kv_len // 128) * 128, dtype=torch.bool)
    for qt in range(count.shape[2]):
        for j, kt in enumerate(index[0, 0, qt, : count[0, 0, qt]].tolist()):
            m = bitmap[0, 0, qt, j]
            dense[qt * 128:(qt + 1) * 128, kt * 128:(kt + 1) * 128] = True if m < 0 else unpacked[m]
    assert torch.equal(dense[:q_len, :kv_len], bm.to_dense()[0, 0])


def test_antidiagonal_scores_are_strided_antidiagonals():
    """_antidiagonal's strided matmul against the definition: entry (a, c) sums q_i . k_j over
    i in query group a, j in key group c with (i + j) % stride == stride - 1."""
    q, k, _ = make((1, 64, 64, 2, 2, 8), torch.float32, "cpu", seed=3)
    stride = 8
    got = sp._antidiagonal(q, k, 64, stride)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double())
    i, j = torch.arange(64)[:, None], torch.arange(64)[None, :]
    s = s * ((i + j) % stride == stride - 1)
    want = s.view(1, 2, 8, stride, 8, stride).sum((3, 5))
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_grouped_scores_read_each_q_heads_kv_head():
    """GQA without repeating k: q head i meets kv head i // (Hq / Hk), as repeat_interleave has it."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    want = a @ b.repeat_interleave(2, dim=1).transpose(-1, -2)
    assert torch.allclose(sp._grouped_scores(a, b), want, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("shape,block", [((2, 300, 3, 64), 64), ((1, 1000, 4, 128), 128), ((1, 130, 2, 256), 128),
                                         ((3, 64, 1, 128), 64), ((1, 129, 2, 64), 128)])
def test_pool_kernel_is_the_block_mean(shape, block):
    """The pooling kernel against the float64 mean of each block (the last over its real
    tokens), times mul, on a strided view (q of a packed qkv), both 16-bit dtypes."""
    b, n, h, d = shape
    for i, dtype in enumerate((torch.float16, torch.bfloat16)):
        g = torch.Generator().manual_seed(n + d + i)
        qkv = (torch.randn(b, n, 3, h, d, generator=g) + 0.5).to("cuda", dtype)
        x = qkv[:, :, 1]  # token stride 3 * h * d
        assert sp._pool_on_gpu(x)
        out = torch.full((b, h, -(-n // block), d), float("nan"), device="cuda")
        fk._native.sparse_pool_blocks(x, out, block=block, mul=0.3)
        pad = (-n) % block
        xd = torch.nn.functional.pad(x.double(), (0, 0, 0, 0, 0, pad)).view(b, -1, block, h, d).sum(2)
        counts = torch.full((xd.shape[1],), float(block), dtype=torch.float64, device="cuda")
        counts[-1] = block - pad
        want = (xd / counts[None, :, None, None] * 0.3).transpose(1, 2)
        assert torch.allclose(out.double(), want, atol=1e-5, rtol=1e-5), (out.double() - want).abs().max()
        assert torch.allclose(sp._pool(x, block, 0.3).double(), want, atol=1e-5, rtol=1e-5)
        out16 = torch.full_like(out, float("nan"), dtype=dtype)  # the means in x's dtype: rounded once
        fk._native.sparse_pool_blocks(x, out16, block=block, mul=0.3)
        assert torch.equal(out16, out.to(dtype))


@pytest.mark.cuda
def test_estimate_kernels_refuse_bad_input():
    x = torch.randn(1, 100, 2, 96, device="cuda", dtype=torch.float16)
    out = torch.empty(1, 2, 1, 96, device="cuda")
    with pytest.raises(ValueError, match="head_dim 64, 128 or 256"):
        fk._native.sparse_pool_blocks(x, out, block=128)
    assert not sp._pool_on_gpu(x)  # estimate_blocks pools such inputs with torch
    x = torch.randn(1, 100, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="block must be 64 or 128"):
        fk._native.sparse_pool_blocks(x, torch.empty(1, 2, 4, 64, device="cuda"), block=32)
    with pytest.raises(ValueError, match="out"):
        fk._native.sparse_pool_blocks(x, torch.empty(1, 2, 3, 64, device="cuda"), block=64)
    with pytest.raises(fk.DTypeError, match="x must have dtype float16 or bfloat16"):
        fk._native.sparse_pool_blocks(x.float(), torch.empty(1, 2, 1, 64, device="cuda"), block=128)
    # The antidiagonal operands' copy: rows must cover the tokens, shapes and dtypes match.
    rows = torch.empty(1, 2, 6, 16 * 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="fewer than"):
        fk._native.sparse_strided_rows(x, rows, stride=16)
    with pytest.raises(ValueError, match="out"):
        fk._native.sparse_strided_rows(x, rows[..., :8 * 64], stride=16)
    with pytest.raises(fk.DTypeError, match="out"):
        fk._native.sparse_strided_rows(x, torch.empty(1, 2, 7, 16 * 64, device="cuda"), stride=16)
    # The antidiagonal scores: 16-byte logit rows, whole blocks of rows, a float32 output.
    logits = torch.randn(2, 8, 12, device="cuda", dtype=torch.float16)
    out = torch.empty(2, 1, 3, device="cuda")
    kw = dict(row0=0, cols_valid=12, causal=False, off=0, stride=16, r=8, scale=1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        fk._native.sparse_antidiag_scores(logits, out, **kw)
    with pytest.raises(ValueError, match="whole blocks"):
        fk._native.sparse_antidiag_scores(logits[:, :6, :8].contiguous(), out, **kw)
    with pytest.raises(fk.DTypeError, match="out"):
        fk._native.sparse_antidiag_scores(logits[..., :8].contiguous(), out.half(), **kw)
    with pytest.raises(ValueError, match="power of two"):
        fk._native.sparse_antidiag_scores(logits[..., :8].contiguous(), out, **dict(kw, r=6))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["pooled", "antidiagonal"])
@pytest.mark.parametrize("causal", [True, False])
def test_estimated_blocks_attend(device, method, causal):
    """Masks chosen from the inputs run exactly under what they chose (GQA, ragged ends,
    fewer queries than keys), keep the sink and diagonal blocks, and never leave a row empty."""
    shape = (2, 300, 700, 4, 2, 64)
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=80 + i)
        for opts in (dict(threshold=0.6), dict(top_k=2)):
            bm = sp.estimate_blocks(q, k, method=method, causal=causal, **opts)
            present, _ = bm.to_blocks()
            assert present[..., 0].all()  # the sink block
            assert present.sum(-1).min() >= 1 + (not causal or False)
            if causal:  # no block past the diagonal: key block start <= last query's position
                kb = torch.arange(present.shape[-1], device=present.device) * 128
                last = torch.arange(present.shape[-2], device=present.device) * 128 + 127 + 400
                assert not (present & (kb[None, :] > last[:, None])).any()
            run(q, k, v, bm)


@pytest.mark.cuda
@pytest.mark.parametrize("nq,nk,stride,causal", [(2048, 2304, 16, True), (4096, 4096, 8, True), (1000, 1300, 16, False),
                                                 (384, 384, 32, True), (640, 4480, 4, True), (512, 700, 128, False)])
def test_antidiagonal_kernel_matches_torch(nq, nk, stride, causal, monkeypatch):
    """The chunked matmul + sparse_antidiag against the torch scores on the same GPU: every
    block's score within 16-bit logit rounding, rows summing to 1 where a row sees keys; GQA,
    ragged ends, strides 4 to 128 (r = 32 to 1 rows per block)."""
    g = torch.Generator().manual_seed(nq + stride)
    for dtype in (torch.float16, torch.bfloat16):
        q = (torch.randn(2, nq, 4, 64, generator=g) * 2).to("cuda", dtype)
        k = torch.randn(2, nk, 2, 64, generator=g).to("cuda", dtype)
        scale = 64 ** -0.5
        got = sp._antidiagonal_gpu(q, k, 128, stride, scale, causal)
        kernel_rows = sp._strided(q, k, 128, stride)
        monkeypatch.setattr(sp, "_SELECT_KERNEL", False)  # torch's pad / flip / permute copies
        want = sp._antidiagonal_torch(q, k, 128, stride, scale, causal)
        for a, b in zip(kernel_rows, sp._strided(q, k, 128, stride)):
            assert torch.equal(a, b)
        monkeypatch.setattr(sp, "_SELECT_KERNEL", True)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=2e-3, rtol=2e-2), (got - want).abs().max()
        sums = want.sum(-1)
        assert torch.allclose(got.sum(-1)[sums > 0.5], sums[sums > 0.5], atol=1e-4)


def test_estimated_blocks_follow_the_scores():
    """A key block that matches every query stands out: both scorers select it under a tight
    threshold, and threshold 1 keeps every visible block."""
    q, k, _ = make((1, 1024, 1024, 2, 2, 64), torch.float32, "cpu", seed=9)
    target = torch.randn(64)
    q = q * 0.1 + target
    k[:, 512:640] = target * 4
    for method in ("pooled", "antidiagonal"):
        present, _ = sp.estimate_blocks(q, k, method=method, threshold=0.3, sink_blocks=0).to_blocks()
        assert present[0, :, 5:, 4].all(), method           # key block 4 for every query block past it
        assert present[0].sum(-1).float().mean() < 3, method  # and little else
        everything, _ = sp.estimate_blocks(q, k, method=method, threshold=1.0).to_blocks()
        assert torch.equal(everything[0, 0], torch.ones(8, 8, dtype=torch.bool).tril()), method


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["pooled", "antidiagonal"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", [dict(threshold=0.7), dict(top_k=5), dict(threshold=1.0)], ids=["mass", "topk", "all"])
def test_gpu_selection_matches_the_torch_path(method, causal, opts, monkeypatch):
    """The selection kernel (one launch from the block scores to the tile lists) chooses the
    blocks the torch path chooses from the same scores on the same GPU: all rows but a few
    whose choice sits on a rounding boundary (near-equal block scores: the kernel's exp and
    sort are not torch's); threshold 1 keeps everything on both."""
    q, k, v = (x.cuda() for x in make((2, 2048, 2304, 4, 2, 64), torch.bfloat16, "cpu", seed=11))
    shift = torch.randn(64, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    q = q + shift * 2  # structure, so that rows are not uniform
    gpu = sp.estimate_blocks(q, k, method=method, causal=causal, sink_blocks=1, local_blocks=2, **opts)
    monkeypatch.setattr(sp, "_SELECT_KERNEL", False)
    cpu = sp.estimate_blocks(q, k, method=method, causal=causal, sink_blocks=1, local_blocks=2, **opts)
    assert gpu._lists is None  # built as tile lists by the kernel
    got, want = gpu.to_blocks(), cpu.to_blocks()
    rows_differ = (got[0] != want[0]).any(-1).float().mean().item()
    assert rows_differ <= (0.0 if opts.get("threshold") == 1.0 else 0.03), rows_differ
    # The kernel's lists attend exactly as the same blocks given as a BlockMask.
    out = fk.sparse_attention(q, k, v, gpu)
    ref = fk.sparse_attention(q, k, v, fk.BlockMask.from_blocks(
        got[0], full=got[1], seq_lengths=gpu.seq_lengths, mask_mod=gpu.mask_mod))
    assert torch.equal(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("nq,nk", [(640, 640), (2048, 25600), (4096, 32768), (1024, 32896), (384, 89600)],
                         ids=["kb5", "kb200", "kb256", "kb257", "kb700"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["mass", "mass-logits", "topk"])
def test_selection_kernels_on_random_scores(nq, nk, causal, mode):
    """Both selection kernels (a warp per row up to 256 key tiles, a CTA per row past it)
    against the torch selection on random scores (no near-ties): the same blocks per row."""
    qb, kb = -(-nq // 128), -(-nk // 128)
    g = torch.Generator().manual_seed(qb * 1000 + kb)
    logits = (torch.randn(2, 3, qb, kb, generator=g) * 3).cuda()
    off = nk - nq
    visible = sp._grid(nq, nk, 128, "cuda")[1] >= 0 if causal else torch.ones(qb, kb, dtype=torch.bool, device="cuda")
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    opts = dict(top_k=7, threshold=None) if mode == "topk" else dict(top_k=None, threshold=0.8)
    opts.update(sink_blocks=2, local_blocks=3)
    gpu = sp._select_gpu(logits if mode == "mass-logits" else probs, nq, nk, causal=causal, off=off,
                         softmax=mode == "mass-logits", **opts)
    ref = sp._select_torch(probs, nq, nk, causal=causal, block_size=128, **opts)
    got, want = gpu.to_blocks(), ref.to_blocks()
    # The blocks, then (causal) the full ones among them: without causal the kernel's lists
    # call every block whole, the torch mask (no mask_mod) leaves them unclassified.
    for g_, w_ in zip(got, want) if causal else [(got[0], want[0])]:
        rows_differ = (g_ != w_).any(-1).float().mean().item()
        assert rows_differ <= (0.0 if mode == "topk" else 0.01), rows_differ


def paged_cache(batch, lens, hk, d, page_size, dtype, device, seed):
    """A shuffled page pool holding `lens` tokens per sequence, its block table, and the same
    cache gathered contiguous (batch, capacity, hk, d)."""
    g = torch.Generator().manual_seed(seed)
    mp = -(-max(lens) // page_size)
    pool = batch * mp + 2
    kc = torch.randn(pool, page_size, hk, d, generator=g).to(device, dtype)
    vc = torch.randn(pool, page_size, hk, d, generator=g).to(device, dtype)
    table = torch.randperm(pool, generator=g)[: batch * mp].view(batch, mp).to(device, torch.int32)
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("q_len", [1, 3])
def test_sparse_decode_attends_the_selected_pages(device, q_len):
    """Quest selection + per-head block tables: each kv head attends exactly the tokens of its
    chosen pages (checked against float64 attention over those tokens gathered per head), the
    pages holding the new tokens are always chosen, and a budget covering the sequence is the
    full decode."""
    from test_decode import check
    ps, hk, g, d = 16, 2, 3, 64
    for i, dtype in enumerate(dtypes_for(device)):
        kc, vc, table, lens = paged_cache(2, [203, 40], hk, d, ps, dtype, device, seed=90 + i)
        q = torch.randn(2, q_len, hk * g, d, generator=torch.Generator().manual_seed(i)).to(device, dtype)
        summ = sp.page_summaries(kc)
        sel, new_lens = sp.select_pages(q, summ, lens, table, ps, budget=80)
        assert sel.shape == (2, hk, 5) and new_lens.tolist() == [4 * 16 + 203 - 12 * 16, 40]
        last_pages = table[0, (203 - q_len) // ps: 13]  # the pages holding the new tokens
        for h in range(hk):
            assert set(last_pages.tolist()) <= set(sel[0, h].tolist())
        # Gather each head's chosen tokens into a contiguous cache and attend them in float64.
        cap = int(new_lens.max())
        k_sel = torch.zeros(2, cap, hk, d, dtype=dtype, device=device)
        v_sel = torch.zeros_like(k_sel)
        for b in range(2):
            for h in range(hk):
                rows = kc[sel[b, h].long(), :, h].reshape(-1, d)[: int(new_lens[b])]
                k_sel[b, : len(rows), h] = rows
                v_sel[b, : len(rows), h] = vc[sel[b, h].long(), :, h].reshape(-1, d)[: int(new_lens[b])]
        out, lse = sp.sparse_decode(q, kc, vc, lens, table, budget=80, summaries=summ, return_lse=True)
        check(q, k_sel, v_sel, new_lens, out, lse)
        full = fk.decode_attention(q, kc, vc, lens, block_table=table)
        assert torch.equal(sp.sparse_decode(q, kc, vc, lens, table, budget=1024, summaries=summ), full)


@pytest.mark.cuda
@pytest.mark.parametrize("q_len,d,hk,g", [(1, 128, 8, 4), (3, 64, 2, 3), (16, 256, 1, 2), (2, 96, 3, 1)])
def test_page_bounds_kernel_matches_torch(q_len, d, hk, g, monkeypatch):
    """The bounds kernel against the torch path on the same GPU: every finite bound within
    float32 rounding, the same +inf (new tokens' pages) / -inf (past the sequence) pattern,
    the same selected lengths, and the same pages chosen; ragged lengths, a shuffled table with
    room past the longest sequence, strided q."""
    ps, lens = 16, [203, 40, 16 * 70, 17]
    for i, dtype in enumerate((torch.float16, torch.bfloat16)):
        kc, _, table, seqlens = paged_cache(len(lens), lens, hk, d, ps, dtype, "cuda", seed=d + i)
        table = torch.nn.functional.pad(table, (0, 3), value=-1)
        qkv = torch.randn(len(lens), q_len, 2, hk * g, d, generator=torch.Generator().manual_seed(i)).to("cuda", dtype)
        q = qkv[:, :, 0]
        summ = sp.page_summaries(kc)
        for keep in (1, 5, 80):
            got = sp._page_bounds(q, summ, seqlens, table, ps, keep)
            monkeypatch.setattr(sp, "_SELECT_KERNEL", False)
            want = sp._page_bounds(q, summ, seqlens, table, ps, keep)
            monkeypatch.setattr(sp, "_SELECT_KERNEL", True)
            assert torch.equal(got[1], want[1])
            fin = want[0].isfinite()
            assert torch.equal(got[0].isfinite(), fin) and torch.equal(got[0][~fin], want[0][~fin])
            assert torch.allclose(got[0][fin], want[0][fin], rtol=1e-5, atol=1e-4 * q_len * g)
        sel, _ = sp.select_pages(q, summ, seqlens, table, ps, budget=5 * ps)
        monkeypatch.setattr(sp, "_SELECT_KERNEL", False)
        ref, _ = sp.select_pages(q, summ, seqlens, table, ps, budget=5 * ps)
        monkeypatch.setattr(sp, "_SELECT_KERNEL", True)
        assert sel.dtype == torch.int32 and (sel == ref).float().mean() > 0.99


@pytest.mark.cuda
def test_page_bounds_kernel_refuses_bad_input():
    q = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.float16)
    pmin = pmax = torch.zeros(3, 2, 64, device="cuda", dtype=torch.float16)
    table, lens = torch.zeros(1, 3, dtype=torch.int32, device="cuda"), torch.ones(1, dtype=torch.int32, device="cuda")
    bounds, nl = torch.empty(1, 2, 3, device="cuda"), torch.empty(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="bounds"):
        fk._native.sparse_page_bounds(q, pmin, pmax, table, lens, bounds[:, :1], nl, page_size=16, keep=1)
    with pytest.raises(fk.DTypeError, match="block_table"):
        fk._native.sparse_page_bounds(q, pmin, pmax, table.long(), lens, bounds, nl, page_size=16, keep=1)
    with pytest.raises(ValueError, match="heads"):
        fk._native.sparse_page_bounds(q[:, :, :3], pmin, pmax, table, lens, bounds, nl, page_size=16, keep=1)
    with pytest.raises(ValueError, match="keep"):
        fk._native.sparse_page_bounds(q, pmin, pmax, table, lens, bounds, nl, page_size=16, keep=0)
    with pytest.raises(fk.DTypeError, match="page_min"):
        fk._native.sparse_page_bounds(q, pmin.float(), pmax, table, lens, bounds, nl, page_size=16, keep=1)


def test_quest_bound_finds_the_relevant_page():
    """A page whose keys point along q has the highest bound: with room for one page besides
    the current one, every head picks it. page_summaries updates pages in place."""
    ps, hk, d = 16, 2, 64
    kc, vc, table, lens = paged_cache(1, [160], hk, d, ps, torch.float32, "cpu", seed=5)
    q = torch.randn(1, 1, hk * 2, d, generator=torch.Generator().manual_seed(1))
    summ = sp.page_summaries(kc)
    target = int(table[0, 3])
    kc[target] = q[0, 0, ::2][None].expand(ps, hk, d) * 10  # random pages bound ~1.8 |q|_1 per row: loose
    sp.page_summaries(kc, pages=torch.tensor([target]), out=summ)
    sel, new_lens = sp.select_pages(q, summ, lens, table, ps, budget=32)
    assert sel.shape == (1, hk, 2) and int(new_lens[0]) == 32
    for h in range(hk):
        assert target in sel[0, h].tolist() and int(table[0, 9]) in sel[0, h].tolist()
    with pytest.raises(ValueError, match="budget"):
        sp.select_pages(q, summ, lens, table, ps, budget=8)


# --- MInference vertical-slash ------------------------------------------------------------------

def vertical_slash_definition(columns, diagonals, nq, nk):
    """The mask straight from its definition, float-free: a query at position p sees key c <= p
    if c is a column of its head, or c's 128-tile is crossed by a diagonal (or diagonal 0)
    somewhere in the query's 128-row block (all 128 rows, also those past q_len)."""
    b, h = columns.shape[:2]
    off = nk - nq
    rows = torch.arange(nq)
    pos = rows + off
    out = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            tiles = torch.zeros(-(-nq // 128), -(-nk // 128), dtype=torch.bool)
            for d in set(diagonals[bi, hi].tolist()) | {0}:
                if not 0 <= d < nk:
                    continue
                for r in range(tiles.shape[0] * 128):  # whole blocks, also past q_len
                    c = r + off - d
                    if 0 <= c < nk:
                        tiles[r // 128, c // 128] = True
            m = tiles[rows // 128][:, torch.arange(nk) // 128]
            for c in columns[bi, hi].tolist():
                if 0 <= c < nk:
                    m[:, c] = True
            out[bi, hi] = m & (torch.arange(nk)[None, :] <= pos[:, None])
    return out


def kernel_lists_to_dense(bm, nq, nk):
    """The kernel's lists read as the kernel reads them: tiles whole or by bitmap, negative
    entries as gathered column tiles masked by their column-bit rows."""
    count, index, bitmap, bits = bm.tiles()
    col_bits = bm.column_bits()
    cols = bm.columns
    unpack = lambda w: ((w[..., None] >> torch.arange(32)) & 1).bool().reshape(w.shape[:-1] + (-1,))  # noqa: E731
    unpacked = unpack(bits).view(bits.shape[0], 128, 128)
    kt = -(-nk // 128)
    dense = torch.zeros(count.shape[0], count.shape[1], count.shape[2] * 128, kt * 128 + 1, dtype=torch.bool)
    for b in range(count.shape[0]):
        for h in range(count.shape[1]):
            for qt in range(count.shape[2]):
                rows = slice(qt * 128, (qt + 1) * 128)
                entries = index[b, h, qt, : count[b, h, qt]].tolist()
                whole = [e for e in entries if e >= 0]
                assert whole == sorted(set(whole))
                for j, e in enumerate(entries):
                    m = int(bitmap[b, h, qt, j])
                    if e >= 0:
                        assert m >= -1
                        block = torch.ones(128, 128, dtype=torch.bool) if m < 0 else unpacked[m]
                        assert not (dense[b, h, rows, e * 128:(e + 1) * 128] & block).any()
                        dense[b, h, rows, e * 128:(e + 1) * 128] |= block
                    else:
                        assert m <= -2
                        t = -1 - e
                        keys = cols[b, h, t * 128:(t + 1) * 128]
                        take = unpack(col_bits[-2 - m])
                        for c, on in zip(keys.tolist(), take.tolist()):
                            if on:  # each key attended once
                                assert not dense[b, h, rows, c].any()
                                dense[b, h, rows, c] = True
    return dense[..., :nq, :nk]


VS_CASES = [(1, 300, 300, 2, 37, 9), (2, 257, 640, 3, 130, 40), (1, 512, 512, 1, 300, 5), (1, 100, 700, 2, 64, 3)]


@pytest.mark.parametrize("b,nq,nk,h,n_cols,n_diag", VS_CASES)
def test_vertical_slash_mask_and_lists(b, nq, nk, h, n_cols, n_diag):
    """Random columns (with duplicates and out-of-range ids) and diagonals: the BlockMask views
    and the kernel's lists (whole tiles, causal bitmaps, column tiles with their bit rows, no
    key twice) both spell the definition. Covers kv_len - q_len off the tile grid."""
    g = torch.Generator().manual_seed(nq + nk)
    cols = torch.randint(-5, nk + 5, (b, h, n_cols), generator=g)
    diags = torch.randint(0, nk, (b, h, n_diag), generator=g)
    bm = sp.VerticalSlashMask(cols, diags, seq_lengths=(nq, nk))
    want = vertical_slash_definition(cols, diags, nq, nk)
    assert torch.equal(bm.to_dense(), want)
    assert torch.equal(kernel_lists_to_dense(bm, nq, nk), want)
    # vertical_slash's columns (distinct, ascending, in range) skip the sorts: the same mask.
    distinct = torch.stack([torch.stack([torch.unique(c[(c >= 0) & (c < nk)])[:10] for c in row]) for row in cols])
    fast = sp.VerticalSlashMask(distinct, diags, seq_lengths=(nq, nk), _distinct_sorted=True)
    assert torch.equal(fast.columns, sp.VerticalSlashMask(distinct, diags, seq_lengths=(nq, nk)).columns)
    assert torch.equal(kernel_lists_to_dense(fast, nq, nk), vertical_slash_definition(distinct, diags, nq, nk))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,sizes", [((2, 700, 700, 4, 2, 64), (40, 10)), ((1, 2048, 2048, 4, 1, 128), (300, 50))])
def test_vertical_slash_attends(device, shape, sizes):
    """Online estimation then attention, exact under the estimated mask (GQA, ragged end, a
    batch whose entries choose differently, several column tiles); the sinks, the local band
    and the strongest column are always in."""
    b, n, _, _, _, d = shape
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = make(shape, dtype, device, seed=200 + i)
        target = torch.randn(d, generator=torch.Generator().manual_seed(i)).to(device, dtype)
        q[b - 1] += target
        k[b - 1, 333] = 2 * target  # a key every query of the last batch entry likes
        bm = sp.vertical_slash(q, k, vertical_size=sizes[0], slash_size=sizes[1], last_q=64)
        dense = bm.to_dense()
        pos = torch.arange(n, device=dense.device)
        assert dense[:, :, pos, pos].all() and dense[:, :, 30:, :30].all()
        assert dense[b - 1, :, 334:, 333].all()
        run(q, k, v, bm)


def vertical_slash_scores_definition(q, k, last_q, scale):
    """float64: the last queries' causal softmax (bottom-right), summed per column and diagonal."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    L = min(last_q, nq)
    kd = k.double().cpu().repeat_interleave(hq // hk, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double().cpu()[:, nq - L:], kd) * scale
    pos = nk - L + torch.arange(L)
    s = s.masked_fill(torch.arange(nk)[None, :] > pos[:, None], float("-inf"))
    a = torch.softmax(s, -1)
    return a.sum(2), sp._diagonal_sums(a)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,last_q", [((2, 300, 700, 4, 2, 64), 64), ((1, 1000, 1000, 8, 2, 128), 100),
                                          ((1, 90, 333, 2, 2, 256), 17), ((1, 40, 40, 3, 1, 128), 64)])
def test_vertical_slash_scores_match_definition(device, shape, last_q):
    """Column and diagonal sums of the last queries' attention (the CUDA kernel: GQA, a window
    shorter than 64 and one of 100 rows, ragged key tiles, every head dim) against float64."""
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, _ = make(shape, dtype, device, seed=300 + i)
        scale = shape[-1] ** -0.5
        vert, slash = sp.vertical_slash_scores(q, k, last_q=last_q, scale=scale)
        want_v, want_s = vertical_slash_scores_definition(q, k, last_q, scale)
        # The torch path rounds scores to the inputs' precision; the kernel keeps them in float32
        # (its column sums add float16 probabilities on the tensor cores).
        tol = 2e-2 if device == "cpu" and dtype != torch.float32 else 4e-3
        for got, want in ((vert, want_v), (slash, want_s)):
            assert got.shape == want.shape and got.dtype == torch.float32
            err = (got.double().cpu() - want).abs().max().item()
            assert err <= tol * want.abs().max().item(), f"{dtype}: max err {err:.2e}"
        # Each query row's probabilities sum to 1, every one on some diagonal >= 0.
        assert torch.allclose(slash.sum(-1).double().cpu(), torch.full(want_s.shape[:2], float(min(last_q, shape[1])),
                                                                      dtype=torch.float64), rtol=1e-2)


def test_window_scores_diagonals_need_one_q_head_per_kv_head():
    q, k = torch.randn(1, 64, 4, 64, dtype=torch.float16), torch.randn(1, 300, 2, 64, dtype=torch.float16)
    lse, out = torch.zeros(1, 4, 64), torch.zeros(1, 2, 300)
    with pytest.raises(NotImplementedError, match="one q head per kv head"):
        fk._native.window_scores(q, k, lse, out, diag=out.clone(), scale=0.125)
    with pytest.raises(NotImplementedError, match="at most 256 queries"):
        fk._native.window_scores(torch.randn(1, 257, 2, 64, dtype=torch.float16), k, torch.zeros(1, 2, 257), out,
                                 diag=out.clone(), scale=0.125)


def test_vertical_slash_bad_input():
    q, k, _ = make((1, 256, 256, 2, 1, 64), torch.float32, "cpu", seed=1)
    with pytest.raises(ValueError, match="vertical_size"):
        sp.vertical_slash(q, k, vertical_size=0)
    with pytest.raises(fk.ShapeError, match="multiple"):
        sp.vertical_slash(q, k[:, :, [0, 0, 0]])
    cols = torch.zeros(1, 2, 3, dtype=torch.int64)
    with pytest.raises(fk.ShapeError, match="columns"):
        sp.VerticalSlashMask(cols.float(), cols, seq_lengths=(256, 256))
    with pytest.raises(fk.ShapeError, match="share"):
        sp.VerticalSlashMask(cols, cols[:, :1], seq_lengths=(256, 256))
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        sp.VerticalSlashMask(cols, cols, seq_lengths=(300, 256))


def test_vertical_slash_scores_are_diagonal_sums():
    """The estimate keeps the diagonals (and columns) with the largest summed attention of the
    last queries: a planted period-64 pattern is found."""
    q, k, _ = make((1, 512, 512, 1, 1, 32), torch.float32, "cpu", seed=4)
    q, k = q * 0.01, k * 0.01
    k[0, ::64] += 20 * q[0, -64:].mean(0)                        # columns 0, 64, 128, ...
    bm = sp.vertical_slash(q, k, vertical_size=8, slash_size=1, last_q=64, sink=0, local=1)
    assert sorted(bm.columns[0, 0, :8].tolist()) == list(range(0, 512, 64))


def test_diagonal_sums_by_definition():
    a = torch.rand(2, 3, 5, 40, dtype=torch.float64)
    got = sp._diagonal_sums(a)
    want = torch.zeros(2, 3, 40, dtype=torch.float64)
    for r in range(5):
        for c in range(40):
            d = 40 - 5 + r - c
            if d >= 0:
                want[..., d] += a[..., r, c]
    assert torch.allclose(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("b,nq,nk,h,n_cols,n_diag", VS_CASES + [(1, 4000, 4096, 4, 1000, 300)])
def test_vertical_slash_gpu_lists_match_torch(b, nq, nk, h, n_cols, n_diag, monkeypatch):
    """The list kernel writes what the torch path writes: counts, entries, bitmap ids and the
    column bit rows the entries name."""
    g = torch.Generator().manual_seed(nq * 7 + nk)
    cols = torch.randint(-5, nk + 5, (b, h, n_cols), generator=g).cuda()
    diags = torch.randint(0, nk, (b, h, n_diag), generator=g).cuda()
    gpu = sp.VerticalSlashMask(cols, diags, seq_lengths=(nq, nk))
    count, index, bitmap, bits = gpu.tiles()
    col_bits = gpu.column_bits()
    monkeypatch.setattr(sp, "_SELECT_KERNEL", False)
    ref = sp.VerticalSlashMask(cols, diags, seq_lengths=(nq, nk))
    r_count, r_index, r_bitmap, r_bits = ref.tiles()
    r_col_bits = ref.column_bits()
    assert torch.equal(count, r_count) and torch.equal(bits, r_bits)
    used = sp._listed(count, index)
    assert torch.equal(index[used], r_index[used]) and torch.equal(bitmap[used], r_bitmap[used])
    rows = -2 - bitmap[used & (bitmap < -1)].long()
    assert torch.equal(col_bits[rows], r_col_bits[rows])
