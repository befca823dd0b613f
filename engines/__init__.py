"""glmrt.engines: exported model -> an engine for one target (`glmrt build`).

build.py           folder naming, manifest, temp-folder-and-rename; dispatch by backend
profiles.py        TensorRT optimization profiles from the IO contract
tensorrt_build.py  TensorRT's Python API (10.x / 11.x): parse, configure, build, serialize
The runtime side is glmrt.trt_runtime (TensorRT) and glmrt.session (ONNX Runtime)."""
