/* Decode attention over a paged float32 or bfloat16 KV cache, shared by paged_decode.c (the engine's batched
   decodes) and decode_step.c (the fused decode step): a sequence's keys are split into shares, `attend`
   computes one share for every head, `merge_shares` combines a head's shares (flash-decoding's split, so
   that a few long sequences still keep every thread busy). Also the bfloat16 helpers both use.

   Cache layout: [blocks, block_size, kv_heads, head_dim] per layer; q is float32 [heads, head_dim]; a
   bfloat16 key or value is widened in registers (it is the top half of a float32). */
#ifndef EFFLLM_ATTENTION_H
#define EFFLLM_ATTENTION_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else  /* built without -fopenmp: one thread */
static inline int omp_get_thread_num(void) { return 0; }
#endif

static inline float widen_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t round_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* exp for the softmax, written so that the compiler vectorises it (libm's expf is a call per element):
   Cephes' range reduction x = n ln2 + r and its degree-7 polynomial on |r| <= ln2 / 2, about 2 ulp. The
   arguments here are scores minus their maximum (<= 0); below -87 the result is clamped to 2^-126 * e^r. */
static inline float softmax_exp(float x) {  /* as in paged_decode.c: a vectorisable exp, about 2 ulp */
    x = x < -87.f ? -87.f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#ifdef __AVX512F__
/* Lane i of the result is the sum of the 16 lanes of v[i]: a transposing tree of unpacks and shuffles,
   about 3 instructions per sum instead of a horizontal reduction each. */
static inline __m512 sum16(const float *v) {
    __m512 s[8], u[4], w[2];
    for (int k = 0; k < 8; k++) {
        const __m512 a = _mm512_loadu_ps(v + 32 * k), b = _mm512_loadu_ps(v + 32 * k + 16);
        s[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * k], s[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(s[2 * k], s[2 * k + 1], 0xEE));
    for (int k = 0; k < 2; k++)
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline __m512 load16(const void *cache, int bf16, int64_t at) {  /* 16 channels as float32 */
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + at))), 16));
    return _mm512_loadu_ps((const float *)cache + at);
}
#endif

/* The cache offset of each of tokens j0 .. j1 - 1 (position p lives in block table[p / BS] at p % BS). */
static inline void token_offsets(const int64_t *table, int64_t BS, int64_t kv_dim, int64_t j0, int64_t j1, int64_t *at) {
    for (int64_t p = j0; p < j1;) {
        const int64_t in_block = p % BS, count = BS - in_block < j1 - p ? BS - in_block : j1 - p;
        const int64_t first = (table[p / BS] * BS + in_block) * kv_dim;
        for (int64_t t = 0; t < count; t++) at[p - j0 + t] = first + t * kv_dim;
        p += count;
    }
}

static void scores_portable(const float *q, const void *k_cache, int c_bf16, const int64_t *at, int64_t n,
                            int64_t Hkv, int64_t G, int64_t D, float scale, float *sc) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < Hkv * G; h++) {
            const int64_t base = at[j] + (h / G) * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; d++)
                s += q[h * D + d] * (c_bf16 ? widen_bf16(((const uint16_t *)k_cache)[base + d]) : ((const float *)k_cache)[base + d]);
            sc[h * n + j] = s * scale;
        }
}

static void values_portable(const float *sc, const void *v_cache, int c_bf16, const int64_t *at, int64_t n,
                            int64_t Hkv, int64_t G, int64_t D, float *o) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < Hkv * G; h++) {
            const int64_t base = at[j] + (h / G) * D;
            const float w = sc[h * n + j];
            for (int64_t d = 0; d < D; d++)
                o[h * D + d] += w * (c_bf16 ? widen_bf16(((const uint16_t *)v_cache)[base + d]) : ((const float *)v_cache)[base + d]);
        }
}

#ifdef __AVX512F__
#define PREFETCH_AHEAD 8  /* tokens: the next blocks' rows are requested before they are read */

/* Request token j + PREFETCH_AHEAD's row (every kv head) of `cache`: blocks are scattered, so the hardware
   prefetcher restarts at each one; asking ahead keeps the memory stream going. */
static inline void prefetch_row(const void *cache, int c_bf16, const int64_t *at, int64_t j, int64_t n, int64_t kv_dim) {
    if (j + PREFETCH_AHEAD >= n) return;
    const char *row = (const char *)cache + at[j + PREFETCH_AHEAD] * (c_bf16 ? 2 : 4);
    const int64_t bytes = kv_dim * (c_bf16 ? 2 : 4);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* Scores, 16 tokens at a time: each (head, token) dot product is left as 16 lanes in `lanes`, then a
   head's 16 tokens are summed together by sum16 (not one horizontal sum each). A bfloat16 cache is read
   with vdpbf16ps against the queries rounded to bfloat16 (32 channels an instruction, nothing widened). */
static inline __attribute__((always_inline)) void scores_avx512_body(const float *q, const void *k_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, const int64_t D, float scale, float *sc, float *lanes, uint16_t *qb) {
    const int64_t H = Hkv * G, C = D / 16;
#ifdef __AVX512BF16__
    if (c_bf16)
        for (int64_t i = 0; i < H * D; i++) qb[i] = round_bf16(q[i]);
#else
    (void)qb;
#endif
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t tn = n - j0 < 16 ? n - j0 : 16;
        for (int64_t t = 0; t < tn; t++) {
            prefetch_row(k_cache, c_bf16, at, j0 + t, n, Hkv * D);
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t base = at[j0 + t] + g * D;
#ifdef __AVX512BF16__
                if (c_bf16 && D % 32 == 0) {
                    const uint16_t *k = (const uint16_t *)k_cache + base;
                    for (int64_t h = g * G; h < (g + 1) * G; h++) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t c = 0; c < D; c += 32)
                            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(qb + h * D + c)),
                                                   (__m512bh)_mm512_loadu_si512((const void *)(k + c)));
                        _mm512_storeu_ps(lanes + (h * 16 + t) * 16, acc);
                    }
                    continue;
                }
#endif
                __m512 kv[16];
                for (int64_t c = 0; c < C; c++) kv[c] = load16(k_cache, c_bf16, base + 16 * c);
                for (int64_t h = g * G; h < (g + 1) * G; h++) {
                    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), kv[0]);
                    for (int64_t c = 1; c < C; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * c), kv[c], acc);
                    _mm512_storeu_ps(lanes + (h * 16 + t) * 16, acc);
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            if (tn == 16) {
                _mm512_storeu_ps(sc + h * n + j0, _mm512_mul_ps(sum16(lanes + h * 256), _mm512_set1_ps(scale)));
            } else {
                for (int64_t t = 0; t < tn; t++)
                    sc[h * n + j0 + t] = _mm512_reduce_add_ps(_mm512_loadu_ps(lanes + (h * 16 + t) * 16)) * scale;
            }
        }
    }
}


/* The body with the head dim a constant where it is a common one, so its loops unroll. */
static void scores_avx512(const float *q, const void *k_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, int64_t D, float scale, float *sc, float *lanes, uint16_t *qb) {
    if (D == 64) scores_avx512_body(q, k_cache, c_bf16, at, n, Hkv, G, 64, scale, sc, lanes, qb);
    else if (D == 128) scores_avx512_body(q, k_cache, c_bf16, at, n, Hkv, G, 128, scale, sc, lanes, qb);
    else scores_avx512_body(q, k_cache, c_bf16, at, n, Hkv, G, D, scale, sc, lanes, qb);
}

/* Weighted values, a kv head at a time: the outputs of as many of its G heads as 24 registers hold stay in
   registers over every token; each token's value row is widened once for them. */
static inline __attribute__((always_inline)) void values_avx512_body(const float *sc, const void *v_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, const int64_t D, float *o) {
    const int64_t C = D / 16, per = 24 / C < 1 ? 1 : 24 / C;
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += per) {
            const int64_t hn = (g + 1) * G - h0 < per ? (g + 1) * G - h0 : per;
            __m512 acc[24];
            for (int64_t i = 0; i < hn * C; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                if (g == 0 && h0 == 0) prefetch_row(v_cache, c_bf16, at, j, n, Hkv * D);
                __m512 v[16];
                for (int64_t c = 0; c < C; c++) v[c] = load16(v_cache, c_bf16, at[j] + g * D + 16 * c);
                for (int64_t hh = 0; hh < hn; hh++) {
                    const __m512 w = _mm512_set1_ps(sc[(h0 + hh) * n + j]);
                    for (int64_t c = 0; c < C; c++) acc[hh * C + c] = _mm512_fmadd_ps(w, v[c], acc[hh * C + c]);
                }
            }
            for (int64_t hh = 0; hh < hn; hh++)
                for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(o + (h0 + hh) * D + 16 * c, acc[hh * C + c]);
        }
}

static void values_avx512(const float *sc, const void *v_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, int64_t D, float *o) {
    if (D == 64) values_avx512_body(sc, v_cache, c_bf16, at, n, Hkv, G, 64, o);
    else if (D == 128) values_avx512_body(sc, v_cache, c_bf16, at, n, Hkv, G, 128, o);
    else values_avx512_body(sc, v_cache, c_bf16, at, n, Hkv, G, D, o);
}
#endif

/* One share of one sequence's keys, positions j0 .. j1 - 1, for all H = Hkv G query heads q [H, D]: per
   head its maximum score m, sum of exp(score - m) l and the unnormalised output o [H, D] =
   sum_j exp(score_j - m) v_j. `sc` is scratch of attend_scratch(H, n) floats. */
static inline int64_t attend_scratch(int64_t H, int64_t D, int64_t n) {
    return H * n + H * 256 + (H * D + 1) / 2 + 2 * n + 4;  /* scores, lanes, bfloat16 queries, offsets */
}

static void attend(const float *restrict q, const void *k_cache, const void *v_cache, int c_bf16,
                   const int64_t *table, int64_t BS, int64_t Hkv, int64_t G, int64_t D, int64_t j0, int64_t j1,
                   float scale, float *restrict sc, float *m, float *l, float *restrict o) {
    const int64_t n = j1 - j0, H = Hkv * G;
    memset(o, 0, sizeof(float) * H * D);
    for (int64_t h = 0; h < H; h++) { m[h] = -INFINITY; l[h] = 0.f; }
    if (n <= 0) return;
    float *lanes = sc + H * n;
    uint16_t *qb = (uint16_t *)(lanes + H * 256);
    int64_t *at = (int64_t *)(sc + H * n + H * 256 + (H * D + 1) / 2 + 1);
    at = (int64_t *)(((uintptr_t)at + 7) & ~(uintptr_t)7);
    token_offsets(table, BS, Hkv * D, j0, j1, at);
#ifdef __AVX512F__
    const int vec = D % 16 == 0 && D <= 256;  /* at most 16 vectors of a head's channels */
    if (vec) scores_avx512(q, k_cache, c_bf16, at, n, Hkv, G, D, scale, sc, lanes, qb);
    else
#endif
        scores_portable(q, k_cache, c_bf16, at, n, Hkv, G, D, scale, sc);
    for (int64_t h = 0; h < H; h++) {
        float *s = sc + h * n, mh = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < n; j++) mh = s[j] > mh ? s[j] : mh;
        for (int64_t j = 0; j < n; j++) { s[j] = softmax_exp(s[j] - mh); sum += s[j]; }
        m[h] = mh;
        l[h] = sum;
    }
#ifdef __AVX512F__
    if (vec) values_avx512(sc, v_cache, c_bf16, at, n, Hkv, G, D, o);
    else
#endif
        values_portable(sc, v_cache, c_bf16, at, n, Hkv, G, D, o);
}

/* Head h of one sequence from its `splits` shares (each [H maxima | H sums | H x D outputs]): the softmax
   over all its keys, into out [D]. */
static void merge_shares(const float *parts, int64_t splits, int64_t H, int64_t D, int64_t h, float *out) {
    float m = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < splits; s++) {
        const float pm = parts[s * H * (D + 2) + h];
        m = pm > m ? pm : m;
    }
    memset(out, 0, sizeof(float) * D);
    for (int64_t s = 0; s < splits; s++) {
        const float *pm = parts + s * H * (D + 2), *pl = pm + H, *po = pl + H;
        if (pl[h] == 0.f) continue;  /* an empty share */
        const float f = softmax_exp(pm[h] - m);
        sum += pl[h] * f;
        for (int64_t d = 0; d < D; d++) out[d] += f * po[h * D + d];
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) out[d] *= inv;
}

/* How many shares each of B sequences splits its keys into: enough for two tasks per thread, but shares of
   at least 64 keys. */
static inline int64_t key_splits(int64_t B, int64_t threads, int64_t max_keys) {
    int64_t splits = (2 * threads + B - 1) / B;
    if (splits > max_keys / 64) splits = max_keys / 64;
    return splits < 1 ? 1 : splits;
}

/* Floats of scratch `attend` and the shares need: per thread attend_scratch for the longest share, and
   parts [B splits, H (D + 2)]. */
static inline int64_t attention_work(int64_t B, int64_t H, int64_t D, int64_t max_keys, int64_t threads) {
    return threads * (attend_scratch(H, D, max_keys) + 2) + B * key_splits(B, threads, max_keys) * H * (D + 2);
}
#endif
