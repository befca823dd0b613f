"""The model's weights on the device, read straight from the export's model.onnx.data.

The engine builder (glmrt/engines/cuda_build.py) indexes every tensor the engine reads: its
offset, size, dtype and shape in the external data file, and which role it plays in which
layer. The runtime memory-maps the file and copies each tensor to the device as it is stored
(MatMulNBits bytes and scales, fp16 matrices, norms, biases): no onnx, no conversion.

Two ways to hold them:
  engine   one cuMemAlloc per tensor (the engine's own copy)
  shared   ONNX Runtime device OrtValues, handed to the prefill session with
           SessionOptions.add_initializer, so that ONNX Runtime uses them instead of loading
           its own copy (whether it does is measured on the GPU: bench/cuda_engine_check.py)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ArtifactError

CHUNK = 1 << 26                       # host bytes staged per copy


def tensor_names(index: dict) -> list[str]:
    return list(index["tensors"])


class DeviceWeights:
    """name -> device address of every indexed tensor."""

    def __init__(self, folder: Path, index: dict, device, mode: str = "engine"):
        path = Path(folder) / index["file"]
        if not path.is_file():
            raise ArtifactError(f"{path}: the weights the engine was built from are missing")
        self.device, self.mode = device, mode
        self.ptr: dict[str, int] = {}
        self.ortvalues: dict[str, object] = {}         # mode "shared": what ONNX Runtime is given
        self.bytes = 0
        data = np.memmap(path, np.uint8, mode="r")
        try:
            for name, t in index["tensors"].items():
                end = t["offset"] + t["bytes"]
                if end > data.size:
                    raise ArtifactError(f"{path}: {name} ends at byte {end}, the file has {data.size} "
                                        "(the export changed since the engine was built; rebuild it)")
                raw = data[t["offset"]:end]
                if mode == "shared":
                    self.ptr[name] = self._ortvalue(name, raw, t)
                else:
                    ptr = device.alloc(t["bytes"])
                    for i in range(0, t["bytes"], CHUNK):
                        device.upload(ptr + i, np.array(raw[i:i + CHUNK]))
                        device.synchronize()            # the staged chunk may go
                    self.ptr[name] = ptr
                self.bytes += t["bytes"]
        finally:
            del data

    def _ortvalue(self, name: str, raw: np.ndarray, t: dict) -> int:
        import onnxruntime as ort
        arr = np.array(raw).view(np.dtype(t["dtype"])).reshape(t["shape"])
        v = ort.OrtValue.ortvalue_from_shape_and_type(list(t["shape"]), arr.dtype, "cuda", 0)
        v.update_inplace(arr)
        self.ortvalues[name] = v
        return int(v.data_ptr())

    def __getitem__(self, name: str | None) -> int:
        return 0 if name is None else self.ptr[name]

    def free(self) -> None:
        if self.mode == "engine":
            for p in self.ptr.values():
                self.device.free(p)
        self.ptr.clear()
        self.ortvalues.clear()
