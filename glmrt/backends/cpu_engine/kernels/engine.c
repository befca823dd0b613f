/* glmrt's CPU decode engine: one GLM-4-0414 decode step (one token, batch 1) in C.

   Compiled per host by `glmrt build --backend cpu` (glmrt/engines/cpu_build.py) with the C
   compiler found there, for one instruction set: GLMRT_AVX512VNNI (AVX-512 BW/VL + VNNI:
   integer dot products of 64 bytes an instruction), GLMRT_AVX2 (32 bytes; with GLMRT_AVXVNNI
   the dot products of AVX-VNNI, else AVX2's maddubs + madd) or the portable C of the same
   arithmetic.
   The runtime (glmrt/backends/cpu_engine/engine.py) mirrors the structs below with ctypes and
   points them into the export's own model.onnx.data (memory-mapped) and ONNX Runtime's KV
   cache buffers: no copy of the weights, and the prefill of ONNX Runtime's CPU form (export
   --target cpu) writes the cache this step reads.

   What a step computes is glmrt/reference.py's layer, as ONNX Runtime's CPU form computes it
   with int8 activations (MatMulNBits accuracy_level 4):

     x = embed[token]                                                       (H) fp32
     per layer:
       h = rmsnorm(x) * w_in                 -> int8 per block, scale amax / 127
       qkv = h Wqkv^T + b                      ((nh + 2 nkv) hd)
       q, k = RoPE (interleaved pairs, first rot dims) at pos; k, v -> cache row pos
       attn = softmax(q k^T / sqrt(hd)) v      per query head over its KV head, positions 0..pos
       x += rmsnorm(attn Wo^T) * w_post_attn
       h = rmsnorm(x) * w_pre_mlp;  act = silu(h Wg^T) * (h Wu^T)              (I)
       x += rmsnorm(act Wd^T) * w_post_mlp
     logits = (rmsnorm(x) * w_final) Wlm^T; argmax (the first maximum)

   Weights are MatMulNBits' symmetric blocks: row n holds kb blocks of `block` values, 4-bit
   (two a byte, the low nibble first, zero point 8) or 8-bit (zero point 128), one scale a
   block: w = (q - zp) * scale. The export stores fp32 scales holding fp16 values (glmrt's
   MatMulNBits); the runtime hands the engine fp16 copies, half the bytes. A row's dot product with the int8 x is, per block,
   scale_w * scale_x * (sum q * xq - zp * sum xq), the integer sums exact.

   Threads: the caller and threads - 1 workers run the whole step together; each GEMV splits
   its rows between them, the small serial parts (norms, quantizing x) run on thread 0, and
   phases are separated by a spinning barrier. Between steps the workers spin a little, then
   sleep on a condition variable (ONNX Runtime's prefill gets the cores back). */
#define _POSIX_C_SOURCE 200809L      /* posix_memalign under -std=c11 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(GLMRT_AVX512VNNI) || defined(GLMRT_AVX2)
#include <immintrin.h>
#endif

#define GLMRT_CPU_ABI 2

/* ---- what the runtime hands over (mirrored in engine.py) ---------------------------------- */
typedef struct {
    const uint8_t *w;       /* (n, kb, block * bits / 8) MatMulNBits bytes, rows back to back */
    const void *scales;     /* (n, kb) fp32, or fp16 (scale_bits 16: the export's values, 2 bytes each) */
    const float *bias;      /* (n,) or NULL */
    int64_t n, k, kb, block, bits, scale_bits;
} Linear;

typedef struct {
    const float *input_norm, *post_attn_norm, *pre_mlp_norm, *post_mlp_norm;   /* (H,) each */
    Linear qkv, o, gate_up, down;   /* (nh+2nkv)hd x H, H x nh hd, 2I x H (gate rows, then up), H x I */
    float *k_cache, *v_cache;       /* (nkv, max_context, hd) each: ONNX Runtime's buffers */
} Layer;

typedef struct {
    int64_t hidden, inter, vocab, heads, kv_heads, head_dim, rot, layers, max_context, threads;
    double eps;
    const float *embed;       /* (vocab, H) */
    const float *final_norm;  /* (H,) */
    const float *rope;        /* (max_context, rot / 2, 2): cos, sin (YaRN's scale included) */
    Linear lm_head;           /* vocab x H */
    const Layer *layer;       /* (layers,) */
} Model;

/* ---- the int8 x of one GEMV ---------------------------------------------------------------
   A "chunk" is what one 64-byte load of weights holds: 128 values of a 4-bit row, 64 of an
   8-bit one; its 16 int32 lanes each sum E = 8 (4-bit) or 4 (8-bit) consecutive values.
   4-bit: chunk c's x is stored as its 64 even-indexed values, then its 64 odd ones (a weight
   byte's low nibble multiplies the first, its high nibble the second). Per lane: the x scale
   of its block (d) and -zp * sum of its xq (corr), the dot's starting value. Padded with zeros
   to whole chunks. */
typedef struct {
    int8_t *q;        /* (chunks * 64) or (chunks * 128) */
    float *d;         /* (chunks * 16) */
    int32_t *corr;    /* (chunks * 16) */
} Xq;

static inline int64_t chunk_values(int64_t bits) { return bits == 4 ? 128 : 64; }

/* x (k values, zero beyond) as the int8 input of L: its blocks, kb * block values in all */
static void quantize_for(const Linear *L, const float *x, int64_t k, Xq *out) {
    const int64_t bits = L->bits, block = L->block, kp = L->kb * block;
    int64_t cv = chunk_values(bits), chunks = (kp + cv - 1) / cv, e = cv / 16;
    int64_t zp = bits == 4 ? 8 : 128;
    memset(out->q, 0, (size_t)(chunks * cv));
    memset(out->corr, 0, (size_t)(chunks * 16) * sizeof(int32_t));
    memset(out->d, 0, (size_t)(chunks * 16) * sizeof(float));
    for (int64_t b0 = 0; b0 < kp; b0 += block) {
        float amax = 0.f;
        for (int64_t i = b0; i < b0 + block && i < k; ++i) amax = fmaxf(amax, fabsf(x[i]));
        float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        if (!isfinite(inv)) d = inv = 0.f;            /* a block of denormals: zero, not inf * 0 */
        for (int64_t i = b0; i < b0 + block; ++i) {
            int32_t q = 0;
            if (i < k) {
                float v = nearbyintf(x[i] * inv);
                q = (int32_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
            }
            int64_t c = i / cv, r = i % cv, lane = r / e;
            int64_t at = bits == 4 ? c * 128 + (r & 1) * 64 + r / 2 : i;   /* 4-bit: evens, then odds */
            out->q[at] = (int8_t)q;
            out->corr[c * 16 + lane] -= (int32_t)zp * q;
            out->d[c * 16 + lane] = d;
        }
    }
}

/* ---- one row's dot product -------------------------------------------------------------- */
/* what every row of a linear shares, worked out once a GEMV */
typedef struct {
    int64_t rb, full, rem, per;   /* bytes a row; whole chunks, values left over; scales a chunk uses */
    int32_t ix[16];               /* lane j's block within its chunk */
} Shape;

static Shape shape_of(const Linear *L) {
    Shape p;
    int64_t kp = L->kb * L->block, cv = chunk_values(L->bits), e = cv / 16;
    p.rb = kp * L->bits / 8;
    p.full = kp / cv;
    p.rem = kp % cv;
    p.per = L->block < cv ? cv / L->block : 1;
    for (int j = 0; j < 16; ++j) p.ix[j] = L->block < cv ? (int32_t)(j * e / L->block) : 0;
    return p;
}

/* weights and scales are requested into L2 this far ahead of the chunk read: one thread then
   streams 21 GB/s from DRAM instead of 17 (this repository's 2-core EPYC, an lm_head-sized GEMV;
   2048 bytes ahead was slower than none, into L1 too) */
#define PREFETCH 8192

#if defined(GLMRT_AVX512VNNI)

/* one chunk of one row: the 16 lanes' integer sums, scaled */
static inline __m512 chunk_dot(__m512i wb, __m512 sw, const Xq *x, int64_t c, int64_t bits) {
    __m512i a = _mm512_loadu_si512(x->corr + c * 16);
    if (bits == 4) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        __m512i lo = _mm512_and_si512(wb, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), m4);
        a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a, lo, _mm512_loadu_si512(x->q + c * 128)),
                                hi, _mm512_loadu_si512(x->q + c * 128 + 64));
    } else {
        a = _mm512_dpbusd_epi32(a, wb, _mm512_loadu_si512(x->q + c * 64));
    }
    return _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(sw, _mm512_loadu_ps(x->d + c * 16)));
}

/* the scales of a chunk starting at block b, spread to its 16 lanes by ix */
static inline __m512 lane_scales(const Linear *L, int64_t b, __mmask16 need, __m512i idx) {
    __m512 v = L->scale_bits == 16
        ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(need, (const uint16_t *)L->scales + b))
        : _mm512_maskz_loadu_ps(need, (const float *)L->scales + b);
    return _mm512_permutexvar_ps(idx, v);
}

static float row_dot(const Linear *L, const Shape *p, int64_t row, const Xq *x) {
    const int64_t bits = L->bits, block = L->block, cv = chunk_values(bits), sb = L->scale_bits / 8;
    const uint8_t *w = L->w + row * p->rb;
    const int64_t s0 = row * L->kb;                     /* the row's first block */
    const char *sp = (const char *)L->scales + s0 * sb;
    const __m512i idx = _mm512_loadu_si512(p->ix);
    const __mmask16 need = (__mmask16)((1u << p->per) - 1);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= p->full; c += 2) {                  /* two chunks a turn: two chains of sums */
        _mm_prefetch((const char *)(w + c * 64 + PREFETCH), _MM_HINT_T1);
        _mm_prefetch((const char *)(w + c * 64 + 64 + PREFETCH), _MM_HINT_T1);
        if ((c & 3) == 0) _mm_prefetch(sp + c * cv / block * sb + PREFETCH / 4, _MM_HINT_T1);
        __m512 sw0 = lane_scales(L, s0 + c * cv / block, need, idx);
        __m512 sw1 = lane_scales(L, s0 + (c + 1) * cv / block, need, idx);
        acc0 = _mm512_add_ps(acc0, chunk_dot(_mm512_loadu_si512(w + c * 64), sw0, x, c, bits));
        acc1 = _mm512_add_ps(acc1, chunk_dot(_mm512_loadu_si512(w + c * 64 + 64), sw1, x, c + 1, bits));
    }
    for (; c <= p->full; ++c) {
        __mmask64 wneed = ~0ULL;
        __mmask16 sneed = need;
        if (c == p->full) {                             /* the row's last, partial chunk */
            if (p->rem == 0) break;
            int64_t bytes = p->rem * bits / 8, blocks = (p->rem + block - 1) / block;
            wneed = (1ULL << bytes) - 1;
            sneed = (__mmask16)((1u << (blocks < p->per ? blocks : p->per)) - 1);
        }
        __m512 sw = lane_scales(L, s0 + c * cv / block, sneed, idx);
        acc0 = _mm512_add_ps(acc0, chunk_dot(_mm512_maskz_loadu_epi8(wneed, w + c * 64), sw, x, c, bits));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#elif defined(GLMRT_AVX2)
/* The same chunks in two 32-byte halves: half h holds weight bytes 32h .. 32h+31 of the chunk,
   lanes 8h .. 8h+7 (x's layout is the AVX-512 one). */
#if defined(GLMRT_AVXVNNI)
/* a += the 4-product sums of unsigned w bytes times signed x bytes, per 32-bit lane */
static inline __m256i dot4(__m256i a, __m256i w, __m256i x) { return _mm256_dpbusd_avx_epi32(a, w, x); }
#else
static inline __m256i dot4(__m256i a, __m256i w, __m256i x) {
    /* maddubs sums pairs into int16: 4-bit codes (<= 15) times |x| <= 127 cannot saturate */
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
#endif

/* the weight scales of a chunk from its first block b (up to 8: 4-bit blocks of 16); n exist */
static inline __m256 chunk_scales(const Linear *L, int64_t b, int64_t n) {
    if (n == 4)
        return _mm256_castps128_ps256(L->scale_bits == 16
            ? _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)L->scales + b)))
            : _mm_loadu_ps((const float *)L->scales + b));
    float v[8] = {0};
    for (int64_t i = 0; i < n && i < 8; ++i)
        v[i] = L->scale_bits == 16 ? _cvtsh_ss(((const uint16_t *)L->scales)[b + i]) : ((const float *)L->scales)[b + i];
    return _mm256_loadu_ps(v);
}

/* half h (32 weight bytes at wb) of chunk c: its 8 lanes' scaled sums */
static inline __m256 half_dot(__m256i wb, __m256 sw, const Xq *x, int64_t c, int h, int64_t bits) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(x->corr + c * 16 + 8 * h));
    if (bits == 4) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        __m256i lo = _mm256_and_si256(wb, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), m4);
        a = dot4(a, lo, _mm256_loadu_si256((const __m256i *)(x->q + c * 128 + 32 * h)));
        a = dot4(a, hi, _mm256_loadu_si256((const __m256i *)(x->q + c * 128 + 64 + 32 * h)));
    } else {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(x->q + c * 64 + 32 * h));
#if defined(GLMRT_AVXVNNI)
        a = dot4(a, wb, xq);
#else
        /* 8-bit codes times x would saturate maddubs' int16 pairs: (w - 128) * x instead, as |x|
           times (w - 128) with x's sign, which is the sum with its zero point taken off (so the
           lane starts at 0, not at corr; symmetric codes are 1 .. 255, so w - 128 never is -128,
           which sign could not negate) */
        __m256i ws = _mm256_xor_si256(wb, _mm256_set1_epi8((char)0x80));
        a = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(xq, xq), _mm256_sign_epi8(ws, xq)),
                              _mm256_set1_epi16(1));
#endif
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(sw, _mm256_loadu_ps(x->d + c * 16 + 8 * h)));
}

static float row_dot(const Linear *L, const Shape *p, int64_t row, const Xq *x) {
    const int64_t bits = L->bits, block = L->block, cv = chunk_values(bits);
    const uint8_t *w = L->w + row * p->rb;
    const int64_t s0 = row * L->kb, bb = block * bits / 8;          /* a block's weight bytes */
    const __m256i idx0 = _mm256_loadu_si256((const __m256i *)p->ix), idx1 = _mm256_loadu_si256((const __m256i *)(p->ix + 8));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  /* the halves: two chains */
    for (int64_t c = 0; c < p->full; ++c) {
        _mm_prefetch((const char *)(w + c * 64 + PREFETCH), _MM_HINT_T1);
        const __m256 s4 = chunk_scales(L, s0 + c * cv / block, p->per);
        acc0 = _mm256_add_ps(acc0, half_dot(_mm256_loadu_si256((const __m256i *)(w + c * 64)),
                                            _mm256_permutevar8x32_ps(s4, idx0), x, c, 0, bits));
        acc1 = _mm256_add_ps(acc1, half_dot(_mm256_loadu_si256((const __m256i *)(w + c * 64 + 32)),
                                            _mm256_permutevar8x32_ps(s4, idx1), x, c, 1, bits));
    }
    if (p->rem) {                                       /* the row's last, partial chunk, copied out */
        const int64_t c = p->full, left = p->rem * bits / 8, blocks = (left + bb - 1) / bb;
        uint8_t tail[64] = {0};
        memcpy(tail, w + c * 64, (size_t)left);
        const __m256 s4 = chunk_scales(L, s0 + c * cv / block, p->per < blocks ? p->per : blocks);
        acc0 = _mm256_add_ps(acc0, half_dot(_mm256_loadu_si256((const __m256i *)tail),
                                            _mm256_permutevar8x32_ps(s4, idx0), x, c, 0, bits));
        if (left > 32)
            acc1 = _mm256_add_ps(acc1, half_dot(_mm256_loadu_si256((const __m256i *)(tail + 32)),
                                                _mm256_permutevar8x32_ps(s4, idx1), x, c, 1, bits));
    }
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#else
/* fp16 bits -> float (normal, subnormal, zero; scales are finite) */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1F, m = h & 0x3FF, bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f;    /* m * 2^-24 */
        return sign ? -f : f;
    }
    bits = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float scale_at(const Linear *L, int64_t b) {
    return L->scale_bits == 16 ? half_to_float(((const uint16_t *)L->scales)[b]) : ((const float *)L->scales)[b];
}

/* the same sums lane by lane, in portable C */
static float row_dot(const Linear *L, const Shape *p, int64_t row, const Xq *x) {
    int64_t bits = L->bits, block = L->block, kp = L->kb * block, cv = chunk_values(bits);
    int64_t chunks = (kp + cv - 1) / cv, e = cv / 16;
    const uint8_t *w = L->w + row * p->rb;
    const int64_t s0 = row * L->kb;
    float acc[16] = {0};
    for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t j = 0; j < 16; ++j) {
            int64_t i0 = c * cv + j * e;               /* the lane's first value */
            if (i0 >= kp) break;
            int32_t sum = x->corr[c * 16 + j];
            for (int64_t t = 0; t < e; ++t) {
                int64_t i = i0 + t, r = i % cv;
                int32_t q = bits == 4 ? (w[i / 2] >> ((i & 1) * 4)) & 0x0F : w[i];
                int64_t at = bits == 4 ? c * 128 + (r & 1) * 64 + r / 2 : i;
                sum += q * (int32_t)x->q[at];
            }
            acc[j] += (float)sum * (scale_at(L, s0 + i0 / block) * x->d[c * 16 + j]);
        }
    }
    float total = 0.f;
    for (int j = 0; j < 16; ++j) total += acc[j];
    return total;
}
#endif

/* ---- threads ------------------------------------------------------------------------------ */
#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#else
#define PAUSE() atomic_signal_fence(memory_order_seq_cst)
#endif
#define WAKE_SPINS 200000        /* a worker spins this many pauses for the next step, then sleeps */

typedef struct Engine Engine;
struct Engine {
    Model m;
    Layer *layers;                /* the model's, copied */
    int64_t nt;
    /* scratch, 64-byte aligned */
    float *x;       /* (H) the residual stream */
    float *h;       /* (max(H, nh hd, I)) a norm's output, the attention's, the SwiGLU's */
    float *qkv;     /* ((nh + 2 nkv) hd) */
    float *t;       /* (H) o_proj's / down's output */
    float *scores;  /* (nh, max_context) */
    Xq xq;
    float *logits;  /* (vocab) the caller's */
    float *best_v;  /* (nt) each thread's maximum logit */
    int64_t *best_i;
    int64_t token, pos;
    /* the pool */
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int generation, sleepers, stop;
    atomic_int bar_count, bar_sense;
};

/* every thread waits here for the others; past BARRIER_SPINS pauses a waiting thread yields its
   core (more threads than cores: the one it waits for may need it) */
#define BARRIER_SPINS 4096
static void barrier(Engine *e, int *sense) {
    *sense = !*sense;
    if (atomic_fetch_add(&e->bar_count, 1) == e->nt - 1) {
        atomic_store(&e->bar_count, 0);
        atomic_store(&e->bar_sense, *sense);
    } else {
        for (int spins = 0; atomic_load(&e->bar_sense) != *sense; ++spins) {
            if (spins < BARRIER_SPINS) PAUSE();
            else sched_yield();
        }
    }
}

/* 16 lanes of a . b over the whole groups of 16 (vectorized without reordering a lane's sum);
   returns where the tail starts */
static int64_t lane_sums(const float *a, const float *b, int64_t n, float acc[16]) {
    int64_t i = 0;
    for (int j = 0; j < 16; ++j) acc[j] = 0.f;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
    return i;
}

static float dot(const float *a, const float *b, int64_t n) {
    float acc[16], s = 0.f;
    int64_t i = lane_sums(a, b, n, acc);
    for (int j = 0; j < 16; ++j) s += acc[j];
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* out = x / sqrt(mean(x^2) + eps) * w: 16 fp32 partial sums of squares, then their sum in
   fp64. Summing the 16 in fp32 instead put one activation of the int4 test checkpoint on the
   other side of an int8 rounding tie from ONNX Runtime's norm (its decode logits 1.3e-3 apart
   instead of 3e-7; tests/test_cpu_engine.py, session 16) */
static void rmsnorm(const float *x, const float *w, float *out, int64_t n, double eps) {
    float acc[16];
    int64_t i = lane_sums(x, x, n, acc);
    double ss = 0.0;
    for (int j = 0; j < 16; ++j) ss += acc[j];
    for (; i < n; ++i) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

/* the sandwich norms' residual add: x += rmsnorm(t) * w (t is overwritten) */
static void add_norm(float *x, float *t, const float *w, int64_t n, double eps) {
    rmsnorm(t, w, t, n, eps);
    for (int64_t i = 0; i < n; ++i) x[i] += t[i];
}

/* rows [lo, hi) of thread tid's share, in whole groups of 4 rows */
static void share(int64_t n, int64_t tid, int64_t nt, int64_t *lo, int64_t *hi) {
    int64_t groups = (n + 3) / 4;
    *lo = groups * tid / nt * 4;
    *hi = groups * (tid + 1) / nt * 4;
    if (*hi > n) *hi = n;
    if (*lo > n) *lo = n;
}

static void gemv(const Linear *L, const Xq *x, float *y, int64_t tid, int64_t nt) {
    int64_t lo, hi;
    share(L->n, tid, nt, &lo, &hi);
    Shape p = shape_of(L);
    for (int64_t r = lo; r < hi; ++r) y[r] = row_dot(L, &p, r, x) + (L->bias ? L->bias[r] : 0.f);
}

/* gate_up: rows r (gate) and inter + r (up) of one thread's share -> act[r] = silu(g) * u */
static void gemv_swiglu(const Linear *L, const Xq *x, float *act, int64_t inter, int64_t tid, int64_t nt) {
    int64_t lo, hi;
    share(inter, tid, nt, &lo, &hi);
    Shape p = shape_of(L);
    for (int64_t r = lo; r < hi; ++r) {
        float g = row_dot(L, &p, r, x), u = row_dot(L, &p, inter + r, x);
        act[r] = g / (1.f + expf(-g)) * u;
    }
}

static void rope(float *v, const float *table, int64_t rot) {
    for (int64_t i = 0; i < rot / 2; ++i) {
        float c = table[2 * i], s = table[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = b * c + a * s;
    }
}

/* query head hq at position pos: out (hd) = softmax(q K^T / sqrt(hd)) V over positions 0..pos */
static void attend(const Engine *e, const Layer *L, int64_t hq, float *out) {
    const Model *m = &e->m;
    int64_t hd = m->head_dim, g = m->heads / m->kv_heads, kvh = hq / g, len = e->pos + 1;
    const float *q = e->qkv + hq * hd;
    const float *K = L->k_cache + kvh * m->max_context * hd, *V = L->v_cache + kvh * m->max_context * hd;
    float *s = e->scores + hq * m->max_context, mx = -INFINITY, scale = 1.f / sqrtf((float)hd);
    for (int64_t t = 0; t < len; ++t) {
        s[t] = dot(q, K + t * hd, hd) * scale;
        mx = fmaxf(mx, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) sum += (s[t] = expf(s[t] - mx));
    for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
    for (int64_t t = 0; t < len; ++t) {
        float p = s[t] / sum;
        const float *v = V + t * hd;
        for (int64_t i = 0; i < hd; ++i) out[i] += p * v[i];
    }
}

static void step_body(Engine *e, int64_t tid) {
    const Model *m = &e->m;
    int64_t H = m->hidden, I = m->inter, nh = m->heads, nkv = m->kv_heads, hd = m->head_dim, nt = e->nt;
    int sense = atomic_load(&e->bar_sense);
    const float *rope_row = m->rope + e->pos * (m->rot / 2) * 2;
    if (tid == 0) memcpy(e->x, m->embed + e->token * H, (size_t)H * sizeof(float));
    for (int64_t l = 0; l < m->layers; ++l) {
        const Layer *L = &e->layers[l];
        if (tid == 0) {
            rmsnorm(e->x, L->input_norm, e->h, H, m->eps);
            quantize_for(&L->qkv, e->h, H, &e->xq);
        }
        barrier(e, &sense);
        gemv(&L->qkv, &e->xq, e->qkv, tid, nt);
        barrier(e, &sense);
        if (tid == 0) {                    /* k, v -> the cache at pos, k rotated */
            for (int64_t j = 0; j < nkv; ++j) {
                float *k = L->k_cache + (j * m->max_context + e->pos) * hd;
                float *v = L->v_cache + (j * m->max_context + e->pos) * hd;
                memcpy(k, e->qkv + (nh + j) * hd, (size_t)hd * sizeof(float));
                memcpy(v, e->qkv + (nh + nkv + j) * hd, (size_t)hd * sizeof(float));
                rope(k, rope_row, m->rot);
            }
        }
        barrier(e, &sense);
        for (int64_t hq = tid; hq < nh; hq += nt) {
            rope(e->qkv + hq * hd, rope_row, m->rot);
            attend(e, L, hq, e->h + hq * hd);
        }
        barrier(e, &sense);
        if (tid == 0) quantize_for(&L->o, e->h, nh * hd, &e->xq);
        barrier(e, &sense);
        gemv(&L->o, &e->xq, e->t, tid, nt);
        barrier(e, &sense);
        if (tid == 0) {
            add_norm(e->x, e->t, L->post_attn_norm, H, m->eps);
            rmsnorm(e->x, L->pre_mlp_norm, e->h, H, m->eps);
            quantize_for(&L->gate_up, e->h, H, &e->xq);
        }
        barrier(e, &sense);
        gemv_swiglu(&L->gate_up, &e->xq, e->h, I, tid, nt);
        barrier(e, &sense);
        if (tid == 0) quantize_for(&L->down, e->h, I, &e->xq);
        barrier(e, &sense);
        gemv(&L->down, &e->xq, e->t, tid, nt);
        barrier(e, &sense);
        if (tid == 0) add_norm(e->x, e->t, L->post_mlp_norm, H, m->eps);
    }
    const Linear *lm = &m->lm_head;
    if (tid == 0) {
        rmsnorm(e->x, m->final_norm, e->h, H, m->eps);
        quantize_for(lm, e->h, H, &e->xq);
    }
    barrier(e, &sense);
    gemv(lm, &e->xq, e->logits, tid, nt);
    int64_t lo, hi;                        /* this thread's rows' first maximum */
    share(lm->n, tid, nt, &lo, &hi);
    float bv = -INFINITY;
    int64_t bi = lo;
    for (int64_t r = lo; r < hi; ++r)
        if (e->logits[r] > bv) { bv = e->logits[r]; bi = r; }
    e->best_v[tid] = bv;
    e->best_i[tid] = bi;
    barrier(e, &sense);
}

static void *worker(void *arg) {
    Engine *e = ((void **)arg)[0];
    int64_t tid = (int64_t)(intptr_t)((void **)arg)[1];
    free(arg);
    int seen = 0;                   /* the generation before the first step (a step may start before this thread) */
    for (;;) {
        int spins = 0;
        while (atomic_load(&e->generation) == seen && spins < WAKE_SPINS) { PAUSE(); ++spins; }
        if (atomic_load(&e->generation) == seen) {
            pthread_mutex_lock(&e->mu);
            atomic_fetch_add(&e->sleepers, 1);
            while (atomic_load(&e->generation) == seen) pthread_cond_wait(&e->cv, &e->mu);
            atomic_fetch_sub(&e->sleepers, 1);
            pthread_mutex_unlock(&e->mu);
        }
        seen = atomic_load(&e->generation);
        if (atomic_load(&e->stop)) return NULL;
        step_body(e, tid);
    }
}

static void *aligned(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (bytes + 63) / 64 * 64 + 64)) return NULL;
    memset(p, 0, bytes);
    return p;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- the ABI -------------------------------------------------------------------------------- */
int glmrt_cpu_abi(void) { return GLMRT_CPU_ABI; }

const char *glmrt_cpu_isa(void) {
#if defined(GLMRT_AVX512VNNI)
    return "avx512vnni";
#elif defined(GLMRT_AVXVNNI)
    return "avxvnni";
#elif defined(GLMRT_AVX2)
    return "avx2";
#else
    return "generic";
#endif
}

void glmrt_cpu_close(Engine *e);

static int64_t xq_chunks(const Linear *L) {
    int64_t cv = chunk_values(L->bits);
    return (L->kb * L->block + cv - 1) / cv;
}

/* the engine for a model; NULL when memory runs out or threads cannot start */
Engine *glmrt_cpu_open(const Model *m) {
    Engine *e = calloc(1, sizeof(Engine));
    if (!e) return NULL;
    e->m = *m;
    e->nt = m->threads < 1 ? 1 : m->threads;
    e->layers = malloc(sizeof(Layer) * (size_t)m->layers);
    if (!e->layers) { free(e); return NULL; }
    memcpy(e->layers, m->layer, sizeof(Layer) * (size_t)m->layers);
    e->m.layer = e->layers;
    int64_t H = m->hidden, nh = m->heads, hd = m->head_dim, chunks = xq_chunks(&m->lm_head);
    for (int64_t l = 0; l < m->layers; ++l) {
        const Layer *L = &m->layer[l];
        chunks = max64(chunks, max64(max64(xq_chunks(&L->qkv), xq_chunks(&L->o)),
                                     max64(xq_chunks(&L->gate_up), xq_chunks(&L->down))));
    }
    e->x = aligned(sizeof(float) * H);
    e->h = aligned(sizeof(float) * max64(max64(H, nh * hd), m->inter));
    e->qkv = aligned(sizeof(float) * (nh + 2 * m->kv_heads) * hd);
    e->t = aligned(sizeof(float) * H);
    e->scores = aligned(sizeof(float) * nh * m->max_context);
    e->xq.q = aligned((size_t)chunks * 128);
    e->xq.d = aligned(sizeof(float) * chunks * 16);
    e->xq.corr = aligned(sizeof(int32_t) * chunks * 16);
    e->best_v = aligned(sizeof(float) * e->nt);
    e->best_i = aligned(sizeof(int64_t) * e->nt);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    if (!e->x || !e->h || !e->qkv || !e->t || !e->scores || !e->xq.q || !e->xq.d || !e->xq.corr ||
        !e->best_v || !e->best_i) { glmrt_cpu_close(e); return NULL; }
    e->workers = calloc((size_t)e->nt, sizeof(pthread_t));
    if (!e->workers) { glmrt_cpu_close(e); return NULL; }
    for (int64_t t = 1; t < e->nt; ++t) {
        void **arg = malloc(2 * sizeof(void *));
        arg[0] = e;
        arg[1] = (void *)(intptr_t)t;
        if (pthread_create(&e->workers[t], NULL, worker, arg)) {
            free(arg);
            e->nt = t;                       /* the threads started so far stop in close */
            glmrt_cpu_close(e);
            return NULL;
        }
    }
    return e;
}

/* one decode step: token at position pos (the cache holds positions 0..pos-1); logits (vocab)
   fp32 into `logits`; returns the argmax (the first maximum) */
int64_t glmrt_cpu_step(Engine *e, int64_t token, int64_t pos, float *logits) {
    e->token = token;
    e->pos = pos;
    e->logits = logits;
    atomic_fetch_add(&e->generation, 1);
    if (atomic_load(&e->sleepers) > 0) {
        pthread_mutex_lock(&e->mu);
        pthread_cond_broadcast(&e->cv);
        pthread_mutex_unlock(&e->mu);
    }
    step_body(e, 0);
    float bv = e->best_v[0];
    int64_t bi = e->best_i[0];
    for (int64_t t = 1; t < e->nt; ++t)
        if (e->best_v[t] > bv) { bv = e->best_v[t]; bi = e->best_i[t]; }
    return bi;
}

void glmrt_cpu_close(Engine *e) {
    if (!e) return;
    if (e->workers) {
        atomic_store(&e->stop, 1);
        pthread_mutex_lock(&e->mu);
        atomic_fetch_add(&e->generation, 1);
        pthread_cond_broadcast(&e->cv);
        pthread_mutex_unlock(&e->mu);
        for (int64_t t = 1; t < e->nt; ++t) pthread_join(e->workers[t], NULL);
        free(e->workers);
    }
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e->x); free(e->h); free(e->qkv); free(e->t); free(e->scores);
    free(e->xq.q); free(e->xq.d); free(e->xq.corr); free(e->best_v); free(e->best_i);
    free(e->layers);
    free(e);
}

/* one GEMV on its own (the tests and the build's check): y (n) = W x, x (k) quantized here */
int glmrt_cpu_gemv(const Linear *L, const float *x, float *y) {
    int64_t chunks = xq_chunks(L);
    Xq q = {aligned((size_t)chunks * 128), aligned(sizeof(float) * chunks * 16),
            aligned(sizeof(int32_t) * chunks * 16)};
    if (!q.q || !q.d || !q.corr) { free(q.q); free(q.d); free(q.corr); return 1; }
    quantize_for(L, x, L->k, &q);
    gemv(L, &q, y, 0, 1);
    free(q.q); free(q.d); free(q.corr);
    return 0;
}
