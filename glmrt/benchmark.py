"""`glmrt bench`: time to first token, prefill and decode speed, device memory, and how close
decode comes to the memory-bandwidth ceiling (weights read once per token).

Every figure is a median over repeats after a warm-up. Each timed step ends with its result on
the host, so the device is synchronized inside the timing: a greedy decode step ends with the
chosen id (argmax on the device where the decoder can, else on the host after the logits are
copied back); the copy-the-logits path is timed too, as sampling pays it. Where the decoder
runs greedy bursts (several steps per host synchronization, what `generate` does on CUDA),
decode is timed per burst and divided by its steps, and one-sync-per-token is timed beside it.

The ceiling: the bytes the export streams per token over a bandwidth that is given, known for
the GPU (the H200's measured device copy rate) or, on the CPU, measured here (the host's copy
rate with the bench's threads). Where none applies, no ceiling is printed.
"""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np

from .errors import InputError

# measured device-to-device copy rates (read + write), the ceiling glmrt uses per GPU name
KNOWN_TBPS = {"NVIDIA H200": 4.22}
DEFAULT_PROMPTS = (128, 512, 2048)
DEFAULT_CONTEXTS = (128, 2048, 8192)
FILL_CHUNK = 512          # the concat form fills a context in prefill steps of this many tokens


def best_device(backend: str = "onnxruntime") -> str:
    """cuda where ONNX Runtime offers it (or the backend runs only there), else cpu."""
    from .backends import backend as lookup
    devices = lookup(backend).devices
    if "cpu" not in devices:
        return devices[0]
    import onnxruntime as ort
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() and "cuda" in devices else "cpu"


def plan(model_max: int, prompt_lengths, contexts, decode_steps: int, burst: int) -> tuple[list, list]:
    """The prompt lengths and contexts to time: defaults cut to what the model holds, given
    values checked (a clear error naming the value that cannot run)."""
    room = decode_steps + 3 * burst + 8                 # decode steps and warm-up after a context

    def check(values, name, need):
        if values is None:
            return None
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise InputError(f"--{name} {','.join(map(str, values))}: expected positive token counts")
        for v in values:
            if v + need > model_max:
                raise InputError(f"--{name} {v}: {v + need} positions with "
                                 f"{'the decode steps' if need else 'the prompt'}, the model holds {model_max}")
        return sorted(set(values))
    prompts = check(prompt_lengths, "prompt-lengths", 0) or [n for n in DEFAULT_PROMPTS if n <= model_max]
    ctxs = check(contexts, "contexts", room) or [n for n in DEFAULT_CONTEXTS if n + room <= model_max]
    if not prompts or not ctxs:
        raise InputError(f"the model holds {model_max} positions: pass --prompt-lengths and --contexts "
                         "that fit it")
    return prompts, ctxs


def check_memory(form: str, heads: int, prompts, contexts) -> None:
    """The concat form materializes attention scores (heads, seq, total) in float32 in a
    prefill step (scores, their mask sum, probabilities): refuse what the host cannot hold."""
    from .host import available_bytes
    avail = available_bytes()
    if form != "concat" or avail is None:
        return
    for name, seq, total in [("prompt-lengths", n, n) for n in prompts] + \
                            [("contexts", min(FILL_CHUNK, c), c) for c in contexts]:
        need = 3 * 4 * heads * seq * total
        if need > 0.8 * avail:
            raise InputError(f"--{name} {total}: a prefill step needs about {need / 1e9:.1f} GB for "
                             f"attention scores on the concat form; {avail / 1e9:.1f} GB are available")


def bench(model_dir, *, device: str | None = None, backend: str = "onnxruntime", prompt_lengths=None,
          contexts=None, decode_steps: int = 64, repeats: int = 5, bandwidth_tbps: float | None = None,
          cuda_graph: bool = True, burst: int | None = None, threads: int | None = None) -> dict:
    from . import manifest as manifest_io
    from .host import physical_cores
    from .model import Model
    device = device or best_device(backend)
    if device == "cpu" and threads is None:
        threads = physical_cores()
    man = manifest_io.read(model_dir, verify=False)
    model_max = man["config"]["max_position_embeddings"]
    prompt_lengths, contexts = plan(model_max, prompt_lengths, contexts, decode_steps, burst or 8)
    check_memory(man["io"]["form"], man["config"]["num_attention_heads"], prompt_lengths, contexts)
    need = max(max(prompt_lengths), max(contexts) + decode_steps + 3 * (burst or 8) + 8)
    m = Model(model_dir, device=device, backend=backend, verify=False, max_context=min(need, model_max),
              cuda_graph=cuda_graph, burst=burst, threads=threads)
    dec = m.decoder
    k = dec.caps.burst
    vocab = min(m.config.vocab_size, 1000)
    rng = np.random.default_rng(0)

    def prompt(n):
        return rng.integers(3, vocab, size=(1, n), dtype=np.int64)

    def prefill_time(n):
        ids = prompt(n)
        with dec.generation() as cache:
            t = time.perf_counter()
            int(np.argmax(dec.step(ids, cache)[0, -1]))
            return time.perf_counter() - t

    desc = dec.describe()
    out = {"model": str(model_dir), "device": device, "backend": backend, "burst": k,
           "precision": m.manifest["precision"]["name"], "form": desc["form"],
           "cuda_graph": desc["cuda_graph"], "ort_settings": desc["settings"], "threads": threads,
           "greedy": "device argmax" if dec.caps.device_argmax else "host argmax",
           "prefill": {}, "decode": {}}
    prefill_time(min(prompt_lengths))                                   # warm-up
    for n in prompt_lengths:
        times = [prefill_time(n) for _ in range(repeats)]
        out["prefill"][n] = {"ms": 1e3 * float(np.median(times)), "tok_s": n / float(np.median(times))}
    out["ttft_ms"] = out["prefill"][min(prompt_lengths)]["ms"]

    def decode_time(ctx, on_device, burst=1):
        steps = []
        with dec.generation() as cache:
            ids = prompt(ctx)
            chunk = FILL_CHUNK if desc["form"] == "concat" else ctx   # concat: bound the scores' memory
            for s in range(0, ctx, chunk):                            # fill the context
                logits = dec.step(ids[:, s:s + chunk], cache)
            token = int(np.argmax(logits[0, -1]))
            if on_device and burst > 1:       # bursts; 3 to warm up (one CUDA graph per step)
                for i in range(3 + max(1, decode_steps // burst)):
                    t = time.perf_counter()
                    token = dec.greedy_burst(token, cache, burst)[-1]
                    if i >= 3:
                        steps.append((time.perf_counter() - t) / burst)
                return float(np.median(steps))
            for i in range(decode_steps + 8):
                t = time.perf_counter()
                step_ids = np.array([[token]], np.int64)
                if on_device:                                   # only the chosen id comes back
                    token = dec.step_greedy(step_ids, cache)
                else:                                           # the logits come back
                    token = int(np.argmax(dec.step(step_ids, cache)[0, -1]))
                if i >= 8:                                              # warm-up (and graph capture)
                    steps.append(time.perf_counter() - t)
        return float(np.median(steps))

    for ctx in contexts:
        med = decode_time(ctx, dec.caps.device_argmax, k)
        out["decode"][ctx] = {"ms": 1e3 * med, "tok_s": 1.0 / med}
    if k > 1:                                  # the same without bursts: one sync per token
        med = decode_time(min(contexts), True)
        out["decode_sync_per_token"] = {"context": min(contexts), "ms": 1e3 * med, "tok_s": 1.0 / med}
    if dec.caps.device_argmax:                 # what a sampled token pays: logits to the host
        med = decode_time(min(contexts), False)
        out["decode_host_logits"] = {"context": min(contexts), "ms": 1e3 * med, "tok_s": 1.0 / med}
    streamed = dec.streamed_bytes() or m.manifest.get("streamed_bytes_per_token")
    tbps, source = _ceiling(device, bandwidth_tbps, threads)
    if streamed and tbps:
        ceiling_s = streamed / (tbps * 1e12)
        out["ceiling"] = {"bytes_per_token": streamed, "tbps": tbps, "source": source,
                          "ms": 1e3 * ceiling_s, "tok_s": 1.0 / ceiling_s}
        for d in out["decode"].values():
            d["pct_of_ceiling"] = 100.0 * ceiling_s / (d["ms"] / 1e3)
    out["device_memory_mib"] = _device_memory_mib() if device == "cuda" else None
    return out


def bench_slots(model_dir, slot_counts, *, device: str | None = None, backend: str = "onnxruntime",
                context: int = 128, decode_steps: int = 32, repeats: int = 3, threads: int | None = None,
                cuda_graph: bool = True, prefill_chunk: int | None = None, turn: int = 256) -> dict:
    """Continuous batching: for each slot count n, n sequences at `context` tokens decoded
    together (step_batch, greedy): aggregate and per-sequence tok/s. Also the scheduler's
    prefill chunk (the longest a running stream waits for a newly admitted prompt) and the time
    to first token of a chat's second turn with its first turn cached in a slot, and cold."""
    from .host import physical_cores
    from .model import Model
    device = device or best_device(backend)
    if device == "cpu" and threads is None:
        threads = physical_cores()
    if not slot_counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in slot_counts):
        raise InputError(f"--slots {slot_counts}: expected positive slot counts")
    need = max(context + decode_steps + 16, 3 * turn + 64)
    m = Model(model_dir, device=device, backend=backend, verify=False, max_context=need, cuda_graph=cuda_graph,
              threads=threads)
    if m.max_context < need:
        raise InputError(f"the model holds {m.max_context} positions; --contexts and the chat turn need {need}")
    dec = m.decoder
    rng = np.random.default_rng(0)
    vocab = min(m.config.vocab_size, 1000)
    out = {"model": str(model_dir), "device": device, "backend": backend, "threads": threads,
           "precision": m.manifest["precision"]["name"], "form": dec.describe()["form"], "context": context,
           "slots": {}}
    for n in sorted(set(slot_counts)):
        caches = dec.open_slots(n)
        for c in caches:
            dec.step(rng.integers(3, vocab, size=(1, context), dtype=np.int64), c)
        ids = rng.integers(3, vocab, size=n, dtype=np.int64)
        times = []
        for i in range(4 + decode_steps):                       # warm-up (and the bucket's graph)
            t = time.perf_counter()
            ids = np.array(dec.step_batch_greedy(ids, caches), np.int64)
            if i >= 4:
                times.append(time.perf_counter() - t)
        med = float(np.median(times))
        out["slots"][n] = {"ms_per_step": 1e3 * med, "tok_s_total": n / med, "tok_s_per_sequence": 1 / med}
    base = out["slots"][min(out["slots"])]["tok_s_total"]
    for v in out["slots"].values():
        v["vs_one"] = v["tok_s_total"] / base
    # the scheduler: one prefill chunk, and a chat's second turn warm and cold
    chunk = prefill_chunk or (512 if device == "cuda" else 128)
    caches = dec.open_slots(1)
    times = []
    for _ in range(repeats + 1):
        dec.truncate(caches[0], 0)
        t = time.perf_counter()
        dec.step(rng.integers(3, vocab, size=(1, chunk), dtype=np.int64), caches[0])
        times.append(time.perf_counter() - t)
    out["prefill_chunk"] = {"tokens": chunk, "ms": 1e3 * float(np.median(times[1:]))}
    m = Model(model_dir, device=device, backend=backend, verify=False, max_context=need, cuda_graph=cuda_graph,
              threads=threads, slots=2, prefill_chunk=chunk)
    try:
        warm, cold = [], []
        for r in range(repeats):
            first = rng.integers(3, vocab, size=turn).tolist()
            answer = m.generate(first, max_new_tokens=16)
            second = first + answer + rng.integers(3, vocab, size=32).tolist()
            for times, prompt in ((warm, second), (cold, [3 + r] + second[1:])):   # cold: no shared prefix
                t = time.perf_counter()
                stream = m.stream(prompt, max_new_tokens=1)
                next(stream, None)
                times.append(time.perf_counter() - t)
                stream.close()
        out["second_turn_ttft_ms"] = {"first_turn_tokens": turn, "second_turn_tokens": len(second),
                                      "with_reuse": 1e3 * float(np.median(warm)),
                                      "without": 1e3 * float(np.median(cold))}
    finally:
        m.close()
    return out


def format_slots(r: dict) -> str:
    lines = [f"{r['model']}  {r['precision']} ({r['form']} form) on {r['backend']}/{r['device']}"
             + (f"  {r['threads']} threads" if r.get("threads") else "") + f", context {r['context']}"]
    for n, v in r["slots"].items():
        lines.append(f"slots {n:>3}: {v['ms_per_step']:7.2f} ms/step  {v['tok_s_total']:8.1f} tok/s in all "
                     f"({v['vs_one']:.2f}x one)  {v['tok_s_per_sequence']:7.1f} tok/s per sequence")
    c = r["prefill_chunk"]
    lines.append(f"prefill chunk of {c['tokens']} tokens: {c['ms']:.1f} ms (the longest a decode step waits "
                 "for a newly admitted prompt)")
    t = r["second_turn_ttft_ms"]
    lines.append(f"chat second turn ({t['second_turn_tokens']} tokens, first turn {t['first_turn_tokens']}): "
                 f"first token {t['with_reuse']:.1f} ms with the first turn cached, {t['without']:.1f} ms without")
    return "\n".join(lines)


def _ceiling(device: str, given: float | None, threads: int | None) -> tuple[float | None, str]:
    """(TB/s, where the figure comes from), or (None, why there is none)."""
    if given is not None:
        return given, "given (--bandwidth-tbps)"
    if device == "cpu":
        from .host import copy_rate_gbps
        n = threads or 1
        return copy_rate_gbps(n) / 1e3, f"this host's memory copy rate, measured with {n} thread(s)"
    try:
        from .gpu import detect
        gpu = detect()
    except Exception:           # no GPU query available: no ceiling rather than a wrong one
        return None, "unknown GPU"
    if gpu.name in KNOWN_TBPS:
        return KNOWN_TBPS[gpu.name], f"{gpu.name}'s measured device copy rate"
    return None, f"no measured bandwidth for {gpu.name} (pass --bandwidth-tbps)"


def _device_memory_mib():
    """Memory in use on the GPU (nvidia-smi), or None where it cannot be read."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return int(r.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def format_report(r: dict) -> str:
    lines = [f"{r['model']}  {r['precision']} ({r['form']} form) on {r['backend']}/{r['device']}"
             + (f"  {r['threads']} threads" if r.get("threads") else "")
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
        lines.append(f"ceiling: {c['bytes_per_token'] / 1e9:.3f} GB/token at {c['tbps'] * 1e3:.1f} GB/s "
                     f"({c['source']}) = {c['ms']:.3f} ms ({c['tok_s']:.0f} tok/s)")
    else:
        lines.append("ceiling: not shown (no bandwidth figure for this device; pass --bandwidth-tbps)")
    if r.get("device_memory_mib") is not None:
        lines.append(f"device memory in use after the runs: {r['device_memory_mib']} MiB "
                     "(ONNX Runtime's arena keeps its peak)")
    return "\n".join(lines)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2, default=str)
