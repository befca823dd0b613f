"""Weight quantization schemes. Each is one small class:
  quantize(w)      w (N, K) float32, rows = output features, K = input features (blocks run along K)
  dequantize(q)    the numpy inverse, float64, (N, K)
  error(w, q)      its own error report
  emit(...)        the ONNX form its consumer runs (docs/FORMATS.md), streamed in chunks

Forms:
  MatMulNBits   ONNX Runtime contrib op (CPU and CUDA kernels), int4/int8, block-wise,
                unsigned codes with zero point 2^(bits-1) when symmetric, or stored zero points.
  Int4QDQ       TensorRT: DequantizeLinear(signed int4 W^T (K, N), blocked 64/128 along K,
                symmetric) -> MatMul. Codes equal MatMulNBits' symmetric codes minus 8.
  Int8QDQ       TensorRT: DequantizeLinear(int8 W^T, per output channel, symmetric) -> MatMul.
  Fp8QDQ        TensorRT FP8: Q/DQ on both MatMul inputs, per-tensor scales; the activation
                scale comes from calibration (export/calibrate.py).
  Fp8Rows       the cuda target's FP8, weight-only (W8A16): e4m3 W (N, K) as the checkpoint
                stores it, one scale per output row, DequantizeLinear(axis 0) -> FusedMatMul
                transB=1 on ONNX Runtime (prefill), read as stored by glmrt's cuda engine.
"""
from __future__ import annotations

import abc
import dataclasses
import functools

import numpy as np

from glmrt.precision import TARGETS

from .checkpoint import convert
from .onnx_builder import GraphBuilder
from .stream import ordered_map

FP8_MAX = 448.0
ACCURACY_INT8 = 4        # MatMulNBits accuracy_level: int8 activations, integer dot products (CPU)


@dataclasses.dataclass
class QTensor:
    codes: np.ndarray             # (N, Kp) integer codes, or float8 values for FP8
    scales: np.ndarray            # (N, Kp / block) or (N,) or () in the scale dtype
    zeros: np.ndarray | None      # (N, Kp / block) unsigned zero points (asymmetric only)
    k: int                        # the unpadded K


class WeightSource:
    """Checkpoint matrices [out_j, K] stacked along out, read in chunks (never whole)."""

    def __init__(self, parts: list[tuple[np.ndarray, str]], chunk: int = 1024,
                 col_scale: np.ndarray | None = None, row_scale: np.ndarray | None = None):
        self.parts, self.chunk = parts, chunk
        self.n = sum(p.shape[0] for p, _ in parts)
        self.k = parts[0][0].shape[1]
        self.col_scale, self.row_scale = col_scale, row_scale     # AWQ (export/awq.py)

    def _scaled(self, w, r0, c0):
        if self.col_scale is not None:
            w = w * self.col_scale[None, c0:c0 + w.shape[1]]
        if self.row_scale is not None:
            w = w * self.row_scale[r0:r0 + w.shape[0], None]
        return w

    def row_jobs(self):
        """Zero-argument callables, each making one (r, K) float32 row chunk of W (N, K), so
        the bf16 -> float32 conversion runs on the worker threads too."""
        r0 = 0
        for p, src in self.parts:
            for r in range(0, p.shape[0], self.chunk):
                yield functools.partial(self._rows, p, src, r, r0 + r)
            r0 += p.shape[0]

    def _rows(self, p, src, r, at):
        return self._scaled(convert(p[r:r + self.chunk], src, "float32"), at, 0)

    def col_jobs(self, multiple: int):
        """Callables making (N, kc) float32 column chunks, kc a multiple of `multiple` (but the last)."""
        kc = max(multiple, (1 << 20) // max(self.n, 1) // multiple * multiple)
        for c in range(0, self.k, kc):
            yield functools.partial(self._cols, c, kc)

    def _cols(self, c, kc):
        w = np.concatenate([convert(p[:, c:c + kc], src, "float32") for p, src in self.parts])
        return self._scaled(w, 0, c)

    def row_amax(self) -> np.ndarray:
        return np.concatenate(list(ordered_map(lambda job: np.abs(job()).max(1), self.row_jobs())))  # (N,)


def stream_quantized(jobs, work, errors: dict, wname: str, keep):
    """Run `work(job()) -> (QTensor, error report, bytes to write)` over chunk-making jobs on
    the thread pool, in order; record each chunk's error under `wname`, hand each QTensor to
    `keep`, and yield the bytes for the weight file."""
    for q, err, data in ordered_map(lambda job: work(job()), jobs):
        errors.setdefault(wname, []).append(err)
        keep(q)
        yield data


def report(w: np.ndarray, deq: np.ndarray) -> dict:
    """A round trip's error: relative RMS, max abs, and the sums that let chunks combine."""
    w32 = np.asarray(w, np.float32).ravel()
    d = (np.asarray(deq, np.float32).ravel() - w32)
    sq_err, sq_norm = float(np.dot(d, d)), float(np.dot(w32, w32))
    return {"rel_rmse": (sq_err / sq_norm) ** 0.5 if sq_norm else 0.0,
            "max_abs": float(np.abs(d).max()) if d.size else 0.0,
            "sq_err": sq_err, "sq_norm": sq_norm}


def combine(reports: list[dict]) -> dict:
    """One report for a tensor quantized in chunks."""
    sq_err, sq_norm = sum(r["sq_err"] for r in reports), sum(r["sq_norm"] for r in reports)
    return {"rel_rmse": (sq_err / sq_norm) ** 0.5 if sq_norm else 0.0,
            "max_abs": max(r["max_abs"] for r in reports)}


def _round_scale(s: np.ndarray, dtype: str) -> np.ndarray:
    """Scales as stored (fp16 or fp32); zero scales (all-zero blocks) become 1."""
    s = np.where(s == 0, 1.0, s).astype(dtype)
    return np.where(np.isfinite(s) & (s != 0), s, np.asarray(1.0, dtype))


def _rows_times_scales(q: QTensor) -> np.ndarray:
    """(N, K) float64: codes (int8 or e4m3) times their row's scale."""
    return q.codes.astype(np.float64) * q.scales.astype(np.float64)[:, None]


def _float_activations_only(int8_activations) -> None:
    if int8_activations:
        raise ValueError("--int8-activations applies to MatMulNBits (int4/int8 on the onnxruntime "
                         "and cuda targets)")


class Scheme(abc.ABC):
    """A quantization form: how one weight matrix is stored, run and checked. Every form
    glmrt.precision's registry names is one subclass, listed in SCHEMES by its `name`."""
    name: str                    # the registry's form name, recorded in the manifest
    calibrated = False           # needs activation ranges from calibration prompts (act_amax)

    @classmethod
    @abc.abstractmethod
    def for_export(cls, *, bits: int, block_size: int | None, symmetric: bool, activations: str,
                   target: str, int8_activations: bool | None = None) -> "Scheme":
        """The scheme for export options; ValueError names an option this form cannot take."""

    @abc.abstractmethod
    def params(self) -> dict:
        """What the manifest records about the form (precision.quantization)."""

    @abc.abstractmethod
    def quantize(self, w: np.ndarray, *args) -> QTensor:
        """w (N, K) float32 -> codes and scales."""

    @abc.abstractmethod
    def dequantize(self, q: QTensor) -> np.ndarray:
        """The numpy inverse: (N, K) float64."""

    @abc.abstractmethod
    def emit(self, g: GraphBuilder, x: str, wname: str, src: "WeightSource", errors: dict,
             act_amax=None) -> str:
        """x (b, s, K) -> the graph's y = x W^T (b, s, N), weights streamed from `src`."""

    def error(self, w: np.ndarray, q: QTensor) -> dict:
        """A chunk's error is its own round trip."""
        return report(w, self.dequantize(q))


class TensorScaledQDQ(Scheme):
    """The Q/DQ schemes scaled per output channel or per tensor: only the scale dtype to choose."""

    def __init__(self, scale_dtype: str):
        self.scale_dtype = scale_dtype


class BlockInt(Scheme):
    """Block-wise integer quantization along K, shared by MatMulNBits and Int4QDQ."""

    # the stored scales hold this dtype's values (see MatMulNBits): TensorRT's int4 blocks take the
    # same, so its codes and weights stay MatMulNBits' exactly
    scale_values: str | None = "float16"

    def __init__(self, bits: int, block: int, symmetric: bool, scale_dtype: str):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if block < 16 or block & (block - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {block}")
        self.bits, self.block, self.symmetric, self.scale_dtype = bits, block, symmetric, scale_dtype

    def quantize(self, w: np.ndarray) -> QTensor:
        n, k = w.shape
        pad = -k % self.block
        wp = np.pad(w.astype(np.float32), ((0, 0), (0, pad)))
        blocks = wp.reshape(n, -1, self.block)                       # (N, kb, block)
        levels = (1 << self.bits) - 1
        if self.symmetric:
            qmax = (1 << (self.bits - 1)) - 1                         # 7 or 127
            scale = self._scales(np.abs(blocks).max(-1) / qmax)
            q = np.clip(np.rint(blocks / scale.astype(np.float32)[..., None]), -qmax, qmax)
            codes = (q + (1 << (self.bits - 1))).astype(np.uint8)     # unsigned, zero point 2^(b-1)
            return QTensor(codes.reshape(n, -1), scale, None, k)
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scale = self._scales((hi - lo) / levels)
        s32 = scale.astype(np.float32)
        zp = np.clip(np.rint(-lo / s32), 0, levels).astype(np.uint8)
        codes = np.clip(np.rint(blocks / s32[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
        return QTensor(codes.reshape(n, -1), scale, zp, k)

    def _scales(self, s: np.ndarray) -> np.ndarray:
        """The stored scales: where scale_values is set and is not scale_dtype itself, rounded up
        to that dtype's values (so a block's range stays covered: no code clips), kept as
        scale_dtype; scales stored as fp16 are rounded to nearest, as before session 16."""
        if self.scale_values not in (None, self.scale_dtype):
            v = np.asarray(s).astype(self.scale_values)
            low = v.astype(np.float64) < s
            v[low] = np.nextafter(v[low], np.asarray(np.inf, v.dtype))
            s = _round_scale(v, self.scale_values)
        return _round_scale(s, self.scale_dtype)

    def dequantize(self, q: QTensor) -> np.ndarray:
        n = q.codes.shape[0]
        zp = q.zeros if q.zeros is not None else np.full(q.scales.shape, 1 << (self.bits - 1))
        blocks = q.codes.reshape(n, -1, self.block).astype(np.float64) - zp[..., None]
        return (blocks * q.scales.astype(np.float64)[..., None]).reshape(n, -1)[:, :q.k]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 2m) values in 0..15 -> (..., m) bytes, even index in the low nibble."""
    c = codes.astype(np.uint8) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


class MatMulNBits(BlockInt):
    """ONNX Runtime's MatMulNBits. int8_activations sets accuracy_level 4: on the CPU the
    activations are quantized to int8 per block and the products summed as integers (the
    CUDA kernels ignore it); otherwise the weights are dequantized and multiplied in float.

    Scales hold fp16 values on every target, stored in the activations' dtype (fp32 on the CPU):
    as llama.cpp's Q4_0 / Q8_0 blocks do. The CPU's graph computes with exactly the values
    glmrt's cpu engine reads as fp16, 2 bytes a block instead of 4 (int4 in blocks of 32: 4.5
    bits a weight instead of 5). Rounded up: a block's scale grows by at most 2^-10 of itself while
    it is a normal fp16 (>= 6.1e-5: int4 blocks whose largest |w| is 4.3e-4 or more, int8 7.8e-3);
    smaller ones round in fp16's subnormal steps of 6e-8 (as llama.cpp's do), and a scale above
    fp16's 65504 (|w| > 458752) would become 1.0."""
    name = "matmulnbits"

    def __init__(self, bits: int, block: int, symmetric: bool, scale_dtype: str,
                 int8_activations: bool = False):
        super().__init__(bits, block, symmetric, scale_dtype)
        self.int8_activations = int8_activations

    @classmethod
    def for_export(cls, *, bits, block_size, symmetric, activations, target, int8_activations=None):
        if int8_activations is None:               # the CPU form's default; CUDA ignores it
            int8_activations = TARGETS[target].int8_activations
        block = block_size or dict(TARGETS[target].blocks).get(bits, 32)    # the target's default
        return cls(bits, block, symmetric, activations, int8_activations)

    def params(self) -> dict:
        return {"form": self.name, "bits": self.bits, "block_size": self.block,
                "symmetric": self.symmetric, "scale_dtype": self.scale_dtype, "scale_values": self.scale_values,
                "int8_activations": self.int8_activations,
                "accuracy_level": ACCURACY_INT8 if self.int8_activations else 0}

    def emit(self, g: GraphBuilder, x: str, wname: str, src: WeightSource, errors: dict,
             act_amax=None) -> str:
        """x (b, s, K) -> (b, s, N), quantized row chunk by row chunk."""
        n, k = src.n, src.k
        kb = -(-k // self.block)
        scales, zeros = [], []

        def work(w):
            q = self.quantize(w)
            c = q.codes.reshape(w.shape[0], kb, self.block)
            return q, self.error(w, q), pack_nibbles(c) if self.bits == 4 else c  # (r, kb, block*bits/8)

        def keep(q):
            scales.append(q.scales)
            if q.zeros is not None:
                zeros.append(q.zeros)
        b = g.weight_blocks(wname + ".qweight", (n, kb, self.block * self.bits // 8), "uint8",
                            stream_quantized(src.row_jobs(), work, errors, wname, keep))
        s = g.weight(wname + ".scales", np.concatenate(scales), self.scale_dtype)
        inputs = [x, b, s]
        if zeros:
            z = np.concatenate(zeros)                                      # (N, kb)
            if self.bits == 4:
                z = pack_nibbles(np.pad(z, ((0, 0), (0, kb % 2)), constant_values=8))
            inputs.append(g.weight(wname + ".zero_points", z, "uint8"))
        level = {"accuracy_level": ACCURACY_INT8} if self.int8_activations else {}
        return g.op("MatMulNBits", inputs, domain="com.microsoft", K=k, N=n, bits=self.bits,
                    block_size=self.block, **level)


class Int4QDQ(BlockInt):
    """Signed int4, symmetric, blocked along K on W^T (K, N): TensorRT's weight-only INT4."""
    name = "int4-qdq"

    def __init__(self, block: int, scale_dtype: str):
        if block not in (64, 128):
            raise ValueError(f"TensorRT's INT4 needs block size 64 or 128, got {block}")
        super().__init__(4, block, True, scale_dtype)

    @classmethod
    def for_export(cls, *, bits, block_size, symmetric, activations, target, int8_activations=None):
        _float_activations_only(int8_activations)
        if not symmetric:
            raise ValueError("TensorRT's int4 is symmetric only")
        return cls(block_size or 128, activations)

    def params(self) -> dict:
        return {"form": self.name, "bits": 4, "block_size": self.block, "symmetric": True,
                "scale_dtype": self.scale_dtype}

    def signed_codes(self, q: QTensor) -> np.ndarray:
        return q.codes.astype(np.int8) - 8                                # in [-7, 7]

    def emit(self, g: GraphBuilder, x: str, wname: str, src: WeightSource, errors: dict,
             act_amax=None) -> str:
        """W^T (K, N) written K-chunk by K-chunk (each a multiple of the block)."""
        n, k = src.n, src.k
        if n % 2:
            raise ValueError(f"{wname}: TensorRT's INT4 needs an even last dimension, N={n}")
        scales = []

        def work(w):
            q = self.quantize(w)
            return q, self.error(w, q), pack_nibbles(self.signed_codes(q)[:, :w.shape[1]].T)  # (kc, N/2)

        wq = g.weight_blocks(wname + ".qweight", (k, n), "int4", stream_quantized(
            src.col_jobs(self.block), work, errors, wname, lambda q: scales.append(q.scales.T)))  # (kc/block, N)
        s = g.weight(wname + ".scales", np.concatenate(scales), self.scale_dtype)
        w = g.op("DequantizeLinear", [wq, s], axis=0, block_size=self.block)       # (K, N)
        return g.op("MatMul", [x, w])


class Int8QDQ(TensorScaledQDQ):
    """Signed int8, symmetric, per output channel, on W^T (K, N)."""
    name = "int8-qdq"

    @classmethod
    def for_export(cls, *, bits, block_size, symmetric, activations, target, int8_activations=None):
        _float_activations_only(int8_activations)
        if not symmetric:
            raise ValueError("TensorRT's int8 is symmetric only")
        if block_size is not None:
            raise ValueError("TensorRT's int8 form is per output channel: no block size")
        return cls(activations)

    def params(self) -> dict:
        return {"form": self.name, "bits": 8, "per_channel": True, "symmetric": True,
                "scale_dtype": self.scale_dtype}

    def quantize(self, w: np.ndarray, amax: np.ndarray | None = None) -> QTensor:
        amax = np.abs(w).max(1) if amax is None else amax                 # (N,)
        scale = _round_scale(amax / 127.0, self.scale_dtype)
        codes = np.clip(np.rint(w / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
        return QTensor(codes, scale, None, w.shape[1])

    def dequantize(self, q: QTensor) -> np.ndarray:
        return _rows_times_scales(q)

    def emit(self, g: GraphBuilder, x: str, wname: str, src: WeightSource, errors: dict,
             act_amax=None) -> str:
        n, k = src.n, src.k
        amax = src.row_amax()                                                # a first pass
        scales = []                 # every chunk's (N,) scales are the same: amax is per row

        def work(w):
            q = self.quantize(w, amax)
            return q, self.error(w, q), np.ascontiguousarray(q.codes.T)        # (kc, N)
        wq = g.weight_blocks(wname + ".qweight", (k, n), "int8", stream_quantized(
            src.col_jobs(1), work, errors, wname, lambda q: scales.append(q.scales)))
        s = g.weight(wname + ".scales", scales[-1], self.scale_dtype)
        w = g.op("DequantizeLinear", [wq, s], axis=1)                        # (K, N)
        return g.op("MatMul", [x, w])


class Fp8QDQ(TensorScaledQDQ):
    """FP8 e4m3 weights and activations, per-tensor scales (TensorRT's FP8 GEMM pattern)."""
    name = "fp8-qdq"
    calibrated = True

    @classmethod
    def for_export(cls, *, bits, block_size, symmetric, activations, target, int8_activations=None):
        _float_activations_only(int8_activations)
        return cls(activations)

    def params(self) -> dict:
        return {"form": self.name, "format": "float8e4m3fn", "per_tensor": True,
                "scale_dtype": self.scale_dtype}

    def quantize(self, w: np.ndarray, amax: float) -> QTensor:
        import ml_dtypes
        scale = _round_scale(np.asarray(amax / FP8_MAX), self.scale_dtype)
        v = np.clip(w / np.float32(scale), -FP8_MAX, FP8_MAX)
        return QTensor(v.astype(ml_dtypes.float8_e4m3fn), scale, None, w.shape[1])

    def dequantize(self, q: QTensor) -> np.ndarray:
        return q.codes.astype(np.float64) * float(q.scales)

    def emit(self, g: GraphBuilder, x: str, wname: str, src: WeightSource, errors: dict,
             act_amax: float = None) -> str:
        """x -> Q/DQ(x, act scale) ; W^T fp8 -> DQ ; MatMul."""
        if act_amax is None:
            raise ValueError(f"{wname}: FP8 needs the activation's calibrated range")
        n, k = src.n, src.k
        amax = float(src.row_amax().max())                                   # a first pass
        scales = []                 # one per-tensor scale, the same for every chunk

        def work(w):
            q = self.quantize(w, amax)
            return q, self.error(w, q), np.ascontiguousarray(q.codes.T).view(np.uint8)  # (kc, N)
        wq = g.weight_blocks(wname + ".qweight", (k, n), "float8e4m3fn", stream_quantized(
            src.col_jobs(1), work, errors, wname, lambda q: scales.append(q.scales)))
        ws = g.weight(wname + ".scale", np.asarray(scales[-1]).reshape(()), self.scale_dtype)
        xs = g.weight(wname + ".input_scale",
                      _round_scale(np.asarray(act_amax / FP8_MAX), self.scale_dtype).reshape(()),
                      self.scale_dtype)
        zero = g.weight(wname + ".input_zero", np.zeros((), np.uint8), "float8e4m3fn")
        xq = g.op("QuantizeLinear", [x, xs, zero], name="QuantizeInput")
        xd = g.op("DequantizeLinear", [xq, xs, zero], name="DequantizeInput")
        w = g.op("DequantizeLinear", [wq, ws], name="DequantizeWeight")
        return g.op("MatMul", [xd, w])


class Fp8Rows(TensorScaledQDQ):
    """FP8 e4m3 weights only (activations stay fp16), one scale per output row: the row's
    largest |w| maps to e4m3's largest finite value (448). W is kept (N, K), rows contiguous,
    the layout a GEMV streams (glmrt's cuda engine reads it as stored)."""
    name = "fp8-rows"

    @classmethod
    def for_export(cls, *, bits, block_size, symmetric, activations, target, int8_activations=None):
        _float_activations_only(int8_activations)
        if block_size is not None:
            raise ValueError("fp8 weights take one scale per output row: no block size")
        if not symmetric:
            raise ValueError("fp8 weights are symmetric (e4m3 has a sign)")
        return cls(activations)

    def params(self) -> dict:
        return {"form": self.name, "format": "float8e4m3fn", "per_channel": True, "weight_only": True,
                "scale_dtype": self.scale_dtype}

    def quantize(self, w: np.ndarray) -> QTensor:
        import ml_dtypes
        # fp16 scales no smaller than its smallest normal (2^-14): a subnormal scale keeps few bits
        # of its own, and the rows' tiny values stay representable in e4m3 under it
        scale = _round_scale(np.maximum(np.abs(w).max(1) / FP8_MAX, 2.0 ** -14), self.scale_dtype)   # (N,)
        v = np.clip(w / scale.astype(np.float32)[:, None], -FP8_MAX, FP8_MAX)
        return QTensor(v.astype(ml_dtypes.float8_e4m3fn), scale, None, w.shape[1])

    def dequantize(self, q: QTensor) -> np.ndarray:
        return _rows_times_scales(q)

    def emit(self, g: GraphBuilder, x: str, wname: str, src: WeightSource, errors: dict,
             act_amax=None) -> str:
        """x (b, s, K) -> (b, s, N): W (N, K) e4m3 streamed row chunk by row chunk."""
        n, k = src.n, src.k
        scales = []

        def work(w):
            q = self.quantize(w)
            return q, self.error(w, q), q.codes.view(np.uint8)                      # (r, K)
        wq = g.weight_blocks(wname + ".qweight", (n, k), "float8e4m3fn", stream_quantized(
            src.row_jobs(), work, errors, wname, lambda q: scales.append(q.scales)))
        s = g.weight(wname + ".scales", np.concatenate(scales), self.scale_dtype)     # (N,)
        w = g.op("DequantizeLinear", [wq, s], axis=0, name="DequantizeWeight")       # (N, K)
        return g.op("FusedMatMul", [x, w], domain="com.microsoft", transB=1)


# the quantization forms glmrt.precision's registry names, by name
SCHEMES = {cls.name: cls for cls in (MatMulNBits, Int4QDQ, Int8QDQ, Fp8QDQ, Fp8Rows)}
