"""The concat form on ONNX Runtime (export --target onnxruntime or tensorrt): standard ops,
the KV cache grown by Concat. Each generation's cache is its own list of numpy arrays, so one
session serves many generations at once (InferenceSession.run is thread-safe)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..contract import numpy_dtype, past_key, past_value
from ..errors import ArtifactError
from .base import Cache, Capabilities, Decoder
from .ort_session import make_session


class OrtConcatDecoder(Decoder):
    def __init__(self, folder: Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                 max_context: int | None = None):
        self.ort = make_session(folder, manifest, device, threads)
        self.device = device
        cfg = manifest["config"]
        self.layers = cfg["num_hidden_layers"]
        kv = next(t for t in self.ort.contract["inputs"] if t.name == past_key(0))
        if numpy_dtype(kv.dtype) is None:
            raise ArtifactError(f"{folder}: KV cache dtype {kv.dtype} cannot be bound from numpy "
                                f"on the {device} provider")
        self.kv_dtype = numpy_dtype(kv.dtype)
        self.kv_heads, self.head_dim = kv.dims[1], kv.dims[3]
        self.output_names = [t.name for t in self.ort.contract["outputs"]]
        limit = cfg["max_position_embeddings"]
        self.caps = Capabilities(max_context=min(max_context or limit, limit), concurrent=True)

    @contextlib.contextmanager
    def generation(self):
        # per layer: key, value, each (1, kv_heads, 0, head_dim)
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        yield Cache(0, [z] * (2 * self.layers))

    def step(self, ids: np.ndarray, cache: Cache, keep: int = 1) -> np.ndarray:
        """ids (1, seq) int64 after cache.length tokens -> logits (1, keep, V) float32; the
        cache's arrays become (1, kv_heads, length + seq, head_dim) per layer and K/V."""
        batch, seq = ids.shape
        self.check_room(cache, seq)
        past = cache.length
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((batch, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)),
                 "logits_index": np.arange(seq - keep, seq, dtype=np.int64)}
        for i in range(self.layers):
            feeds[past_key(i)], feeds[past_value(i)] = cache.kv[2 * i], cache.kv[2 * i + 1]
        out = self.ort.session.run(self.output_names, feeds)
        cache.kv, cache.length = out[1:], past + seq
        return out[0]

    def describe(self) -> dict:
        return {"backend": "onnxruntime", "form": "concat", "device": self.device, "cuda_graph": False,
                "settings": self.ort.settings, "greedy": "host argmax", "graph": str(self.ort.graph)}
