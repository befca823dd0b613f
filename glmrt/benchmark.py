"""`glmrt bench`: time to first token, prefill and decode speed, device memory, and how close
decode comes to the memory-bandwidth ceiling (weights read once per token).

Every figure is a median over repeats after a warm-up. Each timed step ends with its result on
the host, so the device is synchronized inside the timing: a greedy decode step ends with the
chosen id (argmax on the device where the export has `next_token`, else on the host after the
logits are copied back); the copy-the-logits path is timed too, as sampling pays it. Where the
decoder runs greedy bursts (several steps per host synchronization, what `generate` does on
CUDA), decode is timed per burst and divided by its steps, and one-sync-per-token is timed
beside it.
"""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np

H200_TBPS = 4.22     # device-to-device copy on the H200 (shared/GPU.md): the ceiling used here


def bench(model_dir, *, device: str = "cuda", prompt_lengths=(128, 512, 2048),
          contexts=(128, 2048, 8192), decode_steps: int = 64, repeats: int = 5,
          bandwidth_tbps: float = H200_TBPS, cuda_graph: bool = True, burst: int | None = None) -> dict:
    from .model import Model
    need = max(max(prompt_lengths), max(contexts)) + decode_steps + 3 * (burst or 8) + 8
    m = Model(model_dir, device=device, verify=False, max_context=need, cuda_graph=cuda_graph, burst=burst)
    dec = m.decoder
    k = getattr(dec, "burst", 1)
    vocab = min(m.config.vocab_size, 1000)
    rng = np.random.default_rng(0)

    def prompt(n):
        return rng.integers(3, vocab, size=(1, n), dtype=np.int64)

    def prefill_time(n):
        ids = prompt(n)
        with dec.generation() as cache:
            t = time.perf_counter()
            logits, _ = dec.step(ids, cache)
            int(np.argmax(logits[0, -1]))
            return time.perf_counter() - t

    out = {"model": str(model_dir), "device": device, "burst": k, "precision": m.manifest["precision"]["name"],
           "form": m.manifest["io"]["form"], "cuda_graph": bool(getattr(dec, "cuda_graph", False)),
           "ort_settings": getattr(getattr(dec, "session", None), "ort_settings", {}),
           "prefill": {}, "decode": {}}
    prefill_time(min(prompt_lengths))                                   # warm-up
    for n in prompt_lengths:
        times = [prefill_time(n) for _ in range(repeats)]
        out["prefill"][n] = {"ms": 1e3 * float(np.median(times)), "tok_s": n / float(np.median(times))}
    out["ttft_ms"] = out["prefill"][min(prompt_lengths)]["ms"]
    greedy = getattr(dec, "step_greedy", None)
    out["greedy"] = "device argmax" if getattr(dec, "device_greedy", False) else "host argmax"

    def decode_time(ctx, on_device, burst=1):
        steps = []
        with dec.generation() as cache:
            logits, cache = dec.step(prompt(ctx), cache)
            token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
            if on_device and burst > 1:       # bursts; 3 to warm up (one CUDA graph per step)
                for i in range(3 + max(1, decode_steps // burst)):
                    t = time.perf_counter()
                    tok = dec.greedy_burst(int(token[0, 0]), cache, burst)[-1]
                    cache += burst
                    token = np.array([[tok]], np.int64)
                    if i >= 3:
                        steps.append((time.perf_counter() - t) / burst)
                return float(np.median(steps))
            for i in range(decode_steps + 8):
                t = time.perf_counter()
                if on_device:                                   # only the chosen id comes back
                    tok, cache = greedy(token, cache)
                else:                                           # the logits come back
                    logits, cache = dec.step(token, cache)
                    tok = int(np.argmax(logits[0, -1]))
                token = np.array([[tok]], np.int64)
                if i >= 8:                                              # warm-up (and graph capture)
                    steps.append(time.perf_counter() - t)
        return float(np.median(steps))

    for ctx in contexts:
        med = decode_time(ctx, greedy is not None, k)
        out["decode"][ctx] = {"ms": 1e3 * med, "tok_s": 1.0 / med}
    if k > 1:                                  # the same without bursts: one sync per token
        med = decode_time(min(contexts), True)
        out["decode_sync_per_token"] = {"context": min(contexts), "ms": 1e3 * med, "tok_s": 1.0 / med}
    if out["greedy"] == "device argmax":        # what a sampled token pays: logits to the host
        med = decode_time(min(contexts), False)
        out["decode_host_logits"] = {"context": min(contexts), "ms": 1e3 * med, "tok_s": 1.0 / med}
    streamed = m.manifest.get("streamed_bytes_per_token")
    if streamed:
        ceiling_s = streamed / (bandwidth_tbps * 1e12)
        out["ceiling"] = {"bytes_per_token": streamed, "tbps": bandwidth_tbps,
                          "ms": 1e3 * ceiling_s, "tok_s": 1.0 / ceiling_s}
        for ctx, d in out["decode"].items():
            d["pct_of_ceiling"] = 100.0 * ceiling_s / (d["ms"] / 1e3)
    out["device_memory_mib"] = _device_memory_mib() if device == "cuda" else None
    return out


def _device_memory_mib():
    """Memory in use on the GPU (nvidia-smi), or None where it cannot be read."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return int(r.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def format_report(r: dict) -> str:
    lines = [f"{r['model']}  {r['precision']} ({r['form']} form) on {r['device']}"
             + ("  cuda graph" if r["cuda_graph"] else "")
             + "".join(f"  {k}={v}" for k, v in r.get("ort_settings", {}).items()),
             f"time to first token ({min(r['prefill'])} tokens): {r['ttft_ms']:.1f} ms"]
    for n, p in r["prefill"].items():
        lines.append(f"prefill {n:>6} tokens: {p['ms']:8.2f} ms  {p['tok_s']:10.0f} tok/s")
    for ctx, d in r["decode"].items():
        pct = f"  {d['pct_of_ceiling']:.0f}% of ceiling" if "pct_of_ceiling" in d else ""
        lines.append(f"decode at context {ctx:>6}: {d['ms']:6.3f} ms/token  {d['tok_s']:7.1f} tok/s{pct}")
    if "decode_sync_per_token" in r:
        d = r["decode_sync_per_token"]
        lines.append(f"decode at context {d['context']:>6}, one sync per token: {d['ms']:6.3f} ms/token "
                     f"{d['tok_s']:7.1f} tok/s (bursts of {r['burst']} above)")
    if "decode_host_logits" in r:
        d = r["decode_host_logits"]
        lines.append(f"decode at context {d['context']:>6}, logits copied to the host: {d['ms']:6.3f} ms/token "
                     f"{d['tok_s']:7.1f} tok/s (sampling with temperature pays this)")
    lines.append(f"greedy: {r['greedy']}")
    if "ceiling" in r:
        c = r["ceiling"]
        lines.append(f"ceiling: {c['bytes_per_token'] / 1e9:.2f} GB/token at {c['tbps']} TB/s = "
                     f"{c['ms']:.3f} ms ({c['tok_s']:.0f} tok/s)")
    if r.get("device_memory_mib") is not None:
        lines.append(f"device memory in use after the runs: {r['device_memory_mib']} MiB "
                     "(ONNX Runtime's arena keeps its peak)")
    return "\n".join(lines)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2, default=str)
