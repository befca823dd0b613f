"""The model's weights on the device, read straight from the export's model.onnx.data.

The engine builder (glmrt/engines/cuda_build.py) indexes every tensor the engine reads: its
offset, size, dtype and shape in the external data file, and which role it plays in which
layer. The runtime memory-maps the file and copies each tensor to the device as it is stored
(MatMulNBits bytes and scales, fp16 matrices, norms, biases): no onnx, no conversion.

Either way one cuMemAlloc per tensor holds it. With mode "shared" each is also wrapped as an
ONNX Runtime OrtValue over the same memory (DLPack, dlpack.py) and handed to the prefill
session with SessionOptions.add_initializer, so that ONNX Runtime uses it instead of loading
its own copy: the weights in device memory once (whether ONNX Runtime really keeps no copy of
its own is measured on the GPU: bench/cuda_engine_check.py memory). fp8 matrices are the
exception: DLPack has no fp8 type ONNX Runtime reads, so its prefill loads those itself (the
index marks them "shared": false).
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
                ptr = device.alloc(t["bytes"])
                for i in range(0, t["bytes"], CHUNK):
                    device.upload(ptr + i, np.array(raw[i:i + CHUNK]))
                    device.synchronize()                # the staged chunk may go
                self.ptr[name] = ptr
                if mode == "shared" and t.get("shared", True):    # (fp8: ONNX Runtime loads its own)
                    from .dlpack import ortvalue
                    self.ortvalues[name] = ortvalue(ptr, t["shape"], t["dtype"], device.ort_device)
                self.bytes += t["bytes"]
        finally:
            del data

    def __getitem__(self, name: str | None) -> int:
        return 0 if name is None else self.ptr[name]

    def free(self) -> None:
        """After whatever ONNX Runtime session was given the OrtValues is gone."""
        self.ortvalues.clear()
        for p in self.ptr.values():
            self.device.free(p)
        self.ptr.clear()
