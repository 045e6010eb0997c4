/* 4-bit weights with AVX-512 BF16 dot products, shared by gemv_quant.c (`gemv_w4`) and decode_step.c (the
   fused decode step). The weights are compressed-tensors' `pack-quantized` bytes as stored: row n holds K/2
   bytes, byte b the unsigned codes u of columns 2b (low nibble) and 2b + 1 (high nibble), and
   W[n, k] = (u - z[n, g]) * s[n, g] for the group g = k / group_size (z NULL: symmetric, zero 8).

   A bfloat16 with bits 0x4300 | u is exactly 128 + u, so OR-ing a nibble into 0x4300 dequantizes it to
   128 + u for free; `vdpbf16ps` multiplies 32 pairs by bfloat16 activations; sum_k (128 + z) x_k per group
   is taken back once per row. The activations are rounded to bfloat16 (W4A16 computes with 16-bit
   activations). Each 128 columns are one 64-byte load: its 16-bit lane j holds the four codes of columns
   4j .. 4j + 3, pulled out by shifts and masks, so `w4_prepare` lays each 128 columns of x out as columns
   4j, then 4j + 1, 4j + 2 and 4j + 3 (32 each). A last chunk of 64 columns (K = 64 mod 128) is read as 32
   bytes widened to 16-bit lanes, low nibbles (even columns) then high ones (odd columns). xsum holds each
   group's sum of the rounded activations. K is a multiple of 64, group_size a multiple of 32. */
#ifndef EFFLLM_W4_H
#define EFFLLM_W4_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define W4_BF16DOT 1

static inline uint16_t w4_bf16(float v) { /* round to nearest even */
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float w4_scale(const void *s, int bf16, int64_t i) {
    if (!bf16) return ((const float *)s)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)s)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Up to 4 scales from index i, as float32 in the low lanes of a vector. */
static inline __m128 w4_scales4(const void *s, int bf16, int64_t i, int count) {
    const __mmask8 mask = (__mmask8)((1u << count) - 1);
    if (!bf16) return _mm_maskz_loadu_ps(mask, (const float *)s + i);
    const __m128i h = _mm_maskz_loadu_epi16(mask, (const uint16_t *)s + i);
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}

/* Row m's columns c .. c + 127 (or the last 64) of x [M, K] float32 into xb (bfloat16, the kernel's column
   order) and their groups' sums into xsum [M, K / group_size]; group_size divides 128, or the chunk holds
   whole groups. */
static inline void w4_prepare_chunk(const float *x, uint16_t *xb, float *xsum, int64_t m, int64_t c, int64_t K,
                                    int64_t group_size) {
    const int64_t G = K / group_size;
    const float *xm = x + m * K;
    uint16_t *bm = xb + m * K;
    const int64_t width = K - c >= 128 ? 128 : 64;
    if (width == 128)
        for (int j = 0; j < 32; j++)
            for (int q = 0; q < 4; q++) bm[c + 32 * q + j] = w4_bf16(xm[c + 4 * j + q]);
    else
        for (int j = 0; j < 32; j++) {
            bm[c + j] = w4_bf16(xm[c + 2 * j]);
            bm[c + 32 + j] = w4_bf16(xm[c + 2 * j + 1]);
        }
    for (int64_t g = c / group_size; g * group_size < c + width && g < G; g++) {
        float total = 0.f;
        const int64_t hi = (g + 1) * group_size < K ? (g + 1) * group_size : K;
        for (int64_t k = g * group_size; k < hi; k++) {
            const uint32_t wide = (uint32_t)w4_bf16(xm[k]) << 16;
            float r;
            memcpy(&r, &wide, sizeof r);
            total += r;
        }
        xsum[m * G + g] = total;
    }
}

/* x [M, K] float32 -> xb [M, K] bfloat16 in the kernel's column order, xsum [M, K / group_size]. */
static inline void w4_prepare(const float *x, uint16_t *xb, float *xsum, int64_t M, int64_t K, int64_t group_size) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 128) w4_prepare_chunk(x, xb, xsum, m, c, K, group_size);
}

typedef struct {
    int64_t K, group_size, G, full;
    int shift, per_chunk; /* log2(group_size); groups in a 128-column chunk */
    __m512i lane_group;   /* the group of each float32 lane of a chunk's dot products */
} w4_consts;

static inline w4_consts w4_consts_for(int64_t K, int64_t group_size) {
    w4_consts k;
    k.K = K, k.group_size = group_size, k.G = K / group_size, k.full = K / 128 * 128;
    k.shift = 0;
    while ((1 << k.shift) < group_size) k.shift++;
    k.per_chunk = 128 >> k.shift ? 128 >> k.shift : 1;
    int idx[16];
    for (int i = 0; i < 16; i++) idx[i] = (8 * i) >> k.shift;
    k.lane_group = _mm512_loadu_si512((const void *)idx);
    return k;
}

/* s[r] = sum_k W[n, k] x[r, k] for up to 4 rows of prepared x (xb + r K, xsum + r G); `wn` is row n's
   bytes, `sn` and `zn` its scales and zeros (zn NULL: symmetric). */
static inline void w4_dot_bf16(const uint8_t *wn, const void *sn, int scale_bf16, const uint8_t *zn,
                               const uint16_t *xb, const float *xsum, int rows, const w4_consts *k, float *s) {
    const int64_t K = k->K, G = k->G, full = k->full;
    const int shift = k->shift;
    const __m512i low4 = _mm512_set1_epi16(0xF), magic = _mm512_set1_epi16(0x4300);
    __m512 acc[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 128) {
        const __m128 s4 = w4_scales4(sn, scale_bf16, c >> shift, k->per_chunk);
        const __m512 sv = _mm512_permutexvar_ps(k->lane_group, _mm512_castps128_ps512(s4));
        const __m512i v = _mm512_loadu_si512((const void *)(wn + c / 2));
        const __m512bh q0 = (__m512bh)_mm512_or_si512(_mm512_and_si512(v, low4), magic);
        const __m512bh q1 = (__m512bh)_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), magic);
        const __m512bh q2 = (__m512bh)_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 8), low4), magic);
        const __m512bh q3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
        for (int r = 0; r < rows; r++) {
            const uint16_t *xr = xb + r * K + c;
            __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(xr));
            __m512 u = _mm512_dpbf16_ps(_mm512_setzero_ps(), q1, (__m512bh)_mm512_loadu_si512(xr + 32));
            t = _mm512_dpbf16_ps(t, q2, (__m512bh)_mm512_loadu_si512(xr + 64));
            u = _mm512_dpbf16_ps(u, q3, (__m512bh)_mm512_loadu_si512(xr + 96));
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(t, u), sv, acc[r]);
        }
    }
    for (int64_t c = full; c < K; c += 64) { /* the last 64 columns: lanes 0-7 and 8-15 by group */
        const int64_t g0 = c >> shift, g1 = (c + 32) >> shift;
        const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(w4_scale(sn, scale_bf16, g0)), 0xFF00,
                                             _mm512_set1_ps(w4_scale(sn, scale_bf16, g1)));
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wn + c / 2)));
        const __m512bh lo = (__m512bh)_mm512_or_si512(_mm512_and_si512(v, low4), magic);
        const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
        for (int r = 0; r < rows; r++) {
            const uint16_t *xr = xb + r * K + c;
            __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xr));
            t = _mm512_dpbf16_ps(t, hi, (__m512bh)_mm512_loadu_si512(xr + 32));
            acc[r] = _mm512_fmadd_ps(t, sv, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) { /* take back sum_g s_g (128 + z_g) sum_{k in g} x_k */
        const float *xs = xsum + r * G;
        __m512 cs = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g += 16) {
            const int count = G - g < 16 ? (int)(G - g) : 16;
            const __mmask16 mask = (__mmask16)((1u << count) - 1);
            __m512 sv;
            if (scale_bf16) {
                const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)sn + g);
                sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            } else {
                sv = _mm512_maskz_loadu_ps(mask, (const float *)sn + g);
            }
            if (zn) {
                const __m128i z8 = _mm_maskz_loadu_epi8(mask, zn + g);
                sv = _mm512_mul_ps(sv, _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z8)), _mm512_set1_ps(128.f)));
            } else {
                sv = _mm512_mul_ps(sv, _mm512_set1_ps(136.f));
            }
            cs = _mm512_fmadd_ps(sv, _mm512_maskz_loadu_ps(mask, xs + g), cs);
        }
        s[r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[r], cs));
    }
}
#endif
#endif
