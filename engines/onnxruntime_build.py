"""`glmrt build --backend onnxruntime`: ONNX Runtime's optimized graph of an export (any form)
for the cpu or cuda provider, saved so later loads skip the optimization passes."""
from __future__ import annotations

from pathlib import Path

from glmrt.engine import engine_dir
from glmrt.errors import GlmrtError


def plan(model_dir: Path, man: dict, options):
    """The optimized-graph folder for the provider asked for and how to fill it."""
    import onnxruntime as ort
    device = options.device
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
    return out, make
