"""Quantized-KV decode against the bf16 decode (bench_kv.run_quantized) without the presses:
python scripts/time-kv-quant.py [--quick]."""
import sys

sys.path.insert(0, "benchmarks")
import bench_kv  # noqa: E402

bench_kv.run_quantized(quick="--quick" in sys.argv)
