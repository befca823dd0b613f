"""The compiled CPU engine through ctypes: engine.c's structs mirrored, pointed into the export's
model.onnx.data (memory-mapped, read in place: the page cache holds the weights once) and the
KV cache buffers the caller owns.

    native = NativeEngine(library, weight_index, model_folder, cfg, kv, max_context, threads)
    next_id = native.step(token, pos, logits)     # logits: (vocab,) float32, filled in place
    native.close()
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ...errors import ArtifactError, GlmrtError
from ...reference import rope_table
from .compiler import ABI

I64, F32P, VOIDP = ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p


class LinearC(ctypes.Structure):
    _fields_ = [("w", VOIDP), ("scales", VOIDP), ("bias", VOIDP),
                ("n", I64), ("k", I64), ("kb", I64), ("block", I64), ("bits", I64), ("scale_bits", I64)]


class LayerC(ctypes.Structure):
    _fields_ = [("input_norm", VOIDP), ("post_attn_norm", VOIDP), ("pre_mlp_norm", VOIDP), ("post_mlp_norm", VOIDP),
                ("qkv", LinearC), ("o", LinearC), ("gate_up", LinearC), ("down", LinearC),
                ("k_cache", VOIDP), ("v_cache", VOIDP)]


class ModelC(ctypes.Structure):
    _fields_ = [("hidden", I64), ("inter", I64), ("vocab", I64), ("heads", I64), ("kv_heads", I64),
                ("head_dim", I64), ("rot", I64), ("layers", I64), ("max_context", I64), ("threads", I64),
                ("eps", ctypes.c_double), ("embed", VOIDP), ("final_norm", VOIDP), ("rope", VOIDP),
                ("lm_head", LinearC), ("layer", ctypes.POINTER(LayerC))]


def load_library(path: Path, sha256: str | None = None) -> ctypes.CDLL:
    """The engine's shared library, its ABI checked and its functions typed. With its checksum
    (the engine manifest's), it is loaded from a copy named by it: the dynamic loader returns
    the library already loaded under a path, so a rebuilt engine.so would not replace the one a
    process loaded before."""
    path = Path(path)
    if sha256 is not None:
        import os
        import shutil
        import tempfile
        cache = Path(tempfile.gettempdir()) / f"glmrt-cpu-engine-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
        copy = cache / f"{sha256[:32]}.so"
        if not copy.is_file():
            tmp = copy.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(copy)
        path = copy
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise ArtifactError(f"{path}: the cpu engine's library does not load here ({e}); rebuild the engine: "
                            "glmrt build MODEL --backend cpu --overwrite") from None
    if lib.glmrt_cpu_abi() != ABI:
        raise ArtifactError(f"{path}: built for engine ABI {lib.glmrt_cpu_abi()}, this glmrt reads {ABI}; rebuild it")
    lib.glmrt_cpu_isa.restype = ctypes.c_char_p
    lib.glmrt_cpu_open.restype = VOIDP
    lib.glmrt_cpu_open.argtypes = [ctypes.POINTER(ModelC)]
    lib.glmrt_cpu_step.restype = I64
    lib.glmrt_cpu_step.argtypes = [VOIDP, I64, I64, F32P]
    lib.glmrt_cpu_close.argtypes = [VOIDP]
    lib.glmrt_cpu_gemv.restype = ctypes.c_int
    lib.glmrt_cpu_gemv.argtypes = [ctypes.POINTER(LinearC), F32P, F32P]
    return lib


class WeightFile:
    """model.onnx.data memory-mapped; the address of each indexed tensor, its size checked."""

    def __init__(self, folder: Path, index: dict):
        path = Path(folder) / index["file"]
        if not path.is_file():
            raise ArtifactError(f"{path}: the weights the engine was built from are missing")
        self.map = np.memmap(path, np.uint8, mode="r")
        self.base, self.index, self.path = self.map.ctypes.data, index, path
        self.copies: dict[str, np.ndarray] = {}          # fp16 scales (scales16), kept alive here
        for name, t in index["tensors"].items():
            if t["offset"] + t["bytes"] > self.map.size:
                raise ArtifactError(f"{path}: {name} ends at byte {t['offset'] + t['bytes']}, the file has "
                                    f"{self.map.size} (the export changed since the engine was built; rebuild it)")

    def __getitem__(self, name: str | None) -> int | None:
        return None if name is None else self.base + self.index["tensors"][name]["offset"]

    def scales16(self, name: str) -> np.ndarray:
        """fp32 scales holding fp16 values (glmrt's MatMulNBits exports) as an fp16 copy in
        memory: what the engine reads, half the bytes; refused if any value is not exact."""
        if name not in self.copies:
            s32 = self.array(name)
            s16 = s32.astype(np.float16)
            if not np.array_equal(s16.astype(np.float32), s32):
                raise ArtifactError(f"{self.path}: {name} holds scales that are not fp16 values, as the manifest "
                                    "says they are (the export changed since the engine was built; rebuild it)")
            self.copies[name] = s16
        return self.copies[name]

    def array(self, name: str) -> np.ndarray:
        """A tensor as numpy (a view of the map): the build's check reads the weights this way."""
        t = self.index["tensors"][name]
        return np.frombuffer(self.map, np.dtype(t["dtype"]), t["bytes"] // np.dtype(t["dtype"]).itemsize,
                             t["offset"]).reshape(t["shape"])


def linear(wf: WeightFile, role: dict, k: int) -> LinearC:
    """A MatMulNBits linear: qweight (n, kb, block * bits / 8), scales (n, kb), bias (n,); the
    scales as fp16 where the export's are fp16 values (role["scale_values"], cpu_build.py)."""
    n, kb, per = wf.index["tensors"][role["w"]]["shape"]
    bits = 8 if role["format"] == "int8" else 4
    block = per * 8 // bits
    if role["scale_values"] == "float16":
        scales, scale_bits = wf.scales16(role["scales"]).ctypes.data, 16
    else:
        scales, scale_bits = wf[role["scales"]], 32
    return LinearC(wf[role["w"]], scales, wf[role.get("bias")], n, k, kb, block, bits, scale_bits)


class NativeEngine:
    handle = None                                     # until glmrt_cpu_open succeeds; again after close

    def __init__(self, library: Path, index: dict, folder: Path, cfg, kv: list, max_context: int, threads: int,
                 sha256: str | None = None):
        """kv: per layer (K, V) addresses of (kv_heads, max_context, head_dim) float32 buffers;
        sha256: the library's checksum (load_library)."""
        self.lib = load_library(library, sha256)
        self.weights = WeightFile(folder, index)
        wf, H, I = self.weights, cfg.hidden_size, cfg.intermediate_size
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope = rope_table(cfg, max_context)                  # (max_context, rot/2, 2) float32
        self.layers = (LayerC * cfg.num_hidden_layers)()
        for i, (r, (k, v)) in enumerate(zip(index["layers"], kv)):
            self.layers[i] = LayerC(wf[r["input_norm"]], wf[r["post_attn_norm"]], wf[r["pre_mlp_norm"]],
                                    wf[r["post_mlp_norm"]], linear(wf, r["qkv"], H), linear(wf, r["o"], nh * hd),
                                    linear(wf, r["gate_up"], H), linear(wf, r["down"], I), k, v)
        self.model = ModelC(H, I, cfg.vocab_size, nh, nkv, hd, cfg.rotary_dim, cfg.num_hidden_layers, max_context,
                            threads, cfg.rms_norm_eps, wf[index["embed"]], wf[index["norm"]],
                            self.rope.ctypes.data, linear(wf, index["lm_head"], H), self.layers)
        self.handle = self.lib.glmrt_cpu_open(ctypes.byref(self.model))
        if not self.handle:
            raise GlmrtError(f"the cpu engine could not start {threads} threads or allocate its buffers")
        self.isa = self.lib.glmrt_cpu_isa().decode()
        self.threads, self.max_context, self.vocab = threads, max_context, cfg.vocab_size

    def step(self, token: int, pos: int, logits: np.ndarray) -> int:
        """Token `token` at position `pos` (the cache holds 0..pos-1): logits (vocab,) float32
        written in place; the argmax (the first maximum) comes back."""
        if not self.handle:
            raise GlmrtError("the cpu engine was closed")
        if not 0 <= pos < self.max_context:
            raise GlmrtError(f"position {pos} is outside the cache of {self.max_context} positions")
        if not 0 <= token < self.vocab:
            raise GlmrtError(f"token id {token} is outside the vocabulary of {self.vocab}")
        assert logits.dtype == np.float32 and logits.flags.c_contiguous and logits.size == self.vocab
        return int(self.lib.glmrt_cpu_step(self.handle, token, pos, logits.ctypes.data_as(F32P)))

    def close(self) -> None:
        if self.handle:
            self.lib.glmrt_cpu_close(self.handle)
            self.handle = None

    def __del__(self):
        self.close()


def gemv(lib: ctypes.CDLL, lin: LinearC, x: np.ndarray) -> np.ndarray:
    """y (n,) = W x + b with the engine's kernel, one thread, x (k,) quantized to int8 by it: the
    build's check and the tests."""
    x = np.ascontiguousarray(x, np.float32)
    assert x.size == lin.k
    y = np.empty(lin.n, np.float32)
    if lib.glmrt_cpu_gemv(ctypes.byref(lin), x.ctypes.data_as(F32P), y.ctypes.data_as(F32P)):
        raise GlmrtError("the cpu engine's GEMV could not allocate its buffers")
    return y
