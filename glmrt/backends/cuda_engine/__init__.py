"""glmrt's own CUDA decode engine (backend "cuda"): fused kernels compiled per GPU by NVRTC,
run through NVIDIA's Python bindings to the CUDA driver API, numpy on the host, no torch.

  kernels/      the CUDA C: common.cuh (fp16 bits, reductions), gemv.cu (int4 / fp16 GEMV with
                fused norm prologues and bias / RoPE + KV append / SwiGLU / argmax epilogues),
                attention.cu (grouped-query decode attention split over the context)
  sources.py    one model's translation unit: kernel files + its shapes + the kernel instances
  nvrtc.py      CUDA C -> cubin for sm_XY on any machine (the nvidia-cuda-nvrtc wheel)
  args.py       the kernels' argument structs, mirrored with ctypes
  device.py     the GPU through cuda.bindings.driver: memory, modules, launches, CUDA graphs
  weights.py    the export's model.onnx.data, indexed by the builder, copied to the device
  dlpack.py     device memory as ONNX Runtime OrtValues (weights shared with the prefill session)
  step.py       one decode step as a list of launches (what a CUDA graph captures)
  decoder.py    CudaDecoder: the decoder interface (prefill on ONNX Runtime's CUDA form or the
                engine itself, decode bursts as one graph each, argmax on the device)
  selfcheck.py  every kernel against numpy on a device; per-kernel timing on a GPU

`glmrt build MODEL --backend cuda [--gpu NAME@smXY]` (glmrt/engines/cuda_build.py) writes the
engine; `glmrt.load(MODEL, backend="cuda")` runs it. Importing glmrt never imports this.
"""
