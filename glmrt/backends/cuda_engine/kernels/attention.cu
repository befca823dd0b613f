// Decode attention over the KV cache, one new token (M = 1), grouped-query, split over the
// context at every length ("flash decoding").
//
// attention: grid (NKV * G / HPB, splits), THREADS threads. Block (x, s) serves KV head
// h = x / (G / HPB) and HPB of the G = NH / NKV query heads it feeds (query heads
// h * G + (x % (G / HPB)) * HPB + 0 .. HPB-1), over positions [s * chunk, min(len, (s + 1) * chunk))
// of the cache, TILE positions at a time:
//   load     the tile's K and V rows (16-byte words, coalesced) into shared memory; the next
//            tile's words are loaded into registers while this one is computed
//   scores   HPB x TILE dot products (fp32, queries pre-scaled by HD^-0.5), a thread each
//   softmax  online per query head: running max m and sum l, earlier sums rescaled
//   values   each thread owns (head, dim) outputs: sum over the tile of p * V[t, d]
// The blocks of one KV head's query groups read the same K/V rows at about the same time
// (adjacent blockIdx.x): DRAM once, L2 for the rest.
// chunk = max(a.chunk, TILE-rounded len / splits): short contexts use a few splits of a.chunk
// positions, long ones spread over all `splits`; splits past the sequence return at once.
// With one split in use (len <= a.chunk) the block writes the output itself; with more, each
// leaves its unnormalized (o, m, l) per query head and the last of a query group's splits to
// finish (a counter per blockIdx.x) merges them:
//   out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,  M = max_s m_s,
// and re-arms the counter. One launch per layer, whatever the context.
// len = *pos + pos_add + 1: the cache already holds this token's K and V (the QKV epilogue
// wrote them). Cache layout (NKV, max_seq, HD) fp16 per layer, K after RoPE (the gqa form's).
// Query head j is served by KV head j / G (transformers' repeat_interleave).
// Batched slots (slot_stride != 0): the grid's z is the row m; row m is slot m, its query at
// q + m * NH * HD, its cache at k_cache/v_cache + m * slot_stride, its length pos[m] + pos_add + 1,
// its partials, output and counters a row of their own.

struct AttnArgs {
  const float* q;         // (NH * HD) after RoPE
  const h16* k_cache;     // (NKV, max_seq, HD)
  const h16* v_cache;     // (NKV, max_seq, HD)
  const int* pos;         // the token's position = *pos + pos_add
  float* part_o;          // (NH, splits, HD) unnormalized outputs
  float* part_ml;         // (NH, splits, 2) running max and sum
  float* out;             // (NH * HD) fp32
  unsigned* counter;      // (NKV * G / HPB,) splits done; zero between launches
  int pos_add;
  int max_seq;
  int chunk;              // the fewest positions per split, a multiple of TILE
  int splits;             // the attention grid's y, at most ATT_MAX_SPLITS
  int slot_stride;        // 0: one sequence; else rows (grid z) are slots this many h16 apart
  int pad_;
};

#define ATT_MAX_SPLITS 128

// The positions split s of a context of len takes: [s * chunk, min(len, (s + 1) * chunk)) with
// chunk = max(a.chunk, len / splits rounded up to whole tiles); splits past len have none. Every
// attention kernel (and the spread merge, counting the splits in use) takes it from here.
template <int TILE> DEV int att_chunk(const AttnArgs& a, int len) {
  const int per = (len + a.splits - 1) / a.splits;
  return max(a.chunk, (per + TILE - 1) / TILE * TILE);
}

template <int HD, int G, int HPB, int THREADS, int TILE>
DEV void attention(const AttnArgs& a) {
  static_assert(HD % 8 == 0 && THREADS % 32 == 0 && TILE % 32 == 0, "head_dim: a multiple of 8; whole warps");
  static_assert(G % HPB == 0, "query heads per block divide the group");
  constexpr int QG = G / HPB;                // query groups per KV head
  constexpr int RW = HD / 8;                 // 16-byte words per K or V row
  constexpr int TW = TILE * RW;              // words per tile, K or V
  constexpr int LPT = (TW + THREADS - 1) / THREADS;
  constexpr int OUT = (HPB * HD + THREADS - 1) / THREADS;   // outputs per thread
  constexpr int WARPS = THREADS / 32;
  __shared__ __align__(16) float qs[HPB][HD];        // queries, pre-scaled
  __shared__ __align__(16) uint4 ks[TILE][RW + 1];   // K rows, padded: lanes on different rows hit different banks
  __shared__ __align__(16) uint4 vs[TILE * RW];      // V rows; the merge's weights afterwards
  __shared__ __align__(16) float sc[HPB][TILE];      // scores, then probabilities
  __shared__ float m_s[HPB], l_s[HPB], corr_s[HPB], den_s[HPB];
  static_assert(HPB * ATT_MAX_SPLITS * 4 <= TILE * RW * 16, "the merge weights fit where V was");
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int h = blockIdx.x / QG, head0 = h * G + (blockIdx.x % QG) * HPB, split = blockIdx.y;
  const int row = blockIdx.z, rh = row * gridDim.x * HPB;   // rh: the row's first query head (NH a row)
  const int len = (a.slot_stride ? a.pos[row] : *a.pos) + a.pos_add + 1;
  const int chunk = att_chunk<TILE>(a, len);
  const int t0 = split * chunk;
  grid_launch_dependents();
  if (t0 >= len) return;                     // the whole block: nothing to read here (pos is the host's)
  grid_wait();                               // q and this token's K, V: the previous kernel's
  const int t1 = min(len, t0 + chunk);
  const uint4* kbase = (const uint4*)(a.k_cache + (size_t)row * a.slot_stride + (size_t)h * a.max_seq * HD);
  const uint4* vbase = (const uint4*)(a.v_cache + (size_t)row * a.slot_stride + (size_t)h * a.max_seq * HD);

  uint4 kr[LPT], vr[LPT];
  auto load = [&](int tt) {                  // the tile at tt into registers (zeros past t1)
#pragma unroll
    for (int i = 0; i < LPT; ++i) {
      const int w = tid + i * THREADS, t = tt + w / RW;
      const bool ok = w < TW && t < t1;
      kr[i] = ok ? kbase[(size_t)t * RW + w % RW] : make_uint4(0u, 0u, 0u, 0u);
      vr[i] = ok ? vbase[(size_t)t * RW + w % RW] : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load(t0);
  const float scale = rsqrtf((float)HD);
  for (int i = tid; i < HPB * HD / 4; i += THREADS) {
    float4 v = ((const float4*)(a.q + (size_t)(rh + head0) * HD))[i];
    v.x *= scale; v.y *= scale; v.z *= scale; v.w *= scale;
    ((float4*)&qs[0][0])[i] = v;
  }
  if (tid < HPB) { m_s[tid] = __int_as_float(0xff800000); l_s[tid] = 0.f; }
  float acc[OUT];
#pragma unroll
  for (int o = 0; o < OUT; ++o) acc[o] = 0.f;

  for (int tt = t0; tt < t1; tt += TILE) {
#pragma unroll
    for (int i = 0; i < LPT; ++i) {
      const int w = tid + i * THREADS;
      if (w < TW) { ks[w / RW][w % RW] = kr[i]; vs[w] = vr[i]; }
    }
    __syncthreads();
    if (tt + TILE < t1) load(tt + TILE);     // in flight while this tile is computed
    for (int e = tid; e < HPB * TILE; e += THREADS) {
      const int g = e / TILE, t = e % TILE;
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < RW; ++c) {
        const uint4 kv = ks[t][c];
        const float2 k0 = h2x2f(kv.x), k1 = h2x2f(kv.y), k2 = h2x2f(kv.z), k3 = h2x2f(kv.w);
        const float4 qa = *(const float4*)&qs[g][8 * c], qb = *(const float4*)&qs[g][8 * c + 4];
        s += qa.x * k0.x + qa.y * k0.y + qa.z * k1.x + qa.w * k1.y
           + qb.x * k2.x + qb.y * k2.y + qb.z * k3.x + qb.w * k3.y;
      }
      sc[g][t] = tt + t < t1 ? s : __int_as_float(0xff800000);
    }
    __syncthreads();
    for (int g = warp; g < HPB; g += WARPS) {  // softmax statistics, one query head per warp
      float mx = __int_as_float(0xff800000);
#pragma unroll
      for (int i = lane; i < TILE; i += 32) mx = fmaxf(mx, sc[g][i]);
      mx = warp_max(mx);
      const float m_new = fmaxf(m_s[g], mx);  // finite: position tt is in the tile
      float sum = 0.f;
#pragma unroll
      for (int i = lane; i < TILE; i += 32) {
        const float p = __expf(sc[g][i] - m_new);   // exp(-inf) = 0 past the sequence
        sc[g][i] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float c = __expf(m_s[g] - m_new);     // 0 on the first tile
        l_s[g] = l_s[g] * c + sum;
        m_s[g] = m_new;
        corr_s[g] = c;
      }
    }
    __syncthreads();
    const h16* vh = (const h16*)vs;
#pragma unroll
    for (int o = 0; o < OUT; ++o) {
      const int e = tid + o * THREADS, g = e / HD, d = e % HD;
      if (e < HPB * HD) {
        float v = acc[o] * corr_s[g];
#pragma unroll
        for (int t = 0; t < TILE; t += 4) {   // past the sequence p is 0 and V was zeroed
          const float4 p = *(const float4*)&sc[g][t];
          v += p.x * h2f(vh[t * HD + d]) + p.y * h2f(vh[(t + 1) * HD + d])
             + p.z * h2f(vh[(t + 2) * HD + d]) + p.w * h2f(vh[(t + 3) * HD + d]);
        }
        acc[o] = v;
      }
    }
    __syncthreads();
  }
  const int used = (len + chunk - 1) / chunk;            // splits with positions to read
  if (used == 1) {                                       // the only one: normalize, done
#pragma unroll
    for (int o = 0; o < OUT; ++o) {
      const int e = tid + o * THREADS;
      if (e < HPB * HD) a.out[(size_t)(rh + head0) * HD + e] = acc[o] / l_s[e / HD];
    }
    return;
  }
#pragma unroll
  for (int o = 0; o < OUT; ++o) {
    const int e = tid + o * THREADS, g = e / HD, d = e % HD;
    if (e < HPB * HD) a.part_o[((size_t)(rh + head0 + g) * a.splits + split) * HD + d] = acc[o];
  }
  if (tid < HPB) {
    a.part_ml[((size_t)(rh + head0 + tid) * a.splits + split) * 2] = m_s[tid];
    a.part_ml[((size_t)(rh + head0 + tid) * a.splits + split) * 2 + 1] = l_s[tid];
  }
  __threadfence();                                       // the partials, before the count
  __shared__ int is_last;
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(a.counter + row * gridDim.x + blockIdx.x, 1u) == (unsigned)used - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // merge: per query head (a warp each) its largest running max M and each split's weight
  // e^(m_s - M) (into the V tile's space, free now), then every (query head, 4 dims) output
  // from the splits' sums, 16 splits' loads in flight at a time
  float* wsm = (float*)vs;                               // (HPB, ATT_MAX_SPLITS)
  static_assert(ATT_MAX_SPLITS % 32 == 0, "the merge gives each lane ATT_MAX_SPLITS / 32 splits");
  constexpr int SPL = ATT_MAX_SPLITS / 32;               // splits per lane
  for (int g = warp; g < HPB; g += WARPS) {
    const float* ml = a.part_ml + (size_t)(rh + head0 + g) * a.splits * 2;
    float mv[SPL], lv[SPL];                              // every (m, l) loaded at once: one round trip
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
      const int s = lane + 32 * i;
      mv[i] = s < used ? load_l2(ml + 2 * s) : __int_as_float(0xff800000);
      lv[i] = s < used ? load_l2(ml + 2 * s + 1) : 0.f;
    }
    float mx = mv[0];
#pragma unroll
    for (int i = 1; i < SPL; ++i) mx = fmaxf(mx, mv[i]);
    mx = warp_max(mx);
    float den = 0.f;
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
      const int s = lane + 32 * i;
      if (s < used) {
        const float w = __expf(mv[i] - mx);
        wsm[g * ATT_MAX_SPLITS + s] = w;
        den += w * lv[i];
      }
    }
    den = warp_sum(den);
    if (lane == 0) den_s[g] = den;
  }
  __syncthreads();
  for (int e = tid; e < HPB * HD / 4; e += THREADS) {
    const int g = e / (HD / 4), d4 = e % (HD / 4);
    const float4* po = (const float4*)(a.part_o + (size_t)(rh + head0 + g) * a.splits * HD) + d4;
    const float* w = wsm + g * ATT_MAX_SPLITS;
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
    for (int s = 0; s < used; ++s) {
      const float4 o = load_l2(po + (size_t)s * (HD / 4));
      num.x += w[s] * o.x; num.y += w[s] * o.y; num.z += w[s] * o.z; num.w += w[s] * o.w;
    }
    const float r = 1.f / den_s[g];
    ((float4*)(a.out + (size_t)(rh + head0 + g) * HD))[d4] = make_float4(num.x * r, num.y * r, num.z * r, num.w * r);
  }
  if (tid == 0) a.counter[row * gridDim.x + blockIdx.x] = 0u;
}

// ---- the same attention on the tensor cores -------------------------------------------------
// attention_mma: AttnArgs, grid and splits as attention's with HPB = G (grid x = NKV: block (h, s)
// serves all G query heads of KV head h over its split's positions), the two products on the
// tensor cores (mma.sync m16n8k16, fp16 inputs, fp32 sums; common.cuh mma_16816's fragments):
//   scores  S = Q K^T: M = query heads (16 an m-tile, MT = ceil(G / 16) of them; rows past G
//           have zero queries, their results are never written), N = positions (8 an n-tile),
//           K = head dims (16 a k-step). Q (pre-scaled by HD^-0.5, fp16) stays in registers
//           for the whole split.
//   softmax online per query row in fp32, on the S fragments themselves: a row's values sit
//           in the 4 lanes of a quad (shuffles xor 1 and 2 for its maximum)
//   values  O += P V: M = query heads, N = head dims (8 an n-tile), K = positions (16 a k-step);
//           P (fp16) is the S fragments of two adjacent n-tiles, which is the A fragment of one
//           k-step as it stands
// Warps: warp w takes m-tile w % MT (all of them in turn when there are fewer warps than
// m-tiles), then of the tile's 16-position slices those of its position group pg, and of the
// head dims (32 at a time) those of its dims group dg: with more warps than slices, warps on
// the same slices split O's dims (each computes the slices' scores and softmax itself). Each
// warp keeps its own running max and sum per row (equal across dims groups) and its part of O;
// at the end of the split the position groups meet in shared memory, weighted by e^(m - M).
// Loads: the tile's K and V rows (16-byte words, coalesced; the next DEPTH tiles' in registers
// while this one is computed) into shared memory, rows padded so that a lane quarter's 16-byte
// reads of two rows fall in different banks.
// Splits: with one in use the block writes the output; with more, each leaves its output
// normalized (o / l, within V's range) in fp16 and its (m, l) per query head, and the last to
// finish (the counter) merges the group's G x HD outputs alone, so each thread folds its 8 dims
// over the splits as an online softmax (running max, weights e^(m_s - M) l_s), the words and
// (m, l) of 16 splits in flight at once (att_fold); fp16 halves what that one block reads. With
// MG > 0 (the knob merge_group) and more than MG splits in use the merge has two levels: the
// last of each MG consecutive splits to finish folds them into one partial of the same form (in
// part_o's second half, which the fp16 outputs leave free) while other splits still read, the
// last of those folds the partials: at 8K, 64 splits of GLM-Z1-9B's group are 256 KB for one
// block to read, 8 + 8 partials 32 KB each. The counts are arrive's (common.cuh): one atomic with
// release and acquire semantics between two barriers, no fence by every thread (H200, session 15:
// the int4 steps -0.7% / -1.3% at context 128 / 8192 for GLM-Z1-9B, -0.5% / -0.5% for GLM-4-32B).
// H200, GLM-Z1-9B, 256 threads, tile 32, 32 splits: alone 6.3 / 12.7 us at context 128 / 8192 (attention with
// its defaults: 6.6 / 20.7); the 40-layer step 2521 / 2796 us (attention's: 2575 / 3220).
// Fragments, lane l = 4 g + t:
//   K (B of S, n-tile of positions p0..p0+7): lane reads K[p0 + g][32 c + 8 t .. +7] (one 16-byte
//     word) for each 32-dim group c; its words x, y are b0, b1 of k-step 2c and z, w of k-step
//     2c + 1: k-step (c, hh) takes dims 32 c + 8 t + 4 hh + {0, 1} as k = 2t, 2t+1 and + {2, 3} as
//     k = 2t+8, 2t+9. The sum over k does not care for the order; Q's A fragments take the same
//     dims: a0 = Q[g][32 c + 8 t + 4 hh + {0, 1}], a2 = Q[g][.. + {2, 3}], a1, a3 rows g + 8.
//   V (B of O, k-step of positions p0..p0+15): lane reads V[p0 + g][32 c + 8 t .. +7] and
//     V[p0 + 8 + g][same] (16 bytes each); word i of each, as the 8 x 8 matrix of the lanes
//     (row g, columns 2t, 2t+1), transposed by movmatrix, is b0 (b1) of n-tile (c, i) whose
//     column n stands for dim 32 c + 8 (n / 2) + 2 i + n % 2. So O's n-tiles (c, 0..3) leave lane
//     (g, t) the dims 32 c + 8 t .. 32 c + 8 t + 7 of rows g and g + 8: o[.][c][i][e] is row
//     g + 8 (e / 2), dim 32 c + 8 t + 2 i + e % 2.
DEV unsigned att_word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// att_fold: the splits' merge, by one block of THREADS: the G x HD outputs of query heads r0 ..
// r0 + G - 1 folded over `count` partials, partial i of head r0 + r at index (r0 + r) * stride +
// first + i of o16 (HD h16: its output normalized) and ml (2 floats: its max m and sum l). Each
// thread its 8-dim words, SU partials' words and (m, l) loaded at once (one round trip for up to SU
// of them, no shared memory, no barrier), folded in as an online softmax: a running max M, the sum
// of w_s = e^(m_s - M) l_s and of w_s o_s, rescaled when M grows. FINAL: into out (fp32,
// normalized); else a partial of the same form: po at (r0 + r) * pstride + pidx, its (M, sum) in pml.
template <int HD, int G, int THREADS, bool FINAL>
DEV void att_fold(const h16* o16, const float* ml, int r0, int stride, int first, int count, float* out, h16* po,
                  float* pml, int pstride, int pidx) {
  constexpr int EPT = (G * HD / 8 + THREADS - 1) / THREADS;   // 8-dim outputs per thread
  constexpr int SU = EPT < 16 ? 16 / EPT : 1;            // partials a step: 16 words in flight
  const float ninf = __int_as_float(0xff800000);
  const int tid = threadIdx.x;
  float mrun[EPT], lsum[EPT], acc[EPT][8];
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    mrun[k] = ninf;
    lsum[k] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[k][i] = 0.f;
  }
  for (int sp0 = 0; sp0 < count; sp0 += SU) {
    float4 raw[SU][EPT];
    float mv[SU][EPT], lv[SU][EPT];
#pragma unroll
    for (int u = 0; u < SU; ++u)
#pragma unroll
      for (int k = 0; k < EPT; ++k) {
        const int e = tid + k * THREADS, r = e / (HD / 8), d8 = e % (HD / 8), sp = sp0 + u;
        const bool ok = sp < count && e < G * HD / 8;
        const size_t at = (size_t)(r0 + r) * stride + first + sp;
        raw[u][k] = ok ? load_l2((const float4*)(o16 + at * HD) + d8) : make_float4(0.f, 0.f, 0.f, 0.f);
        mv[u][k] = ok ? load_l2(ml + 2 * at) : ninf;
        lv[u][k] = ok ? load_l2(ml + 2 * at + 1) : 0.f;
      }
#pragma unroll
    for (int k = 0; k < EPT; ++k) {
      float mx = mrun[k];
#pragma unroll
      for (int u = 0; u < SU; ++u) mx = fmaxf(mx, mv[u][k]);    // finite: partial sp0 is in use
      const float c = __expf(mrun[k] - mx);               // 0 on the first step
      lsum[k] *= c;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[k][i] *= c;
#pragma unroll
      for (int u = 0; u < SU; ++u) {
        const float w = __expf(mv[u][k] - mx) * lv[u][k];      // 0 past the partials in use
        const float2 o01 = h2x2f(__float_as_uint(raw[u][k].x)), o23 = h2x2f(__float_as_uint(raw[u][k].y));
        const float2 o45 = h2x2f(__float_as_uint(raw[u][k].z)), o67 = h2x2f(__float_as_uint(raw[u][k].w));
        lsum[k] += w;
        acc[k][0] += w * o01.x; acc[k][1] += w * o01.y; acc[k][2] += w * o23.x; acc[k][3] += w * o23.y;
        acc[k][4] += w * o45.x; acc[k][5] += w * o45.y; acc[k][6] += w * o67.x; acc[k][7] += w * o67.y;
      }
      mrun[k] = mx;
    }
  }
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int e = tid + k * THREADS, r = e / (HD / 8), d8 = e % (HD / 8);
    if (e < G * HD / 8) {
      const float inv = 1.f / lsum[k];
      if (FINAL) {
        float4* dst = (float4*)(out + (size_t)(r0 + r) * HD + 8 * d8);
        dst[0] = make_float4(acc[k][0] * inv, acc[k][1] * inv, acc[k][2] * inv, acc[k][3] * inv);
        dst[1] = make_float4(acc[k][4] * inv, acc[k][5] * inv, acc[k][6] * inv, acc[k][7] * inv);
      } else {
        const size_t at = (size_t)(r0 + r) * pstride + pidx;
        ((uint4*)(po + at * HD))[d8] = make_uint4(pack_h2(acc[k][0] * inv, acc[k][1] * inv),
                                                  pack_h2(acc[k][2] * inv, acc[k][3] * inv),
                                                  pack_h2(acc[k][4] * inv, acc[k][5] * inv),
                                                  pack_h2(acc[k][6] * inv, acc[k][7] * inv));
        if (d8 == 0) { pml[2 * at] = mrun[k]; pml[2 * at + 1] = lsum[k]; }
      }
    }
  }
}

template <int HD, int G, int THREADS, int TILE, bool SPREAD = false, int MG = 0>
DEV void attention_mma(const AttnArgs& a) {
  constexpr int WARPS = THREADS / 32;
  constexpr int MT = (G + 15) / 16;                      // m-tiles of 16 query heads
  static_assert(HD % 32 == 0 && TILE % 16 == 0 && THREADS % 32 == 0, "head_dim: a multiple of 32; 16-position slices; whole warps");
  static_assert(WARPS % MT == 0 || MT % WARPS == 0, "warps and m-tiles: one divides the other");
  static_assert(MG == 0 || MG >= 2, "first-level merge groups: 0 (one level) or at least 2 splits");
  constexpr int MPW = MT > WARPS ? MT / WARPS : 1;       // m-tiles per warp
  constexpr int WPM = WARPS > MT ? WARPS / MT : 1;       // warps per m-tile
  constexpr int NSL = TILE / 16;                         // 16-position slices per tile
  constexpr int PGS = WPM < NSL ? WPM : NSL;             // position groups
  static_assert(NSL % PGS == 0 && WPM % PGS == 0, "slices and warps per m-tile: powers of two");
  constexpr int SPW = NSL / PGS;                         // slices per warp and tile
  constexpr int DG = WPM / PGS;                          // dims groups (warps on the same slices)
  constexpr int NC = HD / 32;                            // 32-dim groups of a head
  constexpr int CPW = (NC + DG - 1) / DG;                // of them per warp (at most)
  constexpr int RW = HD / 8;                             // 16-byte words per K or V row
  constexpr int RWP = RW % 8 ? RW : RW + 4;              // padded: a row 16 banks (mod 32) after the last
  constexpr int TW = TILE * RW;                          // words per tile, K or V
  constexpr int LPT = (TW + THREADS - 1) / THREADS;
  constexpr int RS = HD + 4;                             // floats per row of the warps' sum of O
  constexpr int TILE_W = 2 * TILE * RWP, RED_W = MT * 16 * RS / 4;
  constexpr int SMW = TILE_W > RED_W ? TILE_W : RED_W;
  static_assert(SMW * 16 <= 46 * 1024, "static shared memory: under 48 KB");
  // K rows, then V rows (TILE x RWP words each); the warps' sum of O (MT * 16, RS) after the
  // last tile
  __shared__ __align__(16) uint4 sm[SMW];
  __shared__ float ml_s[MT * 16][PGS][2];                // each position group's (m, l) per row
  __shared__ float mx_s[MT * 16], den_s[MT * 16];        // per row: the split's max and sum
  __shared__ int last_s;
  uint4* ks = sm;
  uint4* vs = sm + TILE * RWP;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int h = blockIdx.x, head0 = h * G, split = blockIdx.y;
  const int row = blockIdx.z, rh = row * gridDim.x * G;  // rh: the row's first query head (NH a row)
  const int len = (a.slot_stride ? a.pos[row] : *a.pos) + a.pos_add + 1;
  const int chunk = att_chunk<TILE>(a, len);
  const int t0 = split * chunk;
  grid_launch_dependents();
  if (t0 >= len) return;                                 // the whole block: nothing to read here
  // Before the wait nothing is known to be done, not even earlier steps' K and V: every kernel lets
  // the next start at once (launch_dependents before its own wait), so a chain of kernels waiting
  // in turn can reach back past the step that wrote row len - 2. H200, session 15: the first
  // tiles' older rows loaded before the wait made GLM-Z1-9B's step 1-2% faster (GLM-4-32B's under
  // 1%) and a decoder test on a small model (whose small kernels fit beside each other) got other
  // tokens in 2 of 2 runs, none without them; such a chain is the likely way. Weights, which
  // nothing writes, are all a kernel may read before its wait.
  grid_wait();                                           // q and this token's K, V: the previous kernel's
  const int t1 = min(len, t0 + chunk);
  const size_t kv0 = (size_t)row * a.slot_stride + (size_t)h * a.max_seq * HD;   // this row's KV head h
  const uint4* kbase = (const uint4*)(a.k_cache + kv0);
  const uint4* vbase = (const uint4*)(a.v_cache + kv0);

  // DEPTH tiles in flight in registers (two where that costs at most 64 registers): one block per
  // SM reads its chunk with DEPTH x TILE rows of K and V in flight
  constexpr int DEPTH = LPT <= 4 ? 2 : 1;
  // the scores' mma in KS independent chains (4 where the registers allow: Q's fragments, O's,
  // the tiles in flight and the chains' sums under about 160 a thread)
  constexpr int REGS = 32 * MPW + 16 * CPW * MPW + 8 * LPT * DEPTH;
  constexpr int KS0 = REGS + 32 * MPW * SPW <= 160 ? 4 : REGS + 16 * MPW * SPW <= 176 ? 2 : 1;
  constexpr int KS = KS0 < NC ? KS0 : NC;
  uint4 kr[DEPTH][LPT], vr[DEPTH][LPT];
  auto load = [&](int b, int tt) {                       // the tile at tt into registers b (zeros past t1)
#pragma unroll
    for (int i = 0; i < LPT; ++i) {
      const int w = tid + i * THREADS, p = tt + w / RW;
      const bool ok = w < TW && p < t1;
      kr[b][i] = ok ? kbase[(size_t)p * RW + w % RW] : make_uint4(0u, 0u, 0u, 0u);
      vr[b][i] = ok ? vbase[(size_t)p * RW + w % RW] : make_uint4(0u, 0u, 0u, 0u);
    }
  };
#pragma unroll
  for (int b = 0; b < DEPTH; ++b)
    if (t0 + b * TILE < t1) load(b, t0 + b * TILE);

  // this warp's share: m-tiles mt0 + mi * WARPS, slices pg + PGS * j, dim groups dg + DG * ci
  const int mt0 = WARPS >= MT ? warp % MT : warp;
  const int rest = WARPS >= MT ? warp / MT : 0;
  const int pg = rest % PGS, dg = rest / PGS;
  const bool active = dg < NC;                           // more dims groups than dims: idle
  const float ninf = __int_as_float(0xff800000);
  // Q's A fragments, fp16, scaled (rows past G: zeros)
  h16x2 qa[MPW][HD / 16][4];
  const float scale = rsqrtf((float)HD);
#pragma unroll
  for (int mi = 0; mi < MPW; ++mi) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = (mt0 + mi * WARPS) * 16 + g + 8 * e;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
        if (r < G) {
          const float4* src = (const float4*)(a.q + (size_t)(rh + head0 + r) * HD + 32 * c + 8 * t);
          lo = src[0];
          hi = src[1];
        }
        qa[mi][2 * c][e] = pack_h2(lo.x * scale, lo.y * scale);
        qa[mi][2 * c][2 + e] = pack_h2(lo.z * scale, lo.w * scale);
        qa[mi][2 * c + 1][e] = pack_h2(hi.x * scale, hi.y * scale);
        qa[mi][2 * c + 1][2 + e] = pack_h2(hi.z * scale, hi.w * scale);
      }
    }
  }
  // running max and (this lane's part of the) sum of rows g, g + 8; O's fragments
  float m_run[MPW][2], l_run[MPW][2], o[MPW][CPW][4][4];
#pragma unroll
  for (int mi = 0; mi < MPW; ++mi) {
    m_run[mi][0] = m_run[mi][1] = ninf;
    l_run[mi][0] = l_run[mi][1] = 0.f;
#pragma unroll
    for (int ci = 0; ci < CPW; ++ci)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mi][ci][i][e] = 0.f;
  }

  for (int t00 = t0; t00 < t1; t00 += DEPTH * TILE) {
#pragma unroll
    for (int b = 0; b < DEPTH; ++b) {                  // registers b: a compile-time index
      const int tt = t00 + b * TILE;
      if (tt >= t1) break;                             // block-uniform
#pragma unroll
      for (int i = 0; i < LPT; ++i) {
        const int w = tid + i * THREADS;
        if (w < TW) { ks[(w / RW) * RWP + w % RW] = kr[b][i]; vs[(w / RW) * RWP + w % RW] = vr[b][i]; }
      }
      __syncthreads();
      if (tt + DEPTH * TILE < t1) load(b, tt + DEPTH * TILE);   // in flight while these are computed
      if (active) {                                        // warp-uniform: whole warps skip
        // scores: sc[mi][j][n][.] is the S fragment of slice pg + PGS j, positions 8 n .. 8 n + 7,
        // summed over the head dims in KS independent chains of mma (dims group c into chain
        // c % KS: a chain of 2 NC / KS dependent mma instead of 2 NC), added at the end
        float sk[KS][MPW][SPW][2][4], sc[MPW][SPW][2][4];
#pragma unroll
        for (int q = 0; q < KS; ++q)
#pragma unroll
          for (int mi = 0; mi < MPW; ++mi)
#pragma unroll
            for (int j = 0; j < SPW; ++j)
#pragma unroll
              for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) sk[q][mi][j][n][e] = 0.f;
#pragma unroll
        for (int j = 0; j < SPW; ++j) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const uint4* krow = ks + (16 * (pg + PGS * j) + 8 * n + g) * RWP + t;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
              const uint4 kw = krow[4 * c];
#pragma unroll
              for (int mi = 0; mi < MPW; ++mi) {
                mma_16816(sk[c % KS][mi][j][n], qa[mi][2 * c], kw.x, kw.y);
                mma_16816(sk[c % KS][mi][j][n], qa[mi][2 * c + 1], kw.z, kw.w);
              }
            }
          }
        }
#pragma unroll
        for (int mi = 0; mi < MPW; ++mi)
#pragma unroll
          for (int j = 0; j < SPW; ++j)
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                float v = sk[0][mi][j][n][e];
#pragma unroll
                for (int q = 1; q < KS; ++q) v += sk[q][mi][j][n][e];
                sc[mi][j][n][e] = v;
              }
        // softmax: positions past t1 out; the rows' new max over the quad; p = e^(s - m) rounded
        // to fp16 as the product takes it (and summed so); earlier sums and O rescaled
#pragma unroll
        for (int mi = 0; mi < MPW; ++mi) {
          float tmax[2] = {ninf, ninf};
#pragma unroll
          for (int j = 0; j < SPW; ++j)
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int p = tt + 16 * (pg + PGS * j) + 8 * n + 2 * t + (e & 1);
                if (p >= t1) sc[mi][j][n][e] = ninf;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], sc[mi][j][n][e]);
              }
          float base[2], corr[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            const float m_new = fmaxf(m_run[mi][r], tmax[r]);
            base[r] = m_new == ninf ? 0.f : m_new;         // nothing seen yet: every p and corr 0
            corr[r] = __expf(m_run[mi][r] - base[r]);      // 0 on the first tile
            m_run[mi][r] = m_new;
          }
          float sum[2] = {0.f, 0.f};
#pragma unroll
          for (int j = 0; j < SPW; ++j)
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const float p = h2f(f2h(__expf(sc[mi][j][n][e] - base[e >> 1])));
                sc[mi][j][n][e] = p;
                sum[e >> 1] += p;
              }
#pragma unroll
          for (int r = 0; r < 2; ++r) l_run[mi][r] = l_run[mi][r] * corr[r] + sum[r];
#pragma unroll
          for (int ci = 0; ci < CPW; ++ci)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int e = 0; e < 4; ++e) o[mi][ci][i][e] *= corr[e >> 1];
        }
        // values: each slice one k-step; V's two 8-row halves transposed into B fragments
#pragma unroll
        for (int j = 0; j < SPW; ++j) {
          h16x2 pa[MPW][4];
#pragma unroll
          for (int mi = 0; mi < MPW; ++mi) {
            pa[mi][0] = pack_h2(sc[mi][j][0][0], sc[mi][j][0][1]);
            pa[mi][1] = pack_h2(sc[mi][j][0][2], sc[mi][j][0][3]);
            pa[mi][2] = pack_h2(sc[mi][j][1][0], sc[mi][j][1][1]);
            pa[mi][3] = pack_h2(sc[mi][j][1][2], sc[mi][j][1][3]);
          }
          const uint4* vrow = vs + (16 * (pg + PGS * j) + g) * RWP + t;
#pragma unroll
          for (int ci = 0; ci < CPW; ++ci) {
            const int c = dg + DG * ci;
            if (c < NC) {                                  // warp-uniform
              const uint4 v0 = vrow[4 * c], v1 = vrow[8 * RWP + 4 * c];
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const h16x2 b0 = movmatrix_t(att_word(v0, i)), b1 = movmatrix_t(att_word(v1, i));
#pragma unroll
                for (int mi = 0; mi < MPW; ++mi) mma_16816(o[mi][ci][i], pa[mi], b0, b1);
              }
            }
          }
        }
      }
      __syncthreads();
    }
  }

  // the split's rows: each position group's (m, l) (l summed over the quad), the max M and the
  // sum den = sum e^(m - M) l over the groups, then O = sum e^(m - M) O over them in shared memory
#pragma unroll
  for (int mi = 0; mi < MPW; ++mi)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[mi][r] += __shfl_xor_sync(0xffffffffu, l_run[mi][r], 1);
      l_run[mi][r] += __shfl_xor_sync(0xffffffffu, l_run[mi][r], 2);
    }
  if (active && dg == 0 && t == 0) {
#pragma unroll
    for (int mi = 0; mi < MPW; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rr = (mt0 + mi * WARPS) * 16 + g + 8 * r;
        ml_s[rr][pg][0] = m_run[mi][r];
        ml_s[rr][pg][1] = l_run[mi][r];
      }
  }
  __syncthreads();
  for (int rr = tid; rr < MT * 16; rr += THREADS) {
    float big = ml_s[rr][0][0];
#pragma unroll
    for (int q = 1; q < PGS; ++q) big = fmaxf(big, ml_s[rr][q][0]);   // finite: group 0 saw t0
    float tot = 0.f;
#pragma unroll
    for (int q = 0; q < PGS; ++q) tot += __expf(ml_s[rr][q][0] - big) * ml_s[rr][q][1];
    mx_s[rr] = big;
    den_s[rr] = tot;
  }
  __syncthreads();
  float* red = (float*)sm;                               // (MT * 16, RS): the tiles are spent
#pragma unroll 1
  for (int q = 0; q < PGS; ++q) {                        // one position group after the other
    if (active && pg == q) {
#pragma unroll
      for (int mi = 0; mi < MPW; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rr = (mt0 + mi * WARPS) * 16 + g + 8 * r;
          const float wgt = __expf(m_run[mi][r] - mx_s[rr]);
#pragma unroll
          for (int ci = 0; ci < CPW; ++ci) {
            const int c = dg + DG * ci;
            if (c < NC) {
              float4* dst = (float4*)(red + rr * RS + 32 * c + 8 * t);
              float4 x0 = make_float4(wgt * o[mi][ci][0][2 * r], wgt * o[mi][ci][0][2 * r + 1],
                                      wgt * o[mi][ci][1][2 * r], wgt * o[mi][ci][1][2 * r + 1]);
              float4 x1 = make_float4(wgt * o[mi][ci][2][2 * r], wgt * o[mi][ci][2][2 * r + 1],
                                      wgt * o[mi][ci][3][2 * r], wgt * o[mi][ci][3][2 * r + 1]);
              if (q > 0) {
                const float4 y0 = dst[0], y1 = dst[1];
                x0.x += y0.x; x0.y += y0.y; x0.z += y0.z; x0.w += y0.w;
                x1.x += y1.x; x1.y += y1.y; x1.z += y1.z; x1.w += y1.w;
              }
              dst[0] = x0;
              dst[1] = x1;
            }
          }
        }
    }
    __syncthreads();
  }
  const int used = (len + chunk - 1) / chunk;            // splits with positions to read
  if (used == 1) {                                       // the only one: normalize, done
    for (int e = tid; e < G * HD / 4; e += THREADS) {
      const int r = e / (HD / 4), d4 = e % (HD / 4);
      const float4 v = *(const float4*)(red + r * RS + 4 * d4);
      const float inv = 1.f / den_s[r];
      ((float4*)(a.out + (size_t)(rh + head0 + r) * HD))[d4] = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
    }
    return;
  }
  // several splits: this one's output normalized (|o| <= max |V|) in fp16, as 8 h16 a 16-byte
  // word (part_o's first half taken as h16 (NH, splits, HD)), and (M, den) in part_ml; the
  // merge then reads half the bytes (one block merges the whole group)
  h16* part16 = (h16*)a.part_o;
  for (int e = tid; e < G * HD / 8; e += THREADS) {
    const int r = e / (HD / 8), d8 = e % (HD / 8);
    const float* v = red + r * RS + 8 * d8;
    const float inv = 1.f / den_s[r];
    ((uint4*)(part16 + ((size_t)(rh + head0 + r) * a.splits + split) * HD))[d8] =
        make_uint4(pack_h2(v[0] * inv, v[1] * inv), pack_h2(v[2] * inv, v[3] * inv), pack_h2(v[4] * inv, v[5] * inv),
                   pack_h2(v[6] * inv, v[7] * inv));
  }
  for (int r = tid; r < G; r += THREADS) {
    a.part_ml[((size_t)(rh + head0 + r) * a.splits + split) * 2] = mx_s[r];
    a.part_ml[((size_t)(rh + head0 + r) * a.splits + split) * 2 + 1] = den_s[r];
  }
  if (SPREAD) return;                                    // attention_merge folds the splits
  // merged by the last split to finish (the counter), or with MG > 0 and more than MG splits in
  // use in two levels: the last of each MG splits folds them into a partial of the same form
  // (second level, in part_o's second half), the last of those folds the partials
  const int ngrp = MG ? (used + MG - 1) / MG : 1;        // first-level groups
  unsigned* fin = a.counter + row * gridDim.x + h;
  const int first = ngrp > 1 ? split / MG * MG : 0, count = ngrp > 1 ? min(MG, used - first) : used;
  __syncthreads();                                       // the partials, before the count (arrive)
  unsigned* gc = ngrp > 1 ? a.counter + gridDim.z * gridDim.x + (row * gridDim.x + h) * ATT_MAX_SPLITS + split / MG
                          : fin;
  if (tid == 0) last_s = arrive(gc) == (unsigned)count - 1;
  __syncthreads();
  if (!last_s) return;
  if (ngrp > 1) {
    // second level: (rows, NH, G2) partials after the splits' fp16 outputs, then their (m, l)
    const int g2 = (a.splits + MG - 1) / MG;
    h16* o2 = part16 + (size_t)gridDim.z * gridDim.x * G * a.splits * HD;
    float* ml2 = (float*)(o2 + (size_t)gridDim.z * gridDim.x * G * g2 * HD);
    att_fold<HD, G, THREADS, false>(part16, a.part_ml, rh + head0, a.splits, first, count, nullptr, o2, ml2, g2, split / MG);
    __syncthreads();                                     // the group's partial, before the count
    if (tid == 0) {
      *gc = 0u;                                          // re-armed for the next launch
      last_s = arrive(fin) == (unsigned)ngrp - 1;
    }
    __syncthreads();
    if (!last_s) return;
    att_fold<HD, G, THREADS, true>(o2, ml2, rh + head0, g2, 0, ngrp, a.out, nullptr, nullptr, 0, 0);
  } else {
    att_fold<HD, G, THREADS, true>(part16, a.part_ml, rh + head0, a.splits, 0, used, a.out, nullptr, nullptr, 0, 0);
  }
  if (tid == 0) *fin = 0u;                               // re-armed for the next launch
}

// ---- the splits' merge spread over blocks (attention_mma<..., SPREAD = true>) ------------------
// attention_merge: grid (NKV * G, 1, rows), THREADS threads; block b folds query head b of the
// row (KV head b / G) over the splits the attention left (each split's output normalized, in
// fp16, with its (m, den)): out = sum_s e^(m_s - M) den_s o_s / sum_s e^(m_s - M) den_s. Thread
// (sg, d8) folds the 8 dims d8 over splits sg, sg + SG, ... as an online softmax, SG = THREADS /
// (HD / 8) groups meet in shared memory. One block per query head (32 for GLM-Z1-9B) instead of
// one per KV head: at 8K the last-block merge had one SM read every split's outputs of the group.
// With one split in use the attention wrote the output itself: the blocks return at once. The
// same chunk rule as the attention (TILE: its tile) gives the splits in use.
template <int HD, int G, int THREADS, int TILE>
DEV void attention_merge(const AttnArgs& a) {
  constexpr int DW = HD / 8;                             // 8-dim words of a head
  static_assert(THREADS % DW == 0, "whole split groups");
  constexpr int SG = THREADS / DW;                       // split groups
  __shared__ float m_s[SG], l_s[SG];
  __shared__ __align__(16) float acc_s[SG][HD];
  const int tid = threadIdx.x, sg = tid / DW, d8 = tid % DW;
  const int head = blockIdx.x, row = blockIdx.z, rh = row * gridDim.x;   // rh: the row's first query head
  const int len = (a.slot_stride ? a.pos[row] : *a.pos) + a.pos_add + 1;
  const int chunk = att_chunk<TILE>(a, len);
  const int used = (len + chunk - 1) / chunk;
  grid_launch_dependents();
  grid_wait();                                           // the splits' partials: the attention's (and with
                                                         // one split its output: the next kernel waits on this grid)
  if (used == 1) return;                                 // the attention wrote the output
  const float ninf = __int_as_float(0xff800000);
  const h16* part16 = (const h16*)a.part_o;
  const size_t base = (size_t)(rh + head) * a.splits;
  float mrun = ninf, lsum = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int sp = sg; sp < used; sp += SG) {
    const float4 raw = load_l2((const float4*)(part16 + (base + sp) * HD) + d8);
    const float m = load_l2(a.part_ml + 2 * (base + sp)), den = load_l2(a.part_ml + 2 * (base + sp) + 1);
    const float mx = fmaxf(mrun, m);
    const float c = __expf(mrun - mx), w = __expf(m - mx) * den;     // c: 0 on the first split
    const float2 o01 = h2x2f(__float_as_uint(raw.x)), o23 = h2x2f(__float_as_uint(raw.y));
    const float2 o45 = h2x2f(__float_as_uint(raw.z)), o67 = h2x2f(__float_as_uint(raw.w));
    const float o[8] = {o01.x, o01.y, o23.x, o23.y, o45.x, o45.y, o67.x, o67.y};
    lsum = lsum * c + w;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = acc[i] * c + w * o[i];
    mrun = mx;
  }
  if (d8 == 0) { m_s[sg] = mrun; l_s[sg] = lsum; }       // (groups past `used` keep -inf, 0)
  __syncthreads();
  float big = m_s[0];
#pragma unroll
  for (int q = 1; q < SG; ++q) big = fmaxf(big, m_s[q]);  // finite: split 0 is in group 0
  const float wgt = mrun == ninf ? 0.f : __expf(mrun - big);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc_s[sg][8 * d8 + i] = wgt * acc[i];
  __syncthreads();
  if (sg == 0) {
    float den = 0.f;
#pragma unroll
    for (int q = 0; q < SG; ++q) den += (m_s[q] == ninf ? 0.f : __expf(m_s[q] - big)) * l_s[q];
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float x = 0.f;
#pragma unroll
      for (int q = 0; q < SG; ++q) x += acc_s[q][8 * d8 + i];
      v[i] = x / den;
    }
    float4* dst = (float4*)(a.out + (size_t)(rh + head) * HD + 8 * d8);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}
