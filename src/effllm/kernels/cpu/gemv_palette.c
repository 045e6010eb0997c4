/* Palettized (lookup-table) weights: each weight is an index into a small palette of values, as DKM and
   k-means palettization leave a matrix. y[m, n] = sum_k x[m, k] * P[n / R][i[n, k]].

   The indices are stored as bit planes, so a matrix takes exactly `bits` bits per weight whatever `bits`
   is (3 bits is 3 bits, not a 4-bit nibble): planes is uint8 [N, K/32, 4 * bits], each block of 32
   columns holding `bits` little-endian 32-bit words, word p's bit j being bit p of the index of column
   32 b + j. A palette P[j] (float32 or bfloat16, `palette_bf16`) holds 2^bits values and serves R
   consecutive rows (R = N: one palette per matrix).

   gemv_palette       decode-sized products. The palette lives in a register and the weights are looked
                      up, never stored. With AVX-512 VBMI and GFNI a block's planes are one load, `vpermb`
                      places each 8-column byte of every plane in a 64-bit lane as the rows of a bit
                      matrix and `gf2p8affineqb` transposes it: out come the columns' indices, one per
                      16- or 32-bit lane, three instructions for 32 or 16 columns (without VBMI/GFNI the
                      indices are assembled by masked adds, a plane word being the mask). `vpermw` then
                      looks up 32 bfloat16 weights (bfloat16 activations and palette, up to 32 values)
                      for one `vdpbf16ps` (products of two bfloat16 are exact in float32), or `vpermps`
                      / `vpermt2ps` 16 float32 ones (up to 16 / 32 values) for an FMA; larger palettes
                      gather.
   dequantize_palette rows of the dense weight (float32 or bfloat16), for batches the products do not win.

   x and y are float32, or bfloat16 with io_bf16; K is a multiple of 32. The portable scalar path (any
   CPU) does the same sums. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

/* Palette `which` as float32 into lut (2^bits values). */
static void palette_f32(const void *palette, int palette_bf16, int64_t which, int bits, float *lut) {
    const int64_t size = (int64_t)1 << bits;
    for (int64_t j = 0; j < size; j++)
        lut[j] = palette_bf16 ? bf16_to_f32(((const uint16_t *)palette)[which * size + j])
                              : ((const float *)palette)[which * size + j];
}

/* Plane word p of block b of a row. */
static inline uint32_t plane_word(const uint8_t *row, int bits, int64_t b, int p) {
    uint32_t w;
    memcpy(&w, row + (b * bits + p) * 4, sizeof w);
    return w;
}

/* The indices of a row, columns 0..K-1, as bytes. */
static void row_indices(const uint8_t *row, int64_t K, int bits, uint8_t *idx) {
    for (int64_t b = 0; b < K / 32; b++) {
        uint32_t words[8];
        for (int p = 0; p < bits; p++) words[p] = plane_word(row, bits, b, p);
        for (int j = 0; j < 32; j++) {
            uint8_t v = 0;
            for (int p = 0; p < bits; p++) v |= (uint8_t)(((words[p] >> j) & 1) << p);
            idx[b * 32 + j] = v;
        }
    }
}

static void gemv_palette_scalar(const float *x, const uint8_t *planes, const void *palette, int palette_bf16,
                                float *y, int64_t M, int64_t N, int64_t K, int bits, int64_t R, int threads) {
#pragma omp parallel num_threads(threads)
    {
        uint8_t *idx = malloc((size_t)K);
        float lut[256];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            palette_f32(palette, palette_bf16, n / R, bits, lut);
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
#if defined(__AVX512VBMI__) && defined(__GFNI__)
#define PALETTE_GFNI 1
/* The bit-matrix transpose. A block's planes are loaded as bytes 4p + i (plane p, byte i: columns 8i ..
   8i + 7). `vpermb` puts, in 64-bit lane q, the byte of the lane's columns from every plane p at byte 7 - p
   (zero where p >= bits): the rows of an 8x8 bit matrix A_q. `gf2p8affineqb(s, A_q)` makes byte t of the
   lane parity(A_q.byte[7 - j] & s.byte[t]) in bit j, so a selector byte s = 1 << c gives bit c of every
   plane: column c's index. The selectors put each index at the bottom of a 16-bit (bfloat16 path: lane q
   holds columns 4q .. 4q + 3 of the block) or 32-bit lane (float32: columns 16h + 2q, 16h + 2q + 1).
   Other selector bytes are zero, so the lanes need no widening. */
static inline __m512i gather_plane_bytes(int bits, int half32) {
    uint8_t t[64];
    for (int q = 0; q < 8; q++)
        for (int j = 0; j < 8; j++) {
            const int p = 7 - j;
            const int byte = half32 < 0 ? q / 2 : 2 * half32 + q / 4; /* which 8-column byte of a plane */
            t[8 * q + j] = (uint8_t)(p < bits ? 4 * p + byte : 0);
        }
    return _mm512_loadu_si512((const void *)t);
}

static inline __mmask64 plane_byte_mask(int bits) {
    uint64_t m = 0;
    for (int q = 0; q < 8; q++)
        for (int j = 8 - bits; j < 8; j++) m |= (uint64_t)1 << (8 * q + j);
    return (__mmask64)m;
}

static inline __m512i selectors(int lane16) {
    uint8_t t[64] = {0};
    for (int q = 0; q < 8; q++) {
        if (lane16)
            for (int c = 0; c < 4; c++) t[8 * q + 2 * c] = (uint8_t)(1 << (4 * (q % 2) + c));
        else
            for (int c = 0; c < 2; c++) t[8 * q + 4 * c] = (uint8_t)(1 << (2 * (q % 4) + c));
    }
    return _mm512_loadu_si512((const void *)t);
}
#endif

/* The 16 weights of columns 16h .. 16h + 15 of a block as float32: a register lookup for up to 32 values, else a gather. */
static inline __m512 lookup16(__m512i idx, int bits, __m512 lo, __m512 hi, const float *lut) {
    if (bits <= 4) return _mm512_permutexvar_ps(idx, lo);
    if (bits == 5) return _mm512_permutex2var_ps(lo, idx, hi);
    return _mm512_i32gather_ps(idx, lut, 4);
}

static void gemv_palette_avx512(const float *x, const uint8_t *planes, const void *palette, int palette_bf16,
                                float *y, int64_t M, int64_t N, int64_t K, int bits, int64_t R, int threads) {
    const int64_t row_bytes = K / 8 * bits;
#ifdef PALETTE_GFNI
    const __m512i place0 = gather_plane_bytes(bits, 0), place1 = gather_plane_bytes(bits, 1), sel = selectors(0);
    const __mmask64 keep = plane_byte_mask(bits), load = bits >= 16 ? ~(__mmask64)0 : ((__mmask64)1 << (4 * bits)) - 1;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float lut[256];
        memset(lut, 0, 32 * sizeof(float)); /* the second register of a palette under 32 values */
        palette_f32(palette, palette_bf16, n / R, bits, lut);
        const __m512 lo = _mm512_loadu_ps(lut), hi = _mm512_loadu_ps(lut + 16);
        const uint8_t *row = planes + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = M - m0 < MR ? M - m0 : MR;
            __m512 acc[MR], acc1[MR]; /* two chains per row: an FMA's latency, not its throughput, bounds one */
            for (int r = 0; r < MR; r++) acc[r] = acc1[r] = _mm512_setzero_ps();
            for (int64_t b = 0; b < K / 32; b++) {
#ifdef PALETTE_GFNI
                const __m512i v = _mm512_maskz_loadu_epi8(load, row + b * 4 * bits);
                const __m512i i0 = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_maskz_permutexvar_epi8(keep, place0, v), 0);
                const __m512i i1 = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_maskz_permutexvar_epi8(keep, place1, v), 0);
#else
                __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
                for (int p = 0; p < bits; p++) {
                    const uint32_t w = plane_word(row, bits, b, p);
                    i0 = _mm512_mask_or_epi32(i0, (__mmask16)w, i0, _mm512_set1_epi32(1 << p));
                    i1 = _mm512_mask_or_epi32(i1, (__mmask16)(w >> 16), i1, _mm512_set1_epi32(1 << p));
                }
#endif
                const __m512 w0 = lookup16(i0, bits, lo, hi, lut), w1 = lookup16(i1, bits, lo, hi, lut);
                for (int r = 0; r < mr; r++) {
                    const float *xr = x + (m0 + r) * K + 32 * b;
                    acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r]);
                    acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[r]);
                }
            }
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc1[r]));
        }
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
/* The 32 weights of block b of `row` as bfloat16, looked up in `lut`. */
#ifdef PALETTE_GFNI
#define BLOCK_BF16(b)                                                                                          \
    ((__m512bh)_mm512_permutexvar_epi16(                                                                     \
        _mm512_gf2p8affine_epi64_epi8(                                                                         \
            sel, _mm512_maskz_permutexvar_epi8(keep, place, _mm512_maskz_loadu_epi8(load, row + (b) * 4 * bits)), 0), \
        lut))
#else
static inline __m512i indices32(const uint8_t *row, int bits, int64_t b) {
    __m512i idx = _mm512_setzero_si512();
    for (int p = 0; p < bits; p++) /* bits disjoint: add is or */
        idx = _mm512_mask_add_epi16(idx, (__mmask32)plane_word(row, bits, b, p), idx, _mm512_set1_epi16((short)(1 << p)));
    return idx;
}
#define BLOCK_BF16(b) ((__m512bh)_mm512_permutexvar_epi16(indices32(row, bits, (b)), lut))
#endif

/* bfloat16 activations, a bfloat16 palette of up to 32 values: 32 weights per `vpermw`, one `vdpbf16ps`. */
static void gemv_palette_bf16(const uint16_t *x, const uint8_t *planes, const uint16_t *palette, uint16_t *y,
                              int64_t M, int64_t N, int64_t K, int bits, int64_t R, int threads) {
    const int64_t row_bytes = K / 8 * bits, size = (int64_t)1 << bits;
#ifdef PALETTE_GFNI
    const __m512i place = gather_plane_bytes(bits, -1), sel = selectors(1);
    const __mmask64 keep = plane_byte_mask(bits), load = ((__mmask64)1 << (4 * bits)) - 1;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const __m512i lut = _mm512_maskz_loadu_epi16((__mmask32)(size >= 32 ? 0xFFFFFFFFu : (1u << size) - 1),
                                                     palette + (n / R) * size);
        const uint8_t *row = planes + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = M - m0 < MR ? M - m0 : MR;
            __m512 acc[MR], acc1[MR]; /* even and odd blocks: two chains per row, a dot product's latency bounds one */
            for (int r = 0; r < MR; r++) acc[r] = acc1[r] = _mm512_setzero_ps();
            int64_t b = 0;
            for (; b + 1 < K / 32; b += 2) {
                const __m512bh w0 = BLOCK_BF16(b), w1 = BLOCK_BF16(b + 1);
                for (int r = 0; r < mr; r++) {
                    const uint16_t *xr = x + (m0 + r) * K + 32 * b;
                    acc[r] = _mm512_dpbf16_ps(acc[r], w0, (__m512bh)_mm512_loadu_si512((const void *)xr));
                    acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512((const void *)(xr + 32)));
                }
            }
            if (b < K / 32) {
                const __m512bh w0 = BLOCK_BF16(b);
                for (int r = 0; r < mr; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], w0, (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + r) * K + 32 * b)));
            }
            for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc1[r])));
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
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (io_bf16 && palette_bf16 && bits <= 5) return 3 + gfni;
#endif
#ifdef __AVX512F__
    return 1 + gfni;
#endif
    (void)bits, (void)palette_bf16, (void)io_bf16, (void)gfni;
    return 0;
}

void gemv_palette(const void *x, const uint8_t *planes, const void *palette, int palette_bf16, void *y, int64_t M,
                  int64_t N, int64_t K, int bits, int64_t R, int io_bf16, int threads) {
    const int path = gemv_palette_path(bits, palette_bf16, io_bf16);
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (path >= 3) {
        gemv_palette_bf16(x, planes, palette, y, M, N, K, bits, R, threads);
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
        gemv_palette_avx512(x32, planes, palette, palette_bf16, y32, M, N, K, bits, R, threads);
    else
#endif
        gemv_palette_scalar(x32, planes, palette, palette_bf16, y32, M, N, K, bits, R, threads);
    if (io_bf16) {
        for (int64_t i = 0; i < M * N; i++) ((uint16_t *)y)[i] = f32_to_bf16(y32[i]);
        free((void *)x32);
        free(y32);
    }
}

void dequantize_palette(const uint8_t *planes, const void *palette, int palette_bf16, void *out, int out_bf16,
                        int64_t row0, int64_t rows, int64_t K, int bits, int64_t R, int threads) {
    /* rows row0 .. row0 + rows - 1 of the matrix into out [rows, K] */
    planes += row0 * (K / 8) * bits;
    const int64_t N = rows;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (bits <= 5) { /* register lookups, 32 columns at a time */
#ifdef PALETTE_GFNI
        const __m512i place = gather_plane_bytes(bits, -1), sel = selectors(1);
        const __mmask64 keep = plane_byte_mask(bits), load = ((__mmask64)1 << (4 * bits)) - 1;
#endif
        const int64_t row_bytes = K / 8 * bits, size = (int64_t)1 << bits;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float lut32[32] = {0};
            uint16_t lut16[32] = {0};
            const int64_t which = (row0 + n) / R;
            palette_f32(palette, palette_bf16, which, bits, lut32);
            for (int j = 0; j < size; j++)
                lut16[j] = palette_bf16 ? ((const uint16_t *)palette)[which * size + j] : f32_to_bf16(lut32[j]);
            const __m512i lut = _mm512_loadu_si512((const void *)lut16);
            const __m512 lo = _mm512_loadu_ps(lut32), hi = _mm512_loadu_ps(lut32 + 16);
            const uint8_t *row = planes + n * row_bytes;
            for (int64_t b = 0; b < K / 32; b++) {
#ifdef PALETTE_GFNI
                const __m512i idx = _mm512_gf2p8affine_epi64_epi8(
                    sel, _mm512_maskz_permutexvar_epi8(keep, place, _mm512_maskz_loadu_epi8(load, row + b * 4 * bits)), 0);
#else
                __m512i idx = _mm512_setzero_si512();
                for (int p = 0; p < bits; p++)
                    idx = _mm512_mask_add_epi16(idx, (__mmask32)plane_word(row, bits, b, p), idx, _mm512_set1_epi16((short)(1 << p)));
#endif
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
        for (int64_t n = 0; n < N; n++) {
            palette_f32(palette, palette_bf16, (row0 + n) / R, bits, lut);
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
