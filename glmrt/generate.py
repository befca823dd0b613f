"""The generation loop: prompt ids in, new token ids out, one decoder step at a time.

Greedy decoding with no logits processor asks the decoder for the argmax only
(`step_greedy`: on the device where the decoder can), and after the prompt runs in bursts where
the decoder queues several steps per host synchronization (`caps.burst`). Everything else
copies the last position's logits to the host and samples there (glmrt/sampling.py).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from .backends.base import Decoder
from .sampling import Sampler, SamplingParams


@dataclasses.dataclass
class Generation:
    """What one generate call produced. finish_reason: 'stop' (an end token), 'length', or
    with slots 'cancelled' (the caller closed the stream)."""
    tokens: list[int]
    finish_reason: str | None = None
    stop_token: int | None = None
    prefilled_tokens: int = 0       # prompt tokens run through the model
    cached_tokens: int = 0          # prompt tokens found in a slot's cache (slots only)


def run(decoder: Decoder, eos_ids: frozenset, ids: np.ndarray, params: SamplingParams, budget: int,
        res: Generation, processor=None) -> Iterator[int]:
    """Yield up to `budget` new ids after the prompt `ids` (n,) int64, recording the finish in
    `res`; an end token stops the loop and is not yielded. `processor(ids, logits)` may change
    each logits row (V,) before sampling; ids are the prompt and the output so far."""
    sample = Sampler(params)
    history = np.empty(ids.size + budget, np.int64)      # prompt + output, filled as it grows
    history[:ids.size] = ids
    n = ids.size
    step_ids = ids[None]                                 # (1, seq): the prompt, then one id
    res.finish_reason = "length"
    greedy = processor is None and params.temperature == 0.0 and params.repetition_penalty == 1.0
    burst = decoder.caps.burst if greedy else 1
    left = budget
    res.prefilled_tokens = ids.size
    with decoder.generation() as cache:
        while left > 0:
            if burst > 1 and cache.length > 0:
                tokens = decoder.greedy_burst(int(step_ids[0, -1]), cache, min(burst, left))
            elif greedy:
                tokens = (decoder.step_greedy(step_ids, cache),)
            else:
                row = decoder.step(step_ids, cache)[0, -1]                 # (V,)
                if processor is not None:
                    row = np.asarray(processor(history[:n].copy(), row.copy()), np.float32)
                tokens = (sample(row, history[:n]),)
            for token in tokens:
                left -= 1
                if token in eos_ids:
                    res.finish_reason, res.stop_token = "stop", token
                    return
                history[n] = token
                n += 1
                res.tokens.append(token)
                yield token
            step_ids = np.array([[token]], np.int64)
