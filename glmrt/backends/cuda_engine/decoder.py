"""CudaDecoder: the decoder interface (glmrt/backends/base.py) on glmrt's own engine.

Decode steps (one new token) run the engine's kernels (step.py), as one CUDA graph per burst
length: greedy bursts of n steps are one graph launch, one 8-byte upload (position, first id)
and one download of the n chosen ids. Prefill (several tokens at once) runs on ONNX Runtime's
CUDA form of the same export, writing the KV cache buffers the engine reads (the gqa form's
layout: (1, kv_heads, max_context, head_dim) fp16 per layer and K/V); without
onnxruntime-gpu, or with prefill="engine", the engine itself steps through the prompt one
token at a time (correct, slow for long prompts). The device buffers belong to the decoder:
generations take turns (a lock).
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from ...config import GlmConfig
from ...errors import ArtifactError, GlmrtError
from ..base import Cache, Capabilities, Decoder
from .step import ACTIVATIONS, DEFAULT_CONFIG, DecodeStep, kernel_from_dict
from .weights import DeviceWeights

DEFAULT_BURST = 8


def ort_available(device: str) -> bool:
    """ONNX Runtime can run the prefill where the engine's memory is (its CUDA provider for a
    GPU; the CPU provider for the tests' emulated device, whose memory is host memory)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device] in ort.get_available_providers()


class CudaDecoder(Decoder):
    def __init__(self, folder: Path, manifest: dict, engine_path: Path, engine: dict, device, *,
                 max_context: int | None = None, cuda_graph: bool = True, burst: int | None = None,
                 prefill: str | None = None, weights: str | None = None, threads: int | None = None):
        self.folder, self.engine_path, self.device = Path(folder), Path(engine_path), device
        cfg = self.cfg = GlmConfig.from_dict(manifest["config"])
        limit = cfg.max_position_embeddings
        max_context = min(max_context or limit, limit)
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise GlmrtError(f"burst={burst!r}; expected a positive number of decode steps")
        burst = burst or DEFAULT_BURST
        prefill = prefill or ("onnxruntime" if ort_available(device.ort_device) else "engine")
        if prefill not in ("onnxruntime", "engine"):
            raise GlmrtError(f"prefill={prefill!r}; expected 'onnxruntime' or 'engine'")
        # one copy of the weights on the device by default: ONNX Runtime's prefill computes with
        # the engine's buffers ("shared"); "engine" gives the prefill session its own copy
        weights = weights or ("shared" if prefill == "onnxruntime" else "engine")
        if weights not in ("shared", "engine"):
            raise GlmrtError(f"weights={weights!r}; expected 'shared' or 'engine'")
        if weights == "shared" and prefill != "onnxruntime":
            raise GlmrtError("weights='shared' hands the engine's weights to ONNX Runtime's prefill: "
                             "it needs prefill='onnxruntime'")
        self.prefill, self.weights_mode, self.cuda_graph = prefill, weights, cuda_graph
        device.activate()
        self.weights = DeviceWeights(self.folder, engine["weights"], device, weights)
        self.ort = None
        if prefill == "onnxruntime":
            from ..ort_gqa import OrtGqaDecoder
            shared = self.weights.ortvalues if weights == "shared" else None
            self.ort = OrtGqaDecoder(self.folder, manifest, device.ort_device, threads, max_context, False,
                                     initializers=shared)
            buffers = self.ort.kv_buffers()
            kv = [(int(buffers[2 * i].data_ptr()), int(buffers[2 * i + 1].data_ptr()))
                  for i in range(cfg.num_hidden_layers)]
        else:
            per = cfg.num_key_value_heads * max_context * cfg.head_dim * 2    # (nkv, max_seq, hd) fp16
            kv = [(device.alloc(per), device.alloc(per)) for _ in range(cfg.num_hidden_layers)]
            self._own_kv = [p for pair in kv for p in pair]
        specs = [kernel_from_dict(k) for k in engine["kernels"]]
        image = engine["cubin"] if device.image_kind == "cubin" else engine["source_file"]
        handles = device.load((self.engine_path / image).read_bytes(), {k.name: k.smem for k in specs})
        kernels = {k.name: (k, handles[k.name]) for k in specs}
        self.step_plan = DecodeStep(device, kernels, self.weights, engine["weights"], kv, cfg, max_context,
                                    burst, engine.get("config", DEFAULT_CONFIG))
        self.graphs: dict[int, object] = {}
        self.lock = threading.Lock()
        self.vocab = cfg.vocab_size
        self.caps = Capabilities(max_context=max_context, burst=burst, device_argmax=True)
        self._host_ctl = np.zeros(2, np.int32)               # [pos, id_0], uploaded per step
        act = engine.get("formats", {}).get("act", "f16")
        self.activations = next(name for name, a in ACTIVATIONS.items() if a == act)

    def describe(self) -> dict:
        d = self.device
        return {"backend": "cuda", "form": "gqa", "device": "cuda", "cuda_graph": self.cuda_graph,
                "settings": {"prefill": self.prefill, "weights": self.weights_mode, "activations": self.activations},
                "greedy": "device argmax", "engine": str(self.engine_path),
                "gpu": f"{d.name} (sm{d.compute_capability[0]}{d.compute_capability[1]}, {d.sm_count} SMs)"}

    # ---- decode --------------------------------------------------------------------------
    def _record(self, n: int) -> None:
        for i in range(n):
            for launch in self.step_plan.launches(i):
                self.device.launch(*launch)

    def _decode(self, last: int, past: int, n: int) -> np.ndarray:
        """n steps after `past` tokens, the first fed `last`: the n ids chosen (int32). With
        graphs, a burst of n steps is captured once (while the stream is idle) and replayed."""
        if not 0 <= last < self.vocab:
            raise GlmrtError(f"token id {last} is outside the vocabulary [0, {self.vocab})")
        if self.cuda_graph and n not in self.graphs:
            self.graphs[n] = self.device.capture(lambda: self._record(n))
        self._host_ctl[:] = (past, last)
        self.device.upload(self.step_plan.buf["ctl"], self._host_ctl)
        if self.cuda_graph:
            self.device.replay(self.graphs[n])
        else:
            self._record(n)
        ids = np.empty(n, np.int32)
        self.device.download(self.step_plan.buf["ctl"] + 8, ids)     # slots 1..n; synchronizes
        return ids

    def _logits(self, keep: int = 1) -> np.ndarray:
        out = np.empty((1, keep, self.vocab), np.float32)
        self.device.download(self.step_plan.buf["logits"], out[0, -1])
        return out

    # ---- the interface ---------------------------------------------------------------------
    @contextlib.contextmanager
    def generation(self):
        with self.lock:
            yield Cache(0, None)

    def step(self, ids: np.ndarray, cache: Cache, keep: int = 1) -> np.ndarray:
        batch, seq = ids.shape
        if batch != 1:
            raise GlmrtError("the cuda engine runs batch 1")
        self.check_room(cache, seq)
        self.device.activate()
        if seq > 1 and self.ort is not None:
            return self.ort.step(ids, cache, keep)
        if keep > seq:
            raise GlmrtError(f"keep={keep} exceeds the {seq} positions of this step")
        out = np.empty((1, keep, self.vocab), np.float32)
        for j, token in enumerate(ids[0]):           # the engine: one position per step
            self._decode(int(token), cache.length, 1)
            cache.length += 1
            if j >= seq - keep:
                out[0, j - (seq - keep)] = self._logits()[0, -1]
        return out

    def step_greedy(self, ids: np.ndarray, cache: Cache) -> int:
        batch, seq = ids.shape
        if batch != 1:
            raise GlmrtError("the cuda engine runs batch 1")
        self.check_room(cache, seq)
        self.device.activate()
        if seq > 1:
            if self.ort is not None:
                return self.ort.step_greedy(ids, cache)
            self.step(ids[:, :-1], cache)
        token = int(self._decode(int(ids[0, -1]), cache.length, 1)[0])
        cache.length += 1
        return token

    def greedy_burst(self, last: int, cache: Cache, n: int) -> list[int]:
        if not 1 <= n <= self.caps.burst:
            raise GlmrtError(f"a burst of {n} steps; this decoder runs 1 to {self.caps.burst}")
        self.check_room(cache, n)
        self.device.activate()
        ids = self._decode(int(last), cache.length, n)
        cache.length += n
        return ids.tolist()

    def close(self) -> None:
        self.step_plan.free()
        self.ort = None                  # the prefill session first: with shared weights it reads their memory
        self.weights.free()
        for p in getattr(self, "_own_kv", []):
            self.device.free(p)


def open_engine(folder: Path, manifest: dict, options, device=None) -> CudaDecoder:
    """The registry's loader: the engine built for this GPU (glmrt build --backend cuda)."""
    from ...engine import check_cuda_engine, find_cuda_engine, read_engine, source_matches
    from .device import CudaDevice
    device = device or CudaDevice()
    where = find_cuda_engine(folder, manifest["precision"]["name"], device.name, device.compute_capability)
    em = read_engine(where, options.verify)
    check_cuda_engine(em, device.compute_capability, device.driver_version, where)
    from .sources import kernel_text, sha256
    if em.get("kernels_sha256") != sha256(kernel_text()):
        raise ArtifactError(f"{where}: compiled from other kernels than this glmrt's (their launch shapes differ); "
                            f"rebuild it: glmrt build {folder} --backend cuda --overwrite")
    if not source_matches(em, folder):
        raise ArtifactError(f"{where}: built from another export of {folder} (the model's manifest "
                            f"changed); rebuild it: glmrt build {folder} --backend cuda --overwrite")
    return CudaDecoder(folder, manifest, where, em, device, max_context=options.max_context,
                       cuda_graph=options.cuda_graph, burst=options.burst, threads=options.threads)
