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

MAX_BATCH = 64           # sequences one batched step stacks (the concat form has no fixed buffers)


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
        self.caps = Capabilities(max_context=min(max_context or limit, limit), concurrent=True,
                                 batch=MAX_BATCH)

    def _empty(self, slot: int | None = None) -> Cache:
        # per layer: key, value, each (1, kv_heads, 0, head_dim)
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return Cache(0, [z] * (2 * self.layers), slot)

    @contextlib.contextmanager
    def generation(self):
        yield self._empty()

    def open_slots(self, n: int) -> list[Cache]:
        return [self._empty(i) for i in range(n)]

    def truncate(self, cache: Cache, length: int) -> None:
        if length < cache.length:
            cache.kv = [a[:, :, :length] for a in cache.kv]
            cache.length = length

    def step_batch(self, ids: np.ndarray, caches: list[Cache]) -> np.ndarray:
        """ids (B,) after each cache's own length -> logits (B, V). The caches are stacked
        left-padded to the longest, (B, kv_heads, T, head_dim) per layer and K/V, the padding
        masked out; each row's positions are its own. Each row's new cache is its part of the
        present tensors."""
        b = len(caches)
        for c in caches:
            self.check_room(c, 1)
        lengths = np.array([c.length for c in caches])
        t = int(lengths.max())
        pad = t - lengths                                              # (B,) left padding per row
        mask = np.ones((b, t + 1), np.int64)
        for r, p in enumerate(pad):
            mask[r, :p] = 0
        feeds = {"input_ids": np.asarray(ids, np.int64).reshape(b, 1), "attention_mask": mask,
                 "position_ids": lengths.reshape(b, 1).astype(np.int64),
                 "logits_index": np.zeros(1, np.int64)}
        for j in range(2 * self.layers):
            past = np.zeros((b, self.kv_heads, t, self.head_dim), self.kv_dtype)    # (B, kv, T, hd)
            for r, c in enumerate(caches):
                past[r, :, pad[r]:] = c.kv[j][0]
            feeds[(past_key if j % 2 == 0 else past_value)(j // 2)] = past
        out = self.ort.session.run(self.output_names, feeds)
        for r, c in enumerate(caches):
            c.kv = [a[r:r + 1, :, pad[r]:] for a in out[1:]]         # (1, kv, length + 1, hd)
            c.length += 1
        return out[0][:, -1]                                           # (B, V)

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
