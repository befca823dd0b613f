"""glmrt's own CPU decode engine (backend "cpu"): the whole decode step in C, compiled per
instruction set by the machine's C compiler, driven through ctypes, the weights read in place
from the export's memory-mapped model.onnx.data.

  kernels/engine.c  one decode step: int8-activation GEMVs on MatMulNBits' 4- and 8-bit blocks
                    (AVX-512 VNNI, AVX-VNNI, AVX2 or portable C), norms, RoPE, the KV append,
                    attention, SwiGLU, argmax; its own threads
  compiler.py       engine.c -> engine.so for one instruction set; which ones this CPU runs
  engine.py         the C structs mirrored with ctypes; the weights memory-mapped
  decoder.py        CpuDecoder: prefill on ONNX Runtime's CPU form (--target cpu), decode steps
                    in the engine, on the same KV cache buffers

`glmrt build MODEL --backend cpu [--isa auto|avx512vnni|avxvnni|avx2|generic]` (glmrt/engines/cpu_build.py)
writes the engine; `glmrt.load(MODEL, backend="cpu")` runs it. Importing glmrt never imports this.
"""
