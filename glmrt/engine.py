"""Engine folders: what `glmrt build` writes inside a model folder (an engine is a backend's
artifact for one GPU or device, made from the export), and the checks the runtime makes before
loading one. Shared by the builders (glmrt.engines) and the backends (glmrt.backends).

  MODEL/engines/<gpu-slug>-sm<major><minor>/<precision>/   (TensorRT, glmrt's cuda engine)
  MODEL/engines/onnxruntime-<device>/<precision>/          (ONNX Runtime optimized graph)
  MODEL/engines/cpu-<isa>/<precision>/                     (glmrt's cpu engine, per instruction set)
each with manifest.json:
  format, kind ("tensorrt-engine" | "onnxruntime-optimized" | "cuda-engine"), backend, precision,
  gpu {name, compute_capability}, tensorrt (version), profiles, source {model_manifest_sha256},
  files {name: {sha256, bytes}}, versions; a cuda engine also: cubin, nvrtc (version),
  min_driver (CUDA driver API version), kernels, weights (index into model.onnx.data), config;
  a cpu engine: library, isa, machine, cpu_flags, abi, compiler and flags, weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import manifest as manifest_io
from .errors import ArtifactError

ENGINES = "engines"
ENGINE_KINDS = ("tensorrt-engine", "onnxruntime-optimized", "cuda-engine", "cpu-engine")


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (folder-safe, stable)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def engine_dir(model_dir: Path, backend: str, precision: str, *, gpu_name: str | None = None,
               compute_capability: tuple[int, int] | None = None, device: str | None = None,
               isa: str | None = None) -> Path:
    """Where `glmrt build --backend BACKEND` puts its engine for this precision: named by the GPU
    and its compute capability, by the device, or by the CPU instruction set, as the backend's
    registry entry declares."""
    from .backends import backend as lookup
    naming = lookup(backend).engine_folder
    if naming == "gpu":
        major, minor = compute_capability
        return Path(model_dir) / ENGINES / f"{gpu_slug(gpu_name)}-sm{major}{minor}" / precision
    if naming == "device":
        return Path(model_dir) / ENGINES / f"{backend}-{device}" / precision
    if naming == "isa":
        return Path(model_dir) / ENGINES / f"{backend}-{isa}" / precision
    raise ArtifactError(f"backend {backend!r} builds no engines")


def linear_roles(index: dict) -> list[dict]:
    """Every matrix's entry of an engine's weight index (engines/weight_index.py): each layer's
    qkv, o, gate_up and down, then the lm_head."""
    return [layer[n] for layer in index["layers"] for n in ("qkv", "o", "gate_up", "down")] + [index["lm_head"]]


def check_compatible(engine_manifest: dict, *, gpu_name: str | None, compute_capability: tuple | None,
                     tensorrt_version: str | None, where: Path) -> None:
    """Refuse, saying which and how to rebuild, an engine made for another GPU or TensorRT."""
    if engine_manifest.get("kind") != "tensorrt-engine":
        return
    want = engine_manifest["gpu"]
    built_cc = tuple(want["compute_capability"])
    rebuild = f"rebuild it here: glmrt build {where.parent.parent.parent} --backend tensorrt"
    if tensorrt_version is not None and engine_manifest["tensorrt"] != tensorrt_version:
        raise ArtifactError(f"{where}: engine built with TensorRT {engine_manifest['tensorrt']}, this is "
                            f"TensorRT {tensorrt_version}; plans load only on the version that made them; "
                            + rebuild)
    if compute_capability is not None and built_cc != tuple(compute_capability):
        raise ArtifactError(f"{where}: engine built for {want['name']} (sm{built_cc[0]}{built_cc[1]}), this "
                            f"GPU is {gpu_name} (sm{compute_capability[0]}{compute_capability[1]}); " + rebuild)
    if gpu_name is not None and gpu_slug(want["name"]) != gpu_slug(gpu_name):
        raise ArtifactError(f"{where}: engine built for {want['name']}, this GPU is {gpu_name}; " + rebuild)


def find_cuda_engine(model_dir: Path, precision: str, gpu_name: str, compute_capability: tuple) -> Path:
    """The cuda engine for this GPU: the folder named for it, else one built for another GPU of
    the same compute capability (cubins are per architecture), else a one-line error saying
    what exists and how to build."""
    here = engine_dir(model_dir, "cuda", precision, gpu_name=gpu_name, compute_capability=compute_capability)
    if (here / manifest_io.MANIFEST).is_file():
        return here
    found = []
    for m in sorted(Path(model_dir).glob(f"{ENGINES}/*/{precision}/{manifest_io.MANIFEST}")):
        try:
            em = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if em.get("kind") == "cuda-engine":
            if tuple(em["gpu"]["compute_capability"]) == tuple(compute_capability):
                return m.parent
            found.append(f"{m.parent.parent.name}")
    major, minor = compute_capability
    have = f" (there are engines for {', '.join(found)})" if found else ""
    raise ArtifactError(f"{model_dir}: no cuda engine for {gpu_name} (sm{major}{minor}){have}; build one: "
                        f"glmrt build {model_dir} --backend cuda")


def check_cuda_engine(engine_manifest: dict, compute_capability: tuple, driver_version: int, where: Path) -> None:
    """Refuse, in one line, a cuda engine compiled for another compute capability or needing a
    newer driver than this one (cubins from NVRTC 13.x load on CUDA 13.0+ drivers)."""
    built = tuple(engine_manifest["gpu"]["compute_capability"])
    rebuild = f"rebuild it here: glmrt build {where.parent.parent.parent} --backend cuda"
    if built != tuple(compute_capability):
        raise ArtifactError(f"{where}: compiled for sm{built[0]}{built[1]} ({engine_manifest['gpu']['name']}), "
                            f"this GPU is sm{compute_capability[0]}{compute_capability[1]}; " + rebuild)
    need = engine_manifest["min_driver"]
    if driver_version < need:
        raise ArtifactError(f"{where}: needs a CUDA {need // 1000}.{need % 1000 // 10} driver or newer "
                            f"(compiled by NVRTC {engine_manifest['nvrtc']}); this driver supports CUDA "
                            f"{driver_version // 1000}.{driver_version % 1000 // 10}: update the NVIDIA driver")


def read_engine(engine_path: Path, verify: bool = True) -> dict:
    m = manifest_io.read(engine_path, verify=verify)
    if m.get("kind") not in ENGINE_KINDS:
        raise ArtifactError(f"{engine_path / manifest_io.MANIFEST}: not an engine manifest")
    return m


def source_matches(engine_manifest: dict, model_dir: Path) -> bool:
    """The engine was built from this model folder's manifest (by checksum)."""
    return engine_manifest["source"]["model_manifest_sha256"] == \
        manifest_io.sha256(Path(model_dir) / manifest_io.MANIFEST)
