"""Choosing the next token from a logits row: greedy, temperature, top-k, top-p, repetition
penalty, seeded. Parameters are validated once, with errors that name the parameter."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off (transformers' rule: divide positive logits)
    seed: int | None = None

    def __post_init__(self):
        def num(name, v, lo, hi, lo_open=False):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or v > hi or (lo_open and v == lo):
                raise InputError(f"{name}={v!r} is out of range ({'(' if lo_open else '['}{lo}, {hi}])")
        num("temperature", self.temperature, 0.0, 100.0)
        num("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        num("repetition_penalty", self.repetition_penalty, 0.0, 100.0, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k={self.top_k!r} must be a non-negative integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise InputError(f"seed={self.seed!r} must be a non-negative integer or None")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> int:
        """logits (V,) float32; history: token ids so far (prompt + generated)."""
        if self.p.temperature == 0.0 and self.p.repetition_penalty == 1.0:
            return int(np.argmax(logits))       # what the float64 path picks, without the copy
        x = logits.astype(np.float64)
        if self.p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(history)
            v = x[seen]
            x[seen] = np.where(v > 0, v / self.p.repetition_penalty, v * self.p.repetition_penalty)
        if self.p.temperature == 0.0:
            return int(np.argmax(x))
        x = x / self.p.temperature
        if self.p.top_k and self.p.top_k < x.size:
            kth = np.partition(x, -self.p.top_k)[-self.p.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            cut = int(np.searchsorted(cum, self.p.top_p)) + 1     # smallest prefix reaching top_p
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
