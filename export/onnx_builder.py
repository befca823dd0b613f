"""A small ONNX graph builder: named nodes under a scope, and initializers streamed to one
external data file as they are made, so a graph of any size is built in bounded memory.

Node names say where they sit: /model/layers.3/attn/qkv_proj/MatMul.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 21
ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
              "bfloat16": TensorProto.BFLOAT16, "int64": TensorProto.INT64,
              "int32": TensorProto.INT32, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL,
              "int4": TensorProto.INT4, "uint4": TensorProto.UINT4,
              "float8e4m3fn": TensorProto.FLOAT8E4M3FN, "int8": TensorProto.INT8}
ALIGN = 64


class WeightFile:
    """Appends tensors to one external data file and returns initializers pointing into it.
    The file's sha256 is computed from the bytes as they are written (`sha256` after close),
    so the manifest need not read back tens of gigabytes."""

    def __init__(self, folder: Path, location: str):
        import hashlib
        self.location = location
        self.f = open(folder / location, "wb")
        self.offset = 0
        self.hash = hashlib.sha256()
        self.sha256: str | None = None

    def _write(self, data) -> None:
        """Append a C-contiguous array or bytes (no extra copy); hashing releases the GIL, so
        the quantizing threads keep working meanwhile."""
        buf = memoryview(data).cast("B") if isinstance(data, np.ndarray) else data
        self.f.write(buf)
        self.hash.update(buf)

    def _align(self) -> None:
        pad = -self.offset % ALIGN
        if pad:
            self._write(b"\0" * pad)
            self.offset += pad

    def add(self, name: str, data: np.ndarray, dtype: str) -> TensorProto:
        # data holds the raw bytes (bf16 as uint16, packed int4 as uint8); dims given by dtype
        data = np.ascontiguousarray(data)
        self._align()
        self._write(data)
        t = TensorProto(name=name, data_type=ONNX_DTYPE[dtype], dims=list(data.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)),
                     ("length", str(data.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += data.nbytes
        return t

    def add_blocks(self, name: str, shape: tuple, dtype: str, blocks) -> TensorProto:
        """Write a tensor given as consecutive row blocks (each a C-contiguous array)."""
        self._align()
        start = self.offset
        for b in blocks:
            self._write(np.ascontiguousarray(b))
            self.offset += b.nbytes
        t = TensorProto(name=name, data_type=ONNX_DTYPE[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(start)),
                     ("length", str(self.offset - start))):
            t.external_data.add(key=k, value=v)
        return t

    def close(self):
        self.f.flush()
        import os
        os.fsync(self.f.fileno())
        self.f.close()
        self.sha256 = self.hash.hexdigest()


class GraphBuilder:
    def __init__(self, weights: WeightFile):
        self.weights = weights
        self.nodes: list = []
        self.initializers: list = []
        self.scope: list[str] = ["model"]
        self.used_names: set[str] = set()
        self.const_cache: dict = {}

    @contextmanager
    def under(self, name: str):
        self.scope.append(name)
        try:
            yield
        finally:
            self.scope.pop()

    def _unique(self, base: str) -> str:
        return unique_name(base, self.used_names)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           domain: str = "", unused: tuple = (), **attrs):
        """Add a node; returns its output name(s). Outputs listed in `unused` stay unnamed."""
        node_name = self._unique("/" + "/".join(self.scope) + "/" + (name or op_type))
        outs = ["" if i in unused else f"{node_name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, op_type: str, inputs: list[str], out, name: str | None = None,
               domain: str = "", **attrs):
        """A node writing to fixed graph output name(s) (a name or a list of names)."""
        node_name = self._unique("/" + "/".join(self.scope) + "/" + (name or op_type))
        outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name,
                                           domain=domain or None, **attrs))
        return out

    def const(self, value, dtype: str) -> str:
        """A small constant kept inline in the graph (shapes, scalars, axes)."""
        arr = np.asarray(value, dtype=np.float32 if dtype == "bfloat16" else dtype)
        key = (arr.tobytes(), arr.shape, dtype)
        if key not in self.const_cache:
            name = self._unique(f"/model/constants/{dtype}/{'x'.join(map(str, arr.shape)) or 'scalar'}")
            if dtype == "bfloat16":
                from .checkpoint import f32_to_bf16
                t = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape,
                                       f32_to_bf16(arr).tobytes(), raw=True)
            else:
                t = onnx.numpy_helper.from_array(arr, name)
            self.initializers.append(t)
            self.const_cache[key] = name
        return self.const_cache[key]

    def weight(self, key: str, data: np.ndarray, dtype: str) -> str:
        """A weight streamed to the external data file, named after the checkpoint key."""
        self.initializers.append(self.weights.add(key, data, dtype))
        return key

    def weight_blocks(self, key: str, shape: tuple, dtype: str, blocks) -> str:
        self.initializers.append(self.weights.add_blocks(key, shape, dtype, blocks))
        return key

    def cast(self, x: str, src: str, dst: str, name: str = "Cast") -> str:
        return x if src == dst else self.op("Cast", [x], name=name, to=ONNX_DTYPE[dst])

    def model(self, inputs, outputs, doc: str, contrib: bool = True) -> onnx.ModelProto:
        def vi(spec):
            return helper.make_tensor_value_info(spec.name, ONNX_DTYPE[spec.dtype], list(spec.dims))
        graph = helper.make_graph(self.nodes, "glm4_decoder", [vi(s) for s in inputs],
                                  [vi(s) for s in outputs], self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if contrib:      # ONNX Runtime's contrib ops (MatMulNBits); never for TensorRT
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        m = helper.make_model(graph, opset_imports=opsets,
                              producer_name="glmrt", doc_string=doc)
        m.ir_version = 10
        return m


def unique_name(base: str, taken: set) -> str:
    """`base`, or `base_1`, `base_2`, ... the first not in `taken` (which records it)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
