"""Backends: what runs an exported model folder, in one registry.

Each backend declares the devices it runs on, how it opens a decoder (glmrt/backends/base.py)
for a model folder, whether it needs an engine built first, how its engine folders inside the
model folder are named, and which module of glmrt.engines builds them (`glmrt build --backend
NAME`). Model, `glmrt bench` and the CLI look nothing else up; adding a backend is one
Decoder subclass and one entry here.

  backend      devices    engine (glmrt build)                                decoder
  onnxruntime  cpu, cuda  optional: ORT's optimized graph,                    OrtConcatDecoder (concat form)
                          engines/onnxruntime-<device>/<precision>/           OrtGqaDecoder (gqa form)
  tensorrt     cuda       required: engines/<gpu>-sm<cc>/<precision>/         TrtDecoder
  cuda         cuda       required: glmrt's own kernels, compiled per GPU     CudaDecoder
                          by NVRTC, engines/<gpu>-sm<cc>/<precision>/
  cpu          cpu        required: glmrt's own C, compiled per instruction   CpuDecoder
                          set by the machine's C compiler,
                          engines/cpu-<isa>/<precision>/
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..errors import ArtifactError, InputError
from .base import Cache, Capabilities, Decoder  # noqa: F401  (the interface, re-exported)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    device: str | None = None        # None: the backend's first device
    threads: int | None = None       # CPU threads (ONNX Runtime intra-op); None: its default
    max_context: int | None = None   # positions to reserve (device caches); None: the model's
    cuda_graph: bool = True          # replay decode steps as CUDA graphs where the backend can
    burst: int | None = None         # greedy steps per host synchronization; None: the default
    verify: bool = True              # check engine files' checksums


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple                   # the first is the default
    load: Callable                   # (model folder, manifest, LoadOptions) -> Decoder
    engine_folder: str | None        # "gpu": engines/<gpu>-sm<cc>/; "device": engines/<name>-<device>/;
                                     # "isa": engines/<name>-<isa>/
    engine_required: bool
    builder: str | None              # module of glmrt.engines with build(model_dir, manifest, ...)
    install: str                     # what a user installs to get it


def _onnxruntime(folder: Path, manifest: dict, o: LoadOptions) -> Decoder:
    if manifest["io"]["form"] == "gqa":
        if o.device == "cuda" and manifest["precision"].get("target") == "cpu":
            raise InputError(f"{folder} was exported for the CPU (--target cpu: fp32 GroupQueryAttention, which "
                             "ONNX Runtime's CUDA provider does not run); export with --target cuda for the GPU")
        from .ort_gqa import OrtGqaDecoder
        return OrtGqaDecoder(folder, manifest, o.device, o.threads, o.max_context, o.cuda_graph, o.burst)
    from .ort_concat import OrtConcatDecoder
    return OrtConcatDecoder(folder, manifest, o.device, o.threads, o.max_context)


def _tensorrt(folder: Path, manifest: dict, o: LoadOptions) -> Decoder:
    """The engine built for this GPU and the model's precision (glmrt build --backend tensorrt)."""
    from .. import gpu as gpus
    from ..engine import engine_dir, read_engine
    from .tensorrt import TrtDecoder
    here = gpus.detect()
    where = engine_dir(folder, "tensorrt", manifest["precision"]["name"], gpu_name=here.name,
                       compute_capability=here.compute_capability)
    if not where.is_dir():
        raise ArtifactError(f"{where}: no TensorRT engine for {here.name} ({here.sm}); build one: "
                            f"glmrt build {folder} --backend tensorrt")
    return TrtDecoder(where, read_engine(where, o.verify), manifest, here)


def _cuda(folder: Path, manifest: dict, o: LoadOptions) -> Decoder:
    """glmrt's own engine for this GPU (glmrt build --backend cuda)."""
    from .cuda_engine.decoder import open_engine
    return open_engine(folder, manifest, o)


def _cpu(folder: Path, manifest: dict, o: LoadOptions) -> Decoder:
    """glmrt's own engine for this CPU (glmrt build --backend cpu)."""
    from .cpu_engine.decoder import open_engine
    return open_engine(folder, manifest, o)


BACKENDS = {b.name: b for b in (
    Backend("onnxruntime", ("cpu", "cuda"), _onnxruntime, "device", False, "onnxruntime_build",
            "onnxruntime is a core dependency; for CUDA: pip install 'glmrt[gpu]'"),
    Backend("tensorrt", ("cuda",), _tensorrt, "gpu", True, "tensorrt_build",
            "pip install 'glmrt[tensorrt]' where NVIDIA's TensorRT wheels are reachable"),
    Backend("cuda", ("cuda",), _cuda, "gpu", True, "cuda_build",
            "pip install 'glmrt[cuda]' (cuda-bindings and nvidia-cuda-nvrtc; an NVIDIA driver to run)"),
    Backend("cpu", ("cpu",), _cpu, "isa", True, "cpu_build",
            "nothing beyond glmrt; a C compiler (cc, gcc or clang) where the engine is built"),
)}
DEVICES = ("cpu", "cuda")


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"backend={name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def open_decoder(folder: Path, manifest: dict, name: str = "onnxruntime",
                 options: LoadOptions = LoadOptions()) -> Decoder:
    """The decoder `name` runs this model folder with."""
    b = backend(name)
    device = options.device or b.devices[0]
    if device not in b.devices:
        raise InputError(f"device={device!r}; backend {name} runs on {' or '.join(b.devices)}")
    return b.load(Path(folder), manifest, dataclasses.replace(options, device=device))
