"""glmrt.engines: exported model -> an engine for one backend (`glmrt build`).

build.py             the command: dispatch through the backend registry (glmrt/backends),
                     folder naming, manifest, temp-folder-and-rename
tensorrt_build.py    TensorRT's Python API (10.x / 11.x): parse, configure, build, serialize
profiles.py          TensorRT optimization profiles from the IO contract
onnxruntime_build.py ONNX Runtime's optimized graph for one provider
cuda_build.py        glmrt's own CUDA kernels for one GPU (NVRTC) and the export's weight index
The runtime side of each is its decoder in glmrt/backends."""
