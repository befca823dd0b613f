"""Continuous batching: many generations share every decode step.

A Scheduler owns a decoder's slots (`decoder.open_slots(n)`: n sequences' KV caches) and one
thread. Callers submit from any thread (Model.stream / generate / chat / logits do, when the
model was loaded with `slots=n`); a request waits in a bounded queue, in order, until a slot is
free, and a full queue refuses it at once (QueueFullError). Each turn of the loop:

  1. admits waiting requests to free slots, preferring the slot whose cached tokens share the
     longest prefix with the prompt: that prefix stays and only the rest is prefilled (the next
     turn of a chat, a shared system prompt or tool list);
  2. prefills one chunk (at most `prefill_chunk` tokens) of one admitted prompt, so a new long
     prompt delays the running streams by at most one chunk per step;
  3. advances every decoding sequence by one token in one batched call (step_batch), each
     sampled with its own parameters, seed, stop ids and length limit;
  4. frees the slots of finished and cancelled requests; their tokens stay cached for reuse.

Greedy requests without a logits processor take the argmax on the device where the decoder
can; the others copy their row of logits and sample on the host, as the single-sequence loop.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Callable

import numpy as np

from .backends.base import Cache, Decoder
from .errors import GlmrtError, QueueFullError
from .generate import Generation
from .sampling import Sampler, SamplingParams

_END = object()                 # a request's stream is over (its Generation says why)


@dataclasses.dataclass(eq=False)
class Request:
    ids: np.ndarray                          # the prompt, (n,) int64
    params: SamplingParams
    budget: int                              # new tokens at most
    eos: frozenset
    result: Generation
    processor: Callable | None = None
    score: bool = False                      # logits(): every prompt position's logits, no decoding
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    # the scheduler's own state
    cache: Cache | None = None
    fed: int = 0                             # prompt tokens in the cache
    history: list = dataclasses.field(default_factory=list)    # prompt + new tokens
    sampler: Sampler | None = None
    scores: list = dataclasses.field(default_factory=list)     # score requests: logits chunks
    submitted: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.processor is None and self.params.temperature == 0.0 and self.params.repetition_penalty == 1.0


class TokenStream:
    """What a submitted request gives its caller: an iterator over the new token ids (or, for
    a score request, one logits array). Closing it, or dropping it, cancels the request and
    frees its slot at the scheduler's next step."""

    def __init__(self, req: Request, scheduler: "Scheduler"):
        self.req, self.scheduler = req, scheduler

    def __iter__(self):
        return self

    def __next__(self):
        item = self.req.out.get()
        if item is _END:
            self.req.out.put(_END)                 # stay finished for later calls
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if not self.req.cancelled.is_set():
            self.req.cancelled.set()
            self.scheduler.wake()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: the scheduler may be gone)
            pass


class Scheduler:
    def __init__(self, decoder: Decoder, slots: int, *, max_queue: int, prefill_chunk: int):
        if decoder.caps.batch < slots:
            decoder.open_slots(slots)            # the decoder's own refusal says what would batch more
            raise GlmrtError(f"slots={slots}: this decoder batches at most {decoder.caps.batch}")
        self.decoder = decoder
        self.slots = decoder.open_slots(slots)
        self.cached = {c.slot: [] for c in self.slots}        # slot -> the token ids in its cache
        self.used = {c.slot: 0.0 for c in self.slots}         # slot -> when it was last released
        self.free = list(self.slots)
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.failure: BaseException | None = None
        self.stats = collections.Counter()                   # prefilled, reused, decode_steps, ...
        self.thread = threading.Thread(target=self._loop, name="glmrt-scheduler", daemon=True)
        self.thread.start()

    # ---- callers' side ------------------------------------------------------------------------
    def submit(self, req: Request) -> TokenStream:
        with self.cv:
            if self.failure is not None:
                raise GlmrtError(f"the scheduler stopped: {self.failure}")
            if self.stopping:
                raise GlmrtError("the model is closed")
            queued = len(self.waiting) - len(self.free)        # beyond the slots about to free up
            if queued >= self.max_queue:
                raise QueueFullError(f"all {len(self.slots)} slots are busy and {queued} requests "
                                     f"wait (max_queue={self.max_queue}); try again later")
            req.submitted = time.perf_counter()
            req.history = req.ids.tolist()
            req.sampler = Sampler(req.params)
            self.waiting.append(req)
            self.cv.notify()
        return TokenStream(req, self)

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def load(self) -> dict:
        """What is running now: slots busy, requests waiting."""
        with self.cv:
            return {"slots": len(self.slots), "active": len(self.active), "waiting": len(self.waiting)}

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self):
        try:
            while True:
                with self.cv:
                    while not self.stopping and not self.active and not (self.waiting and self.free):
                        self.cv.wait()
                    if self.stopping:
                        break
                    self._admit()
                self._reap()
                self._prefill_one()
                self._decode()
        except BaseException as e:            # the decoder broke: fail every request, refuse new ones
            with self.cv:
                self.failure = e
                pending = self.active + list(self.waiting)
                self.active, self.waiting = [], collections.deque()
            for r in pending:
                r.out.put(GlmrtError(f"generation failed: {e}"))
            raise
        finally:
            with self.cv:
                pending = self.active + list(self.waiting)
                self.active, self.waiting = [], collections.deque()
            for r in pending:
                r.out.put(GlmrtError("the model was closed"))

    def _admit(self):
        """Waiting requests onto free slots, in order (called with the lock held)."""
        while self.waiting and self.free:
            req = self.waiting.popleft()
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
                continue
            try:
                cache, reuse = self._pick(req.ids)
                reuse = 0 if req.score else reuse          # scoring wants every position's logits
                self.free.remove(cache)
                self.decoder.truncate(cache, reuse)
            except BaseException as e:                     # never lose a caller: it hears why
                req.out.put(GlmrtError(f"generation failed: {e}"))
                raise
            req.cache, req.fed = cache, reuse
            req.result.cached_tokens = reuse
            self.stats["reused"] += reuse
            self.active.append(req)

    def _pick(self, ids: np.ndarray) -> tuple[Cache, int]:
        """The free slot whose cache shares the longest prefix with `ids` (the least recently
        used one when none does), and how many tokens of it to keep (at least one prompt token
        is always run, for its logits)."""
        best, best_n = None, -1
        for c in self.free:
            have = self.cached[c.slot][:c.length]
            n = _common_prefix(have, ids)
            if n > best_n or (n == best_n and self.used[c.slot] < self.used[best.slot]):
                best, best_n = c, n
        return best, min(best_n, len(ids) - 1)

    def _reap(self):
        for req in [r for r in self.active if r.cancelled.is_set()]:
            self._release(req, "cancelled")
        with self.cv:                        # a caller that gave up while waiting leaves the queue
            gone = [r for r in self.waiting if r.cancelled.is_set()]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled")

    def _prefill_one(self):
        """One chunk of the oldest prompt still being prefilled."""
        req = next((r for r in self.active if r.fed < len(r.ids)), None)
        if req is None:
            return
        chunk = req.ids[req.fed:req.fed + self.prefill_chunk]
        last = req.fed + len(chunk) == len(req.ids)
        keep = len(chunk) if req.score else 1
        try:
            logits = self.decoder.step(chunk[None], req.cache, keep=keep)       # (1, keep, V)
        except GlmrtError as e:
            self._release(req, None, error=e)
            return
        req.fed += len(chunk)
        self.stats["prefilled"] += len(chunk)
        req.result.prefilled_tokens += len(chunk)
        if req.score:
            req.scores.append(logits[0])
            if last:
                req.out.put(np.concatenate(req.scores))
                self._release(req, "scored")
            return
        if last:
            self._emit(req, self._sample(req, logits[0, -1]))

    def _decode(self):
        """One batched step for every sequence past its prompt."""
        batch = [r for r in self.active if r.fed == len(r.ids) and not r.score]
        if not batch:
            return
        ids = np.array([r.history[-1] for r in batch], np.int64)
        caches = [r.cache for r in batch]
        if all(r.greedy for r in batch):
            tokens = self.decoder.step_batch_greedy(ids, caches)
        else:
            rows = self.decoder.step_batch(ids, caches)                       # (B, V)
            tokens = [self._sample(r, row) for r, row in zip(batch, rows)]
        self.stats["decode_steps"] += 1
        self.stats["decoded"] += len(batch)
        for r, t in zip(batch, tokens):
            self._emit(r, t)

    def _sample(self, req: Request, row: np.ndarray) -> int:
        if req.processor is not None:
            row = np.asarray(req.processor(np.array(req.history), row.copy()), np.float32)
        return req.sampler(row, np.asarray(req.history))

    def _emit(self, req: Request, token: int):
        """A new token: the end of the request (a stop id, not sent) or one more for it."""
        if token in req.eos:
            req.result.stop_token = token
            self._release(req, "stop")
            return
        req.history.append(token)
        req.result.tokens.append(token)
        req.out.put(token)
        if len(req.result.tokens) >= req.budget:
            self._release(req, "length")

    def _release(self, req: Request, reason: str | None, error: BaseException | None = None):
        """Leave the slot with its tokens cached (those the cache holds) and end the stream."""
        if req in self.active:
            self.active.remove(req)
        c = req.cache
        self.cached[c.slot] = req.history[:c.length]
        self.used[c.slot] = time.perf_counter()
        with self.cv:
            self.free.append(c)
        self._finish(req, reason, error)

    def _finish(self, req: Request, reason: str | None, error: BaseException | None = None):
        req.result.finish_reason = reason
        req.out.put(error if error is not None else _END)


def _common_prefix(a: list, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != b[:n])
    return int(diff[0]) if diff.size else n
