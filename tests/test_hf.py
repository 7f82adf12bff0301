"""transformers integration: tiny random-init Llama, Mistral (sliding window), Qwen2 and Gemma2
(softcap, sliding window) give transformers' eager logits and greedy tokens when patched, with the
dense backend, the paged cache, compile and (on the GPU) the CUDA-graphed decode loop."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
import ferrokernels as fk  # noqa: E402
import ferrokernels.hf as fh  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def make(arch: str, seed: int = 0, dtype=torch.float32, device="cpu", **extra):
    """A random-init model with windows shorter than the test prompts, so they bite."""
    t = transformers
    cls, cfg = {
        "llama": (t.LlamaForCausalLM, lambda: t.LlamaConfig(**{**COMMON, **extra})),
        "mistral": (t.MistralForCausalLM, lambda: t.MistralConfig(sliding_window=5, **COMMON)),
        "qwen2": (t.Qwen2ForCausalLM, lambda: t.Qwen2Config(**COMMON)),
        "gemma2": (t.Gemma2ForCausalLM, lambda: t.Gemma2Config(sliding_window=6, head_dim=16,
                                                               attn_logit_softcapping=2.0, query_pre_attn_scalar=20,
                                                               **COMMON)),
    }[arch]
    torch.manual_seed(seed)
    config = cfg()
    config._attn_implementation = "eager"
    return cls(config).eval().to(device, dtype)


def padded_batch(n=23, seed=1, device="cpu"):
    """Three prompts of n, n - 4 and n - 9 real tokens, left-padded as generate expects."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids.to(device), mask.to(device)


ARCHS = ["llama", "mistral", "qwen2", "gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_logits_match_eager_on_a_padded_batch(arch):
    model = make(arch)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        fk.patch(model)
        assert model.config._attn_implementation == "ferrokernels"
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < 1e-4
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_the_paged_cache_gives_eager_greedy_tokens(arch):
    model = make(arch)
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        fk.patch(model)
        seen = []
        cache_cls = fh.PagedCache
        orig = cache_cls._attend
        cache_cls._attend = lambda self, *a: seen.append(type(self)) or orig(self, *a)
        try:
            got = model.generate(ids, **kw)
        finally:
            cache_cls._attend = orig
    assert seen and all(c is fh.PagedCache for c in seen)  # generate ran on our cache
    assert torch.equal(got, want)
    assert torch.equal(fh.generate(model, ids, mask, max_new_tokens=12), want)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("split", [2, 19])
def test_paged_cache_chunked_prefill(arch, split):
    """A prompt fed in two chunks: a long second chunk runs on keys gathered from the pages, a
    short one (<= 16 tokens) on the decode kernel; both must give the one-shot logits."""
    model = make(arch)
    ids, _ = padded_batch()
    fk.patch(model)
    with torch.no_grad():
        want = model(ids).logits
        cache = fh.PagedCache(model.config, 3, 64, page_size=4)
        a = model(ids[:, :split], past_key_values=cache).logits
        b = model(ids[:, split:], past_key_values=cache).logits
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.pages.lengths(cache.seqs) == [ids.shape[1]] * 3
    assert (torch.cat([a, b], 1) - want).abs().max().item() < 1e-4


def test_paged_cache_drops_padding_and_frees_pages():
    model = fk.patch(make("llama"))
    ids, mask = padded_batch()
    cache = fh.PagedCache(model.config, 3, 64, page_size=4)
    free = cache.pages.free_pages
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    assert cache.pages.lengths(cache.seqs) == mask.sum(1).tolist()  # padding is not stored
    cache.reset()
    assert cache.pages.free_pages == free


def test_num_return_sequences_forks_the_cache():
    model = make("llama")
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        fk.patch(model)
        got = model.generate(ids, **kw)
    assert got.shape[0] == 6
    assert torch.equal(got, want)


def test_beam_search_on_forked_pages():
    model = make("mistral")
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        fk.patch(model)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_unpatch_restores_the_model():
    model = make("qwen2")
    ids, mask = padded_batch()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        fk.patch(model, linear="w8a16", group_size=64)
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, fk.nn.QuantLinear)
        assert isinstance(model.lm_head, torch.nn.Linear)  # skipped by default
        got = model(ids, attention_mask=mask).logits
        rel = ((got - want)[mask.bool()].norm() / want[mask.bool()].norm()).item()
        assert 0 < rel < 2e-2  # 8-bit weights: close, not equal
        fk.unpatch(model)
        assert model.config._attn_implementation == "eager"
        assert "generate" not in model.__dict__
        assert all(model.get_submodule(n) is m for n, m in linears.items())
        assert torch.equal(model(ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_compile_fullgraph_has_no_breaks(arch):
    model = fk.patch(make(arch))
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
        step = torch.compile(lambda i, m, p: model(i, attention_mask=m, position_ids=p, past_key_values=cache).logits,
                             fullgraph=True, backend="aot_eager")
        last = step(ids[:, -1:], mask, torch.full((3, 1), ids.shape[1] - 1))  # positions as `want` has them
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < 1e-4
    assert (last[:, -1] - want[:, -1]).abs().max().item() < 1e-4


def test_bad_use_raises_clearly():
    model = make("llama")
    with pytest.raises(ValueError, match="attn_implementation"):
        fh.PagedCache(model.config, 1, 16)
    with pytest.raises(NotImplementedError, match="attention="):
        fk.patch(model, attention="sparse")
    with pytest.raises(NotImplementedError, match="linear="):
        fk.patch(model, linear="w2a16")
    fk.patch(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        cache = fh.PagedCache(model.config, 3, 16)
        with pytest.raises(ValueError, match="max_cache_len"):
            model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="max_batch_size"):
            model(ids, past_key_values=fh.PagedCache(model.config, 2, 64))
        model.train()
        model.model.layers[0].self_attn.attention_dropout = 0.1
        with pytest.raises(NotImplementedError, match="inference-only"):
            model(ids)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_cuda_graph_generate_matches_eager_paged(arch):
    """bf16 on the GPU: the graphed decode loop replays exactly what the eager paged loop does,
    and the logits stay within bf16 rounding of transformers' eager attention."""
    model = make(arch, dtype=torch.bfloat16, device="cuda")
    ids, mask = padded_batch(n=40, device="cuda")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.float()
        fk.patch(model)
        got = model(ids, attention_mask=mask).logits.float()
        real = mask.bool()
        assert ((got - want)[real].norm() / want[real].norm()).item() < 2e-2
        eager = fh.generate(model, ids, mask, max_new_tokens=24, cuda_graph=False)
        graphed = fh.generate(model, ids, mask, max_new_tokens=24, cuda_graph=True)
    assert torch.equal(graphed, eager)


def _gptq_checkpoint(tmp_path, group=32):
    """A tiny Llama saved as AutoGPTQ writes it (v1: zeros stored minus one, rows packed 8 per
    int32 along K, zeros and columns along N), and the same model with the dequantized weights."""
    from safetensors.torch import save_file

    from test_gemm_formats import pack_cols, pack_rows

    model = make("llama")
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(7)
    state = {k: v for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        k, n = mod.in_features, mod.out_features
        w = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
        z = torch.randint(0, 16, (k // group, n), generator=g, dtype=torch.int32)
        s = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).to(torch.float16)
        gi = torch.arange(k) // group
        mod.weight.data = (s[gi] * (w - z[gi]).to(torch.float16)).t().float()  # GPTQ's dequantization
        del state[name + ".weight"]
        state.update({name + ".qweight": pack_rows(w), name + ".qzeros": pack_cols((z - 1) & 0xF),
                      name + ".scales": s, name + ".g_idx": gi.to(torch.int32)})
    model.config.save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    return model


def test_quantizer_loads_a_gptq_checkpoint_into_quant_linear(tmp_path):
    want_model = _gptq_checkpoint(tmp_path)
    model = fh.load_quantized(str(tmp_path), dtype=torch.float32).eval()
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, fk.nn.QuantLinear) and q.bits == 4 and q.group_size == 32
    assert isinstance(model.lm_head, torch.nn.Linear)
    # GPTQ dequantizes in fp16, bit for bit:
    assert torch.equal(q.dequantized_weight(torch.float16).float(), want_model.model.layers[1].mlp.down_proj.weight)
    # Our CPU kernel dequantizes in float32 (no fp16 rounding of scale * code): the reference
    # model gets exactly those weights.
    for name, mod in model.named_modules():
        if isinstance(mod, fk.nn.QuantLinear):
            want_model.get_submodule(name).weight.data = mod.dequantized_weight(torch.float32)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = want_model(ids, attention_mask=mask).logits
        got = fk.patch(model)(ids, attention_mask=mask).logits
    real = mask.bool()
    assert ((got - want)[real].norm() / want[real].norm()).item() < 1e-5


def test_quantizer_quantizes_a_full_precision_checkpoint(tmp_path):
    model = make("qwen2")
    model.save_pretrained(tmp_path)
    cfg = fh.FerrokernelsConfig(format="w8a16")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=cfg,
                                                               dtype=torch.float32).eval()
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, fk.nn.QuantLinear)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = loaded(ids, attention_mask=mask).logits
    real = mask.bool()
    assert 0 < ((got - want)[real].norm() / want[real].norm()).item() < 2e-2
    with pytest.raises(NotImplementedError, match="format="):
        fh.FerrokernelsConfig(format="w3a16")
    with pytest.raises(NotImplementedError, match="4-bit only"):
        fk.hf_quantizer.config_from_checkpoint({"quant_method": "gptq", "bits": 8})


@pytest.mark.parametrize("kind", ["quant", "fp8"])
def test_quantized_attention_backend_per_layer(kind):
    """patch(attention="quant"|"fp8", quant_layers=[1]): layer 1's prefill runs the quantized
    op, layer 0 stays exact; logits stay close to eager, generate works, unpatch clears it."""
    import sys

    qa = sys.modules["ferrokernels.quant_attention"]  # the module (fk.quant_attention is the function)

    model = make("llama", head_dim=64)  # the quantized ops take head_dim 64 or 128
    ids = padded_batch()[0][:1]  # one unpadded prompt: quantized layers take plain causal attention
    calls = []
    name = "quant_attention" if kind == "quant" else "fp8_attention"
    orig = getattr(qa, name)
    with torch.no_grad():
        want = model(ids).logits
        fk.patch(model, attention=kind, quant_layers=[1])
        setattr(qa, name, lambda *a, **k: calls.append(1) or orig(*a, **k))
        try:
            got = model(ids).logits
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        finally:
            setattr(qa, name, orig)
    assert len(calls) >= 2  # the prefill of the forward and of generate's prompt, layer 1 only
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert 0.99 < cos < 1.0
    assert out.shape == (1, ids.shape[1] + 4)
    fk.unpatch(model)
    assert all(not hasattr(m, "_ferrokernels_quant") for m in model.modules())
    with torch.no_grad():
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        fk.patch(model, attention=kind)
        with pytest.raises(NotImplementedError, match="no padding"):
            model(ids, attention_mask=mask)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["quant", "fp8"])
def test_quantized_backend_on_gpu_models(kind):
    """On the GPU the quantized layers run the Hopper kernels; logits stay close to eager and
    generate (paged decode after a quantized prefill) runs."""
    model = make("llama", head_dim=64, dtype=torch.bfloat16, device="cuda")
    ids = padded_batch(n=150, device="cuda")[0][:1]
    with torch.no_grad():
        want = model(ids).logits.float()
        fk.patch(model, attention=kind, quant_layers=[1])
        got = model(ids).logits.float()
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert 0.99 < cos
    assert out.shape == (1, ids.shape[1] + 4)
    fk.unpatch(model)


# --- quantized and compressed caches --------------------------------------------------------------

def make64(seed=0):
    """A tiny llama with head_dim 64 (the quantized cache's smallest)."""
    return make("llama", seed=seed, hidden_size=256, intermediate_size=256)


def step_logits(model, ids, mask, cache, steps, seed=3):
    """Prefill `ids` into `cache`, then `steps` single random tokens; returns the full ids, mask
    and the logits of every step (prefill's last position first)."""
    g = torch.Generator().manual_seed(seed)
    out = [model(ids, attention_mask=mask, position_ids=fh._positions(mask), past_key_values=cache).logits[:, -1]]
    for _ in range(steps):
        nxt = torch.randint(1, VOCAB, (ids.shape[0], 1), generator=g)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = fh._positions(mask)[:, -1:]
        out.append(model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1])
    return ids, mask, torch.stack(out, 1)


@pytest.mark.parametrize("format,residual,tol", [("int8", 128, 0.02), ("fp8", 128, 0.08), ("int4", 0, 0.25),
                                                 ("int4", 200, 1e-4)])
def test_quantized_cache_decode_matches_eager_within_its_error(format, residual, tol):
    """A padded batch: prefill then decode steps on a QuantizedKVCache, against eager over the
    whole sequence. With a ring longer than the sequence (int4, residual 200) nothing is
    quantized and the logits must agree to float32 rounding."""
    model = make64()
    ids, mask = padded_batch(n=70)
    with torch.no_grad():
        fk.patch(model)
        cache = fh.QuantizedKVCache(model.config, 128, format=format, group_size=32, residual=residual)
        full, full_mask, got = step_logits(model, ids, mask, cache, 5)
        fk.unpatch(model)
        want = model(full, attention_mask=full_mask, position_ids=fh._positions(full_mask)).logits
        want = want[:, ids.shape[1] - 1:]
    assert cache.kv[0].lengths == full_mask.sum(1).tolist()  # padding is not stored
    err = ((got - want).norm() / want.norm()).item()
    assert err <= tol, err
    if residual == 0:
        assert all(q > 0 for q in cache.kv[0].quant_lengths) and err > 1e-4  # quantization did happen


def test_quantized_cache_through_patch_and_generate():
    model = make64()
    ids, mask = padded_batch(n=40)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        fk.patch(model, kv_cache="int4")
        seen = []
        orig = fh.QuantizedKVCache._attend_layer
        fh.QuantizedKVCache._attend_layer = lambda self, *a: seen.append(type(self)) or orig(self, *a)
        try:
            got = model.generate(ids, **kw)
        finally:
            fh.QuantizedKVCache._attend_layer = orig
        fk.unpatch(model)
        want = model.generate(ids, **kw)
    assert seen
    assert torch.equal(got, want)  # 46 tokens stay in the full-precision ring (residual 128)


def eager_pressed(model, ids, press, cache):
    """Each layer's Compressed when `press` runs by hand on the eager prefill of `ids` (1, n): the
    layer's K/V from a DynamicCache, the queries rotated as the model rotates them and cut as
    `cache` (a CompressedCache) cuts them."""
    n = ids.shape[1]
    dyn = transformers.DynamicCache(config=model.config)
    queries = {}
    hooks = [m.q_proj.register_forward_hook(lambda m, a, o, i=i: queries.__setitem__(i, o))
             for i, m in enumerate(fh._attention_modules(model))]
    model(ids, past_key_values=dyn)
    for h in hooks:
        h.remove()
    out = []
    for layer in range(len(dyn.layers)):
        k, v = dyn.layers[layer].keys.transpose(1, 2), dyn.layers[layer].values.transpose(1, 2)
        q = queries[layer].view(1, n, -1, 64).transpose(1, 2)
        cos, sin = model.model.rotary_emb(q, torch.arange(n)[None])
        q = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)[0].transpose(1, 2)
        out.append(press(k, v, cache._queries(q), layer=layer, n_layers=len(dyn.layers)))
    return out


def dynamic_cache_of(model, layers):
    """A DynamicCache holding each layer's Compressed keys and values (padded per head)."""
    cache = transformers.DynamicCache(config=model.config)
    for layer, c in enumerate(layers):
        cache.update(c.keys.transpose(1, 2), c.values.transpose(1, 2), layer)
    return cache


@pytest.mark.parametrize("press", ["streaming_llm", "snapkv", "knorm", "tova"])
def test_compressed_cache_decode_equals_eager_on_the_pressed_cache(press):
    """CompressedCache's decode logits against eager attention over a DynamicCache holding the
    same press's choice of the eager prefill's K/V."""
    model = make64()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (1, 90), generator=g)
    nxt = torch.randint(1, VOCAB, (1, 1), generator=g)
    p = fk.kv.make_press(press, ratio=0.5, **({"window": 16} if press == "snapkv" else {}))
    with torch.no_grad():
        fk.patch(model)
        cache = fh.CompressedCache(model.config, p, max_new_tokens=4)
        model(ids, past_key_values=cache)
        got = model(nxt, past_key_values=cache, position_ids=torch.tensor([[90]])).logits
        fk.unpatch(model)
        pressed = dynamic_cache_of(model, eager_pressed(model, ids, p, cache))
        want = model(nxt, past_key_values=pressed, position_ids=torch.tensor([[90]])).logits
    assert cache.lengths[0] == [p.budget(90) + 1]
    assert (got - want).abs().max().item() < 1e-4


def test_press_context_manager_compresses_and_restores():
    model = make64()
    ids, mask = padded_batch(n=60)
    with torch.no_grad():
        with fk.kv.press(model, "streaming_llm", ratio=0.5) as p:
            seen = []
            orig = fh.CompressedCache._store
            fh.CompressedCache._store = lambda self, *a: seen.append(self) or orig(self, *a)
            try:
                out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            finally:
                fh.CompressedCache._store = orig
        assert isinstance(p, fk.kv.StreamingLLM) and out.shape == (3, 64)
        cache = seen[0]
        # Per sequence: the press's budget of its real tokens, plus the 3 decoded after the prefill.
        assert cache.lengths[0] == [p.budget(int(n)) + 3 for n in mask.sum(1)]
        assert cache.nbytes() < 2 * 2 * 3 * 60 * 2 * 64 * 4  # less than the full layers would hold
    assert model.config._attn_implementation == "eager" and "generate" not in model.__dict__


def test_compressed_cache_refuses_bad_page_size():
    model = fk.patch(make64())
    with pytest.raises(ValueError, match="page_size"):
        fh.CompressedCache(model.config, fk.kv.SnapKV(0.5), max_new_tokens=4, page_size=48)


def test_think_cache_decode_equals_eager_on_the_zeroed_keys():
    """CompressedCache with ThinK: decode logits (two steps) against eager attention over a
    DynamicCache holding the eager prefill's keys with ThinK's dropped channels zeroed
    (kvpress's ThinK) and the new tokens in full; the layer stores only the kept channels."""
    model = make64()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, VOCAB, (1, 90), generator=g)
    steps = torch.randint(1, VOCAB, (2, 1), generator=g)
    pos = lambda i: torch.tensor([[90 + i]])  # noqa: E731
    p = fk.kv.ThinK(0.5, window=16)
    with torch.no_grad():
        fk.patch(model)
        cache = fh.CompressedCache(model.config, p, max_new_tokens=4)
        model(ids, past_key_values=cache)
        got = [model(steps[i:i + 1], past_key_values=cache, position_ids=pos(i)).logits for i in range(2)]
        fk.unpatch(model)
        zeroed = eager_pressed(model, ids, lambda k, v, q, **kw: (p(k, v, q)[0], v, p.channels(k, q)), cache)
        ref = transformers.DynamicCache(config=model.config)
        for layer, (kz, v, ch) in enumerate(zeroed):
            ref.update(kz.transpose(1, 2), v.transpose(1, 2), layer)
            assert torch.equal(cache.channels[layer], ch)
        want = [model(steps[i:i + 1], past_key_values=ref, position_ids=pos(i)).logits for i in range(2)]
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-4
    assert cache.k[0].shape == (1, 2, 90, 32) and cache.lengths[0] == [92]
    # Per layer (float32): K on 32 of 64 channels, V whole, room for 4 new tokens' K and V.
    assert cache.nbytes() == 2 * (90 * 2 * 32 * 4 + 90 * 2 * 64 * 4 + 2 * 4 * 2 * 64 * 4)


def test_think_press_on_a_padded_batch_matches_each_sequence_alone():
    """kv.press(model, "think") through generate on a left-padded batch: each sequence gets the
    tokens and scores it gets alone (its channels chosen from its own real tokens)."""
    model = make64()
    ids, mask = padded_batch(n=50)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), fk.kv.press(model, "think", key_ratio=0.5, window=8) as p:
        assert isinstance(p, fk.kv.ThinK)
        batch = model.generate(ids, attention_mask=mask, **kw)
        for i in range(3):
            real = ids[i:i + 1, mask[i].bool()]
            alone = model.generate(real, attention_mask=torch.ones_like(real), **kw)
            assert torch.equal(batch.sequences[i, -4:], alone.sequences[0, -4:]), i
            for a, b in zip(batch.scores, alone.scores):
                assert (a[i] - b[0]).abs().max().item() < 1e-4


def test_think_cache_refuses_sliding_window_layers():
    model = fk.patch(make64())
    cache = fh.CompressedCache(model.config, fk.kv.ThinK(0.5), max_new_tokens=4)
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        cache._attend_think(0, q, q[:, :, :2], q[:, :, :2], None, (8, 0), 0.0)


_HEAD_KEPT = {}  # layer -> (kept per kv head, padded length): the per-head reference's mask


def _eager_where(query, key, value, scaling, visible=None):
    """Eager attention (transformers' layout, GQA) over the keys where `visible` (bool,
    broadcast against (b, heads_q, q_len, kv_len)) is True; returns (b, q_len, heads_q, D)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    s = (query @ k.transpose(-1, -2)) * scaling
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2).contiguous()


def _per_head_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention where kv head h of a pressed layer sees its first kept[h] tokens of the
    padded pressed K/V and every token appended after them."""
    g = query.shape[1] // key.shape[1]
    kept, padded = _HEAD_KEPT[module.layer_idx]
    j = torch.arange(key.shape[2])
    visible = (j < kept.repeat_interleave(g)[:, None]) | (j >= padded)           # (heads_q, kv)
    return _eager_where(query, key, value, scaling, visible[None, :, None]), None


@pytest.mark.parametrize("press", ["adakv", "duo_attention"])
def test_per_head_presses_decode_equals_eager_over_each_heads_tokens(press):
    """AdaKV / DuoAttention keep a different number of tokens per kv head: CompressedCache's
    decode logits against eager attention over the pressed, padded K/V with each head masked to
    its own kept tokens (two decode steps, so the appended tokens are attended too)."""
    model = make64()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (1, 90), generator=g)
    steps = torch.randint(1, VOCAB, (2, 1), generator=g)
    pos = lambda i: torch.tensor([[90 + i]])  # noqa: E731
    p = (fk.kv.AdaKV(fk.kv.SnapKV(0.5, window=16)) if press == "adakv"
         else fk.kv.DuoAttention(0.5, sink=8, recent=16))
    with torch.no_grad():
        fk.patch(model)
        cache = fh.CompressedCache(model.config, p, max_new_tokens=4, page_size=16)
        model(ids, past_key_values=cache)
        got = [model(steps[i:i + 1], past_key_values=cache, position_ids=pos(i)).logits for i in range(2)]
        fk.unpatch(model)
        layers = eager_pressed(model, ids, p, cache)
        for layer, c in enumerate(layers):
            assert not c.uniform  # the per-head layout is what this test covers
            _HEAD_KEPT[layer] = (c.lengths[0], c.keys.shape[1])
            assert cache.lengths[layer] == (c.lengths[0] + 2).tolist()
        pressed = dynamic_cache_of(model, layers)
        transformers.AttentionInterface.register("per_head_eager", _per_head_eager)
        model.config._attn_implementation = "per_head_eager"
        want = [model(steps[i:i + 1], past_key_values=pressed, position_ids=pos(i)).logits for i in range(2)]
        model.config._attn_implementation = "eager"
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-4
    # Memory: the kept tokens of each head, rounded up to pages, plus the room for new tokens.
    c_lens = torch.tensor(cache.lengths[0]) - 2
    pages = ((c_lens + 4 + 15) // 16).sum().item()
    assert cache.k[0].shape == (pages, 16, 1, 64)


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_per_head_layout_decode_steps(device):
    """The per-head layout alone, on each device: a DuoAttention layer (fixed head scores, so the
    kept sets are known) stored in pages, then decode steps of 1, 3 and 1 new tokens against
    float64 attention over each (sequence, kv head)'s kept tokens and its new ones (causal among
    the new tokens)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, n, hk, hq, d = 2, 150, 4, 8, 64
    model = fk.patch(make("llama", hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk))
    g = torch.Generator().manual_seed(9)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    keys, values = rand(b, n, hk, d), rand(b, n, hk, d)
    press = fk.kv.DuoAttention(0.5, sink=8, recent=24, head_scores=[0.9, 0.1, 0.2, 0.8])
    c = press(keys, values)
    cache = fh.CompressedCache(model.config, press, max_new_tokens=6, page_size=16)
    cache._store(0, [c])
    ks = [[c.keys[i, :int(c.lengths[i, h]), h].double() for h in range(hk)] for i in range(b)]
    vs = [[c.values[i, :int(c.lengths[i, h]), h].double() for h in range(hk)] for i in range(b)]
    assert [len(x) for x in ks[0]] == [150, 32, 32, 150]
    assert cache.nbytes() == 2 * b * (10 + 3 + 3 + 10) * 16 * d * keys.element_size()  # pages of 16
    for q_len in (1, 3, 1):
        q, kn, vn = rand(b, q_len, hq, d), rand(b, q_len, hk, d), rand(b, q_len, hk, d)
        out = cache._attend_layer(0, q, kn, vn, None, None, None, (-1, -1), 0.0)
        want = torch.empty(b, q_len, hq, d, dtype=torch.float64)
        for i in range(b):
            for h in range(hk):
                ks[i][h] = torch.cat([ks[i][h], kn[i, :, h].double()])
                vs[i][h] = torch.cat([vs[i][h], vn[i, :, h].double()])
                m = len(ks[i][h])
                qq = q[i, :, h * 2:(h + 1) * 2].double().transpose(0, 1)          # (2, q_len, d)
                sc = qq @ ks[i][h].T / math.sqrt(d)
                future = torch.arange(m, device=device)[None] > torch.arange(m - q_len, m, device=device)[:, None]
                p = torch.softmax(sc.masked_fill(future, float("-inf")), -1)
                want[i, :, h * 2:(h + 1) * 2] = (p @ vs[i][h]).transpose(0, 1).cpu()
        err = (out.double().cpu() - want).abs().max().item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    assert cache.lengths[0] == [x + 5 for x in [150, 32, 32, 150, 150, 32, 32, 150]]


def test_per_head_press_on_a_padded_batch_equals_each_sequence_alone():
    """A padded batch through generate with DuoAttention: each sequence's tokens are those it
    gets alone (its heads' pages and lengths are its own)."""
    model = make64()
    ids, mask = padded_batch(n=60)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with fk.kv.press(model, "duo_attention", streaming_ratio=0.5, sink=4, recent=12):
            got = model.generate(ids, attention_mask=mask, **kw)
            for i in range(3):
                real = ids[i:i + 1, mask[i].bool()]
                alone = model.generate(real, attention_mask=torch.ones_like(real), **kw)
                assert torch.equal(got[i, -5:], alone[0, -5:]), i


# --- sparse prefill --------------------------------------------------------------------------

_PREFILL_MASK = {}


def _prefill_masked_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention where a whole-sequence prefill sees only _PREFILL_MASK's cells (bool
    (q_len, kv_len)) and later steps every key before them."""
    whole = query.shape[2] == key.shape[2]
    return _eager_where(query, key, value, scaling, _PREFILL_MASK["mask"] if whole else None), None


@pytest.mark.parametrize("pattern,kw", [("sliding_window", dict(window=48)), ("streaming", dict(sink=16, recent=40)),
                                        ("a_shape", dict(sink_blocks=1, local_blocks=2))])
def test_sparse_prefill_equals_eager_under_the_mask(pattern, kw):
    """Inside sparse.prefill the prompt's attention runs under the pattern's mask (logits of
    every prompt position against eager attention with that mask), a prompt under min_len and
    the decode steps stay dense, and the block restores the dense backend."""
    model = make("llama")
    n = 300
    ids = torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(7))
    build = getattr(fk.sparse, pattern)
    _PREFILL_MASK["mask"] = build(n, n, **kw, block_size=64 if pattern == "a_shape" else 128).to_dense()[0, 0]
    assert not _PREFILL_MASK["mask"].tril().all()  # the pattern drops keys a causal row would see
    with torch.no_grad():
        dense = model(ids).logits
        transformers.AttentionInterface.register("prefill_masked_eager", _prefill_masked_eager)
        model.config._attn_implementation = "prefill_masked_eager"
        want = model(ids).logits
        gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        want_gen = model.generate(ids, **gen)
        model.config._attn_implementation = "eager"
        fk.patch(model)
        with fk.sparse.prefill(model, pattern, min_len=256, **kw):
            got = model(ids).logits
            short = model(ids[:, :200]).logits  # under min_len: dense
            got_gen = model.generate(ids, **gen)  # through the paged cache's prefill
        after = model(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - dense).abs().max().item() > 1e-2  # the mask mattered
    assert (short - dense[:, :200]).abs().max().item() < 1e-4
    assert torch.equal(got_gen.sequences, want_gen.sequences)
    for a, b in zip(got_gen.logits, want_gen.logits):  # the prompt's last position, then decode steps
        assert (a - b).abs().max().item() < 1e-4
    assert (got_gen.logits[0] - dense[:, -1]).abs().max().item() > 1e-3
    assert (after - dense).abs().max().item() < 1e-4


def test_sparse_prefill_estimated_pattern_and_bad_use():
    """vertical_slash estimated per layer runs and keeps the logits close (its columns and
    diagonals cover most of the attention of a 300-token prompt); bad arguments fail at the
    block, not inside the model."""
    model = make("llama")
    ids = torch.randint(1, VOCAB, (1, 300), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with pytest.raises(ValueError, match="patch"):
            with fk.sparse.prefill(model, "vertical_slash"):
                pass
        fk.patch(model)
        dense = model(ids).logits
        seen = []
        with fk.sparse.prefill(model, lambda q, k, layer: seen.append(layer) or fk.sparse.vertical_slash(
                q, k, vertical_size=64, slash_size=64), min_len=64):
            got = model(ids).logits
        assert seen == [0, 1]
        assert torch.isfinite(got).all() and (got - dense).abs().max().item() < 1.0
        # A pressed cache's prefill (its LSE feeds SnapKV) under a sparse pattern.
        with fk.kv.press(model, "snapkv", ratio=0.5, window=16), fk.sparse.prefill(model, "streaming", sink=16,
                                                                                     recent=64, min_len=64):
            out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert out.sequences.shape == (1, 303) and all(torch.isfinite(x).all() for x in out.logits)
        with pytest.raises(ValueError, match="pattern must be one of"):
            with fk.sparse.prefill(model, "nope"):
                pass
        with pytest.raises(TypeError):
            with fk.sparse.prefill(model, "sliding_window", windo=3):
                pass
        with pytest.raises(ValueError, match="min_len"):
            with fk.sparse.prefill(model, "streaming", min_len=0):
                pass


@pytest.mark.cuda
def test_sparse_prefill_on_gpu_models():
    """On the GPU (head_dim 64: the Hopper sparse kernel) the prompt under a sliding-window
    pattern matches eager attention with that mask to bf16 rounding, and generate runs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = make("llama", head_dim=64, dtype=torch.bfloat16, device="cuda")
    n = 384
    ids = torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(9)).cuda()
    _PREFILL_MASK["mask"] = fk.sparse.sliding_window(n, n, 100).to_dense()[0, 0].cuda()
    with torch.no_grad():
        transformers.AttentionInterface.register("prefill_masked_eager", _prefill_masked_eager)
        model.config._attn_implementation = "prefill_masked_eager"
        want = model(ids).logits.float()
        model.config._attn_implementation = "eager"
        dense = model(ids).logits.float()
        fk.patch(model)
        with fk.sparse.prefill(model, "sliding_window", window=100, min_len=256):
            got = model(ids).logits.float()
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
    # The window changes the logits by ~0.26 (float32 CPU run); bf16 rounding is ~0.01.
    assert (got - want).abs().max().item() < 0.05 and (dense - want).abs().max().item() > 0.1
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cos > 0.999
    assert out.shape == (2, n + 4)
    fk.unpatch(model)
