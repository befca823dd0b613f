"""CudaDecoder: the decoder interface (glmrt/backends/base.py) on glmrt's own engine.

Decode steps (one new token) run the engine's kernels (step.py), as one CUDA graph per burst
length: greedy bursts of n steps are one graph launch, one 8-byte upload (position, first id)
and one download of the n chosen ids. Prefill (several tokens at once) runs on ONNX Runtime's
CUDA form of the same export, writing the KV cache buffers the engine reads (the gqa form's
layout: (1, kv_heads, max_context, head_dim) fp16 per layer and K/V); without
onnxruntime-gpu, or with prefill="engine", the engine itself steps through the prompt one
token at a time (correct, slow for long prompts). The device buffers belong to the decoder:
generations take turns (a lock).

Continuous batching (an engine built with --max-batch N; glmrt.load(..., slots=n), n <= N):
open_slots gives n caches, rows of one buffer per layer and K/V (ONNX Runtime's slot buffers,
which its prefill of a slot writes), the buffer holding the smallest bucket >= n rows (the
compiled batch sizes: 1, 2, 4, 8 and N); step_batch advances rows 0..b-1 for the smallest bucket
b holding every slot asked for, as one CUDA graph per bucket. Rows not asked for run too, on
token 0 written at their length, past their cached tokens (as the ONNX Runtime form does). The
slot methods share the step's buffers with generation(): one thread calls them (the scheduler's).
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
        self.slots_built = int(engine.get("slots", 1))
        self.step_plan = DecodeStep(device, kernels, self.weights, engine["weights"], kv, cfg, max_context,
                                    burst, engine.get("config", DEFAULT_CONFIG), slots=self.slots_built)
        self.graphs: dict[int, object] = {}
        self.lock = threading.Lock()
        self.vocab = cfg.vocab_size
        self.caps = Capabilities(max_context=max_context, burst=burst, device_argmax=True, batch=self.slots_built)
        self._host_ctl = np.zeros(2, np.int32)               # [pos, id_0], uploaded per step
        self._host_bctl = np.zeros(3 * self.step_plan.slots, np.int32)   # batched: [pos.., id.., out..]
        self.slot_caches: list[Cache] | None = None          # open_slots
        self.slot_kv: list | None = None
        self.batch_graphs: dict[int, object] = {}
        self._own_slot_kv: list[int] = []
        act = engine.get("formats", {}).get("act", "f16")
        self.activations = next(name for name, a in ACTIVATIONS.items() if a == act)
        tuned = engine.get("tuned") or {}     # what the build's tuner chose over the defaults (tune.py)
        self.tuned = "; ".join(f"{role} " + ",".join(f"{k}={v}" for k, v in knobs.items())
                               for role, knobs in tuned.get("chosen", {}).items()) or ("defaults" if tuned else "no")

    def describe(self) -> dict:
        d = self.device
        return {"backend": "cuda", "form": "gqa", "device": "cuda", "cuda_graph": self.cuda_graph,
                "settings": {"prefill": self.prefill, "weights": self.weights_mode, "activations": self.activations,
                             "slots": self.slots_built, "tuned": self.tuned},
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
        if cache.slot is not None:
            return self._slot_step(ids, cache, keep)
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
        if cache.slot is not None:
            return int(np.argmax(self._slot_step(ids, cache, 1)[0, -1]))
        if seq > 1:
            if self.ort is not None:
                return self.ort.step_greedy(ids, cache)
            self.step(ids[:, :-1], cache)
        token = int(self._decode(int(ids[0, -1]), cache.length, 1)[0])
        cache.length += 1
        return token

    def greedy_burst(self, last: int, cache: Cache, n: int) -> list[int]:
        if cache.slot is not None:                  # slots decode in step_batch, not bursts
            return super().greedy_burst(last, cache, n)
        if not 1 <= n <= self.caps.burst:
            raise GlmrtError(f"a burst of {n} steps; this decoder runs 1 to {self.caps.burst}")
        self.check_room(cache, n)
        self.device.activate()
        ids = self._decode(int(last), cache.length, n)
        cache.length += n
        return ids.tolist()

    # ---- slots: continuous batching ------------------------------------------------------------
    def open_slots(self, n: int) -> list[Cache]:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.slots_built:
            raise GlmrtError(f"slots={n}: this engine batches at most {self.slots_built} sequences; rebuild it for "
                             f"more: glmrt build {self.folder} --backend cuda --max-batch N --overwrite (N <= 8)")
        self.device.activate()
        self._free_slots()
        cfg = self.cfg
        stride = cfg.num_key_value_heads * self.caps.max_context * cfg.head_dim     # h16 elements a slot
        rows = next(b for b in self.step_plan.buckets if b >= n)   # a batched step runs a whole bucket
        if self.ort is not None:                    # ONNX Runtime's slot buffers: its prefill writes them
            caches = self.ort.open_slots(rows)
            kv = [(int(self.ort.slot_kv[2 * i].data_ptr()), int(self.ort.slot_kv[2 * i + 1].data_ptr()))
                  for i in range(cfg.num_hidden_layers)]
        else:
            kv = [(self.device.alloc(2 * rows * stride), self.device.alloc(2 * rows * stride))
                  for _ in range(cfg.num_hidden_layers)]
            self._own_slot_kv = [p for pair in kv for p in pair]
            caches = [Cache(0, None, i) for i in range(rows)]
        self.slot_caches, self.slot_kv, self.slot_stride = caches, kv, stride
        return list(caches[:n])                     # rows past n: idle, never handed out

    def _free_slots(self) -> None:
        self.batch_graphs = {}                      # captured with the old buffers' addresses
        for p in self._own_slot_kv:
            self.device.free(p)
        self._own_slot_kv = []
        self.slot_caches = self.slot_kv = None

    def _run_batch(self, ids, caches: list[Cache]) -> int:
        """One batched decode step: each cache's next token; the bucket it ran (rows 0..b-1)."""
        rows = [c.slot for c in caches]
        if (self.slot_caches is None or None in rows or len(set(rows)) != len(rows)
                or any(not 0 <= r < len(self.slot_caches) or self.slot_caches[r] is not c for r, c in zip(rows, caches))):
            raise GlmrtError("step_batch takes the caches open_slots returned, each once")
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != len(caches):
            raise GlmrtError(f"step_batch: {len(ids)} ids for {len(caches)} caches")
        for c in caches:
            self.check_room(c, 1)
        for t in ids:
            if not 0 <= t < self.vocab:
                raise GlmrtError(f"token id {t} is outside the vocabulary [0, {self.vocab})")
        b = next(k for k in self.step_plan.buckets if k >= max(rows) + 1)
        S, ctl = self.step_plan.slots, self._host_bctl
        for c in self.slot_caches[:b]:
            c.length = min(c.length, self.caps.max_context - 1)     # an idle full row gives up its last
        ctl[:] = 0
        ctl[:b] = [c.length for c in self.slot_caches[:b]]          # each row writes at its own length
        ctl[S + np.asarray(rows)] = ids
        self.device.activate()
        self.device.upload(self.step_plan.buf["bctl"], ctl)
        if self.cuda_graph:
            if b not in self.batch_graphs:
                self.batch_graphs[b] = self.device.capture(lambda: self._record_batch(b))
            self.device.replay(self.batch_graphs[b])
        else:
            self._record_batch(b)
        for c in caches:
            c.length += 1
        return b

    def _record_batch(self, b: int) -> None:
        for launch in self.step_plan.batch_launches(b, self.slot_kv, self.slot_stride):
            self.device.launch(*launch)

    def step_batch(self, ids: np.ndarray, caches: list[Cache]) -> np.ndarray:
        b = self._run_batch(ids, caches)
        logits = np.empty((b, self.vocab), np.float32)
        self.device.download(self.step_plan.buf["logits"], logits)          # synchronizes
        return logits[[c.slot for c in caches]]

    def step_batch_greedy(self, ids: np.ndarray, caches: list[Cache]) -> list[int]:
        b = self._run_batch(ids, caches)
        out = np.empty(b, np.int32)
        self.device.download(self.step_plan.buf["bctl"] + 8 * self.step_plan.slots, out)
        return out[[c.slot for c in caches]].tolist()

    def _slot_step(self, ids: np.ndarray, cache: Cache, keep: int) -> np.ndarray:
        """A prompt chunk (or one token) into a slot: ONNX Runtime's prefill of its row, or
        without it the engine's batched step a token at a time."""
        seq = ids.shape[1]
        if self.ort is not None:
            return self.ort.step(ids, cache, keep)
        if keep > seq:
            raise GlmrtError(f"keep={keep} exceeds the {seq} positions of this step")
        out = np.empty((1, keep, self.vocab), np.float32)
        for j, token in enumerate(ids[0]):
            row = self.step_batch(np.array([token]), [cache])[0]
            if j >= seq - keep:
                out[0, j - (seq - keep)] = row
        return out

    def close(self) -> None:
        self._free_slots()
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
