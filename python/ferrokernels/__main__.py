"""python -m ferrokernels {info, demo, warmup, bench}"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args) -> int:
    from .runtime import info

    d = info()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"ferrokernels {d['version']}  (torch {d.get('torch', 'not installed')})")
    if "nvrtc_version" in d:
        print(f"NVRTC        {d['nvrtc_version']}  {d['nvrtc_path']}")
        print(f"headers      {', '.join(str(p) for p in d['include_dirs'])}")
    else:
        print(f"NVRTC        not found: {d['nvrtc_error']}")
    drv = d.get("driver_version")
    print(f"driver       {'CUDA %d.%d' % (drv // 1000, drv % 1000 // 10) if drv else 'none'}")
    for i, dev in enumerate(d["devices"]):
        print(f"cuda:{i}       {dev}")
    print(f"cache        {d['cache_dir']}  ({d['cache_bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_warmup(args) -> int:
    from .runtime import compile_all

    reports = compile_all(args.arch or None, progress=True)
    spills = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    print(f"compiled {len(reports)} kernel variants into the cache"
          + (f"; {len(spills)} spill registers: " + ", ".join(r["name"] for r in spills) if spills else ""))
    return 0


def cmd_demo(args) -> int:
    from .demo import main

    return main(args)


def cmd_bench(args) -> int:
    from .bench import main

    return main(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferrokernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="version, devices, NVRTC, headers, cache")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("warmup", help="pre-compile every kernel variant into the cache")
    s.add_argument("--arch", action="append", help="e.g. sm_90a (repeatable); default: the GPUs present")
    s.set_defaults(fn=cmd_warmup)
    s = sub.add_parser("demo", help="SmolLM2-135M through stock transformers and patched: speed and accuracy")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--long", type=int, default=0, metavar="N", help="an N-token context (the model's maximum is 8192)")
    s.add_argument("--new-tokens", type=int, default=0, help="tokens to generate (default 64 on the GPU, 16 on the CPU)")
    s.add_argument("--linear", choices=["gguf"], default=None,
                   help="gguf: run the file's own Q4_1 weights in our 4-bit GEMM instead of transformers' dequantized copy")
    s.add_argument("--results-dir", default=None, help="on the GPU, also write e2e records to <dir>/<device>.json")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("bench", help="benchmarks vs peers; writes benchmarks/results/<device>.json + .md")
    s.add_argument("which", nargs="?", default="all",
                   choices=["attention", "decode", "sparse", "quant", "quant_attention", "gemm", "kv", "all", "plot"],
                   help="plot: redraw the PNGs from the results files")
    s.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    s.add_argument("--quick", action="store_true", help="fewer shapes")
    s.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
