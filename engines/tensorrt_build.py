"""Build a TensorRT engine from the TensorRT form of an exported model (standard ONNX ops, Q/DQ
for int4/int8/fp8), through TensorRT's Python API, 10.x and 11.x (docs/FORMATS.md):

  Builder -> network (strongly typed: 10.x asks for the flag, 11.x always is) -> OnnxParser
  (with the graph's path, for external weights) -> config: workspace, optimization profiles,
  timing cache, optimization level -> build_serialized_network -> engine.plan

Precision comes from the graph's types and Q/DQ, never from builder flags (11.x removed them).
"""
from __future__ import annotations

from pathlib import Path

from glmrt.contract import contract_from_dict
from glmrt.engine import ENGINES, engine_dir
from glmrt.errors import GlmrtError
from glmrt.gpu import check_precision, detect, parse_gpu

from .profiles import Limits, profiles

TIMING_CACHE = "timing.cache"

INSTALL_HINT = ("TensorRT is not installed: pip install 'glmrt[tensorrt]' on a machine with an "
                "NVIDIA GPU and driver (TensorRT's wheels come from NVIDIA's package index; see "
                "NVIDIA's TensorRT installation guide), or use --backend onnxruntime")


def plan(model_dir: Path, man: dict, options):
    """The engine folder for the GPU named (or found) and how to fill it."""
    detected = options.gpu == "auto"
    target = detect() if detected else parse_gpu(options.gpu)
    limits = Limits(options.max_batch, options.max_prompt, options.max_context)
    opt_level = options.opt_level
    precision = man["precision"]["name"]
    standard_ops = man["io"]["form"] == "concat" and (
        man["precision"]["target"] == "tensorrt" or man["precision"]["quantization"] is None)
    if not standard_ops:
        raise GlmrtError(f"{model_dir} was exported for {man['precision']['target']} (ONNX Runtime's "
                         f"own ops); TensorRT needs standard ops only: export with --target tensorrt")
    check_precision(precision, target, "tensorrt")
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
    return out, make


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise GlmrtError(INSTALL_HINT) from None
    if not hasattr(trt, "Builder"):          # PyPI's placeholder package has no bindings
        raise GlmrtError(INSTALL_HINT)
    return trt


def major_version(trt) -> int:
    return int(trt.__version__.split(".")[0])


def network_flags(trt) -> int:
    """10.x: ask for strong typing; 11.x: it is the only mode and the flag is gone."""
    if major_version(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(graph: Path, plan: Path, profiles: list[dict], *, timing_cache: Path,
                 opt_level: int = 3, workspace_gib: float = 8.0) -> dict:
    """Parse `graph`, build with `profiles`, write the serialized engine to `plan`."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.read_bytes(), str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GlmrtError(f"{graph}: TensorRT's ONNX parser refused it: {errors[:800]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not 0 <= opt_level <= 5:
        raise GlmrtError(f"--opt-level {opt_level}: TensorRT's builder optimization level is 0 to 5")
    config.builder_optimization_level = opt_level
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof["shapes"].items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise GlmrtError(f"{graph}: TensorRT could not build an engine (see its log above)")
    plan.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "opt_level": opt_level, "workspace_gib": workspace_gib}
