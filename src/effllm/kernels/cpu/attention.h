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
static inline __m512 load16(const void *cache, int bf16, int64_t at) {  /* 16 channels as float32 */
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + at))), 16));
    return _mm512_loadu_ps((const float *)cache + at);
}
#endif

/* One share of one sequence's keys, positions j0 .. j1 - 1, for all H = Hkv G query heads q [H, D]:
   scores into sc [H, j1 - j0], then per head its maximum m, sum of exp(score - m) l and the unnormalised
   output o [H, D] = sum_j exp(score_j - m) v_j. Tokens are walked block by block, each token's keys (then
   values) of every head read at once: a share is one front-to-back stream over its part of the cache. */
static void attend(const float *restrict q, const void *k_cache, const void *v_cache, int c_bf16,
                   const int64_t *table, int64_t BS, int64_t Hkv, int64_t G, int64_t D, int64_t j0, int64_t j1,
                   float scale, float *restrict sc, float *m, float *l, float *restrict o) {
    const int64_t n = j1 - j0, H = Hkv * G, kv_dim = Hkv * D;
    memset(o, 0, sizeof(float) * H * D);
    for (int64_t h = 0; h < H; h++) { m[h] = -INFINITY; l[h] = 0.f; }
    if (n <= 0) return;
#ifdef __AVX512F__
    const int vec = D % 16 == 0 && D <= 256;
#else
    const int vec = 0;
#endif
    for (int pass = 0; pass < 2; pass++) {  /* 0: scores, 1: weighted values */
        if (pass == 1)
            for (int64_t h = 0; h < H; h++) {
                float *s = sc + h * n, mh = -INFINITY, sum = 0.f;
                for (int64_t j = 0; j < n; j++) mh = s[j] > mh ? s[j] : mh;
                for (int64_t j = 0; j < n; j++) { s[j] = softmax_exp(s[j] - mh); sum += s[j]; }
                m[h] = mh;
                l[h] = sum;
            }
        const void *cache = pass == 0 ? k_cache : v_cache;
        for (int64_t p = j0; p < j1;) {
            const int64_t in_block = p % BS, count = BS - in_block < j1 - p ? BS - in_block : j1 - p;
            const int64_t first = (table[p / BS] * BS + in_block) * kv_dim;
            for (int64_t t = 0; t < count; t++) {
                const int64_t j = p - j0 + t;
                for (int64_t g = 0; g < Hkv; g++) {
                    const int64_t at = first + t * kv_dim + g * D;
                    if (vec) {
#ifdef __AVX512F__
                        __m512 kv[16];
                        for (int64_t c = 0; c < D / 16; c++) kv[c] = load16(cache, c_bf16, at + 16 * c);
                        for (int64_t h = g * G; h < (g + 1) * G; h++) {
                            if (pass == 0) {
                                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), kv[0]);
                                for (int64_t c = 1; c < D / 16; c++)
                                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * c), kv[c], acc);
                                sc[h * n + j] = _mm512_reduce_add_ps(acc) * scale;
                            } else {
                                const __m512 w = _mm512_set1_ps(sc[h * n + j]);
                                for (int64_t c = 0; c < D / 16; c++) {
                                    float *oc = o + h * D + 16 * c;
                                    _mm512_storeu_ps(oc, _mm512_fmadd_ps(w, kv[c], _mm512_loadu_ps(oc)));
                                }
                            }
                        }
#endif
                    } else {
                        for (int64_t h = g * G; h < (g + 1) * G; h++) {
                            if (pass == 0) {
                                float s = 0.f;
                                for (int64_t d = 0; d < D; d++)
                                    s += q[h * D + d] * (c_bf16 ? widen_bf16(((const uint16_t *)cache)[at + d]) : ((const float *)cache)[at + d]);
                                sc[h * n + j] = s * scale;
                            } else {
                                const float w = sc[h * n + j];
                                for (int64_t d = 0; d < D; d++)
                                    o[h * D + d] += w * (c_bf16 ? widen_bf16(((const uint16_t *)cache)[at + d]) : ((const float *)cache)[at + d]);
                            }
                        }
                    }
                }
            }
            p += count;
        }
    }
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

/* Floats of scratch `attend` and the shares need: scores [threads, H, max_keys] and parts [B splits, H (D + 2)]. */
static inline int64_t attention_work(int64_t B, int64_t H, int64_t D, int64_t max_keys, int64_t threads) {
    return threads * H * max_keys + B * key_splits(B, threads, max_keys) * H * (D + 2);
}
#endif
