"""One generation in its own thread, so the event loop never waits on the model: the thread
iterates the job's deltas and hands each to the loop through an asyncio queue; cancel() (the
client left, or the server is shutting down) makes the thread stop at the next delta and close
the generator, which ends the generation and frees its slot. No web framework here.
"""
from __future__ import annotations

import asyncio
import threading
import time

from .protocol import ApiError, Job

END = object()          # the last item of every run


class Run:
    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, on_end=None):
        """on_end(run) is called in the thread at the end. The model schedules the generation
        itself (slots): a full queue raises QueueFullError from job.open(), a 429."""
        self.job, self.loop, self.on_end = job, loop, on_end
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reason: str | None = None          # why it was cancelled: "disconnect" | "shutdown"
        self.error: BaseException | None = None  # what ended it, if the generation itself failed
        self.t_start = time.perf_counter()
        self.thread = threading.Thread(target=self._work, name=f"glmrt-{job.id}", daemon=True)

    def start(self) -> "Run":
        self.thread.start()
        return self

    def cancel(self, reason: str = "disconnect"):
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()

    async def get(self):
        """The next item: a Delta, an ApiError (then END follows), or END."""
        return await self.items.get()

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:               # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def _work(self):
        job = self.job
        try:
            deltas = job.open()
            try:
                for d in deltas:
                    if job.t_first is None:
                        job.t_first = time.perf_counter()
                    if d.kind == "done":
                        job.t_done = time.perf_counter()
                        job.usage = {**d.usage, "total_tokens": d.usage["prompt_tokens"]
                                     + d.usage["completion_tokens"]}
                    self._put(d)
                    if self.cancelled.is_set():
                        break
            finally:
                deltas.close()
            if self.cancelled.is_set() and self.reason == "shutdown" and job.t_done is None:
                self._put(ApiError(503, "the server is shutting down; the reply was cut short",
                                   code="shutting_down"))
        except BaseException as e:  # noqa: BLE001  every failure reaches the client as an error
            self.error = e             # refused (a full queue) or failed: not a cancellation
            self._put(e)
        finally:                       # counted before the slot is free and the client told
            if self.on_end is not None:
                self.on_end(self)
            self._put(END)
