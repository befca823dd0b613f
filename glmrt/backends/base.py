"""The decoder interface every backend implements, and the one cache type all of them use.

A decoder runs one exported model (or an engine built from it) a step at a time:

    with decoder.generation() as cache:          # a fresh, empty KV cache for one sequence
        logits = decoder.step(prompt_ids, cache)   # prefill: (1, keep, V); cache.length grows
        token = decoder.step_greedy(next_ids, cache)        # decode, only the argmax comes back
        tokens = decoder.greedy_burst(token, cache, k)      # k greedy steps, one host sync

Continuous batching (glmrt/scheduler.py) keeps several sequences' caches at once:

    slots = decoder.open_slots(n)                 # n persistent caches, decoded together
    decoder.step(chunk_ids, slots[i], keep=1)     # prefill one slot, in chunks
    logits = decoder.step_batch(last_ids, [slots[i], slots[j]])     # (B, V): one token each
    decoder.truncate(slots[i], n)                 # keep a prefix for the next request

`caps` says what it can do; the generation loop (glmrt/generate.py), the scheduler and
`glmrt bench` read nothing else. Where the cache's tensors live (numpy arrays owned by the
sequence, or device buffers owned by the decoder) is each backend's business: the Cache
carries its length, its slot in the decoder's buffers (if any) and an opaque handle.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import numpy as np


@dataclasses.dataclass(frozen=True)
class Capabilities:
    max_context: int          # positions one sequence may fill (prompt + output)
    burst: int = 1            # greedy steps queued per host synchronization (1: every step)
    device_argmax: bool = False   # greedy steps take the argmax on the device; one id comes back
    batch: int = 1            # sequences one step_batch may advance (1: no batching)
    concurrent: bool = False  # generations in several threads step at once (else take turns)


@dataclasses.dataclass(eq=False)           # caches are compared by identity, never by their arrays
class Cache:
    """One sequence's KV cache: `length` tokens are in it. `kv` is the backend's own handle
    (per-layer numpy arrays for the concat form; None where the decoder owns device buffers)."""
    length: int = 0
    kv: object = None
    slot: int | None = None   # its row in the decoder's slot buffers (open_slots), else None


class Decoder(abc.ABC):
    caps: Capabilities

    @abc.abstractmethod
    def generation(self) -> contextlib.AbstractContextManager[Cache]:
        """A fresh empty cache for one sequence, held for the `with` block (a decoder whose
        caps say not concurrent serves one generation at a time: others wait here)."""

    @abc.abstractmethod
    def step(self, ids: np.ndarray, cache: Cache, keep: int = 1) -> np.ndarray:
        """ids (1, seq) int64 after cache.length tokens -> logits (1, keep, V) float32 of the
        last `keep` positions; the cache then holds cache.length + seq tokens."""

    def step_greedy(self, ids: np.ndarray, cache: Cache) -> int:
        """Like step, but only the last position's argmax comes back (the first maximum)."""
        return int(np.argmax(self.step(ids, cache)[0, -1]))

    def greedy_burst(self, last: int, cache: Cache, n: int) -> list[int]:
        """n greedy decode steps (1 <= n <= caps.burst), the first fed `last`: the n chosen
        ids. Steps past a stop token only write cache positions beyond the text."""
        out = []
        for _ in range(n):
            last = self.step_greedy(np.array([[last]], np.int64), cache)
            out.append(last)
        return out

    # ---- continuous batching (caps.batch > 1) ------------------------------------------------
    def open_slots(self, n: int) -> list[Cache]:
        """n persistent empty caches that step_batch advances together."""
        from ..errors import InputError
        raise InputError(f"this decoder ({self.describe()['backend']}, {self.describe()['form']} form) "
                         "does not batch sequences; load without slots")

    def step_batch(self, ids: np.ndarray, caches: list[Cache]) -> np.ndarray:
        """One decode step for several sequences: ids (B,) int64, the next token of each ->
        logits (B, V) float32 of each one's new position; every cache grows by one."""
        raise NotImplementedError

    def step_batch_greedy(self, ids: np.ndarray, caches: list[Cache]) -> list[int]:
        """Like step_batch, but only each row's argmax comes back."""
        return [int(i) for i in np.argmax(self.step_batch(ids, caches), -1)]

    def truncate(self, cache: Cache, length: int) -> None:
        """Keep only the first `length` tokens (a prefix another request reuses)."""
        cache.length = min(cache.length, length)

    @abc.abstractmethod
    def describe(self) -> dict:
        """What `glmrt bench` reports about this decoder: backend, form, device, switches."""

    def streamed_bytes(self) -> int | None:
        """Weight bytes one decode step reads, where the decoder holds the weights in another
        layout than the export's (None: the manifest's streamed_bytes_per_token)."""
        return None

    def check_room(self, cache: Cache, new: int) -> None:
        """Refuse a step that would take the cache past caps.max_context."""
        from ..errors import GlmrtError
        if cache.length + new > self.caps.max_context:
            raise GlmrtError(f"{cache.length + new} tokens exceed the cache of {self.caps.max_context} "
                             "positions (load with a larger max_context)")
