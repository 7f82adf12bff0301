"""Quantized attention on the demo model's real keys (SmolLM2-135M-Instruct, head_dim 64, GQA
3:1): the logits of a long prompt with every layer's prefill through quant_attention / fp8_attention,
against the float32 model, beside bf16 attention; and the greedy answer against bf16's.

    python3 scripts/real-model-quant-attention.py [--long N]      (needs the demo model)
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ferrokernels as fk
from ferrokernels.demo import GGUF, build_prompt, logit_error, model_dir

ap = argparse.ArgumentParser()
ap.add_argument("--long", type=int, default=4000)
ap.add_argument("--new", type=int, default=24)
args = ap.parse_args()
d = model_dir()
tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa")
model = model.cuda().eval()
ids = tok(build_prompt(tok, args.long), return_tensors="pt").input_ids.cuda()
keep = 256
with torch.inference_mode():
    exact = model(ids, logits_to_keep=keep).logits.float()
    model.to(torch.bfloat16)
    print(f"prompt {ids.shape[1]} tokens; logit error vs float32 over the last {keep} positions")
    answers = {}
    for label, attention in (("bf16 (ours)", "flash"), ("quant_attention", "quant"), ("fp8_attention", "fp8")):
        fk.patch(model, attention=attention)
        logits = model(ids, logits_to_keep=keep).logits.float()
        top1 = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
        cos = torch.nn.functional.cosine_similarity(logits.flatten(), exact.flatten(), dim=0).item()
        out = model.generate(ids, max_new_tokens=args.new, do_sample=False)
        answers[label] = out[0, ids.shape[1]:]
        a, ref = answers[label].tolist(), answers["bf16 (ours)"].tolist()
        same = next((i for i, (x, y) in enumerate(zip(a, ref)) if x != y), min(len(a), len(ref)))
        err_max, err_rel = logit_error(logits, exact)
        print(f"  {label:16s} logit error max {err_max:.3f} rel {err_rel:.3e}  cos {cos:.5f}  top-1 agree {top1:.3f}  "
              f"first {same} greedy tokens as bf16's: {tok.decode(answers[label], skip_special_tokens=True)!r}")
        fk.unpatch(model)
