/* Quantized matrix-vector products for decode-sized batches: y[m, n] = sum_k x[m, k] * W[n, k], with W
   stored in fewer bits and widened in registers (weights are read once, all M rows of x against them).

   gemv_w4   4-bit weights, the compressed-tensors `pack-quantized` bytes as they are stored: row n holds
             K/2 bytes, byte b the unsigned codes u of k = 2b (low nibble) and k = 2b + 1 (high nibble).
             W[n, k] = (u - z[n, g]) * s[n, g] for the group g = k / group_size; z (unsigned bytes
             [N, G]) is NULL for symmetric weights, whose zero is 8. group_size is a multiple of 32; x is
             split into even and odd columns per 32 so that one byte load feeds two FMAs without shuffles.
   gemv_w8   8-bit weights per output channel stored as the unsigned codes u = q + 128 of
             `pack-quantized`, W[n, k] = (u[n, k] - 128) * s[n], float activations.
   gemv_w8a8 8-bit weights per channel and 8-bit activations per row (dynamic, symmetric: the row's
             absolute maximum maps to 127), integer dot products (AVX-512 VNNI `vpdpbusd` takes unsigned
             times signed bytes, so x is offset by 128 and 128 * sum_k q[n, k], `rowsum`, taken back).

   gemv_w4a8 QoQ's W4A8 (QServe): 4-bit unsigned codes u packed as in gemv_w4, progressive grid
             W[n, k] = s1[n] * s2[n, g] * (u - z[n, g]) with integer s2 and z (bytes [N, G]); activations
             per row to symmetric int8 (x8, scale sx). In MixPE's order each group's integer dot
             product is taken first and scaled once: acc = sum_g s2 (sum_k u x8 - z sum_k x8), and
             y = sx * s1 * acc, all integer until the epilogue. K is a multiple of 64 and group_size
             32, 64 or a multiple of 128: a 64-byte load holds 128 codes, low nibbles the even columns,
             so x8 is split into even and odd halves per 128 (per 64 for a last 64 columns) and
             `vpdpbusd` (unsigned codes times signed activations) takes them; each int32 lane covers 8
             columns of one group, so the group steps are applied per lane.

   x and y are float32, or bfloat16 with io_bf16; the scales are float32 or bfloat16 (`scale_bf16`), as
   the checkpoint stores them. Each kernel has a portable scalar path for CPUs without AVX-512 (and VNNI); the
   build helper compiles with -march=native, so the preprocessor picks what this CPU has. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "w4.h"
#include "w8.h"

/* x [M, K] -> xs [M, K] with each 32 columns reordered as the 16 even ones, then the 16 odd ones. */
static void split_even_odd(const float *x, float *xs, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; j++) {
                xs[m * K + c + j] = x[m * K + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * K + c + 2 * j + 1];
            }
}

#define MR 4 /* rows of x per pass over a weight row */

/* The i-th scale, stored as float32 or (bf16 != 0) bfloat16, the top half of a float32. */
static inline float load_scale(const void *s, int bf16, int64_t i) {
    if (!bf16) return ((const float *)s)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)s)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef W4_BF16DOT
/* 4-bit weights with AVX-512 BF16 dot products (w4.h: the layout and the dot product). */
static void gemv_w4_bf16dot(const float *x, const uint8_t *w, const void *scale, int scale_bf16,
                            const uint8_t *zero, float *y, int64_t M, int64_t N, int64_t K, int64_t group_size,
                            int threads) {
    const int64_t G = K / group_size;
    uint16_t *xb = malloc(sizeof(uint16_t) * M * K);
    float *xsum = malloc(sizeof(float) * M * G);
    w4_prepare(x, xb, xsum, M, K, group_size);
    const w4_consts consts = w4_consts_for(K, group_size);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * (K / 2);
        const uint8_t *zn = zero ? zero + n * G : NULL;
        const void *sn = scale_bf16 ? (const void *)((const uint16_t *)scale + n * G) : (const void *)((const float *)scale + n * G);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;
            float s[MR];
            w4_dot_bf16(wn, sn, scale_bf16, zn, xb + m0 * K, xsum + m0 * G, mr, &consts, s);
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = s[r];
        }
    }
    free(xb);
    free(xsum);
}
#endif

static void gemv_w4_f32(const float *x, const uint8_t *w, const void *scale, int scale_bf16, const uint8_t *zero, float *y,
             int64_t M, int64_t N, int64_t K, int64_t group_size, int threads) {
#ifdef W4_BF16DOT
    if (K % 64 == 0) {
        gemv_w4_bf16dot(x, w, scale, scale_bf16, zero, y, M, N, K, group_size, threads);
        return;
    }
#endif
    float *xs = malloc(sizeof(float) * M * K);
    split_even_odd(x, xs, M, K);
    const int64_t G = K / group_size;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * (K / 2);
        const uint8_t *zn = zero ? zero + n * G : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = M - m0 < MR ? M - m0 : MR;
#ifdef __AVX512F__
            __m512 acc[MR];
            for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
            const __m512i low4 = _mm512_set1_epi32(0xF);
            for (int64_t g = 0; g < G; g++) {
                const float sg = load_scale(scale, scale_bf16, n * G + g), zg = zn ? (float)zn[g] : 8.f;
                const __m512 s = _mm512_set1_ps(sg), zs = _mm512_set1_ps(-zg * sg);
                for (int64_t c = g * group_size; c < (g + 1) * group_size; c += 32) {
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wn + c / 2)));
                    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), s, zs);
                    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, zs);
                    for (int r = 0; r < mr; r++) {
                        const float *xr = xs + (m0 + r) * K + c;
                        acc[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r]);
                        acc[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[r]);
                    }
                }
            }
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
#else
            for (int r = 0; r < mr; r++) {
                const float *xr = xs + (m0 + r) * K;
                float total = 0.f;
                for (int64_t c = 0; c < K; c += 32) {
                    const int64_t g = c / group_size;
                    const float zg = zn ? (float)zn[g] : 8.f;
                    float part = 0.f;
                    for (int j = 0; j < 16; j++) {
                        const uint8_t b = wn[c / 2 + j];
                        part += ((float)(b & 0xF) - zg) * xr[c + j] + ((float)(b >> 4) - zg) * xr[c + 16 + j];
                    }
                    total += part * load_scale(scale, scale_bf16, n * G + g);
                }
                y[(m0 + r) * N + n] = total;
            }
#endif
        }
    }
    free(xs);
}

static void gemv_w8_f32(const float *x, const uint8_t *w, const void *scale, int scale_bf16, float *y, int64_t M, int64_t N,
             int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float sn = load_scale(scale, scale_bf16, n);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;
            float total[MR];
            w8_dot_f32(w + n * K, x + m0 * K, K, mr, total);
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = total[r] * sn;
        }
    }
}

/* Per-row symmetric int8 quantization of x: xq = round(x / sx) + 128 as unsigned bytes, sx = amax / 127. */
static void quantize_rows(const float *x, uint8_t *xq, float *sx, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) w8_quantize_row(x, xq, sx, m, K);
}

static void gemv_w8a8_f32(const float *x, const int8_t *w, const void *scale, int scale_bf16, const int32_t *rowsum,
               float *y, int64_t M, int64_t N, int64_t K, int threads) {
    uint8_t *xq = malloc(M * K);
    float *sx = malloc(sizeof(float) * M);
    quantize_rows(x, xq, sx, M, K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;
            int32_t total[MR];
            w8a8_dot(w + n * K, xq + m0 * K, K, mr, total);
            for (int r = 0; r < mr; r++)
                y[(m0 + r) * N + n] = (float)(total[r] - 128 * rowsum[n]) * sx[m0 + r] * load_scale(scale, scale_bf16, n);
        }
    }
    free(xq);
    free(sx);
}

/* x [M, K] -> x8 [M, K] int8 (symmetric per row, max |x| to 127), each 128 columns (and a last 64, when
   K % 128 is 64) reordered as the even ones then the odd ones; sx [M] the scales; xsum [M, K / group_size]
   the sums of x8 per group. */
static void quantize_rows_split(const float *x, int8_t *x8, float *sx, int32_t *xsum, int64_t M, int64_t K,
                                int64_t group_size) {
    const int64_t G = K / group_size, full = K & ~(int64_t)127;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
        sx[m] = s;
        for (int64_t g = 0; g < G; g++) xsum[m * G + g] = 0;
        for (int64_t k = 0; k < K; k++) {
            float q = nearbyintf(xm[k] * inv);
            q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
            const int64_t c = k < full ? k & ~(int64_t)127 : full, j = k - c, half = k < full ? 64 : 32;
            x8[m * K + c + (j & 1) * half + (j >> 1)] = (int8_t)q;
            xsum[m * G + k / group_size] += (int32_t)q;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define W4A8_VNNI 1
/* The group steps of the 16 int32 lanes of a vpdpbusd over 128 columns from `col` (lane l covers columns
   col + 8l .. col + 8l + 7): the chunk's 128 / group_size steps loaded as bytes, widened and spread by
   `lanes` (lane l takes step (8 l) / group_size), or one step broadcast for groups of 128 and more. */
static inline __m512i lane_scales(const int8_t *s2, int64_t col, int64_t group_size, __m512i lanes) {
    if (group_size >= 128) return _mm512_set1_epi32((int32_t)s2[col / group_size]);
    const __mmask16 count = (__mmask16)((1u << (128 / group_size)) - 1);
    const __m512i wide = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(count, s2 + col / group_size));
    return _mm512_permutexvar_epi32(lanes, wide);
}

/* sum_g s2[g] z[g] xs[g] over the G groups of a row: the zero points taken back once per row. */
static inline int32_t zero_terms(const int8_t *s2, const uint8_t *z, const int32_t *xs, int64_t G) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mask = (__mmask16)(G - g < 16 ? (1u << (G - g)) - 1 : 0xFFFF);
        const __m512i sv = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, s2 + g));
        const __m512i zv = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, z + g));
        const __m512i xv = _mm512_maskz_loadu_epi32(mask, xs + g);
        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(_mm512_mullo_epi32(sv, zv), xv));
    }
    return _mm512_reduce_add_epi32(acc);
}

#define NR 4 /* weight rows per block of the VNNI path: one x load feeds four rows, one reduction sums four */

/* [a0 a1 a2 a3] lane sums of four int32 vectors. */
static inline __m128i sum4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i v = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

/* Rows n0 .. n0 + NR - 1 (fewer at the end) of y for every token, MR tokens at a time. */
static void w4a8_rows_vnni(const uint8_t *w, const void *s1, int scale_bf16, const int8_t *s2, const uint8_t *zero,
                           const int8_t *x8, const float *sx, const int32_t *xsum, float *y, int64_t M, int64_t N,
                           int64_t K, int64_t group_size, __m512i lanes, int64_t n0) {
    const int64_t G = K / group_size, full = K & ~(int64_t)127, nr = N - n0 < NR ? N - n0 : NR;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m256i nib = _mm256_set1_epi8(0x0F);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t mr = M - m0 < MR ? M - m0 : MR;
        __m512i acc[NR][MR];
        for (int i = 0; i < NR; i++)
            for (int r = 0; r < MR; r++) acc[i][r] = _mm512_setzero_si512();
        for (int64_t c = 0; c < full; c += 128) {
            __m512i xe[MR], xo[MR];
            for (int r = 0; r < mr; r++) {
                xe[r] = _mm512_loadu_si512((const void *)(x8 + (m0 + r) * K + c));
                xo[r] = _mm512_loadu_si512((const void *)(x8 + (m0 + r) * K + c + 64));
            }
            for (int i = 0; i < nr; i++) {
                const __m512i packed = _mm512_loadu_si512((const void *)(w + (n0 + i) * (K / 2) + c / 2));
                const __m512i lo = _mm512_and_si512(packed, nibble);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
                const __m512i scale = lane_scales(s2 + (n0 + i) * G, c, group_size, lanes);
                for (int r = 0; r < mr; r++) {
                    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe[r]), hi, xo[r]);
                    acc[i][r] = _mm512_add_epi32(acc[i][r], _mm512_mullo_epi32(d, scale));
                }
            }
        }
        if (full < K) { /* the last 64 columns: 32 bytes, 8 lanes */
            for (int i = 0; i < nr; i++) {
                const int8_t *s2n = s2 + (n0 + i) * G;
                const __m256i packed = _mm256_loadu_si256((const void *)(w + (n0 + i) * (K / 2) + full / 2));
                const __m256i lo = _mm256_and_si256(packed, nib);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nib);
                /* groups of 32: lanes 0-3 and 4-7 take the tail's two steps (only those two bytes are read) */
                const __m256i scale =
                    group_size >= 64
                        ? _mm256_set1_epi32((int32_t)s2n[full / group_size])
                        : _mm512_castsi512_si256(_mm512_permutexvar_epi32(
                              lanes, _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(0x3, s2n + full / 32))));
                for (int r = 0; r < mr; r++) {
                    const int8_t *xr = x8 + (m0 + r) * K + full;
                    __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const void *)xr));
                    d = _mm256_dpbusd_epi32(d, hi, _mm256_loadu_si256((const void *)(xr + 32)));
                    acc[i][r] = _mm512_add_epi32(acc[i][r], _mm512_zextsi256_si512(_mm256_mullo_epi32(d, scale)));
                }
            }
        }
        for (int r = 0; r < mr; r++) {
            int32_t total[NR];
            _mm_storeu_si128((__m128i *)total, sum4_epi32(acc[0][r], acc[1][r], acc[2][r], acc[3][r]));
            for (int i = 0; i < nr; i++) {
                const int64_t n = n0 + i;
                const int32_t zeros = zero_terms(s2 + n * G, zero + n * G, xsum + (m0 + r) * G, G);
                y[(m0 + r) * N + n] = (float)(total[i] - zeros) * sx[m0 + r] * load_scale(s1, scale_bf16, n);
            }
        }
    }
}

/* quantize_rows_split, vectorised (K % 64 == 0, group_size a multiple of 32): 32 columns at a time are
   rounded (nearest even, as nearbyintf), split into their 16 even and 16 odd ones and narrowed to bytes. */
static void quantize_rows_split_avx512(const float *x, int8_t *x8, float *sx, int32_t *xsum, int64_t M, int64_t K,
                                       int64_t group_size) {
    const int64_t G = K / group_size, full = K & ~(int64_t)127;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int8_t *qm = x8 + m * K;
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xm + k)));
        const float amax = _mm512_reduce_max_ps(vmax);
        const float s = amax > 0.f ? amax / 127.f : 1.f;
        const __m512 inv = _mm512_set1_ps(1.f / s);
        sx[m] = s;
        for (int64_t g = 0; g < G; g++) xsum[m * G + g] = 0;
        for (int64_t c = 0; c < K; c += 128) {
            const int64_t half = c < full ? 64 : 32;
            for (int64_t j = 0; j < 2 * half; j += 32) {
                __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + c + j), inv));
                __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + c + j + 16), inv));
                a = _mm512_max_epi32(_mm512_min_epi32(a, top), bottom);
                b = _mm512_max_epi32(_mm512_min_epi32(b, top), bottom);
                _mm_storeu_si128((__m128i *)(qm + c + j / 2), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a, even, b)));
                _mm_storeu_si128((__m128i *)(qm + c + half + j / 2),
                                 _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a, odd, b)));
                xsum[m * G + (c + j) / group_size] += _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
            }
        }
    }
}
#endif

static void gemv_w4a8_f32(const float *x, const uint8_t *w, const void *s1, int scale_bf16, const int8_t *s2,
                          const uint8_t *zero, float *y, int64_t M, int64_t N, int64_t K, int64_t group_size,
                          int threads) {
    const int64_t G = K / group_size, full = K & ~(int64_t)127;
    int8_t *x8 = malloc(M * K);
    float *sx = malloc(sizeof(float) * M);
    int32_t *xsum = malloc(sizeof(int32_t) * M * G);
#ifdef W4A8_VNNI
    quantize_rows_split_avx512(x, x8, sx, xsum, M, K, group_size);
    int idx[16];
    for (int i = 0; i < 16; i++) idx[i] = group_size >= 128 ? 0 : (int)(8 * i / group_size);
    const __m512i lanes = _mm512_loadu_si512((const void *)idx);
#else
    quantize_rows_split(x, x8, sx, xsum, M, K, group_size);
#endif
#ifdef W4A8_VNNI
    const int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < blocks; nb++)
        w4a8_rows_vnni(w, s1, scale_bf16, s2, zero, x8, sx, xsum, y, M, N, K, group_size, lanes, nb * NR);
#else
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * (K / 2);
        const int8_t *s2n = s2 + n * G;
        const uint8_t *zn = zero + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = M - m0 < MR ? M - m0 : MR;
            int32_t total[MR] = {0, 0, 0, 0};
            for (int64_t c = 0; c < K; c += 128) {
                const int64_t half = c < full ? 64 : 32;
                for (int r = 0; r < mr; r++) {
                    const int8_t *xr = x8 + (m0 + r) * K + c;
                    for (int64_t j = 0; j < half; j++) {
                        const uint8_t b = wn[c / 2 + j];
                        /* byte j holds columns c + 2j (low) and c + 2j + 1 (high) */
                        total[r] += (int32_t)s2n[(c + 2 * j) / group_size] * ((int32_t)(b & 15) * xr[j]) +
                                    (int32_t)s2n[(c + 2 * j + 1) / group_size] * ((int32_t)(b >> 4) * xr[half + j]);
                    }
                }
            }
            const float sn = load_scale(s1, scale_bf16, n);
            for (int r = 0; r < mr; r++) {
                const int32_t *xs = xsum + (m0 + r) * G;
                int32_t zeros = 0;
                for (int64_t g = 0; g < G; g++) zeros += (int32_t)s2n[g] * (int32_t)zn[g] * xs[g];
                y[(m0 + r) * N + n] = (float)(total[r] - zeros) * sx[m0 + r] * sn;
            }
        }
    }
#endif
    free(x8);
    free(sx);
    free(xsum);
}

/* The exported kernels: x and y float32, or bfloat16 when io_bf16 (widened and narrowed here, so that a
   bfloat16 model needs no conversions around the call). */
static const float *input_f32(const void *x, int io_bf16, int64_t n) {
    if (!io_bf16) return (const float *)x;
    float *out = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
        memcpy(out + i, &bits, sizeof bits);
    }
    return out;
}

static void output_done(const float *x32, const void *x, float *y32, void *y, int io_bf16, int64_t n) {
    if (!io_bf16) return;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, y32 + i, sizeof bits);
        bits += 0x7FFF + ((bits >> 16) & 1);
        ((uint16_t *)y)[i] = (uint16_t)(bits >> 16);
    }
    if ((const void *)x32 != x) free((void *)x32);
    free(y32);
}

void gemv_w4(const void *x, const uint8_t *w, const void *scale, int scale_bf16, const uint8_t *zero, void *y,
             int64_t M, int64_t N, int64_t K, int64_t group_size, int io_bf16, int threads) {
    const float *x32 = input_f32(x, io_bf16, M * K);
    float *y32 = io_bf16 ? malloc(sizeof(float) * M * N) : (float *)y;
    gemv_w4_f32(x32, w, scale, scale_bf16, zero, y32, M, N, K, group_size, threads);
    output_done(x32, x, y32, y, io_bf16, M * N);
}

void gemv_w8(const void *x, const uint8_t *w, const void *scale, int scale_bf16, void *y, int64_t M, int64_t N,
             int64_t K, int io_bf16, int threads) {
    const float *x32 = input_f32(x, io_bf16, M * K);
    float *y32 = io_bf16 ? malloc(sizeof(float) * M * N) : (float *)y;
    gemv_w8_f32(x32, w, scale, scale_bf16, y32, M, N, K, threads);
    output_done(x32, x, y32, y, io_bf16, M * N);
}

void gemv_w8a8(const void *x, const int8_t *w, const void *scale, int scale_bf16, const int32_t *rowsum, void *y,
               int64_t M, int64_t N, int64_t K, int io_bf16, int threads) {
    const float *x32 = input_f32(x, io_bf16, M * K);
    float *y32 = io_bf16 ? malloc(sizeof(float) * M * N) : (float *)y;
    gemv_w8a8_f32(x32, w, scale, scale_bf16, rowsum, y32, M, N, K, threads);
    output_done(x32, x, y32, y, io_bf16, M * N);
}

void gemv_w4a8(const void *x, const uint8_t *w, const void *s1, int scale_bf16, const int8_t *s2,
               const uint8_t *zero, void *y, int64_t M, int64_t N, int64_t K, int64_t group_size, int io_bf16,
               int threads) {
    const float *x32 = input_f32(x, io_bf16, M * K);
    float *y32 = io_bf16 ? malloc(sizeof(float) * M * N) : (float *)y;
    gemv_w4a8_f32(x32, w, s1, scale_bf16, s2, zero, y32, M, N, K, group_size, threads);
    output_done(x32, x, y32, y, io_bf16, M * N);
}

/* Dequantize a whole weight into out [N, K] (float32, or bfloat16 when out_bf16), for the larger batches
   that run through a dense GEMM: bits 4 (packed codes, zero codes or NULL, groups) or 8 (unsigned codes
   q + 128 when offset is 128, signed int8 when it is 0; one scale per row). */
static inline uint16_t narrow_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* 32 floats v0 (columns 0-15) and v1 (16-31) stored at out + k as float32 or bfloat16. */
static inline void store32(void *out, int out_bf16, int64_t k, __m512 v0, __m512 v1) {
    if (out_bf16)
        _mm512_storeu_si512((uint16_t *)out + k, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
    else {
        _mm512_storeu_ps((float *)out + k, v0);
        _mm512_storeu_ps((float *)out + k + 16, v1);
    }
}

/* The vectorised dequantizer: 32 columns at a time (K % 32 == 0; 4-bit groups are multiples of 32). */
static void dequantize_rows_avx512(const uint8_t *w, int bits, int offset, const void *scale, int scale_bf16,
                                   const uint8_t *zero, void *out, int out_bf16, int64_t N, int64_t K,
                                   int64_t group_size, int threads) {
    const int64_t G = bits == 4 ? K / group_size : 1;
    int even[16], odd[16];
    for (int i = 0; i < 16; i++) {
        even[i] = (i % 2 ? 16 : 0) + i / 2;
        odd[i] = (i % 2 ? 16 : 0) + 8 + i / 2;
    }
    const __m512i first = _mm512_loadu_si512((const void *)even), second = _mm512_loadu_si512((const void *)odd);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t c = 0; c < K; c += 32) {
            const int64_t g = bits == 4 ? c / group_size : 0;
            const float sg = load_scale(scale, scale_bf16, n * G + g);
            const __m512 s = _mm512_set1_ps(sg);
            if (bits == 4) {
                const float zg = zero ? (float)zero[n * G + g] : 8.f;
                const __m512 zs = _mm512_set1_ps(-zg * sg);
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + n * (K / 2) + c / 2)));
                const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))), s, zs);
                const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, zs);
                store32(out, out_bf16, n * K + c, _mm512_permutex2var_ps(lo, first, hi),
                        _mm512_permutex2var_ps(lo, second, hi));
            } else {
                const __m128i *p = (const __m128i *)(w + n * K + c);
                __m512i a = offset ? _mm512_cvtepu8_epi32(_mm_loadu_si128(p)) : _mm512_cvtepi8_epi32(_mm_loadu_si128(p));
                __m512i b = offset ? _mm512_cvtepu8_epi32(_mm_loadu_si128(p + 1)) : _mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1));
                a = _mm512_sub_epi32(a, _mm512_set1_epi32(offset));
                b = _mm512_sub_epi32(b, _mm512_set1_epi32(offset));
                store32(out, out_bf16, n * K + c, _mm512_mul_ps(_mm512_cvtepi32_ps(a), s),
                        _mm512_mul_ps(_mm512_cvtepi32_ps(b), s));
            }
        }
    }
}
#endif

void dequantize_rows(const uint8_t *w, int bits, int offset, const void *scale, int scale_bf16, const uint8_t *zero,
                     void *out, int out_bf16, int64_t N, int64_t K, int64_t group_size, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (K % 32 == 0) {
        dequantize_rows_avx512(w, bits, offset, scale, scale_bf16, zero, out, out_bf16, N, K, group_size, threads);
        return;
    }
#endif
    const int64_t G = bits == 4 ? K / group_size : 1, L = bits == 4 ? group_size : K;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float row[L];
        for (int64_t g = 0; g < G; g++) {
            const float s = load_scale(scale, scale_bf16, n * G + g);
            if (bits == 4) {
                const float z = zero ? (float)zero[n * G + g] : 8.f;
                const uint8_t *b = w + n * (K / 2) + g * (L / 2);
                for (int64_t j = 0; j < L / 2; j++) {
                    row[2 * j] = ((float)(b[j] & 0xF) - z) * s;
                    row[2 * j + 1] = ((float)(b[j] >> 4) - z) * s;
                }
            } else if (offset) {
                const uint8_t *b = w + n * K;
                for (int64_t j = 0; j < L; j++) row[j] = (float)((int)b[j] - offset) * s;
            } else {
                const int8_t *b = (const int8_t *)w + n * K;
                for (int64_t j = 0; j < L; j++) row[j] = (float)b[j] * s;
            }
            const int64_t base = n * K + g * L;
            if (out_bf16)
                for (int64_t j = 0; j < L; j++) ((uint16_t *)out)[base + j] = narrow_bf16(row[j]);
            else
                memcpy((float *)out + base, row, sizeof(float) * L);
        }
    }
}
