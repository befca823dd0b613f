"""Probe: how fast can an int4 GEMV read MatMulNBits weights on this GPU?

ONNX Runtime's M=1 MatMulNBits kernel reads GLM-Z1-9B's matrices at 1.23-2.54 TB/s (ncu,
bench/h200/kernels-9b-8L-int4.md); the copy ceiling is 4.22 TB/s. Before building a kernel of
our own, this measures a straightforward one on the very same layout:

  python3 bench/gemv_probe.py build --out build/gemv     # here: nvcc -> one cubin per variant
  python3 bench/gemv_probe.py run --cubins build/gemv --json OUT.json    # on the GPU machine

The cubins are compiled here for sm_90 (nvcc), loaded there with the driver API through ctypes
and launched on torch's stream inside a torch CUDA graph: the GPU machine needs only torch and
the driver, nothing compiled there.

Layout (MatMulNBits, bits 4, block 32, symmetric): B (N, K/32, 16) uint8, two codes per byte,
the even k in the low nibble, value (q - 8) * scale; scales (N, K/32) fp16; x (K,) fp16 ->
y (N,) fp16. The kernel: one warp per output row, each lane reads one whole block (16 bytes, one
vector load) and its scale, UNROLL blocks in flight per lane before any arithmetic. x comes
either from shared memory (XSMEM=1: staged as fp16 with one pad word per block so the 32 lanes,
each in its own block, hit 32 different banks) or straight from global memory through L1
(XSMEM=0: no staging, no barrier, no shared-memory limit on occupancy). Timed as a CUDA graph
of many launches over several weight copies (more bytes than the 60 MB L2), so every launch
reads its weights from HBM.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

KERNEL = r"""
#include <cuda_fp16.h>

#define WARPS 8                 // output rows per thread block

// XSMEM=1: x staged as fp16, block b at [b * 34, b * 34 + 32): 17 words per block, odd, so
// lane l reading word i of its block b = l + 32 m lands in bank (17 b + i) % 32, distinct per lane.
extern "C" __global__ void __launch_bounds__(32 * WARPS)
w4a16_gemv(const uint4* __restrict__ B, const __half* __restrict__ S,
           const __half* __restrict__ X, __half* __restrict__ Y, int N, int K) {
  const int kb = K / 32;
#if XSMEM == 1
  extern __shared__ __half xs[];
  for (int i = threadIdx.x; i < K; i += blockDim.x) xs[(i / 32) * 34 + i % 32] = X[i];
  __syncthreads();
#elif XSMEM == 2
  // half2 pairs in the order the nibbles come out of a 32-bit word: word j of block b holds
  // k = 32b + 8j + m at bits 4m; (w >> 4s) & 0x000F000F yields (m = s, m = s + 4), so pair
  // 17b + 4j + s is (x[32b+8j+s], x[32b+8j+s+4]) (17 words per block: one pad word)
  extern __shared__ __half2 xs2[];
  for (int p = threadIdx.x; p < K / 2; p += blockDim.x) {
    const int b = p / 16, j = (p % 16) / 4, s = p % 4, k = 32 * b + 8 * j + s;
    xs2[17 * b + 4 * j + s] = __halves2half2(X[k], X[k + 4]);
  }
  __syncthreads();
#endif
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
      const unsigned words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#if XSMEM == 2
      // 1024 + q as fp16 by OR-ing the nibble into 0x6400's mantissa; minus 1032 = q - 8,
      // exact; a block's 32 products summed as half2, then scaled in fp32
      const __half2* x2 = xs2 + 17 * b;
      const __half2 bias = __float2half2_rn(1032.f);
      __half2 a2 = __float2half2_rn(0.f);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          unsigned v = ((words[j] >> (4 * t)) & 0x000F000Fu) | 0x64006400u;
          a2 = __hfma2(__hsub2(*reinterpret_cast<__half2*>(&v), bias), x2[4 * j + t], a2);
        }
      }
      const float2 f = __half22float2(a2);
      acc += (f.x + f.y) * s[u];
#else
#if XSMEM
      const __half2* x2 = reinterpret_cast<const __half2*>(xs + b * 34);   // 16 pairs (k, k+1)
#else
      const __half2* x2 = reinterpret_cast<const __half2*>(X + b * 32);
#endif
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int t = 0; t < 4; ++t) {           // byte 4j + t holds k = 8j + 2t (low), +1 (high)
          const unsigned byte = (words[j] >> (8 * t)) & 0xFFu;
#if XSMEM
          const float2 xv = __half22float2(x2[j * 4 + t]);
#else
          const float2 xv = __half22float2(__ldg(x2 + j * 4 + t));
#endif
          part += xv.x * (float)((int)(byte & 0xFu) - 8) + xv.y * (float)((int)(byte >> 4) - 8);
        }
      }
      acc += part * s[u];
#endif
    }
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) Y[n] = __float2half(acc);
}
"""

WARPS = 8
# (UNROLL, XSMEM): x in padded shared memory with fp32 math (1) or half2 math with the nibbles
# turned into fp16 by bit tricks (2); x straight from L1 (0) was 2-3x slower than 1 on the H200
VARIANTS = [(2, 1), (4, 1), (2, 2), (4, 2), (8, 2)]
SHAPES = {   # name: (N, K)
    "glm-z1-9b qkv": (4608, 4096), "glm-z1-9b o_proj": (4096, 4096),
    "glm-z1-9b gate_up": (27392, 4096), "glm-z1-9b down_proj": (4096, 13696),
    "glm-4-32b qkv": (6656, 6144), "glm-4-32b o_proj": (6144, 6144),
    "glm-4-32b gate_up": (46080, 6144), "glm-4-32b down_proj": (6144, 23040),
}


def cubin_name(unroll: int, xsmem: int) -> str:
    return f"w4a16_gemv_u{unroll}_s{xsmem}.cubin"


def smem_bytes(k: int, xsmem: int) -> int:
    return (k // 32) * 34 * 2 if xsmem else 0          # both layouts: 17 words per block


def build(out: str) -> None:
    """Compile every variant for sm_90 with nvcc (no GPU needed)."""
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "w4a16_gemv.cu")
        with open(cu, "w") as f:
            f.write(KERNEL)
        for u, xs in VARIANTS:
            dst = os.path.join(out, cubin_name(u, xs))
            subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-std=c++17", f"-DUNROLL={u}",
                            f"-DXSMEM={xs}", "-o", dst, cu], check=True)
            print(f"built {dst}")


class Driver:
    """The few CUDA driver calls the probe needs, through ctypes (torch owns the context)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    def load(self, path: str, name: str, smem: int):
        with open(path, "rb") as f:
            image = f.read()
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(image)), f"cuModuleLoadData {path}")
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), "cuModuleGetFunction")
        if smem > 48 * 1024:    # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
            self.check(self.lib.cuFuncSetAttribute(fn, 8, ctypes.c_int(smem)), "cuFuncSetAttribute")
        return fn

    def launch(self, fn, grid: int, block: int, smem: int, stream: int, args: list):
        vals = [ctypes.c_void_p(a) if isinstance(a, Ptr) else ctypes.c_int(a) for a in args]
        params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        self.check(self.lib.cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, smem, ctypes.c_void_p(stream),
                                           params, None), "cuLaunchKernel")


class Ptr(int):
    """A device address (launch() passes it as a pointer, plain ints as int)."""


def probe(drv, cubins, name, n, k, copies_mb=768, launches=200):
    """Time every variant on one shape; weights made on the device, once."""
    import numpy as np
    import torch
    kb = k // 32
    per = n * k // 2 + n * kb * 2                                  # weight + scale bytes
    copies = max(2, -(-copies_mb * 2**20 // per))
    gen = torch.Generator(device="cuda").manual_seed(0)
    b = [torch.randint(0, 256, (n, kb, 16), dtype=torch.uint8, device="cuda", generator=gen) for _ in range(copies)]
    s = [(torch.rand((n, kb), device="cuda", generator=gen) * 0.02 + 0.001).half() for _ in range(copies)]
    x = torch.randn(k, device="cuda", generator=gen).half()
    codes = b[0].to(torch.int32)                                   # reference: dequantized, float32
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(n, kb, 32).float() - 8
    ref = (q * s[0].float()[..., None]).reshape(n, k) @ x.float()
    del q, codes
    y = torch.empty(n, dtype=torch.float16, device="cuda")
    rows = []
    for unroll, xsmem in VARIANTS:
        smem = smem_bytes(k, xsmem)
        fn = drv.load(os.path.join(cubins, cubin_name(unroll, xsmem)), "w4a16_gemv", smem)
        grid = -(-n // WARPS)

        def launch(i, stream, fn=fn, grid=grid, smem=smem):
            drv.launch(fn, grid, 32 * WARPS, smem, stream, [Ptr(b[i % copies].data_ptr()),
                       Ptr(s[i % copies].data_ptr()), Ptr(x.data_ptr()), Ptr(y.data_ptr()), n, k])

        launch(0, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            for i in range(copies):
                launch(i, side.cuda_stream)                        # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cap = torch.cuda.current_stream().cuda_stream
            for i in range(launches):
                launch(i, cap)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / launches)      # ms per launch
        us = 1e3 * float(np.median(times))
        rows.append({"shape": name, "N": n, "K": k, "unroll": unroll, "math": {0: "fp32, x from L1", 1: "fp32", 2: "half2"}[xsmem], "us": us,
                     "mb": per / 1e6, "tbps": per / (us * 1e-6) / 1e12, "max_rel_err": err,
                     "weight_copies": copies})
        del graph
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", default="build/gemv")
    p = sub.add_parser("run")
    p.add_argument("--cubins", default="build/gemv")
    p.add_argument("--json")
    args = ap.parse_args()
    if args.cmd == "build":
        return build(args.out)
    missing = [c for c in (cubin_name(u, xs) for u, xs in VARIANTS) if not os.path.isfile(os.path.join(args.cubins, c))]
    if missing:
        sys.exit(f"{args.cubins}: missing {', '.join(missing)} (run 'gemv_probe.py build' where nvcc is)")
    import torch
    torch.cuda.init()
    torch.zeros(1, device="cuda")                                  # the primary context, current
    drv = Driver()
    rows = []
    for name, (n, k) in SHAPES.items():
        found = probe(drv, args.cubins, name, n, k)
        torch.cuda.empty_cache()
        for r in found:
            rows.append(r)
            print(f"{name:20s} N {n:6d} K {k:6d} unroll {r['unroll']} x {r['math']}: "
                  f"{r['us']:8.2f} us  {r['mb']:7.1f} MB  {r['tbps']:5.2f} TB/s  max rel err {r['max_rel_err']:.1e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
