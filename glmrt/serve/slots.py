"""STAND-IN, to be replaced by continuous batching (glmrt.load(path, slots=N, max_queue=M)).

Until the model itself schedules its sequences, the server bounds them here: `slots`
generations run at once, up to `max_queue` more wait in arrival order, and one more is refused
with glmrt's own QueueFullError (the server's 429). A waiting request whose client leaves gives
its place up. When glmrt.load takes slots= and max_queue=, glmrt/serve/run.py passes them there
and gives create_app admission=None; this file then goes.
"""
from __future__ import annotations

import collections
import threading

from ..errors import QueueFullError


class Admission:
    def __init__(self, slots: int, max_queue: int):
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots={slots} must be >= 1 and max_queue={max_queue} >= 0")
        self.slots, self.max_queue = slots, max_queue
        self.running = 0
        self.queue: collections.deque[Ticket] = collections.deque()
        self.lock = threading.Condition()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def enter(self) -> "Ticket":
        """A place in line; raises QueueFullError when every slot is busy and the line is full."""
        with self.lock:
            if self.running >= self.slots and len(self.queue) >= self.max_queue:
                raise QueueFullError(f"all {self.slots} slots are busy and {len(self.queue)} requests "
                                     f"wait (max_queue {self.max_queue})")
            ticket = Ticket(self)
            self.queue.append(ticket)
            self._promote()
            return ticket

    def _promote(self):
        while self.queue and self.running < self.slots:
            self.queue.popleft().held = True
            self.running += 1
        self.lock.notify_all()


class Ticket:
    def __init__(self, admission: Admission):
        self.admission, self.held, self.done = admission, False, False

    def wait(self, cancelled: threading.Event) -> bool:
        """Block until this ticket holds a slot (True) or `cancelled` is set (False)."""
        a = self.admission
        with a.lock:
            while not self.held and not cancelled.is_set():
                a.lock.wait(0.05)
            return self.held

    def release(self):
        a = self.admission
        with a.lock:
            if self.done:
                return
            self.done = True
            if self.held:
                a.running -= 1
            elif self in a.queue:
                a.queue.remove(self)
            a._promote()
