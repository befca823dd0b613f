"""TensorRT optimization profiles, derived from the IO contract's symbolic dims.

The concat-form graph serves two phases with different shapes, so two profiles:
  prefill   seq 1..max_prompt, past_seq 0, total_seq = seq, kept 1..max_prompt
  decode    seq 1, past_seq 1..max_context-1, total_seq 2..max_context, kept 1
Every input's (min, opt, max) shape follows from its dims: a fixed int stays as it is, a
symbolic name takes that phase's range for it.
"""
from __future__ import annotations

import dataclasses

from glmrt.contract import TensorSpec
from glmrt.errors import GlmrtError


@dataclasses.dataclass(frozen=True)
class Limits:
    max_batch: int = 1
    max_prompt: int = 2048
    max_context: int = 4096

    def check(self, max_positions: int) -> None:
        for k in ("max_batch", "max_prompt", "max_context"):
            if getattr(self, k) < 1:
                raise GlmrtError(f"--{k.replace('_', '-')} must be at least 1")
        if self.max_context > max_positions:
            raise GlmrtError(f"--max-context {self.max_context} exceeds the model's "
                             f"max_position_embeddings {max_positions}")
        if self.max_prompt > self.max_context:
            raise GlmrtError(f"--max-prompt {self.max_prompt} exceeds --max-context {self.max_context}")
        if self.max_context < 2:
            raise GlmrtError("--max-context must be at least 2 (one decode step)")


def dim_ranges(limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """phase -> symbolic dim -> (min, opt, max)."""
    b = (1, 1, limits.max_batch)
    p, c = limits.max_prompt, limits.max_context
    return {
        "prefill": {"batch": b, "seq": (1, max(1, p // 2), p), "past_seq": (0, 0, 0),
                    "total_seq": (1, max(1, p // 2), p), "kept": (1, 1, p)},
        "decode": {"batch": b, "seq": (1, 1, 1), "past_seq": (1, max(1, c // 2), c - 1),
                   "total_seq": (2, max(2, c // 2 + 1), c), "kept": (1, 1, 1)},
    }


def profiles(contract: dict, limits: Limits) -> list[dict]:
    """[{"name": phase, "shapes": {input name: (min, opt, max) shapes}}] for the concat form."""
    if contract["form"] != "concat":
        raise GlmrtError(f"TensorRT engines take the concat form (export --target tensorrt), "
                         f"not {contract['form']!r}")
    out = []
    for phase, ranges in dim_ranges(limits).items():
        shapes = {}
        for spec in contract["inputs"]:
            shapes[spec.name] = tuple(tuple(_dim(d, ranges, spec, i) for d in spec.dims) for i in range(3))
        out.append({"name": phase, "shapes": shapes})
    return out


def _dim(d, ranges, spec: TensorSpec, which: int) -> int:
    if isinstance(d, int):
        return d
    if d not in ranges:
        raise GlmrtError(f"input {spec.name}: symbolic dim {d!r} has no range in the profile")
    return ranges[d][which]
