"""`glmrt build --backend cuda`: glmrt's own decode engine for one GPU, from a `--target cuda`
export (the gqa form) of precision int4 (MatMulNBits, symmetric, block 32/64/128; its lm_head 8-bit
by default, or fp16 W^T with --lm-head float, or int4), fp8 (e4m3
weight-only, a scale per output row: the cuda target's fp8-rows form), fp16 or bf16 (exported
with --float-layout nk, matrices as the checkpoint stores them):

  index    every tensor the engine reads: offset, bytes, dtype, shape in model.onnx.data and
           its role (per layer: norms, qkv/o/gate_up/down, bias), checked against the config
  compile  the kernels (glmrt/backends/cuda_engine/kernels) with this model's shapes and the
           launch parameters, by NVRTC, to a cubin for the GPU's compute capability; works
           without a GPU (--gpu NAME@smXY); ptxas' registers and spills go in the manifest
  tune     with --gpu auto (the GPU here) and unless --no-tune: launch-parameter candidates timed
           in the whole decode step on the model's own weights, the fastest kept
           (glmrt/backends/cuda_engine/tune.py); the manifest records the configuration and every timing
  check    with --gpu auto: every kernel against numpy at the model's shapes with the configuration
           chosen (selfcheck.py), with --max-batch each bucket's kernels too, before the engine is
           written. A named GPU (--gpu NAME@smXY) is compiled for (with the defaults), not checked.

Writes engines/<gpu>-sm<cc>/<precision>/ with engine.cubin, engine.cu (the source compiled)
and a manifest: source hash, compute capability, NVRTC version, the oldest driver that loads
it, kernels and their launch parameters, the weight index.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from glmrt.backends.cuda_engine import nvrtc
from glmrt.backends.cuda_engine.sources import Shapes, kernel_text, sha256, translation_unit
from glmrt.backends.cuda_engine.step import (ACTIVATIONS, DEFAULT_CONFIG, MAX_SLOTS, Formats, engine_kernels,
                                             kernel_to_dict)
from glmrt.config import GlmConfig
from glmrt.engine import engine_dir
from glmrt.engines.weight_index import Reads
from glmrt.engines.weight_index import index_export as index_weights
from glmrt.errors import GlmrtError
from glmrt.gpu import check_precision, detect, parse_gpu

# the most dynamic shared memory a block may have, per architecture (CUDA's opt-in limits)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024}
REFUSE = ("the cuda engine runs int4 (symmetric MatMulNBits; an 8-bit lm_head too), fp8, fp16 and bf16 exports of "
          "--target cuda")


def plan(model_dir: Path, man: dict, options):
    """The engine folder for the GPU named (or found) and how to fill it."""
    detected = options.gpu == "auto"
    target = detect() if detected else parse_gpu(options.gpu)
    precision = man["precision"]["name"]
    check_precision(precision, target, "cuda")
    arch = 10 * target.compute_capability[0] + target.compute_capability[1]
    cfg = GlmConfig.from_dict(man["config"])
    weights, formats = index_export(Path(model_dir), man, cfg)
    formats = dataclasses.replace(formats, act=activations(formats, options.activations))
    shapes = Shapes.from_config(cfg)
    slots = options.max_batch
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise GlmrtError(f"--max-batch {slots!r}: the cuda engine batches 1 to {MAX_SLOTS} sequences")
    _check_smem(engine_kernels(shapes, formats, DEFAULT_CONFIG, slots), arch)
    out = engine_dir(model_dir, "cuda", precision, gpu_name=target.name, compute_capability=target.compute_capability)

    def make(tmp: Path) -> dict:
        seconds, t0 = {}, time.perf_counter()       # where the build's time goes (the manifest's "seconds")

        def lap(what):
            nonlocal t0
            seconds[what] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
        here = _gpu_here(target) if detected else None
        config, tuned = DEFAULT_CONFIG, False
        if here is not None and options.tune:       # timed on this model's own weights, uploaded for it
            from glmrt.backends.cuda_engine.device import freed
            from glmrt.backends.cuda_engine.tune import tune_on_device
            from glmrt.backends.cuda_engine.weights import DeviceWeights
            here.activate()
            with freed(DeviceWeights(Path(model_dir), weights, here, "engine")) as own:
                lap("upload")
                # KV for the positions the runtime gives it by default
                config, tuned = tune_on_device(here, shapes, formats, cfg.num_hidden_layers,
                                               cfg.max_position_embeddings, weights=(own, weights, cfg))
            lap("tune")
        kernels = engine_kernels(shapes, formats, config, slots)
        _check_smem(kernels, arch)
        source = translation_unit(shapes, kernels)
        compiled = nvrtc.compile_cubin(source, arch)
        limit, res = SMEM_LIMIT.get(arch, 99 * 1024), compiled.resources()
        for k in kernels:                           # dynamic and static shared memory together
            total = k.smem + (res.get(k.name, {}).get("smem_static") or 0)
            if total > limit:
                raise GlmrtError(f"kernel {k.name} needs {total} bytes of shared memory per block; sm_{arch} "
                                 f"allows {limit}" + _smem_hint(k))
        lap("compile")
        (tmp / "engine.cubin").write_bytes(compiled.cubin)
        (tmp / "engine.cu").write_text(source, encoding="utf-8")
        version = nvrtc.version()
        entry = {
            "kind": "cuda-engine", "backend": "cuda", "cubin": "engine.cubin", "source_file": "engine.cu",
            "gpu": {"name": target.name, "compute_capability": list(target.compute_capability)},
            "nvrtc": version, "min_driver": int(version.split(".")[0]) * 1000,
            "source_sha256": sha256(source), "kernels_sha256": sha256(kernel_text()),
            "nvrtc_options": [f"--gpu-architecture=sm_{arch}", *nvrtc.OPTIONS],
            "formats": vars(formats), "config": config, "tuned": tuned, "slots": slots,
            "kernels": [kernel_to_dict(k) for k in kernels],
            "resources": compiled.resources(),
            "weights": weights,
            "selfcheck": None, "seconds": seconds,
        }
        if here is not None:
            from glmrt.backends.cuda_engine.selfcheck import run_bucket_checks, run_checks
            report = run_checks(here, shapes, formats, config=config)
            if slots > 1:                           # the batched steps' kernels, bucket by bucket
                report += run_bucket_checks(here, shapes, formats, slots, config=config)
            entry["selfcheck"] = report
            lap("check")
            bad = [r for r in report if not r["ok"]]
            if bad:
                raise GlmrtError(f"the engine's kernels failed their check on {here.name}: "
                                 + "; ".join(f"{r['name']} rel. error {r['rel_err']:.2e} > {r['tol']:.0e}"
                                             for r in bad[:4]))
        return entry
    return out, make


def _check_smem(kernels: list, arch: int) -> None:
    """Refuse, in one line, a kernel whose dynamic shared memory (staged x, a weight ring) does not
    fit sm_<arch>."""
    for k in kernels:
        if k.smem > SMEM_LIMIT.get(arch, 99 * 1024):
            raise GlmrtError(f"kernel {k.name} needs {k.smem} bytes of shared memory per block; sm_{arch} "
                             f"allows {SMEM_LIMIT.get(arch, 99 * 1024)}" + _smem_hint(k))


def _smem_hint(k) -> str:
    if getattr(k, "m", 1) > 1:
        return f" (x staged for {k.m} rows: build with a smaller --max-batch)"
    if getattr(k, "stages", 0):
        return f" (its weight ring of {k.stages} stages: fewer stages)"
    return ""



# What int4 weights multiply by default: fp16 x, as ONNX Runtime's CUDA form. int8 x (dp4a,
# --activations int8) is faster (H200, GLM-Z1-9B int4: 2.38 ms a step against 2.63) but moves
# the logits 4.5e-2 from ONNX Runtime's form on GLM-Z1-9B shapes (fp16 x: 7e-3), enough to part
# greedy tokens that are not near ties: an option, measured in bench/RESULTS.md
DEFAULT_INT4_ACTIVATIONS = "f16"


def activations(formats: Formats, asked: str | None) -> str:
    """The Formats.act of this engine: int4 weights take fp16 x unless --activations int8;
    fp16 weights always multiply fp16 x."""
    if asked is not None and asked not in ACTIVATIONS:
        raise GlmrtError(f"activations={asked!r}; expected 'int8' or 'fp16'")
    if formats.linear != "int4":
        if asked == "int8":
            raise GlmrtError("--activations int8: the engine quantizes x for int4 weights only; this export is "
                             f"{formats.linear} (export --precision int4, or leave --activations out)")
        return "f16"
    return ACTIVATIONS[asked] if asked else DEFAULT_INT4_ACTIVATIONS


def _gpu_here(target):
    """The CudaDevice of the GPU detected for --gpu auto (its kernels are checked there)."""
    try:
        from glmrt.backends.cuda_engine.device import CudaDevice
        dev = CudaDevice()
    except GlmrtError:
        return None
    return dev if dev.compute_capability == target.compute_capability else None


def _check_precision(model_dir: Path, prec: dict) -> None:
    q = prec.get("quantization")
    if prec["name"] == "int4":
        if q["form"] != "matmulnbits" or q["bits"] != 4 or not q["symmetric"] or q["scale_dtype"] != "float16":
            raise GlmrtError(f"{model_dir}: {REFUSE}; this int4 export is {q}")
        if q["block_size"] not in (32, 64, 128):
            raise GlmrtError(f"{model_dir}: int4 block size {q['block_size']}; the engine reads blocks of 32, 64 or 128")
    elif prec["name"] == "fp8":
        if q["form"] != "fp8-rows" or q["scale_dtype"] != "float16":
            raise GlmrtError(f"{model_dir}: {REFUSE}; this fp8 export is {q}")
    elif prec["name"] not in ("fp16", "bf16"):
        raise GlmrtError(f"{model_dir} is a {prec['name']} export; {REFUSE}")


# fp8 e4m3 (17) and bf16 (16) are indexed by their bits
READS = Reads("cuda", "cuda", REFUSE, _check_precision, {10: "float16", 2: "uint8", 17: "uint8", 16: "uint16"},
              floats=True, int8_layers=False)


def index_export(model_dir: Path, man: dict, cfg: GlmConfig) -> tuple[dict, Formats]:
    """The weight index the runtime uploads from, and the matrices' formats (weight_index.py)."""
    index, linear, block = index_weights(model_dir, man, cfg, READS)
    return index, Formats(linear, block, index["lm_head"]["format"])
