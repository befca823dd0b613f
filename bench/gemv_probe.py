"""Probe: how fast can an int4 GEMV read MatMulNBits weights on this GPU?

ONNX Runtime's M=1 MatMulNBits kernel reads GLM-Z1-9B's matrices at 1.23-2.54 TB/s (ncu,
bench/h200/kernels-9b-8L-int4.md); the copy ceiling is 4.22 TB/s. Before building an ONNX
Runtime custom-op library around a better kernel, this measures a straightforward one on the
very same layout, on the GPU machine, with CuPy (there, not a glmrt dependency):

  python3 bench/gemv_probe.py --json OUT.json         # on the GPU machine
  python3 bench/gemv_probe.py --compile-only          # anywhere NVRTC is installed: compiles

Layout (MatMulNBits, bits 4, block 32, symmetric): B (N, K/32, 16) uint8, two codes per byte,
the even k in the low nibble, value (q - 8) * scale; scales (N, K/32) fp16; x (K,) fp16 ->
y (N,) fp16. The kernel: one warp per output row, each lane reads one whole block (16 bytes, one
vector load) and its scale, UNROLL blocks in flight per lane before any arithmetic; x is staged
in shared memory as fp16 with one pad word per block so the 32 lanes, each in its own block, hit
32 different banks. Timed as a CUDA graph of many launches over several weight copies (more
bytes than the 60 MB L2), so every launch reads its weights from HBM.
"""
from __future__ import annotations

import argparse
import json
import sys

KERNEL = r"""
#include <cuda_fp16.h>

#ifndef UNROLL
#define UNROLL 4
#endif
#define WARPS 8                 // output rows per thread block

// x staged as fp16, block b at [b * 34, b * 34 + 32): 17 words per block, odd, so lane l
// reading word i of its block b = l + 32 m lands in bank (17 b + i) % 32, distinct per lane.
extern "C" __global__ void __launch_bounds__(32 * WARPS)
w4a16_gemv(const uint4* __restrict__ B, const __half* __restrict__ S,
           const __half* __restrict__ X, __half* __restrict__ Y, int N, int K) {
  extern __shared__ __half xs[];
  const int kb = K / 32;
  for (int i = threadIdx.x; i < K; i += blockDim.x) xs[(i / 32) * 34 + i % 32] = X[i];
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * WARPS + threadIdx.x / 32;
  if (n >= N) return;
  const uint4* row = B + (size_t)n * kb;
  const __half* srow = S + (size_t)n * kb;

  float acc = 0.f;
  for (int b0 = lane; b0 < kb; b0 += 32 * UNROLL) {
    uint4 w[UNROLL];
    float s[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {          // all loads first: UNROLL x 16 bytes in flight
      const int b = b0 + 32 * u;
      if (b < kb) {
        w[u] = __ldcs(row + b);
        s[u] = __half2float(srow[b]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int b = b0 + 32 * u;
      if (b >= kb) break;
      const __half2* x2 = reinterpret_cast<const __half2*>(xs + b * 34);   // 16 pairs (k, k+1)
      const unsigned words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int t = 0; t < 4; ++t) {           // byte 4j + t holds k = 8j + 2t (low), +1 (high)
          const unsigned byte = (words[j] >> (8 * t)) & 0xFFu;
          const float2 xv = __half22float2(x2[j * 4 + t]);
          part += xv.x * (float)((int)(byte & 0xFu) - 8) + xv.y * (float)((int)(byte >> 4) - 8);
        }
      }
      acc += part * s[u];
    }
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) Y[n] = __float2half(acc);
}
"""

WARPS = 8
SHAPES = {   # name: (N, K)
    "glm-z1-9b qkv": (4608, 4096), "glm-z1-9b o_proj": (4096, 4096),
    "glm-z1-9b gate_up": (27392, 4096), "glm-z1-9b down_proj": (4096, 13696),
    "glm-4-32b qkv": (6656, 6144), "glm-4-32b o_proj": (6144, 6144),
    "glm-4-32b gate_up": (46080, 6144), "glm-4-32b down_proj": (6144, 23040),
}


def smem_bytes(k: int) -> int:
    return (k // 32) * 34 * 2


def compile_only(unroll: int, include: str | None) -> None:
    """Compile the kernel for sm_90 with NVRTC (no GPU needed) and print the log; `include`
    is a folder holding cuda_fp16.h (e.g. the nvidia-cuda-runtime wheel's include/)."""
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(KERNEL.encode(), b"w4a16_gemv.cu", 0, [], [])
    opts = [b"--gpu-architecture=sm_90", b"-std=c++17", f"-DUNROLL={unroll}".encode()]
    if include:
        opts.append(f"--include-path={include}".encode())
    err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    print(log.decode(errors="replace").strip() or "(empty log)")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        sys.exit(f"compile failed: {err}")
    print(f"compiled for sm_90 with UNROLL={unroll}")


def probe(name, n, k, unrolls, copies_mb=768, launches=200):
    """Time the kernel at each UNROLL on one shape; weights made on the device, once."""
    import cupy as cp
    import numpy as np
    kb = k // 32
    per = n * k // 2 + n * kb * 2                                  # weight + scale bytes
    copies = max(2, -(-copies_mb * 2**20 // per))
    gen = cp.random.default_rng(0)
    b = [gen.integers(0, 256, size=(n, kb, 16), dtype=cp.uint8) for _ in range(copies)]
    s = [(gen.random((n, kb), dtype=cp.float32) * 0.02 + 0.001).astype(cp.float16) for _ in range(copies)]
    x = gen.standard_normal(k, dtype=cp.float32).astype(cp.float16)
    codes = b[0]                                                   # reference: dequantized, float32
    q = cp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(n, kb, 32).astype(cp.float32) - 8
    ref = (q * s[0].astype(cp.float32)[..., None]).reshape(n, k) @ x.astype(cp.float32)
    del q
    y = cp.empty(n, cp.float16)
    smem = smem_bytes(k)
    rows = []
    for unroll in unrolls:
        fn = cp.RawModule(code=KERNEL, options=("-std=c++17", f"-DUNROLL={unroll}")).get_function("w4a16_gemv")
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        grid, block = (-(-n // WARPS),), (32 * WARPS,)

        def launch(i):
            fn(grid, block, (b[i % copies], s[i % copies], x, y, np.int32(n), np.int32(k)), shared_mem=smem)

        launch(0)
        err = float(cp.abs(y.astype(cp.float32) - ref).max() / cp.abs(ref).max())
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            for i in range(copies):
                launch(i)                                          # warm-up
            stream.begin_capture()
            for i in range(launches):
                launch(i)
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            times = []
            for _ in range(5):
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record(stream)
                graph.launch(stream)
                end.record(stream)
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) / launches)   # ms per launch
        us = 1e3 * float(np.median(times))
        rows.append({"shape": name, "N": n, "K": k, "unroll": unroll, "us": us, "mb": per / 1e6,
                     "tbps": per / (us * 1e-6) / 1e12, "max_rel_err": err, "weight_copies": copies})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--include", help="with --compile-only: a folder holding cuda_fp16.h")
    ap.add_argument("--unroll", default="2,4,8")
    ap.add_argument("--json")
    args = ap.parse_args()
    unrolls = [int(u) for u in args.unroll.split(",")]
    if args.compile_only:
        for u in unrolls:
            compile_only(u, args.include)
        return
    rows = []
    for name, (n, k) in SHAPES.items():
        for r in probe(name, n, k, unrolls):
            rows.append(r)
            print(f"{name:22s} N {n:6d} K {k:6d} unroll {r['unroll']}: {r['us']:8.2f} us  {r['mb']:7.1f} MB  "
                  f"{r['tbps']:5.2f} TB/s  max rel err {r['max_rel_err']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
