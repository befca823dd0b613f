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
  const int per = (len + a.splits - 1) / a.splits;
  const int chunk = max(a.chunk, (per + TILE - 1) / TILE * TILE);
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
