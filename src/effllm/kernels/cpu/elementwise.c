/* The decoder's elementwise steps in one pass each, for inference on the CPU (see
   effllm/kernels/cpu_elementwise.py): RMSNorm, rotary embeddings, SiLU(gate) * up. PyTorch runs each as
   four to six ops, every one a pass over memory and an OpenMP fork and join; on steps of 17-512 tokens
   that was several seconds of a throughput run.

   Each function rounds where PyTorch's modules round, so that a bfloat16 model gets the same values:
   RMSNorm in float32, cast to the model's dtype, times the weight (rounded); rotary x cos and
   rotate_half(x) sin each rounded, then their sum; SiLU rounded, then times up. The float32 sums of
   squares are in another order than torch's (last-bit differences), and SiLU's exp is a polynomial within
   2 ulp of expf. Built with -ffp-contract=off: a fused multiply-add would skip a rounding torch does. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "attention.h" /* widen_bf16, round_bf16, silu, softmax_exp16 */

static inline float load_x(const void *p, int bf16, int64_t i) {
    return bf16 ? widen_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_x(void *p, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = round_bf16(v);
    else ((float *)p)[i] = v;
}

#ifdef __AVX512F__
static inline __m512 round16(__m512 v) {  /* to bfloat16 and back, nearest even (as round_bf16) */
    __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    const __m512 r = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xffff0000u)));
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);  /* NaN stays NaN */
}

static inline void store16(void *p, int bf16, int64_t at, __m512 v) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + at),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round16(v)), 16)));
    else
        _mm512_storeu_ps((float *)p + at, v);
}
#endif

/* out [rows, dim] = weight * (x / rms(x)) (the normalised x cast to the dtype first); x rows x_stride apart. */
void rms_norm(const void *x, int64_t x_stride, const void *weight, void *out, int64_t rows, int64_t dim,
              float eps, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= 32768)
    for (int64_t r = 0; r < rows; r++) {
        float ss = 0.f;
        int64_t i0 = 0;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; i0 + 16 <= dim; i0 += 16) {
            const __m512 v = load16(x, bf16, r * x_stride + i0);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        ss = _mm512_reduce_add_ps(acc);
#endif
        for (int64_t i = i0; i < dim; i++) {
            const float v = load_x(x, bf16, r * x_stride + i);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        i0 = 0;
#ifdef __AVX512F__
        const __m512 iv = _mm512_set1_ps(inv);
        for (; i0 + 16 <= dim; i0 += 16) {
            __m512 y = _mm512_mul_ps(load16(x, bf16, r * x_stride + i0), iv);
            if (bf16) y = round16(y);
            store16(out, bf16, r * dim + i0, _mm512_mul_ps(load16(weight, bf16, i0), y));
        }
#endif
        for (int64_t i = i0; i < dim; i++) {
            float y = load_x(x, bf16, r * x_stride + i) * inv;
            if (bf16) y = widen_bf16(round_bf16(y));
            store_x(out, bf16, r * dim + i, load_x(weight, bf16, i) * y);
        }
    }
}

/* out [rows, heads, D] = x cos + rotate_half(x) sin, x [rows, heads, D] with rows x_stride apart (a view
   into the fused q/k/v output); row r's cos and sin are row (r / per_batch) * cs_batch + r % per_batch of
   cos, sin [., D] (cs_batch 0: one table for every sequence). */
void rotary(const void *x, int64_t x_stride, void *out, int64_t rows, int64_t heads, int64_t D, const void *cos,
            const void *sin, int64_t per_batch, int64_t cs_batch, int bf16, int threads) {
    const int64_t half = D / 2;
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * D >= 32768)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t cs = ((r / per_batch) * cs_batch + r % per_batch) * D;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t in = r * x_stride + h * D, o = (r * heads + h) * D;
#ifdef __AVX512F__
            if (half % 16 == 0) {
                for (int64_t d = 0; d < half; d += 16) {
                    const __m512 x1 = load16(x, bf16, in + d), x2 = load16(x, bf16, in + d + half);
                    __m512 a1 = _mm512_mul_ps(x1, load16(cos, bf16, cs + d));
                    __m512 b1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(sin, bf16, cs + d));
                    __m512 a2 = _mm512_mul_ps(x2, load16(cos, bf16, cs + d + half));
                    __m512 b2 = _mm512_mul_ps(x1, load16(sin, bf16, cs + d + half));
                    if (bf16) { a1 = round16(a1); b1 = round16(b1); a2 = round16(a2); b2 = round16(b2); }
                    store16(out, bf16, o + d, _mm512_add_ps(a1, b1));
                    store16(out, bf16, o + d + half, _mm512_add_ps(a2, b2));
                }
                continue;
            }
#endif
            for (int64_t d = 0; d < D; d++) {
                const float v = load_x(x, bf16, in + d);
                const float rot = d < half ? -load_x(x, bf16, in + d + half) : load_x(x, bf16, in + d - half);
                float a = v * load_x(cos, bf16, cs + d), b = rot * load_x(sin, bf16, cs + d);
                if (bf16) {
                    a = widen_bf16(round_bf16(a));
                    b = widen_bf16(round_bf16(b));
                }
                store_x(out, bf16, o + d, a + b);
            }
        }
    }
}

/* out [rows, n] = silu(gate) * up, gate_up [rows, 2n] holding gate then up (the fused gate/up output). */
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t n, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= 32768)
    for (int64_t r = 0; r < rows; r++) {
        int64_t i0 = 0;
#ifdef __AVX512F__
        for (; i0 + 16 <= n; i0 += 16) {
            const __m512 g = load16(gate_up, bf16, r * 2 * n + i0), u = load16(gate_up, bf16, r * 2 * n + n + i0);
            const __m512 e = softmax_exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.f)));
            __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
            if (bf16) sg = round16(sg);
            store16(out, bf16, r * n + i0, _mm512_mul_ps(sg, u));
        }
#endif
        for (int64_t i = i0; i < n; i++) {
            const float g = load_x(gate_up, bf16, r * 2 * n + i), u = load_x(gate_up, bf16, r * 2 * n + n + i);
            float s = silu(g);
            if (bf16) s = widen_bf16(round_bf16(s));
            store_x(out, bf16, r * n + i, s * u);
        }
    }
}
