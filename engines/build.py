"""`glmrt build`: an exported model folder -> an engine for one backend, in its own folder keyed
by GPU (or device) and precision, with a manifest; written to a temporary folder and renamed
into place when complete. The backend registry (glmrt/backends) names each backend's builder
module here; each builder has `plan(model_dir, manifest, options) -> (engine folder, make)`
where `make(tmp) -> dict` writes the engine's files and returns its manifest entries.

  tensorrt     the TensorRT form (export --target tensorrt) -> engine.plan for the GPU here
  onnxruntime  any form -> ONNX Runtime's optimized graph for the cpu or cuda provider
  cuda         the cuda target's gqa form -> glmrt's kernels compiled by NVRTC for one GPU
  cpu          the cpu target's gqa form -> glmrt's C compiled for one CPU instruction set
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import platform
from pathlib import Path

import glmrt
from glmrt import manifest as manifest_io
from glmrt.backends import backend as lookup
from glmrt.engine import ENGINE_KINDS
from glmrt.errors import GlmrtError


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    gpu: str = "auto"            # auto, or NAME@smXY (GPU backends)
    device: str = "cuda"         # onnxruntime: the provider to optimize for
    max_batch: int = 1
    max_prompt: int = 2048
    max_context: int = 4096
    opt_level: int = 3           # TensorRT builder optimization level
    activations: str | None = None   # cuda: what int4 weights multiply, "int8" or "fp16" (None: the default)
    tune: bool = True            # cuda: tune launch parameters on the GPU when it is the one built for
    isa: str = "auto"            # cpu: the instruction set (auto: the best this CPU runs)


def build(model_dir: str | Path, *, backend: str = "tensorrt", precision: str | None = None,
          overwrite: bool = False, **options) -> Path:
    model_dir = Path(model_dir)
    man = manifest_io.read(model_dir, verify=False)         # sizes now; checksums below
    prec = man["precision"]
    if precision is not None and precision != prec["name"]:
        raise GlmrtError(f"{model_dir} holds a {prec['name']} model; export it with --precision "
                         f"{precision} (--target {backend}) to build a {precision} engine")
    b = lookup(backend)
    if b.builder is None:
        raise GlmrtError(f"--backend {backend} builds no engines")
    if options.get("activations") is not None and backend != "cuda":
        raise GlmrtError(f"--activations applies to --backend cuda (glmrt's engine), not to --backend {backend}")
    if options.get("isa", "auto") != "auto" and backend != "cpu":
        raise GlmrtError(f"--isa applies to --backend cpu (glmrt's cpu engine), not to --backend {backend}")
    if options.get("tune") is False and backend != "cuda":
        raise GlmrtError(f"--no-tune applies to --backend cuda (glmrt's engine), not to --backend {backend}")
    # the graph, tokenizer and configs (what plan() parses) hashed now; the weights files, hashed
    # in a thread beside the build (GLM-4-32B's 19 GB took 21 s), before the engine lands
    small, weights = split_files(man)
    manifest_io.verify_checksums(model_dir, {"files": small})
    builder = importlib.import_module(f"glmrt.engines.{b.builder}")
    out, make = builder.plan(model_dir, man, BuildOptions(**options))
    return _write(model_dir, man, out, make, overwrite, {"files": weights})


BESIDE = 64 << 20       # files at least this large are hashed beside the build


def split_files(man: dict) -> tuple[dict, dict]:
    """The manifest's files: (smaller than BESIDE, the rest)."""
    files = man.get("files", {})
    return ({r: e for r, e in files.items() if e["bytes"] < BESIDE},
            {r: e for r, e in files.items() if e["bytes"] >= BESIDE})


def _write(model_dir: Path, man: dict, out: Path, make, overwrite: bool, beside: dict | None = None) -> Path:
    """Build into a staged folder that replaces `out` once complete; `beside`: manifest files
    whose checksums are verified in a thread meanwhile, waited for before the engine lands."""
    if out.exists() and not overwrite:
        raise GlmrtError(f"{out}: already built (pass --overwrite to rebuild)")
    manifest_io.check_output(out, overwrite=overwrite, what="glmrt build",
                             owned=manifest_io.owned_by_manifest(ENGINE_KINDS))
    verified = manifest_io.Verification(model_dir, beside) if beside and beside["files"] else None
    with manifest_io.staged(out) as tmp:
        try:
            entry = make(tmp)
        except Exception:
            if verified is not None:            # a corrupted file explains a failure best
                verified.wait()
            raise
        if verified is not None:
            verified.wait()                     # the model's checksums, before the engine lands
        files = {n: manifest_io.file_entry(tmp / n) for n in sorted(os.listdir(tmp))}
        manifest_io.write(tmp, {
            "format": manifest_io.MANIFEST_FORMAT, **entry, "precision": man["precision"]["name"],
            "source": {"model": str(model_dir.resolve()),
                       "model_manifest_sha256": manifest_io.sha256(model_dir / manifest_io.MANIFEST)},
            "files": files,
            "versions": {"glmrt": glmrt.__version__, "python": platform.python_version()}})
    return out
