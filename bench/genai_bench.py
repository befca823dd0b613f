"""onnxruntime-genai beside glmrt on one model folder exported with `--for onnxruntime-genai`:
decode speed at a few contexts, greedy, batch 1, and whether the two choose the same tokens.

  python3 bench/genai_bench.py DIR --contexts 128,2048 --json OUT.json

Both run the same nodes over the same weights file: glmrt runs model.onnx, onnxruntime-genai
runs model.genai.onnx (those nodes behind the small adapter of export/interop.py, without the
ArgMax). The difference is the runtime around the graph.

glmrt: `glmrt bench`'s figures (bursts of greedy steps fed on the device, one host sync per
burst; one sync per token beside it), CUDA graph on, its ORT_ENABLE_XQA=0 default.
onnxruntime-genai: a timed step is generate_next_token() then get_next_tokens() (the chosen id
on the host: one sync per token), after a prompt of CONTEXT tokens and 8 warm-up steps; median
of STEPS. Each variant loads the model afresh: with and without its CUDA graph capture
(enable_cuda_graph), under ORT's default environment and with ORT_ENABLE_XQA=0 (glmrt's).
A variant that fails records its error and the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import numpy as np

WARMUP = 8
VARIANTS = [  # name, enable_cuda_graph, environment while the model loads
    ("genai", False, {}),
    ("genai cuda graph", True, {}),
    ("genai ORT_ENABLE_XQA=0", False, {"ORT_ENABLE_XQA": "0"}),
    ("genai cuda graph ORT_ENABLE_XQA=0", True, {"ORT_ENABLE_XQA": "0"}),
]


def prompt(n: int, vocab: int) -> list[int]:
    return np.random.default_rng(0).integers(3, min(vocab, 1000), size=n).tolist()


def genai_decode(og, folder: str, device: str, graph: bool, env: dict, contexts: list[int],
                 steps: int, vocab: int) -> dict:
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)                      # ORT reads these when it makes its kernels
    try:
        cfg = og.Config(folder)
        cfg.clear_providers()
        if device == "cuda":
            cfg.append_provider("cuda")
        if graph:
            cfg.set_provider_option("cuda", "enable_cuda_graph", "1")
        t = time.perf_counter()
        model = og.Model(cfg)
        load_s = time.perf_counter() - t
    finally:
        for k in added:
            os.environ.pop(k, None)
    out = {"load_s": load_s, "decode": {}, "tokens": {}}
    for ctx in contexts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ctx + WARMUP + steps + 8, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt(ctx, vocab))
        prefill = time.perf_counter() - t
        times, tokens = [], []
        for i in range(WARMUP + steps):
            t = time.perf_counter()
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            if i >= WARMUP:
                times.append(time.perf_counter() - t)
        med = float(np.median(times))
        out["decode"][ctx] = {"ms": 1e3 * med, "tok_s": 1.0 / med, "prefill_ms": 1e3 * prefill}
        out["tokens"][ctx] = tokens
        del gen
    return out


def glmrt_tokens(folder: str, device: str, contexts: list[int], n: int, vocab: int) -> dict:
    """glmrt's first n greedy ids after each context's prompt (stop ids included, as genai's)."""
    import glmrt
    m = glmrt.load(folder, device=device, max_context=max(contexts) + n + 8, verify=False)
    out = {}
    for ctx in contexts:
        ids, got = np.array([prompt(ctx, vocab)]), []
        with m.decoder.generation() as cache:
            token = m.decoder.step_greedy(ids, cache)
            got.append(token)
            for _ in range(n - 1):
                token = m.decoder.step_greedy(np.array([[token]]), cache)
                got.append(token)
        out[ctx] = got
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (no graph variants)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    from glmrt import manifest
    from glmrt.benchmark import bench
    man = manifest.read(a.folder, verify=False)
    if "onnxruntime-genai" not in man.get("consumers", {}):
        raise SystemExit(f"{a.folder}: not exported with --for onnxruntime-genai")
    vocab = man["config"]["vocab_size"]
    result = {"folder": a.folder, "device": a.device, "precision": man["precision"]["name"], "form": man["io"]["form"],
              "layers": man["config"]["num_hidden_layers"], "steps": a.steps, "warmup": WARMUP,
              "contexts": contexts, "variants": {}}

    def save():
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)

    t = time.perf_counter()
    r = bench(a.folder, device=a.device, prompt_lengths=[min(contexts)], contexts=contexts,
              decode_steps=a.steps, repeats=3)
    result["glmrt"] = {"decode_bursts": r["decode"], "decode_sync_per_token": r.get("decode_sync_per_token"),
                       "decode_host_logits": r.get("decode_host_logits"), "ort_settings": r["ort_settings"],
                       "burst": r["burst"], "seconds": time.perf_counter() - t}
    print(f"glmrt: {json.dumps(result['glmrt'], default=str)}", flush=True)
    result["glmrt_tokens"] = glmrt_tokens(a.folder, a.device, contexts, 32, vocab)
    save()

    import onnxruntime_genai as og
    result["onnxruntime_genai"] = og.__version__
    for name, graph, env in VARIANTS:
        if graph and a.device != "cuda":
            continue
        try:
            v = genai_decode(og, a.folder, a.device, graph, env, contexts, a.steps, vocab)
            for ctx in contexts:         # leading tokens both chose (fp16 near-ties may part them)
                mine, theirs = result["glmrt_tokens"][ctx], v["tokens"][ctx]
                same = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
                v["decode"][ctx]["same_leading_tokens"] = same
            del v["tokens"]
        except Exception as e:  # noqa: BLE001 (any failure of genai is a result to record)
            v = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        result["variants"][name] = v
        print(f"{name}: {json.dumps(v, default=str)[:600]}", flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
