/* Matrix-vector products for decode-sized batches on the CPU: y[m, n] = sum_k x[m, k] * w[n, k].

   At M = 1 to a few rows a linear layer is a stream over its weights; MKL's GEMM reads them at about
   half the machine's bandwidth there. These loops read each weight row once (all M rows of x against it,
   x staying in L1) and split the output columns over OpenMP threads. x and y are float32; the weights are
   float32 (stream.h's dot products) or bfloat16 (widened in registers: a bfloat16 is the top half of a
   float32). The compiler vectorises the portable k loops (-O3 -march=native with reassociation allowed). */
#include <stdint.h>
#include <string.h>

#include "stream.h"

static inline float widen_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define GEMV(NAME, T, LOAD) \
void NAME(const float *x, const T *w, float *y, int64_t M, int64_t N, int64_t K, int threads) { \
    _Pragma("omp parallel for num_threads(threads) schedule(static)") \
    for (int64_t n = 0; n < N; n++) { \
        const T *wn = w + n * K; \
        for (int64_t m = 0; m < M; m++) { \
            const float *xm = x + m * K; \
            float s = 0.f; \
            for (int64_t k = 0; k < K; k++) s += xm[k] * LOAD(wn[k]); \
            y[m * N + n] = s; \
        } \
    } \
}

/* float32 weights: four rows of x per pass over a weight row, the weights streamed ahead (stream.h). */
void gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            float s[4];
            const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            dot_f32(w + n * K, x + m0 * K, K, rows, s);
            for (int r = 0; r < rows; r++) y[(m0 + r) * N + n] = s[r];
        }
}

GEMV(gemv_bf16, uint16_t, widen_bf16)

/* bfloat16 weights and bfloat16 activations with AVX-512 BF16: `vdpbf16ps` multiplies 32 pairs per
   instruction with float32 accumulation (both operands keep their own layout, so nothing is reordered),
   four rows of x per pass over a weight row. x [M, K] bf16, y [M, N] float32. Without AVX-512 BF16 it is
   the widening loop above (x widened first). */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_DPBF16 1
#endif

int gemv_bf16_bf16_native(void) {
#ifdef HAVE_DPBF16
    return 1;
#else
    return 0;
#endif
}

void gemv_bf16_bf16(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#ifdef HAVE_DPBF16
    const int64_t full = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *wn = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mr = M - m0 < 4 ? M - m0 : 4;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t k = 0; k < full; k += 32) {
                stream_ahead(wn + k);
                const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wn + k));
                for (int r = 0; r < mr; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + r) * K + k)));
            }
            if (full < K) {
                const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wn + full);
                for (int r = 0; r < mr; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m0 + r) * K + full));
            }
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
        }
    }
#else
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += widen_bf16(x[m * K + k]) * widen_bf16(w[n * K + k]);
            y[m * N + n] = s;
        }
#endif
}
