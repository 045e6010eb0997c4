/* Palettized (lookup-table) weights: each weight is an index into a small palette of values, as DKM and
   k-means palettization leave a matrix. y[m, n] = sum_k x[m, k] * P[n / R][i[n, k]].

   The indices are stored as bit planes, so a matrix takes exactly `bits` bits per weight whatever `bits`
   is (3 bits is 3 bits, not a 4-bit nibble): planes is uint8 [N, K/32, 4 * bits], each block of 32
   columns holding `bits` little-endian 32-bit words, word p's bit j being bit p of the index of column
   32 b + j. A palette P[j] (float32 or bfloat16, `palette_bf16`) holds 2^bits values and serves R
   consecutive rows (R = N: one palette per matrix), or, given `row_palette` (int32 [N]: fused q/k/v or
   gate/up, whose parts have palettes of their own), row n uses palette row_palette[n].

   gemv_palette       decode-sized products. The palette lives in a register and the weights are looked
                      up, never stored. The indices come out of the planes as palette.h says (VBMI + GFNI's
                      bit transpose, three instructions for 32 or 16 columns, or masked adds). `vpermw` then
                      looks up 32 bfloat16 weights (bfloat16 activations and palette, up to 32 values)
                      for one `vdpbf16ps` (products of two bfloat16 are exact in float32), or `vpermps`
                      / `vpermt2ps` 16 float32 ones (up to 16 / 32 values) for an FMA; larger palettes
                      gather.
   dequantize_palette rows of the dense weight (float32 or bfloat16), for batches the products do not win.

   x and y are float32, or bfloat16 with io_bf16; K is a multiple of 32. The portable scalar path (any
   CPU) does the same sums. */
#include <stdint.h>
#include <stdlib.h>

#include "palette.h"

#define MR 4 /* rows of x per pass over a weight row */

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline int64_t which_palette(const int32_t *row_palette, int64_t n, int64_t R) {
    return row_palette ? row_palette[n] : n / R;
}

/* Palette `which` as float32 into lut (2^bits values). */
static void palette_f32(const void *palette, int palette_bf16, int64_t which, int bits, float *lut) {
    const int64_t size = (int64_t)1 << bits;
    for (int64_t j = 0; j < size; j++)
        lut[j] = palette_bf16 ? bf16_to_f32(((const uint16_t *)palette)[which * size + j])
                              : ((const float *)palette)[which * size + j];
}

static void gemv_palette_scalar(const float *x, const uint8_t *planes, const void *palette, int palette_bf16,
                                const int32_t *row_palette, float *y, int64_t M, int64_t N, int64_t K, int bits,
                                int64_t R, int threads) {
#pragma omp parallel num_threads(threads)
    {
        uint8_t *idx = malloc((size_t)K);
        float lut[256];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            palette_f32(palette, palette_bf16, which_palette(row_palette, n, R), bits, lut);
            row_indices(planes + n * (K / 8) * bits, K, bits, idx);
            for (int64_t m = 0; m < M; m++) {
                const float *xm = x + m * K;
                float total = 0.f;
                for (int64_t k = 0; k < K; k++) total += xm[k] * lut[idx[k]];
                y[m * N + n] = total;
            }
        }
        free(idx);
    }
}

#ifdef __AVX512F__
static void gemv_palette_avx512(const float *x, const uint8_t *planes, const void *palette, int palette_bf16,
                                const int32_t *row_palette, float *y, int64_t M, int64_t N, int64_t K, int bits,
                                int64_t R, int threads) {
    const int64_t row_bytes = K / 8 * bits;
    const palette_consts consts = palette_consts_for(bits);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float lut[256];
        memset(lut, 0, 32 * sizeof(float)); /* the second register of a palette under 32 values */
        palette_f32(palette, palette_bf16, which_palette(row_palette, n, R), bits, lut);
        const __m512 lo = _mm512_loadu_ps(lut), hi = _mm512_loadu_ps(lut + 16);
        const uint8_t *row = planes + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;
            float s[MR];
            palette_dot_f32(row, K, &consts, lo, hi, lut, x + m0 * K, mr, s);
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = s[r];
        }
    }
}
#endif

#ifdef PALETTE_BF16
/* bfloat16 activations, a bfloat16 palette of up to 32 values: 32 weights per `vpermw`, one `vdpbf16ps`. */
static void gemv_palette_bf16(const uint16_t *x, const uint8_t *planes, const uint16_t *palette,
                              const int32_t *row_palette, uint16_t *y, int64_t M, int64_t N, int64_t K, int bits,
                              int64_t R, int threads) {
    const int64_t row_bytes = K / 8 * bits, size = (int64_t)1 << bits;
    const palette_consts consts = palette_consts_for(bits);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const __m512i lut = palette_register_bf16(palette + which_palette(row_palette, n, R) * size, bits);
        const uint8_t *row = planes + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;
            float s[MR];
            palette_dot_bf16(row, K, &consts, lut, x + m0 * K, mr, s);
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = f32_to_bf16(s[r]);
        }
    }
}
#endif

/* Which path `gemv_palette` takes for these arguments: 0 scalar, 1 AVX-512 float32 lookups (masked adds),
   2 the same with VBMI + GFNI, 3 bfloat16 lookups (masked adds), 4 bfloat16 with VBMI + GFNI. */
int gemv_palette_path(int bits, int palette_bf16, int io_bf16) {
    int gfni = 0;
#ifdef PALETTE_GFNI
    gfni = 1;
#endif
#ifdef PALETTE_BF16
    if (io_bf16 && palette_bf16 && bits <= 5) return 3 + gfni;
#endif
#ifdef __AVX512F__
    return 1 + gfni;
#endif
    (void)bits, (void)palette_bf16, (void)io_bf16, (void)gfni;
    return 0;
}

void gemv_palette(const void *x, const uint8_t *planes, const void *palette, int palette_bf16,
                  const int32_t *row_palette, void *y, int64_t M, int64_t N, int64_t K, int bits, int64_t R,
                  int io_bf16, int threads) {
    const int path = gemv_palette_path(bits, palette_bf16, io_bf16);
#ifdef PALETTE_BF16
    if (path >= 3) {
        gemv_palette_bf16(x, planes, palette, row_palette, y, M, N, K, bits, R, threads);
        return;
    }
#endif
    const float *x32 = x;
    float *y32 = y;
    if (io_bf16) {
        float *wide = malloc(sizeof(float) * M * K);
        for (int64_t i = 0; i < M * K; i++) wide[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        x32 = wide;
        y32 = malloc(sizeof(float) * M * N);
    }
#ifdef __AVX512F__
    if (path >= 1)
        gemv_palette_avx512(x32, planes, palette, palette_bf16, row_palette, y32, M, N, K, bits, R, threads);
    else
#endif
        gemv_palette_scalar(x32, planes, palette, palette_bf16, row_palette, y32, M, N, K, bits, R, threads);
    if (io_bf16) {
        for (int64_t i = 0; i < M * N; i++) ((uint16_t *)y)[i] = f32_to_bf16(y32[i]);
        free((void *)x32);
        free(y32);
    }
}

void dequantize_palette(const uint8_t *planes, const void *palette, int palette_bf16, const int32_t *row_palette,
                        void *out, int out_bf16, int64_t row0, int64_t rows, int64_t K, int bits, int64_t R,
                        int threads) {
    /* rows row0 .. row0 + rows - 1 of the matrix into out [rows, K] */
    planes += row0 * (K / 8) * bits;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (bits <= 5) { /* register lookups, 32 columns at a time */
        const palette_consts consts = palette_consts_for(bits);
        const int64_t row_bytes = K / 8 * bits, size = (int64_t)1 << bits;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < rows; n++) {
            float lut32[32] = {0};
            uint16_t lut16[32] = {0};
            const int64_t which = which_palette(row_palette, row0 + n, R);
            palette_f32(palette, palette_bf16, which, bits, lut32);
            for (int j = 0; j < size; j++)
                lut16[j] = palette_bf16 ? ((const uint16_t *)palette)[which * size + j] : f32_to_bf16(lut32[j]);
            const __m512i lut = _mm512_loadu_si512((const void *)lut16);
            const __m512 lo = _mm512_loadu_ps(lut32), hi = _mm512_loadu_ps(lut32 + 16);
            const uint8_t *row = planes + n * row_bytes;
            for (int64_t b = 0; b < K / 32; b++) {
                const __m512i idx = palette_indices32(row, b, &consts);
                if (out_bf16) {
                    _mm512_storeu_si512((void *)((uint16_t *)out + n * K + 32 * b), _mm512_permutexvar_epi16(idx, lut));
                } else {
                    float *o = (float *)out + n * K + 32 * b;
                    const __m512i i0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx));
                    const __m512i i1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1));
                    _mm512_storeu_ps(o, _mm512_permutex2var_ps(lo, i0, hi));
                    _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(lo, i1, hi));
                }
            }
        }
        return;
    }
#endif
#pragma omp parallel num_threads(threads)
    {
        uint8_t *idx = malloc((size_t)K);
        float lut[256];
        uint16_t lut16[256];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < rows; n++) {
            palette_f32(palette, palette_bf16, which_palette(row_palette, row0 + n, R), bits, lut);
            row_indices(planes + n * (K / 8) * bits, K, bits, idx);
            if (out_bf16) {
                for (int j = 0; j < (1 << bits); j++) lut16[j] = f32_to_bf16(lut[j]);
                uint16_t *o = (uint16_t *)out + n * K;
                for (int64_t k = 0; k < K; k++) o[k] = lut16[idx[k]];
            } else {
                float *o = (float *)out + n * K;
                for (int64_t k = 0; k < K; k++) o[k] = lut[idx[k]];
            }
        }
        free(idx);
    }
}
