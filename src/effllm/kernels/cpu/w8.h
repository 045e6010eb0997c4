/* 8-bit weights per output channel, shared by gemv_quant.c (`gemv_w8`, `gemv_w8a8`) and decode_step.c (the
   fused decode step): the dot products of one weight row with up to 4 rows of x, and W8A8's per-row
   activation quantization.

   W8A16: the unsigned codes u = q + 128 of compressed-tensors' pack-quantized bytes, W[n, k] = (u - 128) s[n],
   float32 activations (AVX-512: 16 codes widened to float32 per FMA). W8A8: signed int8 weights, activations
   per row to symmetric int8 (the row's absolute maximum to 127) stored offset by 128 as unsigned bytes, for
   AVX-512 VNNI's `vpdpbusd` (unsigned times signed bytes, 64 per instruction); 128 sum_k q[n, k] (`rowsum`) is
   taken back by the caller. Portable loops do the same sums elsewhere. */
#ifndef EFFLLM_W8_H
#define EFFLLM_W8_H
#include <math.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* s[r] = sum_k (wn[k] - 128) x[r K + k], r < rows (<= 4). */
static inline void w8_dot_f32(const uint8_t *wn, const float *x, int64_t K, int rows, float *s) {
    int64_t k = 0;
    for (int r = 0; r < rows; r++) s[r] = 0.f;
#ifdef __AVX512F__
    __m512 acc[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    const __m512i offset = _mm512_set1_epi32(128);
    for (; k + 16 <= K; k += 16) {
        const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wn + k)));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_sub_epi32(u, offset));
        for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), acc[r]);
    }
    for (int r = 0; r < rows; r++) s[r] = _mm512_reduce_add_ps(acc[r]);
#endif
    for (; k < K; k++)
        for (int r = 0; r < rows; r++) s[r] += (float)((int)wn[k] - 128) * x[r * K + k];
}

/* Row m of x [M, K] to symmetric int8 offset by 128 (xq) with its step (sx[m]). */
static inline void w8_quantize_row(const float *x, uint8_t *xq, float *sx, int64_t m, int64_t K) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[m * K + k]));
    const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    sx[m] = s;
    for (int64_t k = 0; k < K; k++) {
        float q = nearbyintf(x[m * K + k] * inv);
        q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
        xq[m * K + k] = (uint8_t)((int)q + 128);
    }
}

/* t[r] = sum_k xq[r K + k] wn[k] (integers: xq offset by 128, wn signed), r < rows (<= 4). */
static inline void w8a8_dot(const int8_t *wn, const uint8_t *xq, int64_t K, int rows, int32_t *t) {
    int64_t k = 0;
    for (int r = 0; r < rows; r++) t[r] = 0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    __m512i acc[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_si512();
    for (; k + 64 <= K; k += 64) {
        const __m512i wv = _mm512_loadu_si512((const void *)(wn + k));
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_loadu_si512((const void *)(xq + r * K + k)), wv);
    }
    for (int r = 0; r < rows; r++) t[r] = _mm512_reduce_add_epi32(acc[r]);
#endif
    for (; k < K; k++)
        for (int r = 0; r < rows; r++) t[r] += (int32_t)xq[r * K + k] * (int32_t)wn[k];
}
#endif
