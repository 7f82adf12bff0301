"""Benchmark machinery shared by benchmarks/bench_<op>.py: CUDA-event timing (median, rotating
inputs), the device ceilings, and the results file (benchmarks/results/<device>.json + .md,
schema in the project's RESULTS.md). Records of other benches are merged, never dropped."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import statistics
import sys
from typing import Callable, List, Optional, Sequence

import torch


def time_ms(fn: Callable[[int], object], n_inputs: int = 1, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn(i) over reps, i cycling through n_inputs input sets so caches
    do not flatter; CUDA events around each call."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % n_inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn: Callable[[], object], calls: int = 10, reps: int = 20) -> float:
    """Median milliseconds of one fn() with launch overhead removed: `calls` back-to-back calls
    captured in a CUDA graph, replayed `reps` times between CUDA events. For kernels shorter
    than the Python that launches them (decode), where eager timing measures the host."""
    fn()  # compile / allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def graph_copies(nbytes: int, calls: int = 10) -> int:
    """Copies of an operand of ``nbytes`` to rotate over so the ``calls`` of a timed graph
    stream ~200 MB (4x an H100's L2) instead of re-reading the cache."""
    return max(1, min(calls, -(-200_000_000 // max(nbytes, 1))))


def rotating(make: Callable[[int], Callable[[], object]], n: int) -> Callable[[], object]:
    """One callable cycling over the n callables make(i), each called once here so packing,
    compiling and allocating stay outside a timed graph."""
    fns = [make(i) for i in range(n)]
    for f in fns:
        f()
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()
    return call


def ceilings() -> dict:
    """Measured once per run: an 8192^3 bf16 matmul and a large device-to-device copy."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda i: a @ b, reps=10)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda i: dst.copy_(src), reps=10)
    return {"bf16_matmul_tflops": round(2 * 8192**3 / ms / 1e9, 1),
            "copy_gbps": round(2 * src.numel() / copy_ms / 1e6, 1)}


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def nvrtc_version() -> str:
    from . import _native

    return _native.runtime_info().get("nvrtc_version", "?")


def merge_results(results_dir: str, records: List[dict], ceil: Optional[dict]) -> str:
    """Rewrites <device>.json with `records` replacing any record of the same bench/impl/params
    (ceil None keeps the file's ceilings)."""
    os.makedirs(results_dir, exist_ok=True)
    name = torch.cuda.get_device_name()
    path = os.path.join(results_dir, device_slug(name) + ".json")
    data = {"records": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    key = lambda r: (r["bench"], r["impl"], json.dumps(r["params"], sort_keys=True))  # noqa: E731
    new = {key(r) for r in records}
    data["records"] = [r for r in data.get("records", []) if key(r) not in new] + records
    data.update({"device": name, "torch": torch.__version__, "nvrtc": nvrtc_version(),
                 "date": datetime.date.today().isoformat(), "ceilings": ceil or data.get("ceilings", {})})
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    with open(path[:-5] + ".md", "w") as f:
        f.write(markdown(data))
    return path


def cell(r: dict) -> str:
    if r.get("tflops"):
        return f"{r['tflops']:.1f} TF/s"
    if r.get("gbps"):
        return f"{r['ms'] * 1000:.1f} µs, {r['gbps']:.0f} GB/s"
    return f"{r['ms']:.3f} ms"


def markdown(data: dict) -> str:
    """One table per bench: a row per workload, a column per impl (TFLOP/s, else ms)."""
    lines = [f"# {data['device']}", "",
             f"torch {data['torch']}, NVRTC {data.get('nvrtc', '?')}, {data['date']}; "
             f"ceilings: {data['ceilings']}", ""]
    benches = sorted({r["bench"] for r in data["records"]})
    for bench in benches:
        recs = [r for r in data["records"] if r["bench"] == bench]
        impls = sorted({r["impl"] for r in recs}, key=lambda s: (s != "ferrokernels", s))
        rows = {}
        for r in recs:
            rows.setdefault(json.dumps(r["params"], sort_keys=True), {})[r["impl"]] = r
        ratio = "ferrokernels" in impls and "sdpa_cudnn" in impls
        peers = [i for i in impls if not i.startswith("ferrokernels")]
        best = "ferrokernels" in impls and len(peers) > 1
        lines += [f"## {bench}", "", "| params | " + " | ".join(impls) + (" | ours / cuDNN" if ratio else "")
                  + (" | ours / best peer" if best else "") + " | rel_err (ours) |",
                  "|---" * (len(impls) + 2 + ratio + best) + "|"]
        for p, by_impl in rows.items():
            cells = []
            for i in impls:
                r = by_impl.get(i)
                cells.append("" if r is None else cell(r))
            ours = by_impl.get("ferrokernels", {})
            params = ", ".join(f"{k}={v}" for k, v in json.loads(p).items())
            err = ours.get("rel_err")
            if ratio:
                cudnn = by_impl.get("sdpa_cudnn")
                both = ours.get("ms") and cudnn
                cells.append(f"{cudnn['ms'] / ours['ms']:.2f}x" if both else "")
            if best:
                peer_ms = [by_impl[i]["ms"] for i in peers if i in by_impl]
                cells.append(f"{min(peer_ms) / ours['ms']:.2f}x" if peer_ms and ours.get("ms") else "")
            lines.append(f"| {params} | " + " | ".join(cells) + f" | {'' if err is None else f'{err:.1e}'} |")
        lines.append("")
    return "\n".join(lines)


def load_bench_module(name: str):
    """benchmarks/bench_<name>.py from the repository (the current folder or above it)."""
    here = os.path.abspath(os.getcwd())
    for root in (here, os.path.dirname(here)):
        path = os.path.join(root, "benchmarks", f"bench_{name}.py")
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise SystemExit(f"benchmarks/bench_{name}.py not found: run from the repository root")


BENCHES: Sequence[str] = ("attention", "decode", "gemm", "quant_attention", "sparse", "kv")
ALIASES = {"quant": "quant_attention"}
NOT_BUILT: dict = {}
X_AXES = ("seqlen", "m", "prompt_tokens", "n_new", "seqs")  # the swept parameter, first one present
# Parameters that vary with the swept one instead of defining a panel (written beside the points).
ALONG_X = {"decode": ("batch",)}


def _metric(recs):
    for key, label in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if all(r.get(key) for r in recs):
            return (lambda r, k=key: r[k]), label, False
    return (lambda r: r["ms"]), "ms (lower is better)", True


def plot(data: dict, results_dir: str) -> List[str]:
    """One PNG per bench (<device>-<bench>.png): a panel per workload family (every parameter
    but the swept one), throughput against the swept parameter, a line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    paths = []
    slug = device_slug(data["device"])
    for bench in sorted({r["bench"] for r in data["records"]}):
        recs = [r for r in data["records"] if r["bench"] == bench]
        x = next((k for k in X_AXES if k in recs[0]["params"]), None)
        if x is None:
            continue
        along = ALONG_X.get(bench, ())
        panels = {}
        for r in recs:
            rest = {k: v for k, v in r["params"].items() if k != x and k not in along}
            panels.setdefault(json.dumps(rest, sort_keys=True), []).append(r)
        keys = sorted(panels, key=lambda k: -len(panels[k]))[:12]
        cols = min(3, len(keys))
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            value, label, lower = _metric(panels[key])
            for impl in sorted({r["impl"] for r in panels[key]}, key=lambda s: (not s.startswith("ferrokernels"), s)):
                pts = sorted((r["params"][x], value(r)) for r in panels[key] if r["impl"] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2 if impl == "ferrokernels" else 1,
                        label=impl)
            if along:
                for r in panels[key]:
                    if r["impl"] == "ferrokernels":
                        ax.annotate(" ".join(f"{k}={r['params'][k]}" for k in along), (r["params"][x], value(r)),
                                    fontsize=7, textcoords="offset points", xytext=(0, -12), ha="center")
            ax.set_xscale("log", base=2)
            if lower:
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(label)
            ax.set_title(", ".join(f"{k}={v}" for k, v in json.loads(key).items()), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{bench} on {data['device']}")
        fig.tight_layout()
        path = os.path.join(results_dir, f"{slug}-{bench}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def replot(results_dir: str) -> int:
    """Redraws every device's plots from its results file (no GPU needed)."""
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                for p in plot(json.load(f), results_dir):
                    print(f"wrote {p}")
    return 0


def main(args) -> int:
    results_dir = args.results_dir or os.path.join("benchmarks", "results")
    if args.which == "plot":
        return replot(results_dir)
    which = ALIASES.get(args.which, args.which)
    if which in NOT_BUILT:
        print(f"{NOT_BUILT[which]} is not built yet: no benchmark to run", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("the benchmarks need a CUDA GPU", file=sys.stderr)
        return 1
    ceil = ceilings()
    print(f"ceilings: {ceil}")
    records = []
    for name in (BENCHES if which == "all" else [which]):
        records += load_bench_module(name).run(quick=args.quick)
    path = merge_results(results_dir, records, ceil)
    print(f"wrote {path}")
    with open(path) as f:
        for p in plot(json.load(f), results_dir):
            print(f"wrote {p}")
    return 0
