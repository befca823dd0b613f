"""NVRTC: CUDA C -> a cubin for one GPU architecture, on any machine (no GPU, no CUDA toolkit:
NVIDIA's `nvidia-cuda-nvrtc` wheel through `cuda.bindings.nvrtc`).

A cubin is machine code for one compute capability (sm_XY), so an engine built here loads on a
driver that knows that architecture without any JIT; PTX would need a driver at least as new as
this NVRTC. The engine's manifest records the NVRTC version and the compute capability.
"""
from __future__ import annotations

import dataclasses
import re

from ...errors import GlmrtError

ARCHS = (80, 86, 87, 89, 90, 120)      # what glmrt's engine is compiled and tested for
OPTIONS = ("-std=c++17", "--extra-device-vectorization", "-lineinfo")
INSTALL = "pip install 'glmrt[cuda]' (NVIDIA's cuda-bindings and nvidia-cuda-nvrtc wheels)"


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise GlmrtError(f"the cuda engine needs NVIDIA's CUDA Python bindings: {INSTALL}") from None
    return nvrtc


def _check(nvrtc, result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise GlmrtError(f"NVRTC {what} failed: {err.name if hasattr(err, 'name') else err}")
    return rest[0] if len(rest) == 1 else rest


def version() -> str:
    nvrtc = _nvrtc()
    try:
        major, minor = _check(nvrtc, nvrtc.nvrtcVersion(), "version")
    except Exception as e:       # the bindings load but libnvrtc is missing
        if isinstance(e, GlmrtError):
            raise
        raise GlmrtError(f"NVRTC is not loadable ({str(e).splitlines()[0][:200]}): {INSTALL}") from None
    return f"{major}.{minor}"


def supported_archs() -> tuple[int, ...]:
    nvrtc = _nvrtc()
    return tuple(_check(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "supported architectures"))


@dataclasses.dataclass(frozen=True)
class Compiled:
    cubin: bytes
    log: str                # ptxas' report: registers, spills, shared memory per kernel

    def resources(self) -> dict:
        """kernel -> {"registers", "spill_bytes", "smem_static"} from ptxas' verbose log."""
        out, name = {}, None
        for line in self.log.splitlines():
            m = re.search(r"Function properties for (\w+)", line)
            if m:
                name = m.group(1)
                out[name] = {"registers": None, "spill_bytes": 0, "smem_static": 0}
                continue
            if name is None:
                continue
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                out[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                out[name]["registers"] = int(m.group(1))
                m = re.search(r"(\d+) bytes smem", line)
                out[name]["smem_static"] = int(m.group(1)) if m else 0
        return out


def compile_cubin(source: str, arch: int, name: str = "glmrt_engine.cu", defines: dict | None = None) -> Compiled:
    """Compile `source` for sm_`arch`; a compile error is raised with NVRTC's log."""
    nvrtc = _nvrtc()
    version()                                  # a clear message where libnvrtc cannot load
    if arch not in supported_archs():
        raise GlmrtError(f"this NVRTC ({version()}) cannot compile for sm_{arch}; it knows "
                         f"{', '.join(f'sm_{a}' for a in supported_archs())}")
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "create")
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--ptxas-options=-v", *(o.encode() for o in OPTIONS),
            *(f"-D{k}={v}".encode() for k, v in (defines or {}).items())]
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "log")
        text = log.rstrip(b"\0 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            errors = "\n".join(line for line in text.splitlines() if "error" in line or "^" in line)
            raise GlmrtError(f"NVRTC could not compile the engine for sm_{arch}:\n{(errors or text)[:4000]}")
        size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
        return Compiled(bytes(cubin), text)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
