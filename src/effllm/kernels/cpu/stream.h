/* Streaming weights at the memory's pace. A decode-sized product reads each weight once, front to back; the
   hardware prefetchers lose the stream at every 4 KiB page and each matrix starts cold, so the loops ask for
   the bytes STREAM_AHEAD past the ones they read (`prefetcht0`, a no-op where the compiler has no
   __builtin_prefetch). On the 2-vCPU Sapphire Rapids VM of docs/benchmarks.md, a two-thread pass over one
   SmolLM-135M decode step's float32 matrices (ad hoc C loop) read 25.5 GB/s without and 33.6 GB/s with it at
   2 KiB, on 2 MiB pages (core/huge_pages.py); 1.5-3 KiB measured alike, NTA hints far slower. Also here:
   the float32 dot products of a weight row with a few input rows, shared by gemv.c and decode_step.c. */
#ifndef EFFLLM_STREAM_H
#define EFFLLM_STREAM_H
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define STREAM_AHEAD 2048

#if defined(__GNUC__) || defined(__clang__)
#define stream_ahead(p) __builtin_prefetch((const char *)(p) + STREAM_AHEAD, 0, 3)
#else
#define stream_ahead(p) ((void)(p))
#endif

/* Dot products of one weight row with up to 4 rows of x (rows x + r * K), the sums in s[r]. */
static inline void dot_f32(const float *w, const float *x, int64_t K, int rows, float *s) {
#ifdef __AVX512F__
    const int64_t full = K & ~(int64_t)31;
    __m512 a[4][2];
    for (int r = 0; r < rows; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {  /* two accumulators per row: FMA latency, not one chain */
        stream_ahead(w + k);
        stream_ahead(w + k + 16);
        const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
        for (int r = 0; r < rows; r++) {
            a[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), a[r][0]);
            a[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), a[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        float t = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
        for (int64_t k = full; k < K; k++) t += x[r * K + k] * w[k];
        s[r] = t;
    }
#else
    for (int r = 0; r < rows; r++) {
        float t = 0.f;
        for (int64_t k = 0; k < K; k++) t += x[r * K + k] * w[k];
        s[r] = t;
    }
#endif
}

#endif
