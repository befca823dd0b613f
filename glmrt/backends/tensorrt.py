"""The TensorRT backend: an engine built by `glmrt build --backend tensorrt`, driven from numpy
with device memory and a stream from cuda-python (no torch). It implements the decoder
interface (glmrt/backends/base.py), so glmrt.load / chat / generate are the same on it.

The KV cache stays on the device: two buffers per cache tensor, each sized for the context
limit; a step reads past from one and writes present (past + new, TensorRT's Concat) into the
other, then they swap. Only the scored logits are copied back to the host.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from ..contract import contract_from_dict, numpy_dtype, past_key, past_value, present_key, present_value
from ..engine import check_compatible
from ..errors import ArtifactError, GlmrtError
from .base import Cache, Capabilities, Decoder


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise GlmrtError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class TrtDecoder(Decoder):
    def __init__(self, engine_path: Path, engine_manifest: dict, model_manifest: dict, gpu):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise GlmrtError("the tensorrt backend needs TensorRT and cuda-python "
                             "(pip install 'glmrt[tensorrt]')") from None
        check_compatible(engine_manifest, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
                         tensorrt_version=trt.__version__, where=engine_path)
        self.trt, self.cudart = trt, cudart
        plan = (engine_path / engine_manifest["plan"]).read_bytes()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"{engine_path}: TensorRT could not deserialize the engine; rebuild it")
        self.ctx = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.contract = contract_from_dict(model_manifest["io"])
        cfg = model_manifest["config"]
        self.layers, self.vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
        limits = engine_manifest["limits"]
        self.max_context, self.max_prompt = limits["max_context"], limits["max_prompt"]
        kv = next(t for t in self.contract["inputs"] if t.name == past_key(0))
        self.kv_dtype = numpy_dtype(kv.dtype)
        self.kv_shape = (kv.dims[1], kv.dims[3])                      # (kv_heads, head_dim)
        kv_bytes = kv.dims[1] * self.max_context * kv.dims[3] * np.dtype(self.kv_dtype).itemsize
        # two ping-pong buffers per cache tensor (layer x key/value)
        self.kv = [[_check(cudart.cudaMalloc(kv_bytes)) for _ in range(2)] for _ in range(2 * self.layers)]
        n = self.max_context
        self.inputs = {name: _check(cudart.cudaMalloc(n * 8)) for name in
                       ("input_ids", "attention_mask", "position_ids", "logits_index")}
        self.logits = _check(cudart.cudaMalloc(self.max_prompt * self.vocab * 4))
        self.lock = threading.Lock()
        self.flip = 0
        self.caps = Capabilities(max_context=self.max_context)
        self.engine_path = engine_path

    def describe(self) -> dict:
        return {"backend": "tensorrt", "form": "concat", "device": "cuda", "cuda_graph": False,
                "settings": {}, "greedy": "host argmax", "engine": str(self.engine_path)}

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for pair in getattr(self, "kv", []):
            for p in pair:
                cudart.cudaFree(p)
        for p in getattr(self, "inputs", {}).values():
            cudart.cudaFree(p)
        if getattr(self, "logits", None):
            cudart.cudaFree(self.logits)

    @contextlib.contextmanager
    def generation(self):
        with self.lock:
            self.flip = 0
            yield Cache(0, None)

    def _h2d(self, name: str, arr: np.ndarray):
        arr = np.ascontiguousarray(arr)
        _check(self.cudart.cudaMemcpyAsync(self.inputs[name], arr.ctypes.data, arr.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        return arr                                                   # keep alive until the sync

    def step(self, ids: np.ndarray, cache: Cache, keep: int = 1) -> np.ndarray:
        batch, seq = ids.shape
        past = cache.length
        total = past + seq
        if batch != 1:
            raise GlmrtError("the tensorrt backend runs batch 1")
        if total > self.max_context or (past == 0 and seq > self.max_prompt):
            raise GlmrtError(f"{total} tokens exceed the engine's limits (max_prompt {self.max_prompt}, "
                             f"max_context {self.max_context}); rebuild with larger --max-prompt/--max-context")
        profile = 0 if past == 0 else 1
        if past and seq != 1:
            raise GlmrtError("the tensorrt engine's decode profile takes one token per step")
        ctx = self.ctx
        ctx.set_optimization_profile_async(profile, self.stream)
        held = [self._h2d("input_ids", ids.astype(np.int64)),
                self._h2d("attention_mask", np.ones((1, total), np.int64)),
                self._h2d("position_ids", np.arange(past, total, dtype=np.int64)[None]),
                self._h2d("logits_index", np.arange(seq - keep, seq, dtype=np.int64))]
        shapes = {"input_ids": (1, seq), "attention_mask": (1, total), "position_ids": (1, seq),
                  "logits_index": (keep,)}
        for name, shape in shapes.items():
            ctx.set_input_shape(name, shape)
            ctx.set_tensor_address(name, self.inputs[name])
        nkv, hd = self.kv_shape
        src, dst = self.flip, 1 - self.flip
        for i in range(self.layers):
            for j, (pin, pout) in enumerate(((past_key(i), present_key(i)), (past_value(i), present_value(i)))):
                bufs = self.kv[2 * i + j]
                ctx.set_input_shape(pin, (1, nkv, past, hd))
                ctx.set_tensor_address(pin, bufs[src])
                ctx.set_tensor_address(pout, bufs[dst])
        ctx.set_tensor_address("logits", self.logits)
        if not ctx.execute_async_v3(self.stream):
            raise GlmrtError("TensorRT failed to run the engine (see its log)")
        out = np.empty((1, keep, self.vocab), np.float32)
        _check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.logits, out.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        del held
        self.flip = dst
        cache.length = total
        return out
