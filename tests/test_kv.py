"""KV-cache presses: the kept tokens against plain-torch reimplementations of each method's
scoring formula as kvpress writes it (heads-first layout, the full attention matrix where
kvpress uses one), attention over the compressed cache against float64 attention over the
kept positions, the merge by its definition, and bad input."""

import math

import pytest
import torch

import ferrokernels as fk
import ferrokernels.kv as kv
from conftest import devices, dtypes_for, rel_err


def inputs(b, n, hq, hk, d, w, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, n, hk, d, generator=g).to(device, dtype)
    values = torch.randn(b, n, hk, d, generator=g).to(device, dtype)
    queries = torch.randn(b, n, hq, d, generator=g).to(device, dtype)
    return keys, values, queries[:, n - w:], queries


# --- kvpress's formulas, heads first (b, h, n, d), written out in plain torch --------------------

def hf(x):
    return x.transpose(1, 2).float()


def repeat_kv(x, g):
    return x.repeat_interleave(g, dim=1)


def ref_window_attention(keys, queries, w):
    """kvpress SnapKV.compute_window_attention: (b, hq, w, n - w)."""
    k, q = hf(keys), hf(queries)
    n, d = k.shape[2], k.shape[3]
    a = q @ repeat_kv(k, q.shape[1] // k.shape[1]).transpose(2, 3) / math.sqrt(d)
    a = a + torch.triu(torch.full_like(a, float("-inf")), diagonal=n - w + 1)
    return torch.softmax(a, -1)[..., :-w]


def ref_snapkv(keys, queries, window, kernel):
    b, n, hk, _ = keys.shape
    a = ref_window_attention(keys, queries, window).mean(-2)
    s = torch.nn.functional.avg_pool1d(a, kernel_size=kernel, padding=kernel // 2, stride=1)
    s = s.view(b, hk, -1, n - window).mean(2)
    return torch.nn.functional.pad(s, (0, window), value=s.max().item())


def ref_tova(keys, queries):
    a = ref_window_attention(keys, queries[:, -1:], 1).mean(1)
    s = a.repeat(1, keys.shape[2], 1)
    return torch.nn.functional.pad(s, (0, 1), value=s.max().item())


def ref_observed(keys, queries_all):
    k, q = hf(keys), hf(queries_all)
    b, hk, n, d = k.shape
    a = q @ repeat_kv(k, q.shape[1] // hk).transpose(2, 3) / math.sqrt(d)
    a = torch.softmax(a + torch.triu(torch.full_like(a, float("-inf")), 1), -1)      # the whole matrix
    s = a.sum(2) / torch.arange(n, 0, -1, dtype=torch.float32, device=k.device)
    return s.view(b, hk, -1, n).mean(2)


def ref_streaming(keys, ratio, n_sink):
    b, n, hk, _ = keys.shape
    pruned = n - int(n * (1 - ratio))
    s = torch.ones(b, hk, n, device=keys.device)
    s[:, :, n_sink:n_sink + pruned] = 0
    return s


def ref_keep(scores, n_kept):
    return scores.topk(n_kept, -1).indices


def same_sets(positions, lengths, want_idx):
    """Per (batch, head): our kept positions (first `length`) equal the reference's set."""
    for b in range(positions.shape[0]):
        for h in range(positions.shape[1]):
            ours = set(positions[b, h, : lengths[b, h]].tolist())
            assert ours == set(want_idx[b][h]), (b, h)


B, N, HQ, HK, D, W = 2, 300, 4, 2, 64, 32


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_scorer_presses_keep_what_kvpress_keeps(device, ratio):
    keys, values, window, allq = inputs(B, N, HQ, HK, D, W, device, seed=int(ratio * 100))
    kept = max(1, int(N * (1 - ratio)))
    cases = [(kv.SnapKV(ratio, window=W, kernel=5), window, ref_snapkv(keys, window, W, 5)),
             (kv.TOVA(ratio), window, ref_tova(keys, window)),
             (kv.ObservedAttention(ratio), allq, ref_observed(keys, allq)),
             (kv.Knorm(ratio), None, -hf(keys).norm(dim=-1)),
             (kv.StreamingLLM(ratio, n_sink=4), None, ref_streaming(keys, ratio, 4))]
    for press, q, ref in cases:
        c = press(keys, values, q)
        assert c.keys.shape == (B, kept, HK, D) and c.uniform, type(press).__name__
        want = ref_keep(ref, kept)
        same_sets(c.positions, c.lengths, want.tolist())
        # The kept rows are the inputs' rows at those positions, in order.
        pos = c.positions
        assert torch.equal(pos, pos.sort(-1).values)
        assert torch.equal(c.keys, torch.gather(keys, 1, pos.transpose(1, 2)[..., None].expand(B, kept, HK, D)))
        assert torch.equal(c.values, torch.gather(values, 1, pos.transpose(1, 2)[..., None].expand(B, kept, HK, D)))


def ref_window_scores(keys, queries, scale=None):
    """float64 window_scores by definition: each window query's softmax over the keys up to its
    position (the last w), summed over queries and each kv head's q heads."""
    k, q = hf(keys).double(), hf(queries).double()
    b, hk, n, d = k.shape
    w, hq = q.shape[2], q.shape[1]
    s = q @ repeat_kv(k, hq // hk).transpose(2, 3) * (scale or 1 / math.sqrt(d))
    s = s + torch.triu(torch.full_like(s, float("-inf")), diagonal=n - w + 1)
    return torch.softmax(s, -1).view(b, hk, hq // hk, w, n).sum((2, 3))


# (batch, n, heads_q, heads_kv, head_dim, w): GQA 1-6, odd lengths, w = 1 (TOVA), w = n (H2O),
# windows that are not multiples of the kernel's 64-row chunks.
SCORE_SHAPES = [(2, 300, 4, 2, 64, 32), (1, 1000, 8, 1, 128, 64), (3, 257, 6, 3, 128, 1), (1, 130, 2, 2, 256, 130),
                (2, 777, 12, 2, 64, 100), (1, 4099, 4, 4, 128, 64)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SCORE_SHAPES)
def test_window_scores_against_float64(device, shape):
    b, n, hq, hk, d, w = shape
    for dtype in dtypes_for(device):
        keys, _, window, _ = inputs(b, n, hq, hk, d, w, device, dtype, seed=n + w)
        keys = keys * 2  # peakier attention than unit-variance scores give
        ref = ref_window_scores(keys, window)
        for lse in (None, ref_lse(keys, window).to(device)):
            out = torch.full((b, hk, n), float("nan"), device=device)  # poison: an unwritten key fails
            got = kv.window_scores(keys, window, lse=lse, out=out)
            assert got is out and not out.isnan().any(), (dtype, lse is None)
            # The kernel accumulates scores in float32; torch rounds them to the inputs' dtype.
            tol = 2e-3 if device == "cuda" else {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
            err = rel_err(out.cpu(), ref.cpu())
            assert err < tol, (dtype, lse is None, err)
            # Every query's probabilities sum to one: the total is the number of window rows.
            assert abs(out.sum().item() - b * hq * w) < 1e-2 * b * hq * w


def ref_lse(keys, queries):
    k, q = hf(keys).double(), hf(queries).double()
    n, w, d = k.shape[2], q.shape[2], k.shape[3]
    s = q @ repeat_kv(k, q.shape[1] // k.shape[1]).transpose(2, 3) / math.sqrt(d)
    s = s + torch.triu(torch.full_like(s, float("-inf")), diagonal=n - w + 1)
    return torch.logsumexp(s, -1).float()


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SCORE_SHAPES)
def test_window_lse_kernel_against_float64(shape):
    """The window's LSE from the keys alone (CTAs over the keys, then the merge): every row
    written (poisoned output), within float32 rounding of float64."""
    b, n, hq, hk, d, w = shape
    for dtype in (torch.float16, torch.bfloat16):
        keys, _, window, _ = inputs(b, n, hq, hk, d, w, "cuda", dtype, seed=2 * n + w)
        keys = keys * 2
        lse = torch.full((b, hq, w), float("nan"), device="cuda")
        ws = torch.full((fk._native.window_lse_workspace(b, n, w, hq, d),), float("nan"), device="cuda")
        fk._native.window_lse(window, keys, lse, ws, scale=1 / math.sqrt(d))
        want = ref_lse(keys, window).cpu()
        assert not lse.isnan().any(), dtype
        assert (lse.cpu() - want).abs().max().item() < 2e-3, dtype


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_presses_on_the_score_kernel_keep_what_torch_keeps(dtype, monkeypatch):
    """16-bit CUDA inputs take the kernel; the kept sets agree with the torch path's (which
    rounds scores to the dtype, so a few near-ties may differ)."""
    keys, values, window, allq = inputs(2, 2000, 8, 2, 128, 64, "cuda", dtype, seed=3)
    for press, q in [(kv.SnapKV(0.5), window), (kv.TOVA(0.5), window), (kv.ObservedAttention(0.5), allq),
                     (kv.PyramidKV(0.5), window), (kv.DuoAttention(0.5, sink=16, recent=64), window)]:
        got = press(keys, values, q, layer=1, n_layers=4)
        monkeypatch.setattr(kv, "_SCORE_KERNEL", False)
        want = press(keys.double(), values.double(), q.double(), layer=1, n_layers=4)
        monkeypatch.setattr(kv, "_SCORE_KERNEL", True)
        assert torch.equal(got.lengths, want.lengths), type(press).__name__
        for bi in range(2):
            for h in range(2):
                a = set(got.positions[bi, h, : got.lengths[bi, h]].tolist())
                e = set(want.positions[bi, h, : want.lengths[bi, h]].tolist())
                assert len(a & e) >= 0.98 * len(e), (type(press).__name__, bi, h, len(a & e), len(e))


@pytest.mark.cuda
@pytest.mark.parametrize("rows,n,k", [(16, 8192, 4096), (3, 1000, 1), (5, 777, 777), (2, 100_003, 31_337), (7, 64, 33),
                                    (1, 65_541, 32_768)])
def test_topk_kernel_against_torch(rows, n, k):
    """The radix-select kernel keeps exactly torch's top-k set, ascending, on distinct scores
    (negative and positive, a few huge); on ties it takes the earliest positions."""
    g = torch.Generator().manual_seed(n + k)
    s = torch.randn(rows, 1, n, generator=g) * torch.rand(rows, 1, 1, generator=g) * 10
    s[:, :, ::97] *= 1e6
    s = s.cuda()
    got = kv._top(s, k)
    want = s.topk(k, -1).indices.sort(-1).values
    assert torch.equal(got, want)
    # Ties: every score in {0, 1, 2}; the kept set is everything above the k-th value plus the
    # earliest positions equal to it.
    t = torch.randint(0, 3, (rows, 1, n), generator=g).float().cuda()
    got = kv._top(t, k)
    kth = t.sort(-1, descending=True).values[..., k - 1:k]
    above = t > kth
    need = k - above.sum(-1, keepdim=True)
    equal_rank = (t == kth).cumsum(-1)
    keep = above | ((t == kth) & (equal_rank <= need))
    want = torch.where(keep, torch.arange(n, device="cuda"), n).sort(-1).values[..., :k]
    assert torch.equal(got, want)
    if rows % 2 == 0:  # with a lookup (sparse decode's block table): its entries, int32
        lookup = torch.randint(-5, 1 << 30, (rows // 2, n), generator=g, dtype=torch.int32).cuda()
        mapped = torch.full((rows, k), -7, dtype=torch.int32, device="cuda")
        fk._native.kv_select_topk(t.view(rows, n), mapped, lookup=lookup)
        assert torch.equal(mapped, torch.gather(lookup.repeat_interleave(2, 0), 1, want.view(rows, k)))
        with pytest.raises(fk.DTypeError, match="index"):
            fk._native.kv_select_topk(t.view(rows, n), mapped.long(), lookup=lookup)
        with pytest.raises(ValueError, match="lookup"):
            fk._native.kv_select_topk(t.view(rows, n), mapped, lookup=lookup[:, 1:])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,dv", [(64, 64), (128, 128), (80, 48)])
def test_gather_kernel_against_torch(dtype, d, dv, monkeypatch):
    g = torch.Generator().manual_seed(d + dv)
    b, n, hk, kept = 3, 501, 4, 200
    keys = torch.randn(b, n, hk, d, generator=g).to("cuda", dtype)
    values = torch.randn(b, n, hk, dv, generator=g).to("cuda", dtype)
    idx = torch.randint(0, n, (b, hk, kept), generator=g).sort(-1).values.cuda()
    idx[1, 2, 150:] = -1  # a shorter head: zero rows
    lengths = torch.full((b, hk), kept, dtype=torch.int32, device="cuda")
    got = kv._gather(keys, values, idx, lengths, padded=True)
    monkeypatch.setattr(kv, "_SCORE_KERNEL", False)
    want = kv._gather(keys, values, idx, lengths, padded=True)
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert got.keys.is_contiguous() and got.values.is_contiguous()


def test_pyramid_budgets():
    """kvpress's pyramid: budgets fall linearly with depth from max_num to min_num; they fall
    back to the uniform budget where the pyramid does not fit."""
    press = kv.PyramidKV(0.5, window=64, beta=20)
    n, layers = 4096, 8
    cap = 64 + n * 0.5
    lo = (cap - 64) / 20
    hi = (cap - 64) * 2 - lo
    want = [round(hi - i * (hi - lo) / (layers - 1)) for i in range(layers)]
    assert [press.budget(n, i, layers) for i in range(layers)] == want
    assert want[0] > want[-1]
    assert kv.PyramidKV(0.5, window=64).budget(100, 0, 8) == 50  # the pyramid does not fit: SnapKV's


@pytest.mark.parametrize("device", devices())
def test_adakv_selects_across_heads(device):
    """kvpress's AdaKV selection: a per-head floor of the top alpha * budget, then the lowest
    heads * (n - budget) scores of the whole layer pruned."""
    keys, values, window, _ = inputs(B, N, HQ, HK, D, W, device, seed=5)
    press = kv.AdaKV(kv.SnapKV(0.5, window=W), alpha_safeguard=0.2)
    c = press(keys, values, window)
    scores = ref_snapkv(keys, window, W, 5)
    n_kept = int(N * 0.5)
    safe = int(n_kept * 0.2)
    s = scores.clone()
    s.scatter_(-1, s.topk(safe, -1).indices, torch.finfo(s.dtype).max)
    pruned = (-s.reshape(B, -1)).topk(HK * (N - n_kept), -1).indices
    keep = torch.ones(B, HK * N, dtype=torch.bool, device=s.device).scatter_(1, pruned, False).view(B, HK, N)
    want = [[keep[b, h].nonzero().flatten().tolist() for h in range(HK)] for b in range(B)]
    same_sets(c.positions, c.lengths, want)
    assert int(c.lengths.sum()) == B * HK * n_kept
    assert (c.lengths >= safe).all()


def reference_attention(q, c):
    """float64 attention of q over each head's first `length` compressed tokens."""
    b, nq, hq, d = q.shape
    hk = c.keys.shape[2]
    k = c.keys.double().repeat_interleave(hq // hk, 2)
    v = c.values.double().repeat_interleave(hq // hk, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(d)
    valid = torch.arange(k.shape[1], device=q.device) < c.lengths.long().repeat_interleave(hq // hk, 1)[..., None]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("device", devices())
def test_attention_over_compressed_layers(device):
    """Uniform presses go through decode_attention, per-head lengths through the masked
    kernel; both match float64 attention over the kept tokens (outputs poisoned first)."""
    for i, dtype in enumerate(dtypes_for(device)):
        keys, values, window, _ = inputs(B, N, HQ, HK, D, W, device, dtype, seed=30 + i)
        q = torch.randn(B, 1, HQ, D, generator=torch.Generator().manual_seed(i)).to(device, dtype)
        for press in (kv.SnapKV(0.5, window=W), kv.AdaKV(kv.SnapKV(0.6, window=W)), kv.DuoAttention(0.5, 8, 16)):
            c = press(keys, values, window)
            out = kv.compressed_attention(q, c)
            ref = reference_attention(q, c)
            tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < tol, (type(press).__name__, dtype, err)


@pytest.mark.parametrize("device", devices())
def test_duo_attention_heads(device):
    """Supplied head scores: the best heads keep everything, the others sink + recent.
    Estimated: a head whose window attends far back is a retrieval head."""
    keys, values, window, _ = inputs(1, 200, 4, 4, 32, 16, device, seed=2)
    c = kv.DuoAttention(0.5, sink=8, recent=16, head_scores=[0.1, 0.9, 0.2, 0.8])(keys, values)
    assert c.lengths.tolist() == [[24, 200, 24, 200]]
    assert c.positions[0, 0, :24].tolist() == list(range(8)) + list(range(184, 200))
    keys[0, 100, 2] = window[0, :, 2].mean(0) * 10  # head 2's window queries all look at token 100
    c = kv.DuoAttention(0.75, sink=8, recent=16)(keys, values, window)
    assert c.lengths[0].tolist() == [24, 24, 200, 24]


def test_think_channels():
    """kvpress's ThinK: channels by mean_w(q^2) (group-averaged) * mean_n(k^2), the lowest
    zeroed; the compact keys with the gathered queries give the same scores."""
    keys, values, window, _ = inputs(B, N, HQ, HK, D, W, "cpu", seed=8)
    zeroed, compact = kv.ThinK(0.25, window=W)(keys, values, window)
    qn = hf(window).pow(2).mean(2).view(B, HK, -1, D).mean(2)
    kn = hf(keys).pow(2).mean(2)
    pruned = (qn * kn).topk(int(D * 0.25), -1, largest=False).indices
    want = hf(keys).scatter(-1, pruned[:, :, None, :].expand(B, HK, N, -1), 0)
    assert torch.equal(hf(zeroed), want)
    q = torch.randn(B, 3, HQ, D)
    full = torch.einsum("bqhd,bkhd->bhqk", q, zeroed.repeat_interleave(2, 2))
    small = torch.einsum("bqhd,bkhd->bhqk", compact.queries(q), compact.keys.repeat_interleave(2, 2))
    assert torch.allclose(full, small, atol=1e-5)
    assert compact.keys.shape[-1] == D - int(D * 0.25)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_pruned_attention_is_attention_over_the_zeroed_keys(device, softcap):
    """pruned_attention against float64 attention where the prefix keys have ThinK's dropped
    channels zeroed (kvpress's semantics): ragged prefixes (padding poisoned), GQA, 3 new
    tokens causal among themselves after 2 earlier ones, each dtype."""
    b, p_len, hq, hk, d, q_len, before = 2, 75, 6, 2, 64, 3, 2
    lens = torch.tensor([75, 41])
    for i, dtype in enumerate(dtypes_for(device)):
        keys, values, window, _ = inputs(b, p_len, hq, hk, d, 16, device, dtype, seed=30 + i)
        _, compact = kv.ThinK(0.5, window=16)(keys, values, window)
        g = torch.Generator().manual_seed(i)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        q, k_new, v_new = rnd(b, q_len, hq, d), rnd(b, before + q_len, hk, d), rnd(b, before + q_len, hk, d)
        kc, vc = compact.keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
        pad = torch.arange(p_len, device=device) >= lens.to(device)[:, None]                  # (b, P)
        kc[pad[:, None, :, None].expand_as(kc)] = 1e4  # padding must not count
        vc[pad[:, None, :, None].expand_as(vc)] = 1e4
        q_before = q.clone()
        out = kv.pruned_attention(q, kc, compact.channels, vc, lens.to(device), k_new=k_new.transpose(1, 2),
                                  v_new=v_new.transpose(1, 2), new_before=before, softcap=softcap)
        assert torch.equal(q, q_before)  # the inputs are left as they were
        zeroed = torch.zeros(b, p_len, hk, d, dtype=torch.float64, device=device).scatter_(
            3, compact.channels[:, None].expand(b, p_len, hk, -1), compact.keys.double())
        ks = torch.cat([zeroed, k_new.double()], 1).repeat_interleave(hq // hk, 2)
        vs = torch.cat([values.double(), v_new.double()], 1).repeat_interleave(hq // hk, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), ks) / math.sqrt(d)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        j = torch.arange(p_len + before + q_len, device=device)
        t = torch.arange(q_len, device=device)[:, None]
        hidden = (j < p_len) & (j >= lens.to(device)[:, None, None, None])  # (b, 1, 1, keys)
        hidden = hidden | ((j >= p_len) & (j - p_len > before + t))
        want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.masked_fill(hidden, float("-inf")), -1), vs)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(out, want) < tol, (dtype, rel_err(out, want))


def test_merge_by_definition():
    """Each kept slot holds the score-weighted mean of itself and the evicted tokens whose key
    is closest (cosine) to its key."""
    keys, values, window, _ = inputs(1, 80, 2, 1, 16, 8, "cpu", seed=11)
    press = kv.SnapKV(0.5, window=8)
    c = kv.KVMerge(press)(keys, values, window)
    scores = press.score(keys, values, window)[0, 0]
    w = scores - scores.min() + 1e-3
    kept = c.positions[0, 0].tolist()
    kn = torch.nn.functional.normalize(keys[0, :, 0], dim=-1)
    acc_k = {p: [w[p] * keys[0, p, 0], w[p]] for p in kept}
    acc_v = {p: w[p] * values[0, p, 0] for p in kept}
    for t in range(80):
        if t in acc_k:
            continue
        target = kept[int((kn[kept] @ kn[t]).argmax())]
        acc_k[target][0] = acc_k[target][0] + w[t] * keys[0, t, 0]
        acc_k[target][1] = acc_k[target][1] + w[t]
        acc_v[target] = acc_v[target] + w[t] * values[0, t, 0]
    for j, p in enumerate(kept):
        assert torch.allclose(c.keys[0, j, 0], acc_k[p][0] / acc_k[p][1], atol=1e-5)
        assert torch.allclose(c.values[0, j, 0], acc_v[p] / acc_k[p][1], atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 120, 256])
def test_merge_targets_on_the_gpu(dtype, d):
    """The match kernel's float32 similarities of the 16-bit keys pick float32's target but
    for float rounding in near ties (poisoned output; kept / evicted counts off the tiles)."""
    b, hk, n, n_kept = 2, 2, 3001, 1001
    keys, _, _, _ = inputs(b, n, 8, hk, d, 64, "cuda", dtype, seed=5 + d)
    keys[0, 7, 1] = 0  # a zero key: F.normalize leaves it zero, similarity 0
    g = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b * hk)]).view(b, hk, n)
    kept, evicted = order[..., :n_kept].sort(-1).values.cuda(), order[..., n_kept:].sort(-1).values.cuda()
    got = kv.KVMerge._most_similar(keys, kept, evicted).cpu()
    want = kv.KVMerge._most_similar(keys.cpu().float(), kept.cpu(), evicted.cpu())
    unit = torch.nn.functional.normalize(keys.cpu().double(), dim=-1).transpose(1, 2)
    sim = torch.gather(unit, 2, evicted.cpu()[..., None].expand(b, hk, n - n_kept, d)) @ \
        torch.gather(unit, 2, kept.cpu()[..., None].expand(b, hk, n_kept, d)).transpose(-1, -2)
    gap = sim.gather(-1, want[..., None]) - sim.gather(-1, got[..., None])
    assert (got == want).float().mean() > 0.999
    assert gap.abs().max() < 1e-5, gap.abs().max()


def merge_reference(keys, values, slot, w, n_kept):
    """float64 score-weighted mean of every token in its slot, (b, n_kept, hk, D)."""
    b, n, hk, _ = keys.shape
    out = []
    for x in (keys, values):
        xs = x.double().transpose(1, 2) * w.double()[..., None]                     # (b, hk, n, D)
        acc = torch.zeros(b, hk, n_kept, x.shape[3], dtype=torch.float64, device=x.device)
        acc.index_put_((torch.arange(b, device=x.device)[:, None, None], torch.arange(hk, device=x.device)[None, :, None],
                        slot), xs, accumulate=True)
        wsum = torch.zeros(b, hk, n_kept, dtype=torch.float64, device=x.device).scatter_add_(-1, slot, w.double())
        out.append((acc / wsum[..., None]).transpose(1, 2))
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_rows_kernel(dtype):
    """kv_merge_rows against float64: keys heads-first in memory (strided), values of another
    width, outputs poisoned, slot counts off the CTA tiles."""
    b, hk, n, n_kept, d, dv = 2, 3, 1037, 411, 64, 136
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(b, hk, n, d, generator=g).to("cuda", dtype).transpose(1, 2)       # strided view
    values = torch.randn(b, n, hk, dv, generator=g).to("cuda", dtype)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b * hk)]).view(b, hk, n)
    kept = order[..., :n_kept].sort(-1).values
    slot = torch.randint(0, n_kept, (b, hk, n), generator=g)
    slot = slot.scatter_(-1, kept, torch.arange(n_kept).expand(b, hk, n_kept)).cuda()  # slot j's own token
    kept = kept.cuda()
    w = (torch.rand(b, hk, n, generator=g) + 1e-3).cuda()
    kout = torch.full((b, n_kept, hk, d), float("nan"), dtype=dtype, device="cuda")
    vout = torch.full((b, n_kept, hk, dv), float("nan"), dtype=dtype, device="cuda")
    ws = torch.zeros(b * hk * n_kept * (d + dv + 1), device="cuda")
    fk._native.kv_merge_rows(keys, values, slot, kept, w, ws, kout, vout, stream=torch.cuda.current_stream().cuda_stream)
    want_k, want_v = merge_reference(keys, values, slot, w, n_kept)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(kout, want_k) < tol and rel_err(vout, want_v) < tol


@pytest.mark.cuda
def test_merge_kernels_name_bad_arguments():
    keys = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    kept = torch.arange(32, device="cuda").expand(1, 2, 32).contiguous()
    evicted = kept + 32
    inv = torch.ones(1, 2, 32, device="cuda")
    slot = torch.empty(1, 2, 32, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="inv_norm"):
        fk._native.kv_merge_match(keys, kept, evicted, inv[..., :31].contiguous(), slot)
    with pytest.raises(ValueError, match="slot"):
        fk._native.kv_merge_match(keys, kept, evicted, inv, slot[..., :5].contiguous())
    with pytest.raises(ValueError, match="multiple of 8"):
        fk._native.kv_merge_match(keys[..., :60], kept, evicted, inv, slot)
    with pytest.raises(ValueError, match="workspace"):
        fk._native.kv_merge_rows(keys, keys, torch.zeros(1, 2, 64, dtype=torch.long, device="cuda"), kept,
                                 torch.ones(1, 2, 64, device="cuda"), torch.zeros(10, device="cuda"),
                                 keys[:, :32].clone(), keys[:, :32].clone())


@pytest.mark.cuda
def test_merge_press_kernels_match_torch(monkeypatch):
    """The whole press on the kernels against its torch path on the same GPU inputs (Knorm
    chooses: its scores do not depend on the kernels)."""
    keys, values, window, _ = inputs(2, 2000, 8, 2, 128, 32, "cuda", torch.bfloat16, seed=9)
    press = kv.KVMerge(kv.Knorm(0.4))
    c = press(keys, values, window)
    monkeypatch.setattr(kv, "_SCORE_KERNEL", False)
    ref = press(keys, values, window)
    assert torch.equal(c.positions, ref.positions) and torch.equal(c.lengths, ref.lengths)
    assert rel_err(c.keys, ref.keys) < 1e-2 and rel_err(c.values, ref.values) < 1e-2


@pytest.mark.cuda
def test_compression_releases_memory():
    keys, values, window, _ = inputs(1, 8192, 8, 2, 128, 64, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    c = kv.SnapKV(0.75, window=64)(keys, values, window)
    del keys, values
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    full = 2 * 8192 * 2 * 128 * 2
    assert before - after >= 0.7 * full, (before, after)
    assert c.keys.shape[1] == 2048


def test_bad_input():
    keys, values, window, _ = inputs(1, 100, 2, 1, 16, 8, "cpu")
    with pytest.raises(ValueError, match="ratio"):
        kv.SnapKV(1.0)
    with pytest.raises(ValueError, match="queries"):
        kv.SnapKV(0.5)(keys, values)
    with pytest.raises(fk.ShapeError, match="queries"):
        kv.SnapKV(0.5)(keys, values, window[..., :8])
    with pytest.raises(fk.ShapeError, match="values"):
        kv.Knorm(0.5)(keys, values[:, :50])
    with pytest.raises(ValueError, match="unknown press"):
        kv.make_press("nope")
    with pytest.raises(ValueError, match="more keys"):
        kv.SnapKV(0.5, window=8)(keys[:, :8], values[:, :8], window)
    assert isinstance(kv.make_press("adakv", scorer="knorm", ratio=0.3), kv.AdaKV)
    ada = kv.make_press("adakv", ratio=0.3, window=16)  # the scorer's own options reach it
    assert isinstance(ada.scorer, kv.SnapKV) and ada.scorer.window == 16 and ada.ratio == 0.3
    with pytest.raises(ValueError, match="streaming_ratio"):
        kv.make_press("duo_attention", ratio=0.5)
    with pytest.raises(ValueError, match="at least as many keys"):
        kv.window_scores(keys[:, :4], window)
    with pytest.raises(fk.ShapeError, match="lse"):
        kv.window_scores(keys, window, lse=torch.zeros(1, 2, 3))
    with pytest.raises(fk.ShapeError, match="out"):
        kv.window_scores(keys, window, out=torch.zeros(1, 1, 99))
