"""Facts about the machine glmrt runs on, for defaults and honest reports: physical CPU cores
(the default thread count), memory available, and the host's measured memory copy rate (the
bandwidth ceiling `glmrt bench` uses on the CPU)."""
from __future__ import annotations

import os
import threading
import time


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once), from
    /proc/cpuinfo where it says; else the logical CPUs available."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        cores, cpu, phys = set(), None, "0"
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and (allowed is None or cpu in allowed):
                    cores.add((phys, value))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return len(allowed) if allowed else (os.cpu_count() or 1)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def copy_rate_gbps(threads: int, mib_per_thread: int = 256, repeats: int = 5) -> float:
    """The host's memory copy rate in GB/s, bytes read + written (the convention the GPU
    ceiling uses): `threads` threads each copy their own array, far larger than any cache;
    the median of `repeats` rounds after a warm-up."""
    import numpy as np
    n = mib_per_thread << 20
    src = [np.ones(n, np.uint8) for _ in range(threads)]
    dst = [np.empty(n, np.uint8) for _ in range(threads)]

    def one_round() -> float:
        workers = [threading.Thread(target=np.copyto, args=(d, s)) for d, s in zip(dst, src)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t
    one_round()
    times = sorted(one_round() for _ in range(repeats))
    return 2 * n * threads / times[len(times) // 2] / 1e9
