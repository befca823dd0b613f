"""Launch parameters tuned on the GPU the engine is built on (`glmrt build --backend cuda` with
the GPU present; `--no-tune` keeps step.DEFAULT_CONFIG).

Why per GPU and per model: a GEMV's grid is persistent (as many blocks as fit at once) and its
tiles of rows are dealt to the blocks in rounds, so whether a matrix takes one round or two
depends on its rows, the SM count and the occupancy the knobs allow. Measured on the H200
(bench/RESULTS.md, session 11), over the defaults: GLM-Z1-9B's qkv (288 tiles, 264 blocks: two
rounds) one round with `unroll` 2 / `min_blocks` 3, -3.7% a step; the same knobs on GLM-4-32B's
qkv +2.7%; GLM-4-32B's down -2.4% with them, GLM-Z1-9B's +1.7%. No one setting suits both.

How: coordinate descent, one pass. Starting from the base configuration, each role's candidates
(CANDIDATES) are timed in turn in the whole decode step (selfcheck.StepBench: the build's own
weights on the device, bursts of 8 steps as one CUDA graph as the runtime replays them, the mean
over two contexts), the other roles at their best so far; a candidate replaces the best when it
is faster by more than MARGIN (the spread of repeated timings in one process is about 0.5%). The GEMV candidates keep the
default's arithmetic: a lane reads the same units of a row in the same order, whatever the
unroll, warps or occupancy; the attention's chunk moves only where the context is split (the
order of the merge's sums). The engine's kernels are then checked against numpy with the
configuration chosen.

Timed on the model's own weights: a first version timed zero-filled weights of the model's
shapes (16 layers), whose gains (-4.5% for GLM-Z1-9B's step) did not carry to `glmrt bench` of
the real engine, while the model's own weights in bursts pick what does (H200: +1.2..2.1%).

A tuned role's knobs apply to the single-row step only: the batched steps' kernels (buckets of
continuous batching) keep the knobs they had (with_knobs pins them under "rows").
"""
from __future__ import annotations

import copy
import time

from .step import DEFAULT_CONFIG, GEMV, knobs

# what is tried per role, over the best so far (H200 measurements in the module's docstring)
CANDIDATES = {
    "qkv": ({"unroll": 2, "min_blocks": 3}, {"warps": 16, "min_blocks": 1}),
    "o_proj": ({"unroll": 2, "min_blocks": 3},),
    "gate_up": ({"unroll": 2, "min_blocks": 3},),
    "down": ({"unroll": 2, "min_blocks": 3}, {"warps": 16, "min_blocks": 1}),
    "attention": ({"chunk": 128},),
}
MARGIN = 0.005          # a candidate must be this much faster (relative) to replace the best
LAYERS = 16             # at most this many layers in the timed step (memory: zero-filled weights)
CONTEXTS = (128, 4096)  # the step is timed at both (at most the engine's max context); the mean counts
BUDGET_S = 30.0         # no new candidate is started after this long
FILL = "zero"           # the timed step's weights without the model's (selfcheck.StepBench)
BURST = 8               # steps a timed graph holds (the runtime's bursts: decoder.DEFAULT_BURST)


def with_knobs(config: dict, role: str, change: dict) -> dict:
    """`config` with `change` over `role`'s knobs (GEMV roles) or over the attention's. A GEMV
    role's batched kernels (rows > 1) keep their knobs: the ones changed are pinned under
    config["rows"][role] at their old effective values."""
    c = copy.deepcopy(config)
    if role == "attention":
        c["attention"] = {**c["attention"], **change}
        return c
    before = {n: knobs(config, role, rows=2)[n] for n in change}
    c[role] = {**GEMV, **c.get(role, {}), **change}
    c.setdefault("rows", {})
    c["rows"][role] = {**before, **c["rows"].get(role, {})}
    return c


def tune(measure, base: dict = DEFAULT_CONFIG, candidates: dict | None = None, margin: float = MARGIN,
         budget_s: float = BUDGET_S, log=None) -> tuple[dict, dict]:
    """Coordinate descent over `candidates` (default CANDIDATES); measure(config) -> µs per step
    (an exception: the candidate is dropped, e.g. it does not compile or fit). Returns the
    configuration chosen and a report of every timing (what the manifest records)."""
    candidates = CANDIDATES if candidates is None else candidates
    start = time.perf_counter()
    best, best_us = base, measure(base)
    report = {"base_us": round(best_us, 1), "tried": [], "margin": margin, "chosen": {}}
    if log:
        log(f"tuning: the base configuration takes {best_us:.1f} us a step")
    for role, options in candidates.items():
        for change in options:
            if time.perf_counter() - start > budget_s:
                report["stopped"] = f"time budget of {budget_s:.0f} s spent"
                break
            cand = with_knobs(best, role, change)
            try:
                us = measure(cand)
            except Exception as e:   # noqa: BLE001 -- a candidate that cannot run is not chosen
                report["tried"].append({"role": role, "knobs": change, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            kept = us < best_us * (1 - margin)
            report["tried"].append({"role": role, "knobs": change, "us": round(us, 1), "kept": kept})
            if log:
                log(f"tuning: {role} {change}: {us:.1f} us{' (kept)' if kept else ''}")
            if kept:
                best, best_us = cand, us
                report["chosen"][role] = {**report["chosen"].get(role, {}), **change}
    report["us"] = round(best_us, 1)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return best, report


def tune_on_device(device, shapes, formats, layers: int, max_context: int, base: dict = DEFAULT_CONFIG,
                   log=None, fill: str = FILL, weights: tuple | None = None) -> tuple[dict, dict]:
    """tune() with the whole step timed on `device` in bursts of BURST steps, as the runtime runs
    them: on the model's own weights (weights: name -> address, the engine's weight index, its
    GlmConfig; every layer) or on `fill`ed ones of its shapes (StepBench: at most LAYERS layers)."""
    from .selfcheck import StepBench
    contexts = tuple(sorted({min(c, max_context) for c in CONTEXTS}))
    n = layers if weights is not None else min(layers, LAYERS)
    bench = StepBench(device, shapes, formats, n, max(contexts) + 64, fill=fill, weights=weights)
    try:
        def measure(config):
            rows = bench.time(config, contexts, reps=1, variants=False, label="tune", burst=BURST)
            return sum(r["us"] for r in rows) / len(rows)
        config, report = tune(measure, base, log=log)
    finally:
        bench.free()
    report.update(layers=n, contexts=list(contexts), burst=BURST,
                  weights="the model's" if weights is not None else fill)
    return config, report
