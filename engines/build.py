"""`glmrt build`: an exported model folder -> an engine for one target, in its own folder
keyed by GPU (or device) and precision, with a manifest; written to a temporary folder and
renamed into place when complete.

  tensorrt     the TensorRT form (export --target tensorrt) -> engine.plan for the GPU here
  onnxruntime  any form -> ONNX Runtime's optimized graph for the cpu or cuda provider
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import glmrt
from glmrt import manifest as manifest_io
from glmrt.contract import contract_from_dict
from glmrt.engine import ENGINE_KINDS, ENGINES, engine_dir
from glmrt.errors import GlmrtError

from glmrt.gpu import Gpu, check_precision, detect, parse_gpu
from .profiles import Limits, profiles

TIMING_CACHE = "timing.cache"


def build(model_dir: str | Path, *, backend: str = "tensorrt", gpu: str = "auto",
          precision: str | None = None, device: str = "cuda", max_batch: int = 1,
          max_prompt: int = 2048, max_context: int = 4096, opt_level: int = 3,
          overwrite: bool = False) -> Path:
    model_dir = Path(model_dir)
    man = manifest_io.read(model_dir, verify=True)
    prec = man["precision"]
    if precision is not None and precision != prec["name"]:
        raise GlmrtError(f"{model_dir} holds a {prec['name']} model; export it with --precision "
                         f"{precision} (--target {backend}) to build a {precision} engine")
    precision = prec["name"]
    if backend == "tensorrt":
        target = detect() if gpu == "auto" else parse_gpu(gpu)
        return _tensorrt(model_dir, man, target, gpu == "auto",
                         Limits(max_batch, max_prompt, max_context), opt_level, overwrite)
    if backend == "onnxruntime":
        return _onnxruntime(model_dir, man, device, overwrite)
    raise GlmrtError(f"--backend {backend!r} is not one of tensorrt, onnxruntime")


def _tensorrt(model_dir: Path, man: dict, target: Gpu, detected: bool, limits: Limits,
              opt_level: int, overwrite: bool) -> Path:
    from .tensorrt_build import build_engine, import_tensorrt
    precision = man["precision"]["name"]
    standard_ops = man["io"]["form"] == "concat" and (
        man["precision"]["target"] == "tensorrt" or man["precision"]["quantization"] is None)
    if not standard_ops:
        raise GlmrtError(f"{model_dir} was exported for {man['precision']['target']} (ONNX Runtime's "
                         f"own ops); TensorRT needs standard ops only: export with --target tensorrt")
    check_precision(precision, target)
    import_tensorrt()                       # a clear message before any work when it is absent
    limits.check(man["config"]["max_position_embeddings"])
    profs = profiles(contract_from_dict(man["io"]), limits)
    if not detected:
        here = detect()
        if here.compute_capability != target.compute_capability:
            raise GlmrtError(f"TensorRT builds for the GPU it runs on: this is {here.name} "
                             f"({here.sm}), not {target.name} ({target.sm})")
    out = engine_dir(model_dir, "tensorrt", precision, gpu_name=target.name,
                     compute_capability=target.compute_capability)

    def make(tmp: Path) -> dict:
        info = build_engine(model_dir / man["graph"], tmp / "engine.plan", profs,
                            timing_cache=model_dir / ENGINES / TIMING_CACHE, opt_level=opt_level)
        return {"kind": "tensorrt-engine", "backend": "tensorrt", "plan": "engine.plan",
                "tensorrt": info["tensorrt"], "build": info,
                "gpu": {"name": target.name, "compute_capability": list(target.compute_capability)},
                "limits": vars(limits),
                "profiles": [{"name": p["name"], "shapes": {k: [list(s) for s in v]
                                                            for k, v in p["shapes"].items()}}
                             for p in profs]}
    return _write(model_dir, man, out, make, overwrite)


def _onnxruntime(model_dir: Path, man: dict, device: str, overwrite: bool) -> Path:
    import onnxruntime as ort
    if device not in ("cpu", "cuda"):
        raise GlmrtError(f"--device {device!r}; expected cpu or cuda")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise GlmrtError("--device cuda needs onnxruntime-gpu (pip install 'glmrt[gpu]')")
    out = engine_dir(model_dir, "onnxruntime", man["precision"]["name"], device=device)

    def make(tmp: Path) -> dict:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp / "model.opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "model.opt.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    "1024")
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" \
            else ["CPUExecutionProvider"]
        ort.InferenceSession(str(model_dir / man["graph"]), so, providers=providers)
        return {"kind": "onnxruntime-optimized", "backend": "onnxruntime", "graph": "model.opt.onnx",
                "device": device, "onnxruntime": ort.__version__,
                "gpu": None, "optimization": "ORT_ENABLE_EXTENDED"}
    return _write(model_dir, man, out, make, overwrite)


def _write(model_dir: Path, man: dict, out: Path, make, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise GlmrtError(f"{out}: already built (pass --overwrite to rebuild)")
    manifest_io.check_output(out, overwrite=overwrite, what="glmrt build",
                             owned=manifest_io.owned_by_manifest(ENGINE_KINDS))
    with manifest_io.staged(out) as tmp:
        entry = make(tmp)
        files = {n: manifest_io.file_entry(tmp / n) for n in sorted(os.listdir(tmp))}
        manifest_io.write(tmp, {
            "format": manifest_io.MANIFEST_FORMAT, **entry, "precision": man["precision"]["name"],
            "source": {"model": str(model_dir.resolve()),
                       "model_manifest_sha256": manifest_io.sha256(model_dir / manifest_io.MANIFEST)},
            "files": files,
            "versions": {"glmrt": glmrt.__version__, "python": platform.python_version()}})
    return out
