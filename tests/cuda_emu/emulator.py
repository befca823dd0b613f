"""Run the engine's CUDA source on the CPU: compile the translation unit NVRTC gets as C++20
with cuda_emu.h (g++ or clang++), and an EmulatedDevice the decoder can be given instead of
a GPU (host memory, kernels launched by name, graphs recorded and replayed)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from glmrt.backends.cuda_engine.device import Device

HEADER = Path(__file__).with_name("cuda_emu.h")
CACHE = Path(tempfile.gettempdir()) / f"glmrt-cuda-emu-{os.getuid()}"


def compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def build(source: str) -> ctypes.CDLL:
    """The emulation library of `source` (cached by the hash of the source and the header)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or clang++) for the CUDA emulation")
    key = hashlib.sha256((source + HEADER.read_text()).encode()).hexdigest()[:20]
    lib = CACHE / f"{key}.so"
    if not lib.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / f"{key}.cpp"
        src.write_text(source)
        tmp = CACHE / f"{key}.{os.getpid()}.so"
        r = subprocess.run([cxx, "-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-w", "-include", str(HEADER),
                            str(src), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the emulation did not compile:\n{r.stderr[:6000]}")
        tmp.rename(lib)
    dll = ctypes.CDLL(str(lib))
    dll.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                               ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
    dll.emu_in_flight.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    return dll


class EmulatedDevice(Device):
    """Device memory is host memory; kernels run in the CPU emulation (blocks in a shuffled
    order, a new order for every launch). `load` takes the CUDA source, not a cubin."""
    image_kind = "source"
    ort_device = "cpu"            # host memory: ONNX Runtime's CPU provider shares it

    def __init__(self, name: str = "Emulated GPU", compute_capability=(9, 0), sm_count: int = 4,
                 async_landing: str = "late"):
        """async_landing: when a cp.async's bytes arrive, "late" (at the wait that completes it)
        or "early" (as it is issued): a kernel must be right under both."""
        if async_landing not in ("late", "early"):
            raise ValueError(f"async_landing={async_landing!r}: 'late' or 'early'")
        self.name, self.compute_capability, self.sm_count = name, compute_capability, sm_count
        self.async_landing = async_landing
        self.driver_version = 13000
        self.buffers: dict[int, np.ndarray] = {}
        self.launches = 0
        self.recording: list | None = None
        self._in_flight: list = []

    def alloc(self, nbytes: int) -> int:
        buf = np.full(int(nbytes) + 64, 0xFF, np.uint8)         # NaN bytes: unwritten memory shows
        ptr = (buf.ctypes.data + 63) // 64 * 64
        self.buffers[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        self.buffers.pop(ptr, None)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        ctypes.memmove(ptr, a.ctypes.data, a.nbytes)

    def download(self, ptr: int, array: np.ndarray) -> None:
        ctypes.memmove(array.ctypes.data, ptr, array.nbytes)

    def zero(self, ptr: int, nbytes: int) -> None:
        ctypes.memset(ptr, 0, nbytes)

    def load(self, image: bytes, kernels: dict) -> dict:
        lib = build(image.decode() if isinstance(image, bytes) else image)
        return {name: (lib, name) for name in kernels}

    def launch(self, kernel, grid: tuple, threads: int, smem: int, args: ctypes.Structure, pdl: bool = False) -> None:
        if self.recording is not None:
            if self._in_flight:
                raise RuntimeError("in_flight spans apply to the next direct launch, not to a captured one")
            copy = type(args).from_buffer_copy(args)            # a graph keeps the arguments it captured
            self.recording.append((kernel, grid, threads, smem, copy))
            return
        self._run(kernel, grid, threads, smem, args)

    def in_flight(self, spans) -> None:
        """The next launch runs as if the previous kernel were still writing these (address,
        bytes) spans: NaN until the kernel's grid_wait (a block's), their values after it."""
        self._in_flight = list(spans)

    def _run(self, kernel, grid, threads, smem, args):
        lib, name = kernel
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        self.launches += 1
        for ptr, n in self._in_flight:
            lib.emu_in_flight(ptr, n)
        self._in_flight = []
        lib.emu_set_async_early(int(self.async_landing == "early"))
        rc = lib.emu_launch(name.encode(), gx, gy, gz, threads, smem, ctypes.addressof(args), self.launches)
        if rc:
            raise RuntimeError(f"emulated kernel {name}: " + {1: "not in the module", 2: "deadlock",
                                                                 3: "a warp collective not met by all 32 lanes at one call",
                                                                 4: "a cp.async outside the block's dynamic shared memory "
                                                                    "or from a misaligned source"}.get(rc, str(rc)))

    def synchronize(self) -> None:
        pass

    def capture(self, record) -> object:
        self.recording = []
        try:
            record()
            return self.recording
        finally:
            self.recording = None

    def replay(self, graph) -> None:
        for launch in graph:
            self._run(*launch)


def break_kernels(monkeypatch, old: str, new: str, what: str = "") -> None:
    """A deliberate bug for the tests that must catch it: the kernel source every engine and
    check compiles has `old` (which must stand there once) replaced by `new`, for this test."""
    from glmrt.backends.cuda_engine import selfcheck, sources
    real = sources.kernel_text()
    assert real.count(old) == 1, f"{what}: the snippet to break is not in the kernels once"
    monkeypatch.setattr(sources, "kernel_text", lambda: real.replace(old, new))
    monkeypatch.setattr(selfcheck, "translation_unit", sources.translation_unit)
