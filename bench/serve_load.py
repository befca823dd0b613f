"""Load test for `glmrt serve` on loopback: start the server on a model folder, drive N concurrent
streaming clients (the official `openai` package, AsyncOpenAI) for T seconds, check every stream,
print the figures as JSON.

Each client asks, again and again, one of a few questions greedily (temperature 0); before the
load, each question's answer is fetched once, not streamed, alone. Every stream must then be well
formed (the role first, one finish_reason, the usage chunk last, ids consistent) and its text and
token count must equal that reference: nothing lost, nothing mixed between streams.

    python3 bench/serve_load.py glm4-pydoc-onnx --clients 32 --seconds 30 --max-tokens 64
    python3 bench/serve_load.py glm4-pydoc-onnx --ray-replicas 2      # glmrt serve --ray, 2 replicas

Figures: time to first token (request sent -> first content delta; it includes waiting for a
slot) p50/p95, aggregate completion tokens per second over the run, requests completed, and how
many requests each replica (x-glmrt-replica) answered.
The exit status is 1 if any stream failed a check.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

QUESTIONS = ["What is with in Python?", "What is yield in Python?", "What is a lambda?",
             "What does import do?", "What is a class?", "What is try in Python?"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an exported model folder")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--ray-replicas", type=int, default=None,
                    help="serve with glmrt serve --ray --replicas N (a Ray of its own) instead")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray-replicas")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--check", choices=["text", "structure"], default="text",
                    help="text: every stream equals the answer fetched alone (exact on the CPU); "
                         "structure: well formed only (on a GPU, batched and single fp16 kernels may "
                         "round a near tie apart)")
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "glmrt.cli", "serve", a.model, "--port", "0", "--slots", str(a.slots),
           "--max-queue", str(a.max_queue), "--name", "bench", "--grace", "5"]
    cmd += ["--device", a.device] if a.device else []
    cmd += ["--backend", a.backend] if a.backend else []
    if a.ray_replicas:
        cmd += ["--ray", "--replicas", str(a.ray_replicas), "--cpus-per-replica", str(a.cpus_per_replica)]
    load_before = _loadavg()
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = _wait_for_url(server)
        result = asyncio.run(load(url, a))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    result["server_exit"] = server.returncode
    result["conditions"] = {"command": " ".join(["python3", "bench/serve_load.py", *sys.argv[1:]]),
                            "host": platform.node(), "cpus": os.cpu_count(),
                            "load_average_before": load_before,
                            "load_average_after": _loadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if result["failed"] == 0 and result["ok"] > 0 else 1)


def _wait_for_url(server) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = server.stderr.readline()
        if not line and server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        if line.startswith("glmrt serve: http://"):
            return line.split()[2]
    raise SystemExit("the server did not start within 120 s")


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


async def load(url: str, a) -> dict:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    reference = {}
    for q in QUESTIONS:                       # alone, not streamed: what every stream must equal
        r = await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": q}],
                                                 max_tokens=a.max_tokens, temperature=0)
        reference[q] = (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason)
    ttft, failures, done, served = [], [], [], {}
    tokens = 0
    t_start = time.perf_counter()
    t_stop = t_start + a.seconds

    async def one_client(k: int):
        nonlocal tokens
        i = k
        while time.perf_counter() < t_stop:
            q = QUESTIONS[i % len(QUESTIONS)]
            i += a.clients
            t0 = time.perf_counter()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="bench", messages=[{"role": "user", "content": q}], max_tokens=a.max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True})
                replica = raw.headers.get("x-glmrt-replica", "?")
                stream = raw.parse()              # the stream itself (a coroutine in some versions)
                stream = await stream if inspect.isawaitable(stream) else stream
                chunks, first = [], None
                async for ch in stream:
                    if first is None and ch.choices and ch.choices[0].delta.content:
                        first = time.perf_counter()
                    chunks.append(ch)
            except Exception as e:  # noqa: BLE001  every failure is counted and reported
                failures.append(f"{type(e).__name__}: {e}")
                continue
            problem = check(chunks, reference[q], a.check == "text")
            if problem:
                failures.append(problem)
                continue
            if first is not None:
                ttft.append(first - t0)
            tokens += chunks[-1].usage.completion_tokens
            done.append(time.perf_counter() - t0)
            served[replica] = served.get(replica, 0) + 1
    await asyncio.gather(*(one_client(k) for k in range(a.clients)))
    wall = time.perf_counter() - t_start
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else [float("nan")] * 19
    return {"clients": a.clients, "seconds_asked": a.seconds, "wall_s": round(wall, 2),
            "slots": a.slots, "max_tokens": a.max_tokens, "check": a.check, "ok": len(done),
            "failed": len(failures),
            "failures": failures[:10], "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
            "ttft_p95_s": round(q[18], 4), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1),
            "request_p50_s": round(statistics.median(done), 3) if done else None,
            "ray_replicas": a.ray_replicas, "answered_per_replica": sorted(served.values(), reverse=True)}


def check(chunks, ref, same_text: bool = True) -> str | None:
    """Why a stream is not well formed or (same_text) not the reference answer, else None."""
    want_text, want_tokens, want_finish = ref
    if not chunks or not chunks[0].choices or chunks[0].choices[0].delta.role != "assistant":
        return "the first chunk does not carry the assistant role"
    if len({c.id for c in chunks}) != 1:
        return "chunks of one stream carry different ids"
    if chunks[-1].choices or chunks[-1].usage is None:
        return "the stream does not end with its usage chunk"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    if not same_text:
        return None if len(finishes) == 1 and chunks[-1].usage.completion_tokens > 0 else \
            f"finish_reasons {finishes}, {chunks[-1].usage.completion_tokens} tokens"
    if finishes != [want_finish]:
        return f"finish_reason {finishes}, expected [{want_finish!r}]"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if text != want_text:
        return f"text differs from the reference: {text[:80]!r} vs {want_text[:80]!r}"
    if chunks[-1].usage.completion_tokens != want_tokens:
        return f"{chunks[-1].usage.completion_tokens} tokens, expected {want_tokens}"
    return None


if __name__ == "__main__":
    main()
