/* Matrix-vector products for decode-sized batches on the CPU: y[m, n] = sum_k x[m, k] * w[n, k].

   At M = 1 to a few rows a linear layer is a stream over its weights; MKL's GEMM reads them at about
   half the machine's bandwidth there. These loops read each weight row once (all M rows of x against it,
   x staying in L1) and split the output columns over OpenMP threads. x and y are float32; the weights are
   float32 or bfloat16 (widened in registers: a bfloat16 is the top half of a float32). The compiler
   vectorises the k loops (-O3 -march=native with reassociation allowed). */
#include <stdint.h>
#include <string.h>

static inline float widen_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#define LOAD_F32(x) (x)

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

GEMV(gemv_f32, float, LOAD_F32)
GEMV(gemv_bf16, uint16_t, widen_bf16)
