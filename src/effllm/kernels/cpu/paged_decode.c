/* Paged decode attention: the CPU engine's fast path (see effllm/kernels/cpu_paged_attention.py).

   `paged_decode` reads a float32 or bfloat16 cache (attention.h's shares, split over OpenMP threads);
   `paged_decode_quant` below an int8 or int4 one (rows split over the caller's threads). q and out are
   float32 either way. */
#include <stdlib.h>
#include "attention.h"

/* B single queries q [B, H, D], one per sequence; row b sees keys lo[b] .. lens[b]-1 of its blocks
   tables[b] (its query sits at lens[b]-1). q and out are float32, or bfloat16 with io_bf16 (a bfloat16
   model's activations: widened and rounded here, not by two extra passes in PyTorch). `work` holds
   paged_decode_work(B, H, D, max keys, threads) floats. */
int64_t paged_decode_work(int64_t B, int64_t H, int64_t D, int64_t max_keys, int64_t threads) {
    return attention_work(B, H, D, max_keys, threads) + threads * (H * D + D);
}

/* Whether bfloat16 scores take AMX tiles here (the CPU has them and Linux grants the tile state). */
int paged_decode_amx(void) { return attention_init(); }

void paged_decode(const void *q, int io_bf16, const void *k_cache, const void *v_cache, int cache_bf16,
                  const int64_t *tables, int64_t width, const int64_t *lens, const int64_t *lo, int64_t B, int64_t H,
                  int64_t Hkv, int64_t D, int64_t BS, float scale, int threads, float *work, void *out) {
    int64_t max_keys = 1;
    for (int64_t b = 0; b < B; b++)
        if (lens[b] - lo[b] > max_keys) max_keys = lens[b] - lo[b];
    const int64_t splits = key_splits(B, threads, max_keys), G = H / Hkv;
    attention_init();
    float *parts = work + (int64_t)threads * (attend_scratch(H, D, max_keys) + 2);
    float *io = work + attention_work(B, H, D, max_keys, threads);  /* per thread: a query [H, D], an output [D] */
    #pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num();
        float *sc = work + (int64_t)me * (attend_scratch(H, D, max_keys) + 2), *qf = io + me * (H * D + D);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < B * splits; t++) {
            const int64_t b = t / splits, part = t % splits, n = lens[b] - lo[b];
            const int64_t j0 = lo[b] + n * part / splits, j1 = lo[b] + n * (part + 1) / splits;
            float *pm = parts + t * H * (D + 2);
            const float *qb = (const float *)q + b * H * D;
            if (io_bf16) {
                for (int64_t i = 0; i < H * D; i++) qf[i] = widen_bf16(((const uint16_t *)q)[b * H * D + i]);
                qb = qf;
            }
            attend(qb, k_cache, v_cache, cache_bf16, tables + b * width, BS, Hkv, G, D, j0, j1, scale, sc, pm, pm + H,
                   pm + 2 * H);
        }
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < B * H; u++) {
            float *o = io_bf16 ? qf + H * D : (float *)out + u * D;
            merge_shares(parts + (u / H) * splits * H * (D + 2), splits, H, D, u % H, o);
            if (io_bf16)
                for (int64_t d = 0; d < D; d++) ((uint16_t *)out)[u * D + d] = round_bf16(o[d]);
        }
    }
}

/* The same over an int8 or int4 cache (effllm/kernels/kv_quant.py): each token-head holds codes c and a
   float16 step s and minimum m, x = c * s + m. Nothing is dequantized to memory: a score is
   s * (q . c) + m * sum(q), and a value row adds (w * s) * c to the output and w * m to a per-head sum
   added once at the end. int4 packs two codes per byte, the even channel in the low nibble. */
static inline float widen_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        float f = (float)mant * (1.0f / 16777216.0f);  /* zero or subnormal: mant * 2^-24 */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef __AVX512F__
/* Scores of one sequence over int8/int4 codes, 16 tokens at a time: each token's codes widened once for
   the G query heads of its kv head, the 16 x G dot products reduced together by sum16. qd holds the
   queries in the codes' channel order (deinterleaved for int4). */
static inline __attribute__((always_inline)) void quant_scores_avx512(
    const float *qd, const float *qsum, const uint8_t *k_cache, const uint16_t *k_params,
    const int64_t *table, int64_t first, int64_t n, int64_t G, int64_t Hkv, const int64_t D, int64_t BS,
    float scale, const int64_t bits, float *part, float *scores) {
    const int64_t W = D * bits / 8, token_stride = Hkv * W, V = D / 16;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t jn = n - j0 < 16 ? n - j0 : 16;
        for (int64_t g = 0; g < Hkv; g++) {
            float step[16] = {0}, low[16] = {0};
            for (int64_t jj = 0; jj < 16; jj++) {
                if (jj >= jn) {
                    for (int64_t hh = 0; hh < G; hh++) _mm512_storeu_ps(part + (hh * 16 + jj) * 16, _mm512_setzero_ps());
                    continue;
                }
                const int64_t p = first + j0 + jj, slot = table[p / BS] * BS + p % BS;
                const uint8_t *k = k_cache + slot * token_stride + g * W;
                const uint16_t *ph = k_params + (slot * Hkv + g) * 2;
                step[jj] = widen_f16(ph[0]);
                low[jj] = widen_f16(ph[1]);
                __m512 kf[8];
                if (bits == 8) {
                    for (int64_t v = 0; v < V; v++)
                        kf[v] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(k + 16 * v))));
                } else {
                    const __m128i mask = _mm_set1_epi8(0x0F);
                    for (int64_t v = 0; v < V / 2; v++) {
                        const __m128i packed = _mm_loadu_si128((const __m128i *)(k + 16 * v));
                        kf[v] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, mask)));
                        kf[V / 2 + v] = _mm512_cvtepi32_ps(
                            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), mask)));
                    }
                }
                for (int64_t hh = 0; hh < G; hh++) {
                    const float *qh = qd + (g * G + hh) * D;
                    __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qh), kf[0]);
                    for (int64_t v = 1; v < V; v++) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * v), kf[v], dot);
                    _mm512_storeu_ps(part + (hh * 16 + jj) * 16, dot);
                }
            }
            const __m512 st = _mm512_loadu_ps(step), lw = _mm512_loadu_ps(low), sc = _mm512_set1_ps(scale);
            const __mmask16 keep = (__mmask16)((1u << jn) - 1);
            for (int64_t hh = 0; hh < G; hh++) {
                const int64_t h = g * G + hh;
                const __m512 dots = sum16(part + hh * 256);
                const __m512 out = _mm512_mul_ps(_mm512_fmadd_ps(st, dots, _mm512_mul_ps(lw, _mm512_set1_ps(qsum[h]))), sc);
                _mm512_mask_storeu_ps(scores + h * n + j0, keep, out);
            }
        }
    }
}
#endif

#ifdef __AVX512F__
/* The weighted sum of the values, one kv head at a time: its G heads' accumulators stay in registers over
   all tokens, each token's codes widened once. acc gets the output in the codes' channel order. */
static inline __attribute__((always_inline)) void quant_values_avx512(
    const float *scores, const uint8_t *v_cache, const uint16_t *v_params, const int64_t *table, int64_t first,
    int64_t n, const int64_t G, int64_t Hkv, const int64_t D, int64_t BS, const int64_t bits, float *acc,
    float *msum) {
    const int64_t W = D * bits / 8, token_stride = Hkv * W, V = D / 16;
    for (int64_t g = 0; g < Hkv; g++) {
        __m512 out[8][8];
        float lows[8] = {0};
        for (int64_t hh = 0; hh < G; hh++)
            for (int64_t v = 0; v < V; v++) out[hh][v] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const int64_t p = first + j, slot = table[p / BS] * BS + p % BS;
            const uint8_t *c = v_cache + slot * token_stride + g * W;
            const uint16_t *ph = v_params + (slot * Hkv + g) * 2;
            const float step = widen_f16(ph[0]), low = widen_f16(ph[1]);
            __m512 vf[8];
            if (bits == 8) {
                for (int64_t v = 0; v < V; v++)
                    vf[v] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 16 * v))));
            } else {
                const __m128i mask = _mm_set1_epi8(0x0F);
                for (int64_t v = 0; v < V / 2; v++) {
                    const __m128i packed = _mm_loadu_si128((const __m128i *)(c + 16 * v));
                    vf[v] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, mask)));
                    vf[V / 2 + v] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), mask)));
                }
            }
            for (int64_t hh = 0; hh < G; hh++) {
                const float w = scores[(g * G + hh) * n + j];
                const __m512 ws = _mm512_set1_ps(w * step);
                lows[hh] += w * low;
                for (int64_t v = 0; v < V; v++) out[hh][v] = _mm512_fmadd_ps(ws, vf[v], out[hh][v]);
            }
        }
        for (int64_t hh = 0; hh < G; hh++) {
            for (int64_t v = 0; v < V; v++) _mm512_storeu_ps(acc + (g * G + hh) * D + 16 * v, out[hh][v]);
            msum[g * G + hh] = lows[hh];
        }
    }
}
#endif

static inline __attribute__((always_inline)) void decode_quant(
    const float *q, const uint8_t *k_cache, const uint8_t *v_cache, const uint16_t *k_params,
    const uint16_t *v_params, const int64_t *tables, int64_t width, const int64_t *lens, const int64_t *lo,
    int64_t H, int64_t Hkv, const int64_t D, int64_t BS, float scale, const int64_t bits, int64_t row_start,
    int64_t row_end, float *out) {
    /* int4: the query and the output are kept deinterleaved (even channels, then odd), so that byte i's
       low nibble meets channel 2i and its high nibble channel 2i + 1 in two contiguous, vectorisable
       loops. The G query heads of a kv head share each key's and value's loads. */
    const int64_t G = H / Hkv, W = D * bits / 8, token_stride = Hkv * W, half = D / 2;
    int64_t most = 1;
    for (int64_t b = row_start; b < row_end; b++)
        if (lens[b] - lo[b] > most) most = lens[b] - lo[b];
    float *scores = malloc(sizeof(float) * (H * most + 2 * H + 2 * H * D + G * 16 * 16));
    float *qsum = scores + H * most, *msum = qsum + H, *qd = msum + H, *acc = qd + H * D;
    float *part = acc + H * D; /* G x 16 tokens x 16 lanes of partial dot products (AVX-512 path) */
    (void)part;
    for (int64_t b = row_start; b < row_end; b++) {
        const int64_t n = lens[b] - lo[b];
        const int64_t *table = tables + b * width;
        const float *qb = q + b * H * D;
        for (int64_t h = 0; h < H; h++) {
            float s = 0.f;
            for (int64_t d = 0; d < D; d++) s += qb[h * D + d];
            qsum[h] = s;
            msum[h] = 0.f;
            if (bits == 4) {
                for (int64_t i = 0; i < half; i++) {
                    qd[h * D + i] = qb[h * D + 2 * i];
                    qd[h * D + half + i] = qb[h * D + 2 * i + 1];
                }
            } else {
                memcpy(qd + h * D, qb + h * D, sizeof(float) * D);
            }
        }
#ifdef __AVX512F__
        if (D % 32 == 0 && D <= 128) {
            quant_scores_avx512(qd, qsum, k_cache, k_params, table, lo[b], n, G, Hkv, D, BS, scale, bits,
                                part, scores);
        } else
#endif
        for (int64_t j = 0; j < n; j++) {
            const int64_t p = lo[b] + j, slot = table[p / BS] * BS + p % BS;
            for (int64_t g = 0; g < Hkv; g++) {
                const uint8_t *k = k_cache + slot * token_stride + g * W;
                const uint16_t *ph = k_params + (slot * Hkv + g) * 2;
                const float step = widen_f16(ph[0]), low = widen_f16(ph[1]);
                for (int64_t h = g * G; h < (g + 1) * G; h++) {
                    const float *qh = qd + h * D;
                    float dot = 0.f;
                    if (bits == 8) {
                        for (int64_t d = 0; d < D; d++) dot += qh[d] * (float)k[d];
                    } else {
                        for (int64_t i = 0; i < half; i++)
                            dot += qh[i] * (float)(k[i] & 15) + qh[half + i] * (float)(k[i] >> 4);
                    }
                    scores[h * n + j] = (step * dot + low * qsum[h]) * scale;
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *sh = scores + h * n, sum;
            softmax_row(sh, n, &sum);
            const float inv = 1.f / sum;
            for (int64_t j = 0; j < n; j++) sh[j] *= inv;
        }
#ifdef __AVX512F__
        if (D % 32 == 0 && D <= 128 && G <= 8) {
            quant_values_avx512(scores, v_cache, v_params, table, lo[b], n, G, Hkv, D, BS, bits, acc, msum);
        } else
#endif
        {
        memset(acc, 0, sizeof(float) * H * D);
            for (int64_t j = 0; j < n; j++) {
                const int64_t p = lo[b] + j, slot = table[p / BS] * BS + p % BS;
                for (int64_t g = 0; g < Hkv; g++) {
                    const uint8_t *v = v_cache + slot * token_stride + g * W;
                    const uint16_t *ph = v_params + (slot * Hkv + g) * 2;
                    const float step = widen_f16(ph[0]), low = widen_f16(ph[1]);
                    for (int64_t h = g * G; h < (g + 1) * G; h++) {
                        const float w = scores[h * n + j], ws = w * step;
                        float *oh = acc + h * D;
                        msum[h] += w * low;
                        if (bits == 8) {
                            for (int64_t d = 0; d < D; d++) oh[d] += ws * (float)v[d];
                        } else {
                            for (int64_t i = 0; i < half; i++) {
                                oh[i] += ws * (float)(v[i] & 15);
                                oh[half + i] += ws * (float)(v[i] >> 4);
                            }
                        }
                    }
                }
            }
        }
        float *ob = out + b * H * D;
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < D; d++) {
                const int64_t from = bits == 4 ? (d & 1) * half + (d >> 1) : d;
                ob[h * D + d] = acc[h * D + from] + msum[h];
            }
    }
    free(scores);
}

/* Specialised for the common head sizes, so the compiler sees fixed trip counts and unrolls. */
void paged_decode_quant(const float *q, const uint8_t *k_cache, const uint8_t *v_cache,
                        const uint16_t *k_params, const uint16_t *v_params, const int64_t *tables,
                        int64_t width, const int64_t *lens, const int64_t *lo, int64_t H, int64_t Hkv,
                        int64_t D, int64_t BS, float scale, int64_t bits, int64_t row_start, int64_t row_end,
                        float *out) {
#define CALL(DD, BB) decode_quant(q, k_cache, v_cache, k_params, v_params, tables, width, lens, lo, H, Hkv, DD, \
                                  BS, scale, BB, row_start, row_end, out)
    if (D == 64 && bits == 4) CALL(64, 4);
    else if (D == 64 && bits == 8) CALL(64, 8);
    else if (D == 128 && bits == 4) CALL(128, 4);
    else if (D == 128 && bits == 8) CALL(128, 8);
    else CALL(D, bits);
#undef CALL
}
