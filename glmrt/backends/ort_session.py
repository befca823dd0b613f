"""ONNX Runtime sessions for glmrt's graphs: providers, the session options glmrt relies on,
the environment switches it picks for CUDA, and the optimized graph `glmrt build --backend
onnxruntime` may have saved. Shared by both ONNX Runtime decoders."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from pathlib import Path

from ..contract import contract_from_dict
from ..errors import ArtifactError, GlmrtError
from ..host import physical_cores

# ONNX Runtime switches glmrt picks for CUDA sessions unless the environment already sets them.
# ORT_ENABLE_XQA=0: GroupQueryAttention's decode step on ORT's flash path instead of its XQA
# kernel, 8 us per layer faster on the H200 with GLM-Z1-9B shapes at every context measured
# (same on GLM-4-32B shapes; bench/RESULTS.md). ORT reads them when a session makes its kernels.
CUDA_ORT_DEFAULTS = {"ORT_ENABLE_XQA": "0"}
# 8-bit MatMulNBits (int8 weights, the cuda target's lm_head) runs on ONNX Runtime's CUDA provider
# from 1.22 on (microsoft/onnxruntime#24509)
CUDA_NBITS8_ORT = (1, 22)
_ENV_LOCK = threading.Lock()            # models loaded from several threads set them in turn


@dataclasses.dataclass
class OrtSession:
    session: object           # onnxruntime.InferenceSession
    contract: dict            # the IO contract (glmrt/contract.py)
    graph: Path               # the graph it runs (the export's, or an optimized one)
    settings: dict            # the ORT environment switches in force when it was made


@contextlib.contextmanager
def ort_settings(defaults: dict):
    """Set each default the environment leaves unset, for the duration of session creation
    only; yields the values in force (the environment's own where it sets them)."""
    with _ENV_LOCK:
        added = {k: v for k, v in defaults.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield {k: os.environ[k] for k in defaults}
        finally:
            for k in added:
                os.environ.pop(k, None)


def check_ort_version(folder: Path, manifest: dict, device: str, version: str) -> None:
    """One line, before ONNX Runtime fails deep inside, where this export needs a newer one."""
    q = manifest["precision"].get("quantization") or {}
    forms = [q] + ([q["lm_head_form"]] if q.get("lm_head_form") else [])
    if device == "cuda" and any(f.get("form") == "matmulnbits" and f.get("bits") == 8 for f in forms):
        have = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if have < CUDA_NBITS8_ORT:
            raise GlmrtError(f"{folder}: its 8-bit MatMulNBits needs onnxruntime-gpu "
                             f"{'.'.join(map(str, CUDA_NBITS8_ORT))} or newer on CUDA (this is {version}); "
                             "upgrade it, or export with --lm-head float")


def make_session(folder: Path, manifest: dict, device: str, threads: int | None,
                 cuda_graph: bool = False, initializers: dict | None = None) -> OrtSession:
    """initializers: name -> OrtValue the session uses instead of loading that weight (the
    cuda engine shares its device copies this way)."""
    import onnxruntime as ort
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GlmrtError("device='cuda' needs onnxruntime-gpu with a CUDA device "
                             "(pip install 'glmrt[gpu]'); this onnxruntime offers "
                             f"{', '.join(ort.get_available_providers())}")
        check_ort_version(folder, manifest, device, ort.__version__)
        opts = {"enable_cuda_graph": "1"} if cuda_graph else {}
        providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    else:
        raise GlmrtError(f"device={device!r}; expected 'cpu' or 'cuda'")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations
    # (accuracy level 4) unless told otherwise: keep the exported numerics.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads or device == "cpu":
        so.intra_op_num_threads = threads or physical_cores()
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    graph = optimized_graph(folder, manifest, device) or folder / manifest["graph"]
    try:
        with ort_settings(CUDA_ORT_DEFAULTS if device == "cuda" else {}) as settings:
            session = ort.InferenceSession(str(graph), so, providers=providers)
    except Exception as e:  # ORT raises its own pybind exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{graph}: ONNX Runtime cannot load it ({first[:300]})") from None
    contract = contract_from_dict(manifest["io"])
    if device == "cpu":
        settings = {**settings, "threads": so.intra_op_num_threads}
    names = {i.name for i in session.get_inputs()}
    want = {t.name for t in contract["inputs"]}
    if names != want:
        raise ArtifactError(f"{graph}: graph inputs do not match the manifest's IO contract "
                            f"(differ on {sorted(names ^ want)[:4]})")
    return OrtSession(session, contract, graph, settings)


def optimized_graph(folder: Path, manifest: dict, device: str):
    """The graph `glmrt build --backend onnxruntime --device DEVICE` saved for this model, if
    one exists and was built from this very export (by manifest checksum)."""
    from ..engine import engine_dir, read_engine, source_matches
    where = engine_dir(folder, "onnxruntime", manifest["precision"]["name"], device=device)
    if not (where / "manifest.json").is_file():
        return None
    em = read_engine(where, verify=False)
    return where / em["graph"] if source_matches(em, folder) else None
