// GEMV: y (M, N) = x (M, K) @ W^T for M = 1..8 rows of activations (decode: M = 1), with the
// norm that produces x fused in front (prologue) and what consumes y fused behind (epilogue).
//
// Weight formats (W is read once per token: the whole cost of decode):
//   W_INT4    ONNX Runtime's MatMulNBits, 4 bits, symmetric: bytes (N, Kp/BLOCK, BLOCK/2), the
//             even k in the low nibble, value (q - 8) * scale; scales (N, Kp/BLOCK) fp16; Kp is K
//             padded to the block (docs/FORMATS.md).
//   W_F16     fp16 (N, K), the checkpoint's [out, in] (export --float-layout nk).
//   W_F16_KN  fp16 (K, N), W^T as ONNX MatMul reads it (a default export's float lm_head).
//   W_INT4_A8 W_INT4's bytes with x quantized to int8 (W4A8): each 32 values of x (one weight
//             unit) get a scale sx = absmax / 127 and q = rint(x / sx); a 32-bit word of weights
//             gives its 8 products in 2 dp4a (the nibbles as unsigned bytes, x as signed bytes)
//             and a unit's sum is sx * (sum of n * q - 8 * sum of q) in fp32: 5 instructions per
//             8 products where W_INT4 takes ~15 (on the H200 the W_INT4 GEMVs read 1.3-2.6
//             TB/s where the fp16 ones read 2.7-4.2 with the same loads: their arithmetic, not
//             memory, is the limit). An accuracy trade, as llama.cpp's Q4_0 x Q8_1.
//   W_F16_KN_MMA W_F16_KN on the tensor cores (gemv_kn_mma below; batched steps' lm_head).
//   W_INT4_MMA W_INT4's bytes and staged x on the tensor cores (gemv_mma below): each weight
//             dequantized once to fp16 (q - 8) * scale, then mma.sync m16n8k16 multiplies 16
//             rows by up to 8 rows of x at once: M = 1..8 cost the same arithmetic.
//   W_FP8     fp8 e4m3 weights, (N, K) as the checkpoint stores them, 16 values per 16-byte unit,
//             one fp16 scale per output row (N,): value = e4m3 * scale (export's fp8-rows form,
//             weight-only, W8A16). Decoded in registers by bit moves (dot_fp8), products in
//             half2 with x, the row's scale (times 2^8, see dot_fp8) applied in fp32.
//   W_BF16    bf16 (N, K), the checkpoint's own values unchanged (export --precision bf16
//             --target cuda --float-layout nk); products in fp32 (dot_half).
//   W_INT8    ONNX Runtime's MatMulNBits, 8 bits, symmetric (an int4 export's lm_head, export
//             --lm-head int8): bytes (N, K/BLOCK, BLOCK), value (b - 128) * scale; scales
//             (N, K/BLOCK) fp16; 16 values per 16-byte unit (dot_int8).
//
// Work split (NK formats): a tile is ROWS = WARPS * RPW output rows; each warp owns RPW rows and
// each lane reads 16-byte units of them (32 int4 or 8 fp16 values), lane l taking units l,
// l + 32, ... so a warp's loads are contiguous. Every x value a lane loads from shared memory
// serves its RPW rows, every weight unit serves the M rows of x. A block loops over tiles
// (blockIdx.x, + gridDim.x, ...): x is staged once per block. The next step's weights are loaded
// before the current step's arithmetic (two register stages), and the first step's before the
// prologue, so the prologue's reductions hide under the first loads' latency.
//
// x in shared memory, fp16, per row of x (m) and unit (u):
//   W_INT4  16 half2 pairs in the order the nibbles come out of a 32-bit word: word j of the unit
//           holds k = 32u + 8j + i at bits 4i, and (word >> 4s) & 0x000F000F gives the nibbles of
//           k = 32u + 8j + s (low half) and 32u + 8j + s + 4 (high half): pair 4j + s is
//           (x[32u+8j+s], x[32u+8j+s+4]). Plus one 16-byte pad per unit: units 80 bytes apart,
//           so the 8 lanes of a 16-byte shared load phase hit 8 different bank groups.
//   W_F16, W_BF16   8 values in order (16 bytes per unit).
//   W_INT8  as W_FP8: 16 values in order (32 bytes per unit), the words swizzled (fp8_swizzle).
//   W_FP8   16 values in order (32 bytes per unit), the unit's two 16-byte words swapped in
//           every other group of 4 units (fp8_swizzle): lanes 4 units apart would otherwise
//           meet on the same banks in a phase of 16-byte loads.
//   W_INT4_A8  per unit 48 bytes: word j of the weights pairs with the 8 bytes at 8j: first the
//           int8 x of its even nibbles (k = 32u + 8j + 0, 2, 4, 6 in bytes 0..3), then of the odd
//           ones; then (sx, -8 * sx * sum of the unit's q) as floats and 8 bytes of pad (units 48
//           bytes apart: a phase of 8 lanes' 16-byte loads covers all 32 banks once).
//
// Prologues (how x is made):
//   PRO_F16         x = h_in (M, K) fp16
//   PRO_F32         x = y_in (M, K) fp32 (the attention output)
//   PRO_ADD_NORM    x_new = x_in + rmsnorm(y_in) * norm_y   (the sandwich norm's residual add)
//                   x = rmsnorm(x_new) * norm_x; block 0 writes x_new to x_out
//   PRO_EMBED_NORM  x_new = embed[token]; x = rmsnorm(x_new) * norm_x; block 0 writes x_out
//                   (PRO_EMBED_NORM_BF16: the table in bf16)
// RMSNorm in fp32 (docs/GLM4.md): v / sqrt(mean(v^2) + eps) * w; the residual stream is fp32.
//
// Epilogues (what y becomes):
//   EPI_STORE   y (M, N) fp32, + bias when given
//   EPI_QKV     + bias; RoPE (partial, interleaved pairs (2i, 2i+1) of the first ROT dims of each
//               q and k head; cos/sin from the fp32 table at the row's position) on q and k;
//               q -> q (M, NH*HD) fp32, k and v -> the layer's KV cache (NKV, max_seq, HD) fp16
//               at that position (the gqa form's layout: K after RoPE, V as projected); with
//               slot_stride, row m into slot m's cache at its own position
//   EPI_SWIGLU  a tile holds gate rows j and up rows I + j: act[j] = silu(gate) * up (fp16)
//   EPI_ARGMAX  logits y (if given) and each row's argmax; every block leaves its best, the
//               last block to finish picks the overall best (first index on ties) into
//               token_out and re-arms the counter

#define W_INT4 0
#define W_F16 1
#define W_F16_KN 2
#define W_INT4_A8 3
#define W_INT4_MMA 4
#define W_F16_KN_MMA 5
#define W_FP8 6
#define W_BF16 7
#define W_INT8 8
#define INT4_FMT(F) ((F) == W_INT4 || (F) == W_INT4_A8 || (F) == W_INT4_MMA)   // the MatMulNBits bytes and scales
#define NBITS_FMT(F) (INT4_FMT(F) || (F) == W_INT8)                             // blocks along K, a scale each
#define SCALED(F) (NBITS_FMT(F) || (F) == W_FP8)                                // weights carry scales
#define PAIRED_X(F) ((F) == W_INT4 || (F) == W_INT4_MMA)   // x staged in the nibbles' pair order

#define PRO_F16 0
#define PRO_F32 1
#define PRO_ADD_NORM 2
#define PRO_EMBED_NORM 3
#define PRO_EMBED_NORM_BF16 4     // PRO_EMBED_NORM from a bf16 embedding table (bf16 exports)
#define EMBED_PRO(P) ((P) == PRO_EMBED_NORM || (P) == PRO_EMBED_NORM_BF16)

#define EPI_STORE 0
#define EPI_QKV 1
#define EPI_SWIGLU 2
#define EPI_ARGMAX 3

struct GemvArgs {
  const void* w;          // weights, the format above
  const h16* scales;      // W_INT4: (N, Kp/BLOCK)
  const h16* bias;        // (N,) or null
  const float* x_in;      // (M, H) residual stream                      PRO_ADD_NORM
  const float* y_in;      // PRO_ADD_NORM: (M, H) sublayer output; PRO_F32: (M, K) input
  const h16* h_in;        // (M, K)                                      PRO_F16
  const h16* norm_y;      // (H,) the sublayer output's own norm         PRO_ADD_NORM
  const h16* norm_x;      // (H,) the norm feeding this GEMV             PRO_ADD_NORM, PRO_EMBED_NORM
  const h16* embed;       // (V, H)                                      PRO_EMBED_NORM
  const int* tokens;      // (M,) ids                                    PRO_EMBED_NORM
  float* x_out;           // (M, H) the new residual stream
  float* y;               // (M, N)                                      EPI_STORE; EPI_ARGMAX (logits, or null)
  h16* act;               // (M, I)                                      EPI_SWIGLU; norm_rows: (M, H)
  float* q;               // (M, NH * HD)                                EPI_QKV
  h16* k_cache;           // (NKV, max_seq, HD)                          EPI_QKV
  h16* v_cache;           // (NKV, max_seq, HD)                          EPI_QKV
  const float* rope;      // (max_seq, ROT/2, 2): cos, sin               EPI_QKV
  const int* pos;         // row m sits at position *pos + pos_add + m   EPI_QKV (slot_stride: pos[m] + pos_add)
  float* part_val;        // (M, gridDim.x) each block's best            EPI_ARGMAX
  int* part_idx;          // (M, gridDim.x)
  unsigned* counter;      // blocks done; zero between launches          EPI_ARGMAX
  int* token_out;         // (M,) the argmax                             EPI_ARGMAX
  float eps;              // RMSNorm epsilon
  int pos_add;            // this step's offset in a burst
  int max_seq;            // positions in the KV cache
  int slot_stride;        // 0: the M rows are one sequence's consecutive positions; else row m is slot m
                          // (batched slots): its own position pos[m] + pos_add, its cache at
                          // k_cache/v_cache + m * slot_stride (h16 elements)
};

// ---- shared memory layout of x ---------------------------------------------------------------
template <int FMT> struct XLayout;
template <> struct XLayout<W_INT4> {
  static constexpr int VALS = 32;     // values per 16-byte weight unit
  static constexpr int XU = 5;        // 16-byte words of staged x per unit (4 + 1 pad)
};
template <> struct XLayout<W_F16> {
  static constexpr int VALS = 8, XU = 1;
};
template <> struct XLayout<W_F16_KN> : XLayout<W_F16> {};
template <> struct XLayout<W_BF16> : XLayout<W_F16> {};
template <> struct XLayout<W_INT8> {
  static constexpr int VALS = 16, XU = 2;   // as W_FP8's: the two words of a unit swizzled (fp8_swizzle)
};
template <> struct XLayout<W_INT4_A8> {
  static constexpr int VALS = 32, XU = 3;
};
template <> struct XLayout<W_INT4_MMA> {
  static constexpr int VALS = 32, XU = 4;   // no pad: the words of a unit swizzled instead (mma_swizzle)
};
template <> struct XLayout<W_FP8> {
  static constexpr int VALS = 16, XU = 2;   // no pad: the two words of a unit swizzled (fp8_swizzle)
};
// W_FP8's staged x: word j (0, 1) of unit u sits at word j ^ fp8_swizzle(u) of the unit. A phase
// of 8 lanes' 16-byte loads covers units u0..u0+7 (32 bytes apart): units 4 apart share banks
// unless one of them is swapped.
DEV int fp8_swizzle(int u) { return (u >> 2) & 1; }
// W_INT4_MMA's staged x: word j of unit u of row m sits at word j ^ mma_swizzle(u, m) of the unit.
// The 8 lanes of a 16-byte shared load phase are (g, c) for two rows g and c = 0..3 (units
// u0 + c, u0 a multiple of 4): units 64 bytes apart put c and c + 2 on the same banks and the two
// rows' units at the same offset (or half a bank row apart); the swizzle gives the 8 lanes 8
// different bank groups. 64 bytes a unit (80 with a pad) let 8 rows of GLM-Z1-9B's 13696-wide x
// fit in shared memory.
DEV int mma_swizzle(int u, int m) { return ((u >> 1) & 1) | ((m & 1) << 1); }

// ---- prologue: x (M, K) into shared memory as fp16 ------------------------------------------
// Vectorized: a thread takes 8 consecutive values at a time (k0 = 8c, c = tid, tid + NT, ...;
// K is a multiple of 8), every global load of a pass issued before any is used (the passes
// are unrolled: NT is the block's thread count, a compile-time constant), so a pass costs one
// round trip to L2, not one per value. The 8 values land as ONE 16-byte word of staged x:
// x_word_at says where, x_word packs them in that word's order.
template <int FMT> DEV int x_word_at(int k0, int m) {   // in uint4 units of xs (row m's own)
  typedef XLayout<FMT> L;
  if (FMT == W_INT4_MMA) return (k0 / 32) * L::XU + (((k0 % 32) / 8) ^ mma_swizzle(k0 / 32, m));
  if (FMT == W_FP8 || FMT == W_INT8) return (k0 / 16) * L::XU + (((k0 % 16) / 8) ^ fp8_swizzle(k0 / 16));
  return PAIRED_X(FMT) ? (k0 / 32) * L::XU + (k0 % 32) / 8 : k0 / 8;
}
template <int FMT> DEV uint4 x_word(const float (&v)[8]) {
  // int4: pairs (s, s + 4) (the nibble order of dot_int4); fp16: in order
  return PAIRED_X(FMT) ? make_uint4(pack_h2(v[0], v[4]), pack_h2(v[1], v[5]), pack_h2(v[2], v[6]), pack_h2(v[3], v[7]))
                       : make_uint4(pack_h2(v[0], v[1]), pack_h2(v[2], v[3]), pack_h2(v[4], v[5]), pack_h2(v[6], v[7]));
}
template <int FMT> DEV uint4 x_word_h(uint4 w) {       // 8 fp16 values in order -> the word's order
  if (!PAIRED_X(FMT)) return w;
  return make_uint4((w.x & 0xffffu) | (w.z << 16), (w.x >> 16) | (w.z & 0xffff0000u),
                    (w.y & 0xffffu) | (w.w << 16), (w.y >> 16) | (w.w & 0xffff0000u));
}
// Write 8 values of x at k0 (a multiple of 8) into staged x row xm, when store. W_INT4_A8
// quantizes per 32 values: the 4 threads holding a unit are 4 neighbouring lanes of one warp
// (k0 = 8 * (tid + i * NT), NT a multiple of 32), and EVERY thread of the block calls this in
// the same pass (store false, values 0 where there is nothing to write) for the shuffles.
template <int FMT> DEV void put8(uint4* xm, int m, int k0, bool store, const float (&v)[8]) {
  if (FMT != W_INT4_A8) {
    if (store) xm[x_word_at<FMT>(k0, m)] = x_word<FMT>(v);
    return;
  }
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const float inv = amax > 1e-30f ? 127.f / amax : 0.f;      // (tinier: all zeros, not inf)
  int q[8], sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) { q[j] = f2i_rn(v[j] * inv); sum += q[j]; }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if (!store) return;
  unsigned* unit = (unsigned*)(xm + (k0 / 32) * XLayout<W_INT4_A8>::XU);
  const int j = (k0 % 32) / 8;
  unit[2 * j] = (q[0] & 0xff) | (q[2] & 0xff) << 8 | (q[4] & 0xff) << 16 | (unsigned)(q[6] & 0xff) << 24;
  unit[2 * j + 1] = (q[1] & 0xff) | (q[3] & 0xff) << 8 | (q[5] & 0xff) << 16 | (unsigned)(q[7] & 0xff) << 24;
  if (j == 0) {
    const float sx = amax / 127.f;
    xm[(k0 / 32) * XLayout<W_INT4_A8>::XU + 2] = make_uint4(__float_as_uint(sx), __float_as_uint(-8.f * sx * (float)sum), 0u, 0u);
  }
}
DEV void load8(const float* p, float (&v)[8]) {
  const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
DEV float2 bf2x2f(unsigned v) { return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u)); }
// the two 16-bit floats of a word as fp32: fp16 (BF false) or bf16 (one shift or mask a value)
template <bool BF> DEV float2 half2f(unsigned v) { return BF ? bf2x2f(v) : h2x2f(v); }
template <bool BF = false> DEV void unpack8(uint4 w, float (&v)[8]) {     // 8 values in order
  const float2 a = half2f<BF>(w.x), b = half2f<BF>(w.y), c = half2f<BF>(w.z), d = half2f<BF>(w.w);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y; v[4] = c.x; v[5] = c.y; v[6] = d.x; v[7] = d.y;
}
DEV void load8(const h16* p, float (&v)[8]) { unpack8(*(const uint4*)p, v); }
DEV void load8_bf16(const h16* p, float (&v)[8]) { unpack8<true>(*(const uint4*)p, v); }

// 1 / rms over the block of the H values its threads hold, 8 per word: word i of thread t holds
// k = 8 (t + i NT) .. + 7 (words past H are not summed)
template <int HW, int NT, int H>
DEV float inv_rms(const float (&v)[HW][8], float* red, float eps) {
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < HW; ++i)
    if (8 * (threadIdx.x + i * NT) < H)
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
  return rsqrtf(block_sum(ss, red) / H + eps);
}

// x_new of row m (this thread's words of it: word i holds k = 8 (t + i NT) .. + 7, fp32) and
// 1 / rms(x_new): the sandwich norm's residual add x_in + rmsnorm(y_in) * norm_y (PRO_ADD_NORM)
// or the embedding row of tokens[m] (PRO_EMBED_NORM). Every thread of the block calls it.
template <class C, int PRO, int NT, int HW>
DEV float residual_row(const GemvArgs& a, int m, float (&v)[HW][8], float* red) {
  constexpr int H = C::H;
  const int tid = threadIdx.x;
  if (PRO == PRO_ADD_NORM) {
    float y[HW][8];
    uint4 nw[HW];                                   // norm_y, fp16 until used
#pragma unroll
    for (int i = 0; i < HW; ++i) {
      const int k0 = 8 * (tid + i * NT);
      if (k0 < H) {
        load8(a.y_in + m * H + k0, y[i]);
        load8(a.x_in + m * H + k0, v[i]);
        nw[i] = *(const uint4*)(a.norm_y + k0);
      }
    }
    const float ry = inv_rms<HW, NT, H>(y, red, a.eps);
#pragma unroll
    for (int i = 0; i < HW; ++i) {
      const h16x2 wp[4] = {nw[i].x, nw[i].y, nw[i].z, nw[i].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = h2x2f(wp[j]);
        v[i][2 * j] += y[i][2 * j] * ry * f.x;
        v[i][2 * j + 1] += y[i][2 * j + 1] * ry * f.y;
      }
    }
  } else {
    const int tok = min(max(a.tokens[m], 0), C::V - 1);   // a bad id reads row 0 or V-1, never past the table
#pragma unroll
    for (int i = 0; i < HW; ++i) {
      const int k0 = 8 * (tid + i * NT);
      if (k0 < H) {
        if (PRO == PRO_EMBED_NORM_BF16) load8_bf16(a.embed + (size_t)tok * H + k0, v[i]);
        else load8(a.embed + (size_t)tok * H + k0, v[i]);
      }
    }
  }
  return inv_rms<HW, NT, H>(v, red, a.eps);
}

template <class C, int FMT, int K, int KP, int M, int PRO, int NT>
DEV void stage_x(const GemvArgs& a, h16* xh, float* red) {
  typedef XLayout<FMT> L;
  constexpr int U = KP / L::VALS, H = C::H;
  static_assert(K % 8 == 0 && KP % 8 == 0, "x is staged 8 values at a time");
  constexpr int CW = KP / 8, PER = (CW + NT - 1) / NT;    // 8-value words per row, per thread
  const int tid = threadIdx.x;
  uint4* xs = (uint4*)xh;
  for (int m = 0; m < M; ++m) {
    uint4* xm = xs + m * U * L::XU;
    if (PRO == PRO_F16) {
      uint4 w[PER];
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int k0 = 8 * (tid + i * NT);
        w[i] = k0 < K ? *(const uint4*)(a.h_in + m * K + k0) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int k0 = 8 * (tid + i * NT);
        if (FMT == W_INT4_A8) {
          float v[8];
          unpack8(w[i], v);                             // zeros past K
          put8<FMT>(xm, m, k0, k0 < KP, v);
        } else if (k0 < KP) {
          xm[x_word_at<FMT>(k0, m)] = x_word_h<FMT>(w[i]);
        }
      }
    } else if (PRO == PRO_F32) {
      float v[PER][8];
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int k0 = 8 * (tid + i * NT);
        if (k0 < K) load8(a.y_in + m * K + k0, v[i]);
        else
#pragma unroll
          for (int j = 0; j < 8; ++j) v[i][j] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < PER; ++i) put8<FMT>(xm, m, 8 * (tid + i * NT), 8 * (tid + i * NT) < KP, v[i]);
    } else {
      static_assert((PRO != PRO_ADD_NORM && !EMBED_PRO(PRO)) || K == C::H,
                    "a fused norm feeds a GEMV over the hidden size");
      static_assert(H % 8 == 0, "the hidden size is staged 8 values at a time");
      constexpr int HW = (H / 8 + NT - 1) / NT;
      float v[HW][8];                                 // x_new, 8 values per word this thread holds
      const float rx = residual_row<C, PRO, NT, HW>(a, m, v, red);
#pragma unroll
      for (int i = 0; i < HW; ++i) {
        const int k0 = 8 * (tid + i * NT);
        float h[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (k0 < H) {
          float nx[8];
          load8(a.norm_x + k0, nx);
          if (blockIdx.x == 0) {
            ((float4*)(a.x_out + m * H + k0))[0] = make_float4(v[i][0], v[i][1], v[i][2], v[i][3]);
            ((float4*)(a.x_out + m * H + k0))[1] = make_float4(v[i][4], v[i][5], v[i][6], v[i][7]);
          }
#pragma unroll
          for (int j = 0; j < 8; ++j) h[j] = v[i][j] * rx * nx[j];
        }
        put8<FMT>(xm, m, k0, k0 < H, h);
      }
      const float zero[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < (KP - H) / 8 / NT + 1; ++i) {   // int4 padding past H (none at real shapes)
        const int k0 = H + 8 * (tid + i * NT);
        put8<FMT>(xm, m, k0, k0 < KP, zero);
      }
    }
  }
}

// ---- the norms of a batched step, once per row ------------------------------------------------
// Batched steps (M > 1 rows) do not fuse the norms into their GEMVs' prologues: every block of
// a GEMV would recompute M rows' norms from L2, one row after another. Block m of this kernel
// computes row m once: x_new -> x_out (fp32), rmsnorm(x_new) * norm_x -> act (M, H) fp16, which
// the GEMVs then stage as PRO_F16.
template <class C, int PRO, int NT>
DEV void norm_rows(const GemvArgs& a) {
  static_assert(PRO == PRO_ADD_NORM || EMBED_PRO(PRO), "a residual add or an embedding row");
  static_assert(C::H % 8 == 0, "the hidden size is handled 8 values at a time");
  constexpr int H = C::H, HW = (H / 8 + NT - 1) / NT;
  __shared__ float red[33];
  const int m = blockIdx.x, tid = threadIdx.x;
  grid_launch_dependents();
  grid_wait();
  float v[HW][8];
  const float rx = residual_row<C, PRO, NT, HW>(a, m, v, red);
#pragma unroll
  for (int i = 0; i < HW; ++i) {
    const int k0 = 8 * (tid + i * NT);
    if (k0 >= H) continue;
    float nx[8];
    load8(a.norm_x + k0, nx);
    ((float4*)(a.x_out + m * H + k0))[0] = make_float4(v[i][0], v[i][1], v[i][2], v[i][3]);
    ((float4*)(a.x_out + m * H + k0))[1] = make_float4(v[i][4], v[i][5], v[i][6], v[i][7]);
    *(uint4*)(a.act + m * H + k0) = make_uint4(pack_h2(v[i][0] * rx * nx[0], v[i][1] * rx * nx[1]),
                                               pack_h2(v[i][2] * rx * nx[2], v[i][3] * rx * nx[3]),
                                               pack_h2(v[i][4] * rx * nx[4], v[i][5] * rx * nx[5]),
                                               pack_h2(v[i][6] * rx * nx[6], v[i][7] * rx * nx[7]));
  }
}

// ---- dot products of one 16-byte weight unit with staged x ----------------------------------
// int4, q - 8 as fp16, exactly, with one shift per word: the nibbles at bits 0 and 16 OR-ed into
// 0x6400's mantissa are 1024 + q (minus 1032: q - 8); those at bits 4 and 20 (masked in place)
// are 1024 + 16 q (times 1/16 minus 72: q - 8); the word shifted by 8 gives the other two pairs.
// HSUM words' products (4 per half, 8 for the pair) are summed in half2, then in fp32.
// The masks and the 1/16 come from constant memory, where LOP3 and HFMA2 read them as operands:
// as immediates, ptxas (sm_90, register-capped by min_blocks 2) rematerialized them into registers
// before almost every use, ~110 MOVs in a step's 924 instructions of the 9B down GEMV's loop.
__constant__ unsigned INT4_MAGIC[3] = {0x000F000Fu, 0x00F000F0u, 0x2C002C00u};   // low mask, high mask, 1/16
template <int HSUM>
DEV float dot_int4(uint4 w, const uint4* xu) {
  static_assert(HSUM == 1 || HSUM == 2 || HSUM == 4, "words per half2 sum: 1, 2 or 4");
  const unsigned words[4] = {w.x, w.y, w.z, w.w};
  float sum = 0.f;
  h16x2 acc = 0u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 xv = xu[j];
    const unsigned lo = words[j], hi = words[j] >> 8;
    const h16x2 q0 = hsub2((lo & INT4_MAGIC[0]) | 0x64006400u, 0x64086408u);
    const h16x2 q1 = hfma2((lo & INT4_MAGIC[1]) | 0x64006400u, INT4_MAGIC[2], 0xD480D480u);   // 1/16, -72
    const h16x2 q2 = hsub2((hi & INT4_MAGIC[0]) | 0x64006400u, 0x64086408u);
    const h16x2 q3 = hfma2((hi & INT4_MAGIC[1]) | 0x64006400u, INT4_MAGIC[2], 0xD480D480u);
    acc = hfma2(q0, xv.x, acc);
    acc = hfma2(q1, xv.y, acc);
    acc = hfma2(q2, xv.z, acc);
    acc = hfma2(q3, xv.w, acc);
    if ((j + 1) % HSUM == 0) {
      const float2 f = h2x2f(acc);
      sum += f.x + f.y;
      acc = 0u;
    }
  }
  return sum;
}

// int4 x int8 (W_INT4_A8): 8 dp4a over the unit's 4 words, then the unit's x scale and the
// -8 offset of the nibbles (both staged with x): sx * sum(n * q) - 8 * sx * sum(q)
DEV float dot_int4_a8(uint4 w, const uint4* xu) {
  const uint4 xa = xu[0], xb = xu[1], meta = xu[2];
  const unsigned words[4] = {w.x, w.y, w.z, w.w}, xq[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  int d = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    d = dp4a_us(words[j] & 0x0F0F0F0Fu, xq[2 * j], d);
    d = dp4a_us((words[j] >> 4) & 0x0F0F0F0Fu, xq[2 * j + 1], d);
  }
  return fmaf(__uint_as_float(meta.x), (float)d, __uint_as_float(meta.y));
}

// int8 (W_INT8): a stored byte b is q + 128; two bytes permuted under 0x64 high bytes are the
// fp16 1024 + b exactly, and times 1/16 minus 72 (one fma, as dot_int4's high nibbles) q / 16
// exactly: products stay as small as int4's (|q / 16| <= 8); the 16 goes into the block's scale.
// Word j of the unit holds values 4j..4j+3: (b0, b1) pair with x's half2 2j, (b2, b3) with 2j + 1
// (staged x swizzled as fp8's: word j of the unit's two at xu[j ^ swz]). A word's products (2 a
// half) are summed in half2, two words' then in fp32 (4 products a half, as dot_int4's hsum 2's 8).
DEV float dot_int8(uint4 w, const uint4* xu, int swz) {
  const uint4 xa = xu[swz], xb = xu[swz ^ 1];
  const unsigned words[4] = {w.x, w.y, w.z, w.w}, xh[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  float sum = 0.f;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    h16x2 acc = 0u;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int j = 2 * p + jj;
      const h16x2 q01 = hfma2(__byte_perm(words[j], 0x64646464u, 0x4140), INT4_MAGIC[2], 0xD480D480u);
      const h16x2 q23 = hfma2(__byte_perm(words[j], 0x64646464u, 0x4342), INT4_MAGIC[2], 0xD480D480u);
      acc = hfma2(q01, xh[2 * j], acc);
      acc = hfma2(q23, xh[2 * j + 1], acc);
    }
    const float2 f = h2x2f(acc);
    sum += f.x + f.y;
  }
  return sum;
}

// fp8 e4m3: a byte's 7 low bits moved to bits 7..13 of an fp16 and its sign to bit 15 give
// the same value times 2^-8 (e4m3's exponent bias 7, fp16's 15; e4m3's subnormals land on
// fp16's subnormals exactly), so two bytes become a half2 in three integer operations and no
// conversion; the 2^8 goes into the row's scale. Products stay small in half2 (|w| <= 1.75
// there, where 448 times a large x could overflow fp16). Word j of the unit holds values
// 4j..4j+3 of the unit: (b0, b1) pair with x's half2 2j, (b2, b3) with 2j + 1. Two words'
// products (4 per half) are summed in half2, then in fp32, as dot_int4's (HSUM = 1): the whole
// unit's 8 per half moved 4 GLM-Z1-9B layers' logits 5.6e-3 from the float reference on the
// H200 (ONNX Runtime's fp8 form: 4.0e-3).
// (e4m3 NaN, 0x7f / 0xff, is never written: the exporter clips to +-448.)
// On sm_89+ the conversion instruction gives the same bits (exact e4m3 -> fp16, then an exact
// multiplication by 2^-8): two instructions a pair instead of three or four.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
DEV h16x2 fp8x2_lo(unsigned w) {
  h16x2 d;
  asm("{.reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n}" : "=r"(d) : "r"(w));
  return hmul2(d, 0x1C001C00u);             // 2^-8
}
DEV h16x2 fp8x2_hi(unsigned w) {
  h16x2 d;
  asm("{.reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n}" : "=r"(d) : "r"(w));
  return hmul2(d, 0x1C001C00u);
}
#else
DEV h16x2 fp8x2_lo(unsigned w) {            // bytes 0, 1 -> (b0, b1) * 2^-8
  const unsigned t = ((w & 0xFFu) << 8) | ((w & 0xFF00u) << 16);
  return (t & 0x80008000u) | ((t >> 1) & 0x3F803F80u);
}
DEV h16x2 fp8x2_hi(unsigned w) {            // bytes 2, 3 -> (b2, b3) * 2^-8
  const unsigned t = ((w >> 8) & 0xFF00u) | (w & 0xFF000000u);
  return (t & 0x80008000u) | ((t >> 1) & 0x3F803F80u);
}
#endif
DEV float dot_fp8(uint4 w, const uint4* xu, int swz) {
  const uint4 xa = xu[swz], xb = xu[swz ^ 1];        // values 0..7, 8..15 of the unit
  const unsigned words[4] = {w.x, w.y, w.z, w.w};
  const h16x2 xp[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 4; j += 2) {                   // 4 products per half in half2, then fp32
    h16x2 acc = hmul2(fp8x2_lo(words[j]), xp[2 * j]);
    acc = hfma2(fp8x2_hi(words[j]), xp[2 * j + 1], acc);
    acc = hfma2(fp8x2_lo(words[j + 1]), xp[2 * j + 2], acc);
    acc = hfma2(fp8x2_hi(words[j + 1]), xp[2 * j + 3], acc);
    const float2 f = h2x2f(acc);
    sum += f.x + f.y;
  }
  return sum;
}

// fp16 (BF false) or bf16 weights: a unit's 8 products with x, in fp32
template <bool BF> DEV float dot_half(uint4 w, const uint4* xu) {
  const uint4 xv = xu[0];
  const unsigned wp[4] = {w.x, w.y, w.z, w.w};
  const h16x2 xp[4] = {xv.x, xv.y, xv.z, xv.w};
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = half2f<BF>(wp[i]), b = h2x2f(xp[i]);
    sum += a.x * b.x + a.y * b.y;
  }
  return sum;
}

// ---- epilogues ---------------------------------------------------------------------------------
// red[lr * M + m]: the tile's results, lr = local row (its row in the weights: row_of below).
// SwiGLU tiles interleave their rows: local row 2j is gate row tile * ROWS / 2 + j and 2j + 1 the
// up row I + tile * ROWS / 2 + j, so a warp owning two neighbouring rows holds a whole pair (as
// QKV's RoPE pairs (2i, 2i + 1)) and can finish them alone (warp_epilogue).
template <int ROWS, int N, int EPI, class C> DEV int row_of(int tile, int lr) {
  if (EPI == EPI_SWIGLU) return (lr % 2 ? C::I : 0) + tile * (ROWS / 2) + lr / 2;
  return tile * ROWS + lr;
}
template <int ROWS, int N, int EPI, class C> DEV bool row_ok(int tile, int lr) {
  if (EPI == EPI_SWIGLU) return tile * (ROWS / 2) + lr / 2 < C::I;
  return tile * ROWS + lr < N;
}
template <int ROWS, int N, int EPI, class C> __host__ __device__ constexpr int tiles() {
  return EPI == EPI_SWIGLU ? (C::I + ROWS / 2 - 1) / (ROWS / 2) : (N + ROWS - 1) / ROWS;
}

// The tile's local rows lr0 .. lr0 + NR - 1 (NR even for QKV and SwiGLU: whole pairs), by threads
// t = 0 .. nt - 1: the whole tile by the block (epilogue) or a warp's own rows by its lanes.
template <int ROWS, int N, int M, int EPI, class C, int NR = ROWS>
DEV void epilogue_rows(const GemvArgs& a, const float* red, int tile, int lr0, int tid, int nt) {
  if (EPI == EPI_STORE) {
    for (int e = tid; e < NR * M; e += nt) {
      const int lr = lr0 + e % NR, m = e / NR, n = row_of<ROWS, N, EPI, C>(tile, lr);
      if (row_ok<ROWS, N, EPI, C>(tile, lr))
        a.y[m * N + n] = red[lr * M + m] + (a.bias ? h2f(a.bias[n]) : 0.f);
    }
  } else if (EPI == EPI_QKV) {
    static_assert(EPI != EPI_QKV || (ROWS % 2 == 0 && NR % 2 == 0 && ROWS % NR == 0), "RoPE pairs stay inside a tile");
    for (int e = tid; e < NR / 2 * M; e += nt) {
      const int lr = lr0 + 2 * (e % (NR / 2)), m = e / (NR / 2), n = row_of<ROWS, N, EPI, C>(tile, lr);
      if (!row_ok<ROWS, N, EPI, C>(tile, lr)) continue;
      float x0 = red[lr * M + m], x1 = red[(lr + 1) * M + m];
      if (a.bias) { x0 += h2f(a.bias[n]); x1 += h2f(a.bias[n + 1]); }
      const int head = n / C::HD, d = n % C::HD;                  // d even
      const int p = a.slot_stride ? a.pos[m] + a.pos_add : *a.pos + a.pos_add + m;
      if (head < C::NH + C::NKV && d < C::ROT) {                  // q or k: rotate the pair
        const float c = a.rope[(p * (C::ROT / 2) + d / 2) * 2], s = a.rope[(p * (C::ROT / 2) + d / 2) * 2 + 1];
        const float r0 = x0 * c - x1 * s, r1 = x1 * c + x0 * s;
        x0 = r0; x1 = r1;
      }
      if (head < C::NH) {
        a.q[m * C::NH * C::HD + n] = x0;
        a.q[m * C::NH * C::HD + n + 1] = x1;
      } else {
        const bool is_k = head < C::NH + C::NKV;
        const int kvh = is_k ? head - C::NH : head - C::NH - C::NKV;
        h16* cache = is_k ? a.k_cache : a.v_cache;
        const size_t at = (size_t)m * a.slot_stride + ((size_t)kvh * a.max_seq + p) * C::HD + d;
        cache[at] = f2h(x0);
        cache[at + 1] = f2h(x1);
      }
    }
  } else if (EPI == EPI_SWIGLU) {
    static_assert(EPI != EPI_SWIGLU || (ROWS % 2 == 0 && NR % 2 == 0 && ROWS % NR == 0), "SwiGLU pairs stay inside a tile");
    for (int e = tid; e < NR / 2 * M; e += nt) {
      const int lr = lr0 + 2 * (e % (NR / 2)), m = e / (NR / 2), j = tile * (ROWS / 2) + lr / 2;
      if (j >= C::I) continue;
      const float g = red[lr * M + m], u = red[(lr + 1) * M + m];
      a.act[m * C::I + j] = f2h(g / (1.f + __expf(-g)) * u);
    }
  }
}

// The whole tile's epilogue by the block (between two __syncthreads); the argmax's running best
// per row of x in best_v / best_i.
template <int ROWS, int N, int M, int EPI, class C>
DEV void epilogue(const GemvArgs& a, const float* red, int tile, float* best_v, int* best_i) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if (EPI != EPI_ARGMAX) {
    epilogue_rows<ROWS, N, M, EPI, C>(a, red, tile, 0, tid, nt);
  } else {
    if (a.y)
      for (int e = tid; e < ROWS * M; e += nt) {
        const int lr = e % ROWS, m = e / ROWS, n = row_of<ROWS, N, EPI, C>(tile, lr);
        if (row_ok<ROWS, N, EPI, C>(tile, lr)) a.y[m * N + n] = red[lr * M + m];
      }
    if (tid < M)
      for (int lr = 0; lr < ROWS; ++lr) {
        const int n = row_of<ROWS, N, EPI, C>(tile, lr);
        if (row_ok<ROWS, N, EPI, C>(tile, lr) && better(red[lr * M + tid], n, best_v[tid], best_i[tid])) {
          best_v[tid] = red[lr * M + tid];
          best_i[tid] = n;
        }
      }
  }
}

// After every tile: each block's best goes to part_*; the last block to finish reduces them.
template <int M>
DEV void argmax_finish(const GemvArgs& a, const float* best_v, const int* best_i) {
  __shared__ int is_last;
  __shared__ float rv[32];
  __shared__ int ri[32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = (blockDim.x + 31) / 32;
  if (tid < M) {
    a.part_val[tid * gridDim.x + blockIdx.x] = best_v[tid];
    a.part_idx[tid * gridDim.x + blockIdx.x] = best_i[tid];
    __threadfence();
  }
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int m = 0; m < M; ++m) {
    float v = __int_as_float(0xff800000);
    int i = 0x7fffffff;
    for (int b = tid; b < (int)gridDim.x; b += blockDim.x) {
      const float bv = load_l2(a.part_val + m * gridDim.x + b);
      const int bi = load_l2(a.part_idx + m * gridDim.x + b);
      if (better(bv, bi, v, i)) { v = bv; i = bi; }
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, i, o);
      if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
    if (lane == 0) { rv[warp] = v; ri[warp] = i; }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < warps; ++w)
        if (better(rv[w], ri[w], v, i)) { v = rv[w]; i = ri[w]; }
      a.token_out[m] = i;
    }
    __syncthreads();
  }
  if (tid == 0) *a.counter = 0u;
}

// A tile's results red[lr * M + m] summed over PARTS partial sums (warps that split K) laid out
// part[p * ROWS * M + lr * M + m]; the caller synchronizes before and after.
template <int PARTS, int ROWS, int M>
DEV void sum_parts(const float* part, float* red) {
  for (int e = threadIdx.x; e < ROWS * M; e += blockDim.x) {
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < PARTS; ++p) v += part[p * ROWS * M + e];
    red[e] = v;
  }
}

// ---- the GEMV on the NK formats (W_INT4, W_F16, W_FP8, W_BF16, W_INT4_A8, W_INT8) ----------------
// Where the weights wait between their load and their arithmetic (STAGES):
//   0   two register stages: a step's loads are issued before the previous step's arithmetic, so a
//       warp has one step (UNROLL * RPW units a lane) in flight while it computes.
//   S   a ring of S stages in shared memory filled by cp.async (sm_80+): a warp keeps S - 1 steps
//       in flight, issuing the next as soon as one is consumed, and no registers hold them. Each
//       lane copies its own units (and the 4-byte word holding each unit's scale) into its own
//       slots and reads back only those: no barrier, a cp_async_wait per step. A block's work is
//       a run of items (tile, step) = (blockIdx.x + (i / STEPS) gridDim.x, i % STEPS).
template <int FMT, int BLOCK, int UNROLL, int RPW> struct Stage {
  uint4 w[UNROLL][RPW];
  float s[UNROLL][RPW];
};
template <int UNROLL, int RPW, bool SC> struct RingSlot {     // one warp's stage: lane l's units at [..][l]
  uint4 w[UNROLL][RPW][32];
  unsigned s[UNROLL][RPW][32];                       // the 32-bit word holding the unit's fp16 scale
};
template <int UNROLL, int RPW> struct RingSlot<UNROLL, RPW, false> {   // formats without scales
  uint4 w[UNROLL][RPW][32];
};

template <class C, int FMT, int BLOCK, int K, int N, int M, int WARPS, int RPW, int UNROLL, int PRO, int EPI,
          int HSUM = 1, int STAGES = 0>
DEV void gemv_nk(const GemvArgs& a) {
  typedef XLayout<FMT> L;
  constexpr int KP = NBITS_FMT(FMT) ? (K + BLOCK - 1) / BLOCK * BLOCK : K;
  constexpr int KB = NBITS_FMT(FMT) ? KP / BLOCK : 1;         // scales per row (fp8: one)
  constexpr int U = KP / L::VALS;                             // units per row
  constexpr int ROWS = WARPS * RPW;
  constexpr int TILES = tiles<ROWS, N, EPI, C>();
  constexpr int STEPS = (U + 32 * UNROLL - 1) / (32 * UNROLL);  // per tile
  static_assert((FMT != W_F16 && FMT != W_BF16) || K % 8 == 0, "fp16 and bf16 rows are read in 8-value units");
  static_assert(FMT != W_FP8 || K % 16 == 0, "fp8 rows are read in 16-value units");
  static_assert(!NBITS_FMT(FMT) || BLOCK % 32 == 0, "MatMulNBits blocks of 32 values or more");
  static_assert(FMT != W_INT8 || K % BLOCK == 0, "int8 rows of whole blocks (no padding to stage)");
  static_assert(EPI != EPI_SWIGLU || ROWS % 2 == 0, "SwiGLU pairs gate and up rows in a tile");
  static_assert(STAGES == 0 || STAGES >= 2, "the shared-memory ring holds 2 stages or more");
  // the ring copies scales as 32-bit words (pairs): their count must be even, or the last word
  // would reach past the array
  static_assert(STAGES == 0 || !SCALED(FMT) || (FMT == W_FP8 ? N : N * KB) % 2 == 0,
                "the shared-memory ring reads the scales in pairs: an even count of them");
  // A warp finishes its own rows where they hold whole pairs (QKV's RoPE pairs, SwiGLU's gate and
  // up: RPW even) or need none (store): no block barrier per tile. The argmax reduces over the block.
  constexpr bool WARP_EPI = EPI != EPI_ARGMAX && (EPI == EPI_STORE || RPW % 2 == 0);

  DYN_SMEM(uint4, xs);                      // (M, U, XU) staged x, then (STAGES > 0) the warps' rings
  __shared__ float red[ROWS * M > 33 ? ROWS * M : 33];
  __shared__ float best_v[M];
  __shared__ int best_i[M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint4* W = (const uint4*)a.w;

  // where row r of the warp's tile reads unit uu of a step: its row, unit, and whether it exists
  auto unit_of = [&](int tile, int step, int uu, int r, int& row, int& u) -> bool {
    const int lr = warp * RPW + r;
    u = (step * UNROLL + uu) * 32 + lane;
    row = row_of<ROWS, N, EPI, C>(tile, lr);
    return u < U && row_ok<ROWS, N, EPI, C>(tile, lr);
  };
  // the index of a unit's scale in a.scales (fp8: one per row)
  auto scale_at = [&](int row, int u) -> size_t {
    return FMT == W_FP8 ? (size_t)row : (size_t)row * KB + u * L::VALS / BLOCK;
  };
  // dot_fp8's 2^-8 and dot_int8's 1/16 undone
  auto scale_of = [&](h16 h) -> float { return FMT == W_FP8 ? 256.f * h2f(h) : FMT == W_INT8 ? 16.f * h2f(h) : h2f(h); };

  float acc[RPW][M];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  // one step's arithmetic on its units w and their scales s (a lambda with no auto parameters:
  // NVRTC 12 takes a generic lambda in device code for a host function)
  auto mac = [&](int step, const uint4 (&w)[UNROLL][RPW], const float (&s)[UNROLL][RPW]) {
#pragma unroll
    for (int uu = 0; uu < UNROLL; ++uu) {
      const int u = (step * UNROLL + uu) * 32 + lane;
      if (u >= U) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4* xu = xs + (m * U + u) * L::XU;
#pragma unroll
        for (int r = 0; r < RPW; ++r)
          acc[r][m] += (FMT == W_INT4 ? dot_int4<HSUM>(w[uu][r], xu)
                        : FMT == W_INT4_A8 ? dot_int4_a8(w[uu][r], xu)
                        : FMT == W_INT8 ? dot_int8(w[uu][r], xu, fp8_swizzle(u))
                        : FMT == W_FP8 ? dot_fp8(w[uu][r], xu, fp8_swizzle(u))
                        : dot_half<FMT == W_BF16>(w[uu][r], xu)) * s[uu][r];
      }
    }
  };
  // after a tile's last step: reduce its rows, then their epilogue
  auto finish = [&](int tile) {
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float v = warp_sum(acc[r][m]);
        if (lane == 0) red[(warp * RPW + r) * M + m] = v;
        acc[r][m] = 0.f;
      }
    if constexpr (WARP_EPI) {               // the warp's own rows, no barrier for the block
      __syncwarp();
      epilogue_rows<ROWS, N, M, EPI, C, (WARP_EPI ? RPW : ROWS)>(a, red, tile, warp * RPW, lane, 32);
      __syncwarp();                         // its red slots are rewritten at its next tile
    } else {
      __syncthreads();
      epilogue<ROWS, N, M, EPI, C>(a, red, tile, best_v, best_i);
      __syncthreads();
    }
  };
  auto begin = [&]() {                      // after the first loads are issued: x staged
    grid_launch_dependents();
    grid_wait();                            // from here on: what other kernels write
    if (threadIdx.x < M) { best_v[threadIdx.x] = __int_as_float(0xff800000); best_i[threadIdx.x] = 0x7fffffff; }
    stage_x<C, FMT, K, KP, M, PRO, WARPS * 32>(a, (h16*)xs, red);
    __syncthreads();
  };

  if constexpr (STAGES == 0) {
    // (the same addressing as unit_of / scale_at, written out: through those lambdas ptxas gave the
    // 9B down GEMV's loop 5% more instructions, sm_90)
    auto load = [&](Stage<FMT, BLOCK, UNROLL, RPW>& st, int tile, int step) {
#pragma unroll
      for (int uu = 0; uu < UNROLL; ++uu) {
        const int u = (step * UNROLL + uu) * 32 + lane;
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const int lr = warp * RPW + r;
          const bool ok = u < U && row_ok<ROWS, N, EPI, C>(tile, lr);
          const int row = row_of<ROWS, N, EPI, C>(tile, lr);
          st.w[uu][r] = ok ? load_stream(W + (size_t)row * U + u) : make_uint4(0u, 0u, 0u, 0u);
          st.s[uu][r] = !SCALED(FMT) || !ok ? 1.f
                        : FMT == W_FP8 ? 256.f * h2f(a.scales[row])          // dot_fp8's 2^-8 undone
                        : (FMT == W_INT8 ? 16.f : 1.f)                        // dot_int8's 1/16 undone
                          * h2f(a.scales[(size_t)row * KB + u * L::VALS / BLOCK]);
        }
      }
    };
    Stage<FMT, BLOCK, UNROLL, RPW> cur, nxt;
    int tile = blockIdx.x, step = 0;
    load(cur, tile, 0);                     // in flight while x is staged (and the previous kernel ends)
    begin();
    auto advance = [&](const Stage<FMT, BLOCK, UNROLL, RPW>& cur, Stage<FMT, BLOCK, UNROLL, RPW>& nxt) -> bool {
      int nt = tile, ns = step + 1;
      if (ns == STEPS) { ns = 0; nt += gridDim.x; }
      const bool more = nt < TILES;
      if (more) load(nxt, nt, ns);
      mac(step, cur.w, cur.s);
      if (step == STEPS - 1) finish(tile);
      tile = nt;
      step = ns;
      return more;
    };
    // two steps an iteration, the stages swapping roles: no register copies of a stage
    while (advance(cur, nxt) && advance(nxt, cur)) {}
  } else {
    typedef RingSlot<UNROLL, RPW, SCALED(FMT)> Slot;
    Slot* ring = (Slot*)(xs + M * U * L::XU) + warp * STAGES;
    const int items = ((TILES - 1 - (int)blockIdx.x) / (int)gridDim.x + 1) * STEPS;
    auto slot = [&](int i) -> Slot& { return ring[i % STAGES]; };   // item i's stage
    auto issue = [&](int i) {               // item i into its slot: one commit group per item (empty past the end)
      if (i < items) {
        const int tile = blockIdx.x + i / STEPS * gridDim.x, step = i % STEPS;
        Slot& sl = slot(i);
#pragma unroll
        for (int uu = 0; uu < UNROLL; ++uu)
#pragma unroll
          for (int r = 0; r < RPW; ++r) {
            int row, u;
            const bool ok = unit_of(tile, step, uu, r, row, u);   // else zeros: weights and scale 0
            cp_async16(&sl.w[uu][r][lane], ok ? (const void*)(W + (size_t)row * U + u) : (const void*)W, ok ? 16 : 0);
            if constexpr (SCALED(FMT))
              cp_async4(&sl.s[uu][r][lane], ok ? (const void*)(a.scales + (scale_at(row, u) & ~(size_t)1)) : (const void*)a.scales,
                        ok ? 4 : 0);
          }
      }
      cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(i);   // in flight while x is staged
    begin();
    for (int i = 0; i < items; ++i) {
      issue(i + STAGES - 1);                // into the slot item i - 1 left (its reads are done)
      cp_async_wait<STAGES - 1>();          // item i has landed
      const int tile = blockIdx.x + i / STEPS * gridDim.x, step = i % STEPS;
      const Slot& sl = slot(i);
      uint4 w[UNROLL][RPW];
      float sc[UNROLL][RPW];
#pragma unroll
      for (int uu = 0; uu < UNROLL; ++uu)
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          int row, u;
          unit_of(tile, step, uu, r, row, u);
          w[uu][r] = sl.w[uu][r][lane];
          if constexpr (SCALED(FMT)) sc[uu][r] = scale_of((h16)(sl.s[uu][r][lane] >> (16 * (scale_at(row, u) & 1))));
          else sc[uu][r] = 1.f;
        }
      mac(step, w, sc);
      if (step == STEPS - 1) finish(tile);
    }
  }
  if (EPI == EPI_ARGMAX) argmax_finish<M>(a, best_v, best_i);
}

// ---- the int4 GEMV on the tensor cores (W_INT4_MMA) --------------------------------------------
// One 32-bit word of a row's weights -> its 8 values (q - 8) * s as 4 half2, in the staged x's
// pair order (pair s = nibbles at bits 4s and 16 + 4s: k = 8j + s and 8j + s + 4 of word j):
// q - 8 exactly (dot_int4's magic numbers), then one rounding of the product with the scale.
DEV void dequant_word(unsigned w, h16x2 s2, h16x2 (&p)[4]) {
  const unsigned hi = w >> 8;
  p[0] = hmul2(hsub2((w & INT4_MAGIC[0]) | 0x64006400u, 0x64086408u), s2);
  p[1] = hmul2(hfma2((w & INT4_MAGIC[1]) | 0x64006400u, INT4_MAGIC[2], 0xD480D480u), s2);
  p[2] = hmul2(hsub2((hi & INT4_MAGIC[0]) | 0x64006400u, 0x64086408u), s2);
  p[3] = hmul2(hfma2((hi & INT4_MAGIC[1]) | 0x64006400u, INT4_MAGIC[2], 0xD480D480u), s2);
}

// Work split: a warp owns 16 output rows (the mma's M) and KSPLIT warps share them, each taking
// every KSPLIT-th chunk of the row's units; a tile is ROWS = 16 * WARPS / KSPLIT rows. Lane
// l = 4 g + c loads the same unit (16 bytes: 32 values of one scale block) of rows g and g + 8:
// units 4 uu + c of the warp's chunk, so 4 lanes read 64 contiguous bytes of a row. The mma's
// k is any order both operands agree on: a lane's A registers are pairs of its own unit (rows g,
// g + 8), and the B registers of lane (g, c) are the same pairs of staged x, row g (x row g: the
// batch's column g; rows past M read as zeros). So every weight is dequantized once, scaled in
// fp16 (each lane's unit has its own scale, so the scale cannot wait until after the sum), and
// 8 words of a lane (rows g, g + 8) feed 8 mma: 2 per word pair. The fp32 sums stay in the
// mma's accumulators over the whole row; the KSPLIT warps of a row group add theirs in shared
// memory, and the tile's results take the same epilogues as gemv_nk (red[lr * M + m]).
template <class C, int BLOCK, int K, int N, int M, int WARPS, int KSPLIT, int UNROLL, int PRO, int EPI>
DEV void gemv_mma(const GemvArgs& a) {
  typedef XLayout<W_INT4_MMA> L;
  constexpr int KP = (K + BLOCK - 1) / BLOCK * BLOCK, KB = KP / BLOCK, U = KP / 32;
  constexpr int ROWS = 16 * (WARPS / KSPLIT);
  constexpr int TILES = tiles<ROWS, N, EPI, C>();
  constexpr int CHUNK = 4 * UNROLL;                            // units of a row per warp step
  constexpr int STEPS = (U + CHUNK * KSPLIT - 1) / (CHUNK * KSPLIT);
  static_assert(M >= 1 && M <= 8, "the mma's N is 8: 1 to 8 rows of x");
  static_assert(WARPS % KSPLIT == 0, "the warps split into whole row groups");
  static_assert(BLOCK % 32 == 0, "int4 blocks of 32 values or more");
  static_assert(EPI != EPI_SWIGLU || ROWS % 2 == 0, "SwiGLU pairs gate and up rows in a tile");

  DYN_SMEM(uint4, xs);                      // (M, U, XU) staged x
  __shared__ float red[ROWS * M > 33 ? ROWS * M : 33];
  __shared__ float part[KSPLIT > 1 ? KSPLIT * ROWS * M : 1];
  __shared__ float best_v[M];
  __shared__ int best_i[M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4, grp = warp / KSPLIT, ks = warp % KSPLIT;
  const uint4* W = (const uint4*)a.w;

  struct Stage { uint4 w[UNROLL][2]; unsigned s[UNROLL][2]; };
  auto load = [&](Stage& st, int tile, int step) {
#pragma unroll
    for (int uu = 0; uu < UNROLL; ++uu) {
      const int u = (step * KSPLIT + ks) * CHUNK + 4 * uu + c;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lr = grp * 16 + g + 8 * r;
        const bool ok = u < U && row_ok<ROWS, N, EPI, C>(tile, lr);
        const int row = row_of<ROWS, N, EPI, C>(tile, lr);
        st.w[uu][r] = ok ? load_stream(W + (size_t)row * U + u) : make_uint4(0u, 0u, 0u, 0u);
        st.s[uu][r] = ok ? (unsigned)a.scales[(size_t)row * KB + u * 32 / BLOCK] : 0u;   // 0: adds nothing
      }
    }
  };

  Stage cur, nxt;
  int tile = blockIdx.x, step = 0;
  load(cur, tile, 0);                       // in flight while x is staged (and the previous kernel ends)
  grid_launch_dependents();
  grid_wait();
  if (threadIdx.x < M) { best_v[threadIdx.x] = __int_as_float(0xff800000); best_i[threadIdx.x] = 0x7fffffff; }
  stage_x<C, W_INT4_MMA, K, KP, M, PRO, WARPS * 32>(a, (h16*)xs, red);
  __syncthreads();

  float d[4] = {0.f, 0.f, 0.f, 0.f};
  while (true) {
    int nt = tile, ns = step + 1;
    if (ns == STEPS) { ns = 0; nt += gridDim.x; }
    const bool more = nt < TILES;
    if (more) load(nxt, nt, ns);
#pragma unroll
    for (int uu = 0; uu < UNROLL; ++uu) {
      const int u0 = (step * KSPLIT + ks) * CHUNK + 4 * uu;   // the warp's first unit: uniform
      if (u0 >= U) break;
      const int u = u0 + c;
      const bool xok = u < U && g < M;                         // else B is zero (never NaN x 0)
      const uint4* xu = xs + (g * U + u) * L::XU;
      const int sw = mma_swizzle(u, g);
      const h16x2 s0 = cur.s[uu][0] | cur.s[uu][0] << 16, s1 = cur.s[uu][1] | cur.s[uu][1] << 16;
      const unsigned w0[4] = {cur.w[uu][0].x, cur.w[uu][0].y, cur.w[uu][0].z, cur.w[uu][0].w};
      const unsigned w1[4] = {cur.w[uu][1].x, cur.w[uu][1].y, cur.w[uu][1].z, cur.w[uu][1].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        h16x2 p0[4], p1[4];
        dequant_word(w0[j], s0, p0);
        dequant_word(w1[j], s1, p1);
        const uint4 xv = xok ? xu[j ^ sw] : make_uint4(0u, 0u, 0u, 0u);
        const h16x2 a01[4] = {p0[0], p1[0], p0[1], p1[1]}, a23[4] = {p0[2], p1[2], p0[3], p1[3]};
        mma_16816(d, a01, xv.x, xv.y);
        mma_16816(d, a23, xv.z, xv.w);
      }
    }
    if (step == STEPS - 1) {                // the tile is done: rows g, g + 8 of the group, x rows 2c, 2c + 1
      float* dst = KSPLIT > 1 ? part + ks * ROWS * M : red;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 2 * c + (i & 1), lr = grp * 16 + g + 8 * (i >> 1);
        if (m < M) dst[lr * M + m] = d[i];
        d[i] = 0.f;
      }
      __syncthreads();
      if (KSPLIT > 1) {
        sum_parts<KSPLIT, ROWS, M>(part, red);
        __syncthreads();
      }
      epilogue<ROWS, N, M, EPI, C>(a, red, tile, best_v, best_i);
      __syncthreads();
    }
    if (!more) break;
    cur = nxt;
    tile = nt;
    step = ns;
  }
  if (EPI == EPI_ARGMAX) argmax_finish<M>(a, best_v, best_i);
}

// ---- the GEMV on W^T (K, N) fp16 ----------------------------------------------------------------
// A tile is 256 columns: lane l reads the 16 bytes of columns 8l..8l+7 of a row k; warp w takes
// rows k = w, w + WARPS, ... (UNROLL rows in flight), the warps' sums meet in shared memory.
template <class C, int K, int N, int M, int WARPS, int UNROLL, int PRO, int EPI>
DEV void gemv_kn(const GemvArgs& a) {
  constexpr int ROWS = 256;
  constexpr int TILES = (N + ROWS - 1) / ROWS;
  static_assert(N % 8 == 0 && K % 8 == 0, "fp16 rows are read in 8-value units");
  static_assert(EPI == EPI_STORE || EPI == EPI_ARGMAX, "W^T tiles are columns: store or argmax");
  DYN_SMEM(uint4, xs);                      // (M, K) fp16 x, then (WARPS, 256, M) fp32 sums
  float* part = (float*)(xs + M * K / 8);
  __shared__ float red[ROWS * M];
  __shared__ float best_v[M];
  __shared__ int best_i[M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint4* W = (const uint4*)a.w;
  const h16* xh = (const h16*)xs;

  grid_launch_dependents();
  grid_wait();
  if (threadIdx.x < M) { best_v[threadIdx.x] = __int_as_float(0xff800000); best_i[threadIdx.x] = 0x7fffffff; }
  stage_x<C, W_F16_KN, K, K, M, PRO, WARPS * 32>(a, (h16*)xs, red);
  __syncthreads();
  for (int tile = blockIdx.x; tile < TILES; tile += gridDim.x) {
    const int col = tile * ROWS + lane * 8;
    const bool ok = col < N;
    float acc[8][M];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[i][m] = 0.f;
    for (int k0 = warp; k0 < K; k0 += WARPS * UNROLL) {
      uint4 w[UNROLL];
#pragma unroll
      for (int uu = 0; uu < UNROLL; ++uu) {
        const int k = k0 + uu * WARPS;
        w[uu] = ok && k < K ? load_stream(W + ((size_t)k * N + col) / 8) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int uu = 0; uu < UNROLL; ++uu) {
        const int k = k0 + uu * WARPS;
        if (k >= K) break;
        const h16x2 wp[4] = {w[uu].x, w[uu].y, w[uu].z, w[uu].w};
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float xv = h2f(xh[m * K + k]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = h2x2f(wp[i]);
            acc[2 * i][m] += f.x * xv;
            acc[2 * i + 1][m] += f.y * xv;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int m = 0; m < M; ++m) part[(warp * ROWS + lane * 8 + i) * M + m] = acc[i][m];
    __syncthreads();
    sum_parts<WARPS, ROWS, M>(part, red);
    __syncthreads();
    epilogue<ROWS, N, M, EPI, C>(a, red, tile, best_v, best_i);
    __syncthreads();
  }
  if (EPI == EPI_ARGMAX) argmax_finish<M>(a, best_v, best_i);
}

// ---- the GEMV on W^T (K, N) fp16 on the tensor cores (W_F16_KN_MMA) -------------------------------
// A batched step's lm_head: on the CUDA cores 8 rows of x take 64 fp32 FMAs a 16-byte load of W^T,
// twice the time of one row. Here the mma's A is x (rows g < M of the 16; the others zero) and
// its B 16 k x 8 columns of W^T: lane (g, c) loads W^T rows k0 + g and k0 + 8 + g, columns
// n0 + 8c .. + 7 (16 bytes each: 4 lanes read 64 contiguous bytes of a row), and word j of those
// loads is its part of an 8 x 8 block whose columns are n0 + 8c' + 2j + {0, 1} (c' = 0..3):
// movmatrix's transpose turns it into B's fragment for those 8 columns, in that order. So a
// k-step of 16 feeds 4 mma covering 32 columns, and lane (g, c) ends with row g's results for
// columns n0 + 8c + 2j + {0, 1}. All WARPS warps of a block share one tile of 32 columns, each
// taking every WARPS-th k-step, and add their sums in shared memory; the epilogues are
// gemv_nk's (store, argmax).
template <class C, int K, int N, int M, int WARPS, int UNROLL, int PRO, int EPI>
DEV void gemv_kn_mma(const GemvArgs& a) {
  constexpr int ROWS = 32;                          // output columns a tile
  constexpr int TILES = (N + ROWS - 1) / ROWS;
  constexpr int STEPS = K / 16;                     // k-steps of the whole row
  static_assert(M >= 1 && M <= 8, "the mma's rows: 1 to 8 rows of x");
  static_assert(K % 16 == 0 && N % 8 == 0, "W^T in whole k-steps of 16 and 8-column words");
  static_assert(EPI == EPI_STORE || EPI == EPI_ARGMAX, "W^T tiles are columns: store or argmax");
  DYN_SMEM(uint4, xs);                              // (M, K) fp16 x in order
  __shared__ float red[ROWS * M > 33 ? ROWS * M : 33];
  __shared__ float part[WARPS * ROWS * M];
  __shared__ float best_v[M];
  __shared__ int best_i[M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const uint4* W = (const uint4*)a.w;
  const h16* xh = (const h16*)xs;

  grid_launch_dependents();
  grid_wait();
  if (threadIdx.x < M) { best_v[threadIdx.x] = __int_as_float(0xff800000); best_i[threadIdx.x] = 0x7fffffff; }
  stage_x<C, W_F16_KN, K, K, M, PRO, WARPS * 32>(a, (h16*)xs, red);
  __syncthreads();
  for (int tile = blockIdx.x; tile < TILES; tile += gridDim.x) {
    const int col = tile * ROWS + 8 * c;            // this lane's 8 columns
    const bool ok = col < N;
    float d[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) d[j][i] = 0.f;
    for (int s0 = warp; s0 < STEPS; s0 += WARPS * UNROLL) {
      uint4 w[UNROLL][2];
#pragma unroll
      for (int uu = 0; uu < UNROLL; ++uu) {         // every load of the group in flight
        const int k0 = 16 * (s0 + uu * WARPS);
        const bool in = ok && k0 < K;
        w[uu][0] = in ? load_stream(W + ((size_t)(k0 + g) * N + col) / 8) : make_uint4(0u, 0u, 0u, 0u);
        w[uu][1] = in ? load_stream(W + ((size_t)(k0 + 8 + g) * N + col) / 8) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int uu = 0; uu < UNROLL; ++uu) {
        const int k0 = 16 * (s0 + uu * WARPS);
        if (k0 >= K) break;                         // uniform: the warp's k-step
        const bool xr = g < M;
        const h16x2 x0 = xr ? *(const h16x2*)(xh + g * K + k0 + 2 * c) : 0u;
        const h16x2 x1 = xr ? *(const h16x2*)(xh + g * K + k0 + 8 + 2 * c) : 0u;
        const h16x2 ax[4] = {x0, 0u, x1, 0u};
        const unsigned lo[4] = {w[uu][0].x, w[uu][0].y, w[uu][0].z, w[uu][0].w};
        const unsigned hi[4] = {w[uu][1].x, w[uu][1].y, w[uu][1].z, w[uu][1].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816(d[j], ax, movmatrix_t(lo[j]), movmatrix_t(hi[j]));
      }
    }
    // lane (g, c): x row g, columns 8c + 2j + {0, 1} of the tile
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (g < M) part[(warp * ROWS + 8 * c + 2 * j + e) * M + g] = d[j][e];
    __syncthreads();
    sum_parts<WARPS, ROWS, M>(part, red);
    __syncthreads();
    epilogue<ROWS, N, M, EPI, C>(a, red, tile, best_v, best_i);
    __syncthreads();
  }
  if (EPI == EPI_ARGMAX) argmax_finish<M>(a, best_v, best_i);
}
