"""Ordered parallel map for streaming export: numpy releases the GIL in its large loops, so
converting and quantizing weight chunks on threads uses every core while memory stays bounded
by the chunks in flight."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

WORKERS = max(1, min(16, os.cpu_count() or 1))


def ordered_map(fn, items, workers: int = WORKERS, ahead: int | None = None):
    """Yield fn(item) in order; at most `ahead` (default 2 x workers) items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
