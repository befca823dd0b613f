// glmrt's CUDA decode engine: what every kernel shares.
//
// Compiled by NVRTC without any header (no CUDA toolkit on the user's machine): fp16 is
// handled as raw bits (h16) through a few PTX instructions, vector types (uint4, float2, float4)
// and intrinsics are NVRTC's built-ins. The same source also compiles as C++20 on the host with
// GLMRT_EMULATE defined and tests/cuda_emu.h included first: the CPU emulation the tests run the
// kernels in (one block at a time, its threads as cooperative fibers), so every #ifdef below
// has an emulated twin there.
//
// Argument passing: every kernel takes ONE struct by value (GemvArgs, AttnArgs, ...). The host
// mirrors each struct with ctypes (glmrt/backends/cuda_engine/args.py); a test compares their
// layouts field by field.

typedef unsigned short h16;      // IEEE fp16, as bits
typedef unsigned int h16x2;      // two fp16: element 0 in the low 16 bits

#ifndef GLMRT_EMULATE
#define DEV __device__ __forceinline__
#define DYN_SMEM(type, name) extern __shared__ __align__(16) type name[]

DEV float h2f(h16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
DEV h16 f2h(float f) { h16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
DEV h16x2 hfma2(h16x2 a, h16x2 b, h16x2 c) {
  h16x2 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
DEV h16x2 hsub2(h16x2 a, h16x2 b) { h16x2 d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
DEV h16x2 hmul2(h16x2 a, h16x2 b) { h16x2 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
// d += A B on the tensor cores (sm_80+), one warp: A 16 x 16 fp16 (4 registers of half2 a lane),
// B 16 x 8 fp16 (2), d 16 x 8 fp32 (4). Lane l = 4 g + t holds A[g][2t, 2t+1] (a0), A[g + 8][2t,
// 2t+1] (a1), A[g][2t + 8, 2t + 9] (a2), A[g + 8][2t + 8, 2t + 9] (a3); B[2t, 2t+1][g] (b0),
// B[2t + 8, 2t + 9][g] (b1); d[g][2t, 2t+1], d[g + 8][2t, 2t+1] (the lower k in the low half).
// Every lane of the warp must execute it (no divergence around it).
DEV void mma_16816(float (&d)[4], const h16x2 (&a)[4], h16x2 b0, h16x2 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 4 unsigned bytes of a times 4 signed bytes of b, summed into c (int8 activations)
DEV int dp4a_us(unsigned a, unsigned b, int c) {
  int d; asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
DEV int f2i_rn(float f) { int i; asm("cvt.rni.s32.f32 %0, %1;" : "=r"(i) : "f"(f)); return i; }
// the 8 x 8 fp16 matrix the warp holds (lane 4 r + c: row r, columns 2c, 2c + 1), transposed:
// lane 4 r + c gets the transpose's row r, columns 2c, 2c + 1 (sm_75+, every lane executes it)
DEV h16x2 movmatrix_t(h16x2 a) {
  h16x2 d; asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a)); return d;
}
// weights are read once per token: stream them past the caches
DEV uint4 load_stream(const uint4* p) { return __ldcs(p); }
// Asynchronous copies global -> shared (sm_80+, cp.async): `bytes` of the 16 (or 4) are read, the
// rest of the destination zero-filled (0: a zero word, nothing read). A thread's copies form a
// group at each cp_async_commit; cp_async_wait<N> returns when all but its newest N groups have
// landed, and only its own copies are then visible to it (here each thread reads back only what
// it copied itself).
DEV unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t;\n cvta.to.shared.u64 t, %1;\n cvt.u32.u64 %0, t;\n}" : "=r"(a) : "l"(p));
  return a;
}
DEV void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes) : "memory");
}
DEV void cp_async4(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes) : "memory");
}
DEV void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
// The last-block pattern's count (returns the count before this block's): one thread of the
// block calls it between two __syncthreads, the block's writes before the first, its reads of
// the other blocks' writes after the second. One atomic add with release and acquire semantics
// at GPU scope: the barriers carry the other threads' writes and reads across (the PTX memory
// model's causality order), so no thread needs a fence of its own (the classic form: every
// thread's __threadfence, fence.sc.gpu, before the first barrier and after the second).
DEV unsigned arrive(unsigned* p) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
  return old;
}
// written by other blocks of this kernel (the last-block reductions): read through L2
DEV float load_l2(const float* p) { return __ldcg(p); }
DEV int load_l2(const int* p) { return __ldcg(p); }
DEV float4 load_l2(const float4* p) { return __ldcg(p); }
// Programmatic dependent launch (sm_90+, when the host launches with the attribute; no-ops
// otherwise): a kernel may start while the previous one finishes, loading its weights (which
// no kernel writes), and waits for the previous grid's completion and memory before touching
// anything another kernel writes. launch_dependents lets the next kernel start as early.
DEV void grid_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
DEV void grid_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

DEV float2 h2x2f(h16x2 v) { return make_float2(h2f((h16)(v & 0xffffu)), h2f((h16)(v >> 16))); }
DEV float bf2f(h16 b) { return __uint_as_float((unsigned)b << 16); }
DEV h16x2 pack_h2(float lo, float hi) { return (h16x2)f2h(lo) | ((h16x2)f2h(hi) << 16); }   // (lo, hi) -> half2

DEV float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

DEV float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (every thread calls it; all get the total). red: >= 33 floats of shared
// memory, free to reuse once this returns.
DEV float block_sum(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? red[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  v = red[32];
  __syncthreads();
  return v;
}

// (value, index) maximum, the first index on ties (numpy's argmax)
DEV bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }
