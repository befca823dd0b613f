"""Drive an exported decoder graph through ONNX Runtime: one call per prefill or decode step.

The IO contract in the manifest names every input and output; the KV cache is a list of
numpy arrays owned by the caller, so one session serves many concurrent generations
(InferenceSession.run is thread-safe in ONNX Runtime).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .contract import contract_from_dict, past_key, past_value
from .errors import ArtifactError, GlmrtError

NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class OrtDecoder:
    def __init__(self, folder: Path, manifest: dict, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort
        self.contract = contract_from_dict(manifest["io"])
        self.layers = manifest["config"]["num_hidden_layers"]
        kv = next(t for t in self.contract["inputs"] if t.name == past_key(0))
        if kv.dtype not in NUMPY_DTYPE:
            raise ArtifactError(f"{folder}: KV cache dtype {kv.dtype} cannot be bound from numpy "
                                f"on the {device} provider")
        self.kv_dtype = NUMPY_DTYPE[kv.dtype]
        self.kv_heads, self.head_dim = kv.dims[1], kv.dims[3]
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise GlmrtError("device='cuda' needs onnxruntime-gpu with a CUDA device "
                                 "(pip install 'glmrt[gpu]'); this onnxruntime offers "
                                 f"{', '.join(ort.get_available_providers())}")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise GlmrtError(f"device={device!r}; expected 'cpu' or 'cuda'")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # ORT fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations
        # (accuracy level 4) unless told otherwise: keep the exported numerics.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            so.intra_op_num_threads = threads
        graph = folder / manifest["graph"]
        try:
            self.session = ort.InferenceSession(str(graph), so, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{graph}: ONNX Runtime cannot load it ({first[:300]})") from None
        names = {i.name for i in self.session.get_inputs()}
        want = {t.name for t in self.contract["inputs"]}
        if names != want:
            raise ArtifactError(f"{graph}: graph inputs do not match the manifest's IO contract "
                                f"(differ on {sorted(names ^ want)[:4]})")
        self.output_names = [t.name for t in self.contract["outputs"]]

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        # per layer: key, value, each (batch, kv_heads, 0, head_dim)
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return [z] * (2 * self.layers)

    def step(self, ids: np.ndarray, cache: list[np.ndarray], keep: int = 1):
        """ids (batch, seq) int64 after `past` cached tokens -> logits (batch, keep, V) float32,
        the new cache (batch, kv_heads, past + seq, head_dim) per layer and K/V."""
        batch, seq = ids.shape
        past = cache[0].shape[2]
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((batch, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)),
                 "logits_index": np.arange(seq - keep, seq, dtype=np.int64)}
        for i in range(self.layers):
            feeds[past_key(i)], feeds[past_value(i)] = cache[2 * i], cache[2 * i + 1]
        out = self.session.run(self.output_names, feeds)
        return out[0], out[1:]
