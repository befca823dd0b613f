"""Which GPU is this, without torch: NVML (nvidia-ml-py), then the CUDA driver through
cuda-python, then nvidia-smi. The one place glmrt asks; what each compute capability runs is
declared in glmrt/precision.py."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess

from .errors import GlmrtError


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def check_precision(precision: str, gpu: Gpu, backend: str = "tensorrt") -> None:
    """Refuse a GPU too old to run `precision` on `backend` (glmrt.precision's registry)."""
    from .precision import precision as spec
    spec(precision).check_gpu(backend, gpu)


def parse_gpu(text: str) -> Gpu:
    """'NAME@smXY' or 'NAME@X.Y' (a GPU named explicitly)."""
    m = re.fullmatch(r"(.+)@(?:sm(\d)(\d+)|(\d+)\.(\d+))", text.strip())
    if not m:
        raise GlmrtError(f"--gpu {text!r}: expected 'auto' or NAME@smXY (for example 'NVIDIA H200@sm90')")
    major, minor = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
    return Gpu(m.group(1).strip(), (int(major), int(minor)))


def detect(index: int = 0) -> Gpu:
    """CUDA's device `index` of this process: the one ONNX Runtime and TensorRT run on."""
    for probe in (_nvml, _cuda_driver, _nvidia_smi):
        try:
            gpu = probe(index)
        except Exception:  # each probe is optional; the next one is tried
            gpu = None
        if gpu is not None:
            return gpu
    raise GlmrtError("no NVIDIA GPU found (tried NVML, the CUDA driver and nvidia-smi); "
                     "name one with --gpu NAME@smXY")


def visible(index: int) -> int | str:
    """CUDA's device `index` as NVML and nvidia-smi name it. CUDA numbers only the GPUs that
    CUDA_VISIBLE_DEVICES lists (Ray gives each replica its own GPU that way); NVML numbers every
    GPU of the machine. An entry is an index or a UUID (GPU-..., MIG-...)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return index
    ids = [v.strip() for v in listed.split(",") if v.strip()]
    if index >= len(ids):
        raise GlmrtError(f"CUDA_VISIBLE_DEVICES={listed!r} leaves no CUDA device {index}")
    return int(ids[index]) if ids[index].isdigit() else ids[index]


def _nvml(index):
    import pynvml
    pynvml.nvmlInit()
    try:
        which = visible(index)
        h = (pynvml.nvmlDeviceGetHandleByIndex(which) if isinstance(which, int)
             else pynvml.nvmlDeviceGetHandleByUUID(which))
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        return Gpu(name, tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)))
    finally:
        pynvml.nvmlShutdown()


def _cuda_driver(index):
    from cuda.bindings import driver as cu
    (err,) = cu.cuInit(0)
    if err != cu.CUresult.CUDA_SUCCESS:
        return None
    err, dev = cu.cuDeviceGet(index)
    err, raw = cu.cuDeviceGetName(256, dev)
    _, major = cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    _, minor = cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return Gpu(raw.split(b"\0")[0].decode(), (major, minor))


def _nvidia_smi(index):
    out = subprocess.run(["nvidia-smi", f"--id={visible(index)}", "--query-gpu=name,compute_cap",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    name, cc = out.stdout.strip().rsplit(",", 1)
    major, minor = cc.strip().split(".")
    return Gpu(name.strip(), (int(major), int(minor)))
