"""Decode-speed variants of the CUDA form on a few layers of a real shape, one GPU call.

Each variant is an export (precision, glmrt export flags) plus ONNX Runtime environment
switches; exports are made once and shared by their switches. Every bench is `glmrt bench`
in its own process (ORT reads the switches when it builds its kernels), CUDA graph on.

  python3 bench/sweep.py --shape glm-z1-9b --layers 8 --work /tmp/work --json OUT.json

Also measures what a decode step costs on the host: a step that copies the logits back and
takes the argmax there (what sampling pays) against the bare `run_with_iobinding` replay.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

VARIANTS = [
    # name, precision, export flags, environment
    ("int4 b32", "int4", [], {}),
    ("int4 b32 + ORT_FPA_INTB_GEMM", "int4", [], {"ORT_FPA_INTB_GEMM": "1"}),
    ("int4 b32 + ORT_DISABLE_FLASH_ATTENTION", "int4", [], {"ORT_DISABLE_FLASH_ATTENTION": "1"}),
    ("int4 b32, lm_head int4", "int4", ["--quantize-lm-head"], {}),
    ("int4 b64", "int4", ["--block-size", "64"], {}),
    ("int4 b64 + ORT_FPA_INTB_GEMM", "int4", ["--block-size", "64"], {"ORT_FPA_INTB_GEMM": "1"}),
    ("int4 b128", "int4", ["--block-size", "128"], {}),
    ("int4 b128 + ORT_FPA_INTB_GEMM", "int4", ["--block-size", "128"], {"ORT_FPA_INTB_GEMM": "1"}),
    ("fp16 MatMul W^T (kn)", "fp16", [], {}),
    ("fp16 FusedMatMul transB (nk)", "fp16", ["--float-layout", "nk"], {}),
]


def sh(cmd, env=None):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if r.returncode:
        print(r.stdout[-2000:], r.stderr[-3000:], flush=True)
    return r.returncode


def host_overhead(model_dir, steps=64):
    """Median decode step with the logits copied to the host vs the bare graph replay."""
    import numpy as np
    import glmrt
    from glmrt.backends.ort_gqa import GRAPH_DECODE
    m = glmrt.load(model_dir, device="cuda", max_context=512)
    dec = m.decoder
    full, bare = [], []
    with dec.generation() as cache:
        logits = dec.step(np.arange(3, 131)[None], cache)
        token = np.array([[int(np.argmax(logits[0, -1]))]])
        for i in range(steps + 8):
            t = time.perf_counter()
            int(np.argmax(dec.step(token, cache)[0, -1]))
            if i >= 8:
                full.append(time.perf_counter() - t)
        ro = dec.ort_mod.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(GRAPH_DECODE))
        for i in range(steps):
            t = time.perf_counter()
            dec.ort.session.run_with_iobinding(dec.decode_binding, ro)    # ends synchronized
            bare.append(time.perf_counter() - t)
    return {"step_ms": 1e3 * float(np.median(full)), "replay_only_ms": 1e3 * float(np.median(bare))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="glm-z1-9b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", default="/tmp/work")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default all)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--best", help="also write the chosen settings here (sourced by gpu.sh)")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    variants = [v for v in VARIANTS if not only or v[0] in only]
    results = {"shape": args.shape, "layers": args.layers, "variants": {}}
    exports = {}
    for name, prec, flags, env in variants:
        exports.setdefault((prec, tuple(flags)), []).append((name, env))
    for (prec, flags), runs in exports.items():
        d = export_dir(args.work, args.shape, args.layers, prec, flags)
        if not os.path.isfile(os.path.join(d, "manifest.json")):     # `gpu.sh ncu` may have made it
            t = time.time()
            rc = sh([sys.executable, "-m", "glmrt.cli", "export", f"synthetic:{args.shape}:{args.layers}",
                     "-o", d, "--precision", prec, "--target", "cuda", "--overwrite", *flags])
            print(f"export {prec} {' '.join(flags)}: rc {rc}, {time.time() - t:.0f} s", flush=True)
            if rc:
                continue
        if prec == "int4" and not flags:
            results["host_overhead"] = host_overhead(d)
            print("host overhead:", results["host_overhead"], flush=True)
        for name, env in runs:
            out = os.path.join(args.work, "sweep-bench.json")
            rc = sh([sys.executable, "-m", "glmrt.cli", "bench", d, "--prompt-lengths", "128",
                     "--contexts", "128,2048", "--decode-steps", "64", "--repeats", "3", "--json", out], env)
            if rc:
                results["variants"][name] = {"error": rc}
                continue
            with open(out) as f:
                r = json.load(f)
            row = {"flags": list(flags), "env": env,
                   "decode_ms": {c: v["ms"] for c, v in r["decode"].items()},
                   "prefill128_ms": r["prefill"]["128"]["ms"],
                   "streamed_bytes_per_token": r.get("ceiling", {}).get("bytes_per_token")}
            results["variants"][name] = row
            print(f"{name:45s} decode {row['decode_ms']}  prefill(128) {row['prefill128_ms']:.2f} ms", flush=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        shutil.rmtree(d, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    best = best_settings(results)
    print(best)
    if args.best:
        with open(args.best, "w") as f:
            f.write(best + "\n")


def export_dir(work, shape, layers, prec, flags=()):
    return os.path.join(work, f"{shape}-{layers}L-{prec}{''.join(flags).replace('--', '-')}")


def best_settings(results) -> str:
    """Shell lines for gpu.sh: the fastest ORT switches for the default int4 export (block 32,
    float lm_head: the same model, so only kernels differ) and the faster fp16 weight layout."""
    v = results["variants"]

    def ms(name):
        return v.get(name, {}).get("decode_ms", {}).get("128", float("inf"))
    int4 = min((n for n in v if n.startswith("int4 b32") and not v[n].get("flags")), key=ms, default=None)
    fp16 = min((n for n in v if n.startswith("fp16")), key=ms, default=None)
    lines = [f"# from {results['shape']}:{results['layers']} sweep: int4 {int4!r}, fp16 {fp16!r}"]
    if int4:
        lines += [f"export {k}={val}" for k, val in v[int4]["env"].items()]
    if fp16:
        lines.append(f"FP16_FLAGS='{' '.join(v[fp16]['flags'])}'")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
