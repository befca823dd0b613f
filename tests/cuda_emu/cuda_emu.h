// A CPU emulation of the CUDA subset glmrt's engine kernels use, so the tests can run the very
// kernel source NVRTC compiles, on a machine without a GPU, against numpy.
//
// Blocks run one after another (in a shuffled order: no kernel may depend on block order);
// a block's threads are cooperative fibers (a register-only switch on x86-64, ucontext
// elsewhere) switched at __syncthreads() and at warp
// shuffles, so barriers, shuffles, shared memory, atomics and the "last block" reductions
// behave as on the device, just without parallel speed. A thread that returns counts as
// arrived at every later barrier (as exited threads do on the GPU). A barrier no thread can
// pass is reported as a deadlock instead of hanging. Dynamic shared memory is filled with NaN
// bytes before each block, so reading what the block did not write shows. A warp collective
// (shuffle, mma, movmatrix) must be met by all 32 lanes at the same call (source line): a warp
// whose lanes meet at different ones, or with lanes gone, is reported as divergent.
//
// What the previous kernel writes can be staged to land only at a block's first grid_wait (the
// spans emu_in_flight names: NaN bytes before it); they must be inputs the kernel only reads
// (each block starts from NaN there again, and they are restored after each block).
//
// Not emulated: the memory model between blocks beyond sequential order, timing, occupancy,
// register and shared-memory limits (the NVRTC compile and the GPU stage check those); a
// grid_wait reached by some threads only (the first thread's lands the spans for the whole
// block, as a barrier would not on the device).
#pragma once
#define GLMRT_EMULATE 1

#include <array>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

typedef unsigned short h16;
typedef unsigned int h16x2;
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define DEV inline
#define DYN_SMEM(type, name) type* name = (type*)emu::dyn_smem

namespace emu {
// ---- fibers: a register-only context switch on x86-64 (no system call per switch),
// ucontext elsewhere
#if defined(__x86_64__)
extern "C" __attribute__((visibility("hidden"))) void emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .hidden emu_switch
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
struct Context { void* sp = nullptr; };
inline Context scheduler;
inline void switch_to(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
inline void make(Context& c, std::vector<char>& stack, void (*entry)()) {
  uintptr_t top = ((uintptr_t)stack.data() + stack.size()) & ~(uintptr_t)15;
  void** sp = (void**)top;
  *--sp = nullptr;                  // the entry's return address: it never returns
  *--sp = (void*)entry;             // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;    // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
#else
struct Context { ucontext_t uc; };
inline Context scheduler;
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make(Context& c, std::vector<char>& stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack.data();
  c.uc.uc_stack.ss_size = stack.size();
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  std::vector<char> stack;
  bool done = false;
};
inline std::vector<Fiber> fibers;
inline int current = 0, live = 0, nthreads = 0;
inline unsigned block_gen = 0, block_arrived = 0;
inline std::vector<unsigned> warp_gen, warp_arrived, warp_live;
inline unsigned long long progress = 0;
inline dim3 block_idx, block_dim, grid_dim;
inline char* dyn_smem = nullptr;
inline std::vector<unsigned long long> xchg;
inline void (*body)(const void*) = nullptr;
inline const void* body_arg = nullptr;
inline bool deadlock = false;
inline bool divergent = false;             // a warp collective not met by every lane at one call
inline std::vector<int> warp_site;         // per thread: the source line of its pending collective
// cp.async copies not landed yet, per thread: the open group and the committed ones, oldest first
struct AsyncCopy { void* dst; const void* src; int size, bytes; };
struct AsyncQueue { std::vector<AsyncCopy> open; std::vector<std::vector<AsyncCopy>> groups; };
inline std::vector<AsyncQueue> async_queues;      // per thread of the block running
inline bool async_early = false;           // copies land as they are issued (else at their wait)
inline bool fault = false;                 // a cp.async outside dynamic shared memory, or misaligned
inline size_t dyn_smem_size = 0;

inline dim3 thread_idx() { dim3 d; d.x = (unsigned)current; return d; }

inline void yield() { switch_to(fibers[current].ctx, scheduler); }

inline void sync_block() {
  const unsigned g = block_gen;
  ++progress;
  if (++block_arrived == (unsigned)live) { block_arrived = 0; ++block_gen; return; }
  while (block_gen == g && !deadlock) yield();
}

inline void sync_warp(int w, int site = 0) {
  const unsigned g = warp_gen[w];
  ++progress;
  if (site) warp_site[current] = site;
  if (++warp_arrived[w] == warp_live[w]) {
    if (site) {                            // the last lane to arrive checks the warp met as one
      const int lanes = std::min(32, nthreads - w * 32);
      bool same = (int)warp_live[w] == lanes;
      for (int l = 0; l < lanes && same; ++l) same = warp_site[w * 32 + l] == site;
      if (!same) { divergent = true; deadlock = true; return; }
    }
    warp_arrived[w] = 0; ++warp_gen[w]; return;
  }
  while (warp_gen[w] == g && !deadlock) yield();
}

template <class T> T shfl_xor(T v, int mask, int site) {
  static_assert(sizeof(T) <= 8, "shuffle of a scalar");
  const int t = current, w = t / 32, src = w * 32 + ((t % 32) ^ mask);
  std::memcpy(&xchg[t], &v, sizeof(T));
  sync_warp(w, site);
  T r = v;
  if (src < nthreads) std::memcpy(&r, &xchg[src], sizeof(T));
  sync_warp(w);
  return r;
}

inline void fiber_main() {
  body(body_arg);
  Fiber& f = fibers[current];
  f.done = true;
  --live;
  const int w = current / 32;
  --warp_live[w];
  ++progress;
  // an exited thread no longer holds back the barriers the others wait at
  if (block_arrived && block_arrived == (unsigned)live) { block_arrived = 0; ++block_gen; }
  if (warp_arrived[w] && warp_arrived[w] == warp_live[w]) { warp_arrived[w] = 0; ++warp_gen[w]; }
  switch_to(f.ctx, scheduler);
  std::abort();                     // never resumed
}

// Run one block of `threads` threads; false on a deadlock.
inline bool run_block(int threads) {
  const size_t stack = 128 * 1024;
  if ((int)fibers.size() < threads) fibers.resize(threads);
  nthreads = live = threads;
  block_gen = block_arrived = 0;
  const int warps = (threads + 31) / 32;
  warp_gen.assign(warps, 0);
  warp_arrived.assign(warps, 0);
  warp_live.assign(warps, 0);
  for (int t = 0; t < threads; ++t) ++warp_live[t / 32];
  xchg.assign(threads, 0);
  warp_site.assign(threads, 0);
  for (auto& q : async_queues) { q.open.clear(); q.groups.clear(); }   // a block's copies never outlive it
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.done = false;
    if (f.stack.size() < stack) f.stack.resize(stack);
    make(f.ctx, f.stack, fiber_main);
  }
  int finished = 0;
  while (finished < threads) {
    const unsigned long long before = progress;
    for (int t = 0; t < threads; ++t) {
      if (fibers[t].done) continue;
      current = t;
      switch_to(scheduler, fibers[t].ctx);
      if (fibers[t].done) ++finished;
    }
    if (progress == before && finished < threads) {     // every thread waits at a barrier no one can pass
      deadlock = true;                                  // the fibers are abandoned, made anew next block
      return false;
    }
  }
  return true;
}
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __syncthreads() emu::sync_block()
#define __syncwarp() emu::sync_warp(emu::current / 32, __LINE__)
#define __threadfence() ((void)0)

// warp collectives carry their call's source line (the divergence check)
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor((v), (m), __LINE__)
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p += v; return old; }
inline int atomicAdd(int* p, int v) { const int old = *p; *p += v; return old; }
inline unsigned arrive(unsigned* p) { return atomicAdd(p, 1u); }   // common.cuh's (no reordering here)
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {   // byte i: selector nibble i's low 3 bits
  const unsigned long long v = (unsigned long long)y << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline float h2f(h16 h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline h16 f2h(float f) { const _Float16 v = (_Float16)f; h16 h; std::memcpy(&h, &v, 2); return h; }
inline h16x2 pack2(float lo, float hi) { return (h16x2)f2h(lo) | ((h16x2)f2h(hi) << 16); }
inline h16x2 hfma2(h16x2 a, h16x2 b, h16x2 c) {
  return pack2(std::fma(h2f(a & 0xffff), h2f(b & 0xffff), h2f(c & 0xffff)),
               std::fma(h2f(a >> 16), h2f(b >> 16), h2f(c >> 16)));
}
inline h16x2 hsub2(h16x2 a, h16x2 b) {
  return pack2(h2f(a & 0xffff) - h2f(b & 0xffff), h2f(a >> 16) - h2f(b >> 16));
}
inline h16x2 hmul2(h16x2 a, h16x2 b) {
  return pack2(h2f(a & 0xffff) * h2f(b & 0xffff), h2f(a >> 16) * h2f(b >> 16));
}
// mma.sync m16n8k16 (fp16 in, fp32 accumulate) as a warp collective: every lane leaves its
// fragments, the warp meets, each lane computes its own 4 results from everyone's (products
// exact in float, summed in k order), the warp meets again before the fragments are reused.
namespace emu { inline std::vector<std::array<unsigned, 6>> mma_x; }
inline void mma_16816_at(int site, float (&d)[4], const h16x2 (&a)[4], h16x2 b0, h16x2 b1) {
  using namespace emu;
  const int t = current, w = t / 32, lane = t % 32, base = w * 32;
  if ((int)mma_x.size() < nthreads) mma_x.resize(nthreads);
  mma_x[t] = {a[0], a[1], a[2], a[3], b0, b1};
  sync_warp(w, site);
  auto half = [](unsigned r, int k) { return h2f((h16)(k & 1 ? r >> 16 : r & 0xffffu)); };
  auto A = [&](int row, int k) {          // A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
    return half(mma_x[base + 4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k);
  };
  auto B = [&](int k, int n) { return half(mma_x[base + 4 * n + (k % 8) / 2][4 + (k >= 8)], k); };
  const int g = lane / 4, tg = lane % 4;
  float r[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * tg + (i & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    r[i] = d[i] + s;
  }
  sync_warp(w);
  for (int i = 0; i < 4; ++i) d[i] = r[i];
}
// movmatrix.sync.aligned.m8n8.trans.b16 as a warp collective: lane 4r + c holds S[r][2c, 2c+1];
// it gets S^T[r][2c, 2c+1] = (S[2c][r], S[2c+1][r]), S[q][col] being half col % 2 of lane 4q + col / 2.
inline h16x2 movmatrix_t_at(int site, h16x2 a) {
  using namespace emu;
  const int t = current, w = t / 32, lane = t % 32, base = w * 32;
  std::memcpy(&xchg[t], &a, sizeof a);
  sync_warp(w, site);
  const int r = lane / 4, c = lane % 4;
  auto at = [&](int q, int col) {
    unsigned v; std::memcpy(&v, &xchg[base + 4 * q + col / 2], sizeof v);
    return (col % 2) ? v >> 16 : v & 0xffffu;
  };
  const h16x2 d = at(2 * c, r) | at(2 * c + 1, r) << 16;
  sync_warp(w);
  return d;
}
#define mma_16816(...) mma_16816_at(__LINE__, __VA_ARGS__)
#define movmatrix_t(a) movmatrix_t_at(__LINE__, (a))
inline int dp4a_us(unsigned a, unsigned b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)((a >> (8 * i)) & 0xffu) * (int)(signed char)((b >> (8 * i)) & 0xffu);
  return c;
}
inline int f2i_rn(float f) { return (int)std::nearbyint(f); }     // round half to even, as cvt.rni
inline uint4 load_stream(const uint4* p) { return *p; }
inline float load_l2(const float* p) { return *p; }
inline int load_l2(const int* p) { return *p; }
inline float4 load_l2(const float4* p) { return *p; }
// cp.async: by default a copy lands at the latest moment the program may rely on it, the
// cp_async_wait that completes its group (or never, if none does), so a read of a stage before
// its wait sees the destination's old bytes (NaN-filled shared memory at first) and fails the
// check; with async_early (emu_set_async_early) it lands as it is issued, so a copy into a slot
// still to be read overwrites it first. Either way a copy must land inside the block's dynamic
// shared memory, from a source aligned to its size, or the launch fails (fault).
namespace emu {
inline bool async_ok(void* dst, const void* src, int size, int bytes) {
  const char* d = (const char*)dst;
  const bool inside = d >= dyn_smem && d + size <= dyn_smem + dyn_smem_size && (uintptr_t)d % size == 0;
  const bool aligned = bytes == 0 || (uintptr_t)src % size == 0;
  if (!inside || !aligned) fault = true;
  return inside && aligned;
}
inline AsyncQueue& async_queue() {
  if ((int)async_queues.size() < nthreads) async_queues.resize(nthreads);
  return async_queues[current];
}
inline void async_land(const std::vector<AsyncCopy>& g) {
  for (const AsyncCopy& c : g) {
    std::memset(c.dst, 0, c.size);
    if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
  }
}
}  // namespace emu
inline void cp_async_at(void* dst, const void* src, int size, int bytes) {
  if (!emu::async_ok(dst, src, size, bytes)) return;
  if (emu::async_early) emu::async_land({{dst, src, size, bytes}});
  else emu::async_queue().open.push_back({dst, src, size, bytes});
}
inline void cp_async16(void* dst, const void* src, int bytes) { cp_async_at(dst, src, 16, bytes); }
inline void cp_async4(void* dst, const void* src, int bytes) { cp_async_at(dst, src, 4, bytes); }
inline void cp_async_commit() {
  emu::AsyncQueue& q = emu::async_queue();
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}
template <int N> void cp_async_wait() {
  emu::AsyncQueue& q = emu::async_queue();
  while ((int)q.groups.size() > N) {
    emu::async_land(q.groups.front());
    q.groups.erase(q.groups.begin());
  }
}
// Blocks and grids run in order here; the spans emu_in_flight names land at a block's first
// grid_wait (the header's "staged" paragraph).
namespace emu {
struct InFlight { void* dst; std::vector<char> bytes; };
inline std::vector<InFlight> in_flight;     // named for the next launch (emu_in_flight)
inline std::vector<InFlight> staged;        // the running launch's
inline bool landed = true;
inline void land() {
  if (landed) return;
  for (const InFlight& f : staged) std::memcpy(f.dst, f.bytes.data(), f.bytes.size());
  landed = true;
}
}  // namespace emu
inline void grid_wait() { emu::land(); }
inline void grid_launch_dependents() {}
extern "C" void emu_in_flight(void* dst, unsigned long long n) {   // the next launch only
  emu::in_flight.push_back({dst, std::vector<char>((char*)dst, (char*)dst + n)});
}

// The kernel table the generated source ends with (EMU_KERNEL lines).
struct EmuKernel { const char* name; void (*run)(const void*); };
#define EMU_KERNEL(name, Args) {#name, [](const void* p) { name(*(const Args*)p); }},

std::vector<EmuKernel>& emu_kernels();

extern "C" void emu_set_async_early(int on) { emu::async_early = on != 0; }

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                          unsigned smem, const void* args, unsigned seed) {
  emu::staged = std::move(emu::in_flight);         // this launch's, whatever happens to it
  emu::in_flight.clear();
  void (*run)(const void*) = nullptr;
  for (const EmuKernel& k : emu_kernels())
    if (std::strcmp(k.name, name) == 0) run = k.run;
  if (!run) return 1;
  std::vector<char> shared(smem + 16);
  emu::dyn_smem = shared.data();
  emu::dyn_smem_size = smem;
  emu::fault = false;
  emu::body = run;
  emu::body_arg = args;
  emu::deadlock = emu::divergent = false;
  emu::grid_dim.x = gx; emu::grid_dim.y = gy; emu::grid_dim.z = gz;
  emu::block_dim.x = threads; emu::block_dim.y = emu::block_dim.z = 1;
  std::vector<unsigned> order(gx * gy * gz);
  for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
  unsigned long long r = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (size_t i = order.size(); i > 1; --i) {        // a shuffled block order (seed 0: in order)
    r = r * 6364136223846793005ull + 1442695040888963407ull;
    if (seed) std::swap(order[i - 1], order[(r >> 33) % i]);
  }
  for (unsigned b : order) {
    emu::block_idx.x = b % gx; emu::block_idx.y = (b / gx) % gy; emu::block_idx.z = b / (gx * gy);
    std::memset(shared.data(), 0xff, shared.size());
    for (const emu::InFlight& f : emu::staged) std::memset(f.dst, 0xff, f.bytes.size());
    emu::landed = emu::staged.empty();
    const bool ok = emu::run_block((int)threads);
    emu::land();                                       // a block that never waited: written now
    if (!ok || emu::fault) return !ok ? (emu::divergent ? 3 : 2) : 4;
  }
  emu::staged.clear();
  return 0;
}
