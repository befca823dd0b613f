"""The precision registry: every stage reads it (CLI choices, export checks, the engine
builders' and the GPU checks), nobody matches precision names itself.

A precision says how weights are stored and how matmuls compute. Each entry declares, for
every export target it supports, the quantization form it takes there ("float": none; the
others are scheme classes in export/quant.py, looked up by that name; a form says itself
whether it needs calibration prompts), whether AWQ applies, and the oldest compute capability each GPU backend
runs it on. Targets (export --target) are declared beside them: the graph form each one
emits and the activation dtypes it accepts.

Adding a precision is one scheme class (if it quantizes), one line in PRECISIONS, one test row.
"""
from __future__ import annotations

import dataclasses

from .errors import GlmrtError


@dataclasses.dataclass(frozen=True)
class Target:
    name: str                    # export --target
    form: str                    # the IO contract's attention form (glmrt/contract.py)
    activations: tuple           # activation dtypes of quantized forms; the first is the default
    contrib_ops: bool            # may use ONNX Runtime's com.microsoft ops
    what: str                    # one line for --help and the architecture page
    int8_activations: bool = False   # MatMulNBits computes with int8 activations by default
    lm_head: str = "float"       # quantized exports: lm_head's default: "float", "int8", "int4" or
                                 # "same" (the weights' own bits, MatMulNBits forms; float otherwise)
    fp16_compute: str = "float16"    # the dtype fp16 weights multiply in by default
    blocks: tuple = ()           # ((bits, block size), ...): MatMulNBits' default block where not 32


TARGETS = {t.name: t for t in (
    Target("onnxruntime", "concat", ("float32", "float16"), True,
           "standard ops + MatMulNBits, cache grown by Concat; ONNX Runtime CPU (and CUDA)",
           # int8 in blocks of 128: on 2 CPU cores 1.24x block 32's decode and 1.3x its prefill for
           # a top-1 agreement with fp32 of 99.1% against 99.3% (bench/RESULTS.md, issue 14)
           int8_activations=True, lm_head="same", blocks=((8, 128),)),
    Target("cuda", "gqa", ("float16",), True,
           "GroupQueryAttention, fused norms, device KV cache updated in place; ONNX Runtime CUDA",
           # an 8-bit lm_head (MatMulNBits, block 32): H200, glmrt's engine, GLM-Z1-9B int4 457.9
           # against 432.3 tok/s with fp16's, GLM-4-32B 164.0 against 160.1; ONNX Runtime 1.22+ runs
           # it (its prefill as fast); accuracy on the default model in bench/RESULTS.md (session 14)
           lm_head="int8"),
    # the gqa form in fp32 for ONNX Runtime's CPU provider: 230 nodes where the concat form has 1344,
    # the KV cache updated in place, the same logits; 2 cores, a 1.45B int4 checkpoint: decode 30.5
    # against 25.3 tok/s (medians of 4 alternating runs), 26.6 against 25.6 in another run, prefill
    # level (bench/RESULTS.md, issue 14)
    Target("cpu", "gqa", ("float32",), True,
           "GroupQueryAttention, fused norms, KV cache updated in place, fp32; ONNX Runtime CPU",
           int8_activations=True, lm_head="same", blocks=((8, 128),)),
    Target("tensorrt", "concat", ("float16", "float32"), False,
           "standard ops only, weights as Q/DQ; TensorRT (and ONNX Runtime CPU)"),
)}


@dataclasses.dataclass(frozen=True)
class PrecisionSpec:
    name: str
    forms: dict                  # target -> quantization form ("float" for float weights)
    weights: str | None = None   # float precisions: dtype of matmul / embedding weights in the graph
    compute: str | None = None   # float precisions: dtype matmuls run in (norm weights, biases too)
    kv: str | None = None        # float precisions: KV cache dtype (quantized: the activation dtype)
    bits: int | None = None      # quantized weight bits
    awq: bool = False            # activation-aware weight scales apply
    min_cc: tuple = ()           # ((backend, (major, minor)), ...): oldest GPU that runs it

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def form(self, target: str) -> str:
        """The quantization form on `target`, or an error naming the targets it has."""
        if target not in TARGETS:
            raise GlmrtError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        if target not in self.forms:
            have = [t for t, p in PRECISIONS.items() if target in p.forms]
            raise GlmrtError(f"target {target} ({TARGETS[target].what.split(';')[0]}) takes "
                             f"{', '.join(have[:-1])} or {have[-1]}, not {self.name}")
        return self.forms[target]

    def check_gpu(self, backend: str, gpu) -> None:
        """Refuse a GPU too old for this precision on `backend` (glmrt.gpu.Gpu)."""
        need = dict(self.min_cc).get(backend)
        if need is None:
            have = [n for n, p in PRECISIONS.items() if backend in dict(p.min_cc)]
            raise GlmrtError(f"{backend} engines are built for {', '.join(have[:-1])} or {have[-1]}, "
                             f"not {self.name}")
        if gpu.compute_capability < need:
            raise GlmrtError(f"{self.name} needs compute capability {need[0]}.{need[1]} or newer "
                             f"(Ada, Hopper and later for fp8); {gpu.name} is "
                             f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}")


# What TensorRT runs per precision, by compute capability (its support matrix: FP16 from 5.3,
# INT8 from 6.1, INT4 weight-only from 8.0, FP8 from 8.9). glmrt's own cuda engine compiles its
# kernels for sm_80 and newer (Ampere, Jetson Orin, Ada, Hopper, Blackwell), fp8 included: below
# sm_89 it decodes e4m3 weights by integer bit moves (kernels/gemv.cu dot_fp8), on sm_89+ by the
# conversion instruction (the same values). On the cuda target fp8 is weight-only (fp8-rows:
# W8A16, no calibration); the onnxruntime and tensorrt targets quantize activations too (fp8-qdq).
PRECISIONS = {p.name: p for p in (
    PrecisionSpec("fp32", {"onnxruntime": "float", "cpu": "float"}, "float32", "float32", "float32"),
    PrecisionSpec("fp16", {"onnxruntime": "float", "cuda": "float", "tensorrt": "float"},
                  "float16", "float16", "float16", min_cc=(("tensorrt", (5, 3)), ("cuda", (8, 0)))),
    # ONNX Runtime's CPU provider has no bf16 MatMul: bf16 weights are cast to float32 there
    # (ORT folds the cast at load); on the cuda target to fp16, the target's compute dtype, while
    # glmrt's cuda engine reads the bf16 weights as stored
    PrecisionSpec("bf16", {"onnxruntime": "float", "cuda": "float"}, "bfloat16", "float32", "float32",
                  min_cc=(("cuda", (8, 0)),)),
    PrecisionSpec("int4", {"onnxruntime": "matmulnbits", "cuda": "matmulnbits", "cpu": "matmulnbits",
                           "tensorrt": "int4-qdq"},
                  bits=4, awq=True, min_cc=(("tensorrt", (8, 0)), ("cuda", (8, 0)))),
    PrecisionSpec("int8", {"onnxruntime": "matmulnbits", "cuda": "matmulnbits", "cpu": "matmulnbits",
                           "tensorrt": "int8-qdq"},
                  bits=8, awq=True, min_cc=(("tensorrt", (6, 1)),)),
    PrecisionSpec("fp8", {"onnxruntime": "fp8-qdq", "cuda": "fp8-rows", "tensorrt": "fp8-qdq"},
                  bits=8, min_cc=(("tensorrt", (8, 9)), ("cuda", (8, 0)))),
)}


def precision(name: str) -> PrecisionSpec:
    if name not in PRECISIONS:
        raise GlmrtError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def names(target: str | None = None, backend: str | None = None) -> list[str]:
    """Precision names, all or those a target exports / a GPU backend builds (CLI choices)."""
    return [n for n, p in PRECISIONS.items()
            if (target is None or target in p.forms) and (backend is None or backend in dict(p.min_cc))]
