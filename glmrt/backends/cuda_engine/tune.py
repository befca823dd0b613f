"""Launch parameters tuned on the GPU the engine is built on (`glmrt build --backend cuda` with
the GPU present; `--no-tune` keeps step.DEFAULT_CONFIG).

Why per GPU and per model: a GEMV's grid is persistent (as many blocks as fit at once) and its
tiles of rows are dealt to the blocks in rounds, so whether a matrix takes one round or two
depends on its rows, the SM count and the occupancy the knobs allow. Measured on the H200
(bench/RESULTS.md, session 11, step graphs on zero-filled weights): GLM-Z1-9B's qkv (288 tiles,
264 blocks: two rounds) takes one round with `unroll` 2 / `min_blocks` 3, and with the attention's
chunk 128 the step is 3.8% faster; the same two changes make GLM-4-32B's 2.7% slower; over them,
`unroll` 2 / `min_blocks` 3 on down: GLM-4-32B -5.0%, GLM-Z1-9B +1.7%. No one setting suits both.

How: coordinate descent, one pass. Starting from the base configuration, each role's candidates
(CANDIDATES) are timed in turn in the whole decode step (selfcheck.StepBench: the build's own
weights on the device, bursts of 8 steps as one CUDA graph as the runtime replays them, the mean
over two contexts), the other roles at their best so far; a candidate replaces the best when it
is faster by more than MARGIN twice: as first timed, and timed again right after the best is
(the spread of repeated timings in one process is about 0.5%, the margin's size). The GEMV candidates keep the
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

from ...errors import GlmrtError
from .step import DEFAULT_CONFIG, GEMV

# what is tried per role, over the best so far (H200 measurements in the module's docstring)
# (gate_up {"unroll": 2, "min_blocks": 3} and down {"warps": 16, "min_blocks": 1} were candidates
# until session 14: never kept in any build since session 11, GLM-4-32B's gate_up +8%; each
# costs GLM-4-32B's build 3.3 s of its tuning budget)
CANDIDATES = {
    "qkv": ({"unroll": 2, "min_blocks": 3}, {"warps": 16, "min_blocks": 1}),
    "o_proj": ({"unroll": 2, "min_blocks": 3},),
    "down": ({"unroll": 2, "min_blocks": 3},),
    "attention": ({"chunk": 128},),
    # an lm_head on (n, k) rows (int4, fp8, bf16, fp16 nk): 9472 tiles for GLM's vocabulary; the
    # default W^T fp16 lm_head takes "lm_head_kn" instead, so this changes nothing there (skipped)
    "lm_head": ({"unroll": 2, "min_blocks": 3},),
}
MARGIN = 0.005          # a candidate must be this much faster (relative) to replace the best
LAYERS = 16             # at most this many layers in the timed step (memory: zero-filled weights)
CONTEXTS = (128, 4096)  # the step is timed at both (at most the engine's max context); the mean counts
# no new candidate is started after this long: GLM-4-32B's step takes ~3.4 s a timing, and with
# 30 s its build took 65 s with the 8-bit lm_head (H200, session 14: tuning 34.5 s, checks 18.5);
# 27 s still starts down's candidate (at ~21 s, the last one any of its builds kept; one extra
# re-timing before it fits) and not the attention's after it (which none kept)
BUDGET_S = 27.0
FILL = "zero"           # the timed step's weights without the model's (selfcheck.StepBench)


def with_knobs(config: dict, role: str, change: dict) -> dict:
    """`config` with `change` over `role`'s knobs (GEMV roles) or over the attention's. A GEMV
    role's batched kernels (rows > 1) keep their knobs: the ones changed are pinned under
    config["rows"][role] at the values the batched steps had before (step.knobs without a
    bucket's own entries, which still apply over them)."""
    c = copy.deepcopy(config)
    if role == "attention":
        c["attention"] = {**c["attention"], **change}
        return c
    rows = c.setdefault("rows", {})
    before = {**GEMV, **config.get(role, {}), **rows.get(role, {})}
    c[role] = {**GEMV, **c.get(role, {}), **change}
    rows[role] = {**{n: before[n] for n in change}, **rows.get(role, {})}
    return c


def tune(measure, base: dict = DEFAULT_CONFIG, candidates: dict | None = None, margin: float = MARGIN,
         budget_s: float = BUDGET_S, log=None, same=None) -> tuple[dict, dict]:
    """Coordinate descent over `candidates` (default CANDIDATES); measure(config) -> µs per step.
    A candidate that looks faster than the best by more than `margin` is timed again right after
    the best is, and kept only if it still is (one timing's spread is about the margin). One
    whose kernels do not compile or fit (selfcheck.Unfit) is dropped; any other failure stops
    the tuning with one line naming the candidate; one that same(candidate, best) finds launching
    what the best does is not timed. Returns the configuration chosen and a report of every
    timing (what the manifest records)."""
    from .selfcheck import Unfit
    candidates = CANDIDATES if candidates is None else candidates
    for role, options in candidates.items():      # checked first: a wrong table fails in one line, not mid-tuning
        known = set(DEFAULT_CONFIG["attention"]) if role == "attention" else set(GEMV)
        if role not in ("attention", "qkv", "o_proj", "gate_up", "down", "lm_head", "lm_head_kn", "lm_head_i8") or \
                not isinstance(options, (tuple, list)) or not all(isinstance(o, dict) and o and set(o) <= known
                                                             for o in options):
            raise ValueError(f"tuning candidates of {role}: {options!r} is not a sequence of knob dicts "
                             f"over {sorted(known)} for a GEMV role or the attention")
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
            if same is not None and same(cand, best):
                report["tried"].append({"role": role, "knobs": change, "skipped": "launches what the best does"})
                continue
            try:
                us = measure(cand)
                row = {"role": role, "knobs": change, "us": round(us, 1), "kept": False}
                if us < best_us * (1 - margin):          # again, beside the best timed anew
                    again_best, again = measure(best), measure(cand)
                    row.update(again_us=round(again, 1), best_again_us=round(again_best, 1))
                    row["kept"] = again < again_best * (1 - margin)
            except Unfit as e:
                report["tried"].append({"role": role, "knobs": change, "error": str(e).splitlines()[0][:200]})
                continue
            except Exception as e:   # noqa: BLE001 -- a GPU fault: the context may be lost
                raise GlmrtError(f"tuning stopped at {role} {change}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''} (build with --no-tune)") from e
            report["tried"].append(row)
            if log:
                log(f"tuning: {role} {change}: {us:.1f} us" + (f", again {row['again_us']} against "
                    f"{row['best_again_us']}" if "again_us" in row else "") + (" (kept)" if row["kept"] else ""))
            if row["kept"]:
                best, best_us = cand, row["again_us"]
                report["chosen"][role] = {**report["chosen"].get(role, {}), **change}
    report["us"] = round(best_us, 1)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return best, report


def tune_on_device(device, shapes, formats, layers: int, max_context: int, base: dict = DEFAULT_CONFIG,
                   log=None, fill: str = FILL, weights: tuple | None = None) -> tuple[dict, dict]:
    """tune() with the whole step timed on `device` in bursts as the runtime runs them, its KV
    cache (and so the attention's split count) for `max_context` positions, the runtime's: on the
    model's own weights (weights: name -> address, the engine's weight index, its GlmConfig; every
    layer) or on `fill`ed ones of its shapes (StepBench: at most LAYERS layers)."""
    from .decoder import DEFAULT_BURST
    from .device import freed
    from .selfcheck import StepBench
    from .step import attention_split, decode_kernels
    contexts = tuple(sorted({min(c, max_context) for c in CONTEXTS}))
    n = layers if weights is not None else min(layers, LAYERS)

    def launched(config):                     # what a configuration compiles and launches
        ks = decode_kernels(shapes, formats, config)
        att = next(k for k in ks if k.name == "attention")
        return ks, attention_split(config, max_context, att.tile), config.get("pdl")

    with freed(StepBench(device, shapes, formats, n, max_context, fill=fill, weights=weights)) as bench:
        def measure(config):
            rows = bench.time(config, contexts, reps=1, variants=False, label="tune", burst=DEFAULT_BURST)
            return sum(r["us"] for r in rows) / len(rows)
        config, report = tune(measure, base, log=log, same=lambda a, b: launched(a) == launched(b))
    report.update(layers=n, contexts=list(contexts), max_context=max_context, burst=DEFAULT_BURST,
                  weights="the model's" if weights is not None else fill)
    return config, report
