"""Per-kernel breakdown of one decode step, from Nsight Compute.

  run:    decode a few steps of an exported CUDA-form model with the profiler window open only
          around them (cudaProfilerStart/Stop), plain launches (no CUDA graph), so that
            ncu --profile-from-start off --clock-control none --metrics METRICS --csv \\
                --print-units base --print-kernel-base function --log-file X.csv \\
                python3 bench/kernels.py run MODEL_DIR --steps 3
          sees exactly the decode steps' kernels.
  report: X.csv -> a markdown table per kernel (count per step, time per step, mean time,
          DRAM bytes read and the rate they were read at) and per class of work.

The kernel durations are measured with the clocks left alone and L2 flushed before each
kernel (ncu's default cache control), which is what a decode step sees for its weights; the
sum over a step is the GPU-busy time, so comparing it with the CUDA-graph step time from
`glmrt bench` shows what launch gaps cost.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import OrderedDict

METRICS = "gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"

# class of work, by kernel name (first match wins)
CLASSES = [
    ("glmrt cuda engine GEMV (norm, bias, RoPE, SwiGLU, argmax fused)",
     r"^(qkv_first|qkv|o_proj|gate_up|down|lm_head)$"),
    ("int4 GEMV (MatMulNBits)", r"(?i)nbits|4bits|int4|fpA_intB|weight_only|WeightOnly"),
    ("fp16 GEMV (cuBLAS)", r"(?i)nvjet|gemv|gemm|xmma|cutlass|cublas|splitKreduce"),
    ("RMSNorm (SLN / SkipSLN)", r"(?i)layernorm"),
    ("attention (GQA: seqlens, RoPE + KV append, decode kernel)",
     r"(?i)flash|fmha|_mha|attention|rotary|rope|concat|unpackqkv|seqlens|sequencelengths|posid"),
    ("elementwise (split, SiLU, mul, bias, gather)",
     r"(?i)elementwise|quickgelu|gelu|split|cast|gather|add|mul|copy|fill|memset"),
]


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name):
            return label
    return "other"


def _profiler(start: bool):
    """cudaProfilerStart/Stop on the primary context ONNX Runtime uses."""
    try:
        from cuda.bindings import runtime as rt
        (rt.cudaProfilerStart if start else rt.cudaProfilerStop)()
        return
    except ImportError:
        pass
    import ctypes
    import ctypes.util
    for lib in ("libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart")):
        if not lib:
            continue
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        (cudart.cudaProfilerStart if start else cudart.cudaProfilerStop)()
        return
    sys.exit("cannot find the CUDA runtime to open the profiler window")


def run(args):
    import numpy as np
    import glmrt
    m = glmrt.load(args.model, device="cuda", backend=args.backend,
                   max_context=args.context + args.steps + 16, cuda_graph=False)
    dec = m.decoder
    rng = np.random.default_rng(0)
    with dec.generation() as cache:
        logits = dec.step(rng.integers(3, 1000, size=(1, args.context)), cache)
        token = np.array([[int(np.argmax(logits[0, -1]))]])
        for _ in range(3):                                       # warm-up
            dec.step(token, cache)
        _profiler(True)
        for _ in range(args.steps):
            dec.step(token, cache)
        _profiler(False)
    print(f"profiled {args.steps} decode steps at context {args.context} of {args.model}")


def load_csv(path):
    """ncu --csv rows -> [(id, kernel name, {metric: value, "grid": launch grid})] in launch order."""
    kernels = OrderedDict()
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]           # skip ncu's own log lines
    for row in csv.DictReader(lines):
        k = kernels.setdefault(int(row["ID"]), (row["Kernel Name"], {"grid": row.get("Grid Size", "")}))
        try:
            k[1][row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
        except ValueError:
            pass
    return [(i, name, m) for i, (name, m) in kernels.items()]


def tally(ks, key) -> OrderedDict:
    """key(name, metrics) -> [launches, ns, bytes read] summed over the kernels (None: skipped)."""
    groups = OrderedDict()
    for _, name, m in ks:
        k = key(name, m)
        if k is not None:
            g = groups.setdefault(k, [0, 0.0, 0.0])
            g[0] += 1
            g[1] += m.get("gpu__time_duration.sum", 0.0)
            g[2] += m.get("dram__bytes_read.sum", 0.0)
    return groups


def report(args):
    ks = load_csv(args.csv)
    steps = args.steps
    if not ks:
        sys.exit(f"{args.csv}: no kernels")
    per = tally(ks, lambda name, m: name)
    total_ns = sum(p[1] for p in per.values()) / steps
    out = [f"# Decode-step kernels: {args.title}", "",
           f"{len(ks)} kernels over {steps} steps ({len(ks) / steps:.0f} per step); "
           f"GPU-busy time per step {total_ns / 1e3:.1f} µs"
           + (f" ({total_ns / 1e3 / args.layers:.1f} µs per layer incl. head share)" if args.layers else ""),
           "", "| kernel | class | per step | µs per step | µs each | % of step | DRAM read per step | read rate |",
           "|---|---|---|---|---|---|---|---|"]
    for name, (c, ns, rd) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        each = ns / c
        rate = f"{rd / ns / 1e3:.2f} TB/s" if ns and rd / c > 1e6 else "–"   # bytes/ns = GB/s
        short = name if len(name) <= 70 else name[:67] + "..."
        out.append(f"| `{short}` | {classify(name)} | {c / steps:g} | {ns / steps / 1e3:.1f} | "
                   f"{each / 1e3:.2f} | {100 * ns / steps / total_ns:.1f}% | {rd / steps / 1e6:.1f} MB | {rate} |")
    cls = tally(ks, lambda name, m: classify(name))
    out += ["", "| class of work | kernels per step | µs per step | % of step | DRAM read per step | read rate |",
            "|---|---|---|---|---|---|"]
    for label, (c, ns, rd) in sorted(cls.items(), key=lambda kv: -kv[1][1]):
        out.append(f"| {label} | {c / steps:g} | {ns / steps / 1e3:.1f} | {100 * ns / steps / total_ns:.1f}% | "
                   f"{rd / steps / 1e6:.1f} MB | {rd / ns / 1e3:.2f} TB/s |")
    # the weight-reading kernels by launch grid and bytes read (same grid, other K): one row
    # per matrix shape
    shapes = tally(ks, lambda name, m: (name, m["grid"], round(m["dram__bytes_read.sum"] / 4e6))
                   if classify(name).startswith(("int4", "fp16", "glmrt")) and m.get("dram__bytes_read.sum", 0) > 1e6
                   else None)
    out += ["", "| weight-reading kernel | grid | launches per step | µs each | MB each | read rate |",
            "|---|---|---|---|---|---|"]
    for (name, grid, _), (c, ns, rd) in shapes.items():
        out.append(f"| `{name[:60]}` | {grid} | {c / steps:g} | {ns / c / 1e3:.2f} | {rd / c / 1e6:.1f} | "
                   f"{rd / ns / 1e3:.2f} TB/s |")
    text = "\n".join(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": args.title, "steps": steps, "busy_us_per_step": total_ns / 1e3,
                       "kernels": {n: {"count": c, "ns": ns, "bytes_read": rd} for n, (c, ns, rd) in per.items()}},
                      f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--context", type=int, default=128)
    r.add_argument("--backend", default="onnxruntime", help="onnxruntime, or cuda (glmrt's engine)")
    p = sub.add_parser("report")
    p.add_argument("csv")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--title", default="")
    p.add_argument("--json")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
