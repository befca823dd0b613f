// Decode attention over the KV cache, one new token (M = 1), grouped-query.
//
// attention: grid (NKV, splits), THREADS threads. Block (h, s) reads positions
// [s * chunk, min(len, (s + 1) * chunk)) of KV head h ONCE for all G = NH / NKV query heads it
// serves (16 for GLM-Z1-9B, 24 for GLM-4-32B), tile by tile (THREADS positions):
//   scores   thread t: the key at position t of the tile, dotted with the G queries (fp32,
//            scaled by HD^-0.5)
//   softmax  online per query head: running max m and sum l, earlier sums rescaled
//   values   thread d: dimension d of the G outputs, sum over the tile of p * V[t, d]
// Splits past the sequence return at once. With one split in use (len <= chunk) that block
// writes the output itself; with more, each leaves its unnormalized (o, m, l) per query head
// and the last of them to finish (a counter per KV head) merges them:
//   out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,  M = max_s m_s,
// and re-arms the counter. One launch per layer, whatever the context.
// len = *pos + pos_add + 1: the cache already holds this token's K and V (the QKV epilogue
// wrote them). Cache layout (NKV, max_seq, HD) fp16 per layer, K after RoPE (the gqa form's).
// Query head j is served by KV head j / G (transformers' repeat_interleave).

struct AttnArgs {
  const float* q;         // (NH * HD) after RoPE
  const h16* k_cache;     // (NKV, max_seq, HD)
  const h16* v_cache;     // (NKV, max_seq, HD)
  const int* pos;         // the token's position = *pos + pos_add
  float* part_o;          // (NH, splits, HD) unnormalized outputs
  float* part_ml;         // (NH, splits, 2) running max and sum
  float* out;             // (NH * HD) fp32
  unsigned* counter;      // (NKV,) splits done; zero between launches
  int pos_add;
  int max_seq;
  int chunk;              // positions per split, a multiple of THREADS
  int splits;             // the attention grid's y
};

template <int HD, int G, int THREADS>
DEV void attention(const AttnArgs& a) {
  static_assert(HD % 8 == 0 && HD <= THREADS && THREADS % 32 == 0, "head_dim: a multiple of 8, at most THREADS");
  static_assert(THREADS % 4 == 0, "the values are summed 4 positions at a time");
  constexpr int WARPS = THREADS / 32;
  __shared__ __align__(16) float qs[G][HD];  // queries, pre-scaled
  __shared__ __align__(16) float sc[G][THREADS];  // this tile's scores, then probabilities
  __shared__ float m_s[G], l_s[G], corr_s[G];
  const int h = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int len = *a.pos + a.pos_add + 1;
  const int t0 = split * a.chunk;
  if (t0 >= len) return;                     // the whole block: nothing to read here
  const int t1 = min(len, t0 + a.chunk);
  const float scale = rsqrtf((float)HD);
  for (int i = tid; i < G * HD; i += THREADS) qs[i / HD][i % HD] = a.q[(h * G + i / HD) * HD + i % HD] * scale;
  if (tid < G) { m_s[tid] = __int_as_float(0xff800000); l_s[tid] = 0.f; }
  float acc[G];
#pragma unroll
  for (int g = 0; g < G; ++g) acc[g] = 0.f;
  const h16* kbase = a.k_cache + (size_t)h * a.max_seq * HD;
  const h16* vbase = a.v_cache + (size_t)h * a.max_seq * HD;
  __syncthreads();

  for (int tt = t0; tt < t1; tt += THREADS) {
    const int t = tt + tid;
    if (t < t1) {
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] = 0.f;
      const uint4* kp = (const uint4*)(kbase + (size_t)t * HD);
#pragma unroll
      for (int c = 0; c < HD / 8; ++c) {
        const uint4 kv = kp[c];
        const float2 k0 = h2x2f(kv.x), k1 = h2x2f(kv.y), k2 = h2x2f(kv.z), k3 = h2x2f(kv.w);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 qa = *(const float4*)&qs[g][8 * c], qb = *(const float4*)&qs[g][8 * c + 4];
          s[g] += qa.x * k0.x + qa.y * k0.y + qa.z * k1.x + qa.w * k1.y
                + qb.x * k2.x + qb.y * k2.y + qb.z * k3.x + qb.w * k3.y;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) sc[g][tid] = s[g];
    } else {
#pragma unroll
      for (int g = 0; g < G; ++g) sc[g][tid] = __int_as_float(0xff800000);
    }
    __syncthreads();
    for (int g = warp; g < G; g += WARPS) {  // softmax statistics, one query head per warp
      float mx = __int_as_float(0xff800000);
      for (int i = lane; i < THREADS; i += 32) mx = fmaxf(mx, sc[g][i]);
      mx = warp_max(mx);
      const float m_new = fmaxf(m_s[g], mx);  // finite: position tt is in the tile
      float sum = 0.f;
      for (int i = lane; i < THREADS; i += 32) {
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
    if (tid < HD) {
      const int n = min(THREADS, t1 - tt);
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g] *= corr_s[g];
      for (int i = 0; i < n; i += 4) {        // 4 positions a step: one 16-byte read of p per query head
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = i + j < n ? h2f(vbase[(size_t)(tt + i + j) * HD + tid]) : 0.f;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 p = *(const float4*)&sc[g][i];     // past the sequence p is 0 (and v too)
          acc[g] += p.x * v[0] + p.y * v[1] + p.z * v[2] + p.w * v[3];
        }
      }
    }
    __syncthreads();
  }
  const int used = (len + a.chunk - 1) / a.chunk;        // splits with positions to read
  if (used == 1) {                                       // the only one: normalize, done
    if (tid < HD)
#pragma unroll
      for (int g = 0; g < G; ++g) a.out[(h * G + g) * HD + tid] = acc[g] / l_s[g];
    return;
  }
  if (tid < HD)
#pragma unroll
    for (int g = 0; g < G; ++g) a.part_o[((size_t)(h * G + g) * a.splits + split) * HD + tid] = acc[g];
  if (tid < G) {
    a.part_ml[((h * G + tid) * a.splits + split) * 2] = m_s[tid];
    a.part_ml[((h * G + tid) * a.splits + split) * 2 + 1] = l_s[tid];
  }
  __threadfence();                                       // the partials, before the count
  __shared__ int is_last;
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(a.counter + h, 1u) == (unsigned)used - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // merge: per query head (a warp each) its largest running max M and each split's weight
  // e^(m_s - M) (into sc, free now: used <= THREADS, the host sizes the chunk so), then
  // every (query head, dim) output from the splits' sums
  __shared__ float den_s[G];
  for (int g = warp; g < G; g += WARPS) {
    const float* ml = a.part_ml + (size_t)(h * G + g) * a.splits * 2;
    float mx = __int_as_float(0xff800000);
    for (int s = lane; s < used; s += 32) mx = fmaxf(mx, load_l2(ml + 2 * s));
    mx = warp_max(mx);
    float den = 0.f;
    for (int s = lane; s < used; s += 32) {
      const float w = __expf(load_l2(ml + 2 * s) - mx);
      sc[g][s] = w;
      den += w * load_l2(ml + 2 * s + 1);
    }
    den = warp_sum(den);
    if (lane == 0) den_s[g] = den;
  }
  __syncthreads();
  for (int e = tid; e < G * HD; e += THREADS) {
    const int g = e / HD, d = e % HD;
    const float* po = a.part_o + (size_t)(h * G + g) * a.splits * HD + d;
    float num = 0.f;
    for (int s = 0; s < used; ++s) num += sc[g][s] * load_l2(po + (size_t)s * HD);
    a.out[(h * G + g) * HD + d] = num / den_s[g];
  }
  if (tid == 0) a.counter[h] = 0u;
}
