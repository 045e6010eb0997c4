/* Palettized weights' indices out of their bit planes, shared by gemv_palette.c (one linear) and
   decode_step.c (the fused decode step). The layout: a row's planes are uint8 [K/32, 4 * bits], each block
   of 32 columns holding `bits` little-endian 32-bit words, bit j of word p being bit p of the index of
   column 32 b + j.

   With AVX-512 VBMI and GFNI a block's planes are one load; `vpermb` puts, in 64-bit lane q, the byte of
   the lane's columns from every plane p at byte 7 - p (zero where p >= bits): the rows of an 8x8 bit
   matrix A_q; `gf2p8affineqb(s, A_q)` makes byte t of the lane parity(A_q.byte[7 - j] & s.byte[t]) in bit
   j, so a selector byte s = 1 << c gives bit c of every plane: column c's index. The selectors put each
   index at the bottom of a 16-bit lane (32 columns: lane q holds columns 4q .. 4q + 3) or of a 32-bit lane
   (16 columns h: columns 16h + 2q, 16h + 2q + 1); other selector bytes are zero, so no widening is needed.
   Without VBMI/GFNI the indices are assembled by masked adds, a plane word being the mask. */
#ifndef EFFLLM_PALETTE_H
#define EFFLLM_PALETTE_H
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Plane word p of block b of a row. */
static inline uint32_t plane_word(const uint8_t *row, int bits, int64_t b, int p) {
    uint32_t w;
    memcpy(&w, row + (b * bits + p) * 4, sizeof w);
    return w;
}

/* The indices of a row, columns 0..K-1, as bytes (the portable path). */
static inline void row_indices(const uint8_t *row, int64_t K, int bits, uint8_t *idx) {
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

#ifdef __AVX512F__
#if defined(__AVX512VBMI__) && defined(__GFNI__) && defined(__AVX512BW__)
#define PALETTE_GFNI 1
#endif

typedef struct {
    int bits;
#ifdef PALETTE_GFNI
    __m512i place16, sel16, place32[2], sel32;
    __mmask64 keep, load;
#endif
} palette_consts;

#ifdef PALETTE_GFNI
static inline __m512i palette_place(int bits, int half32) {
    uint8_t t[64];
    for (int q = 0; q < 8; q++)
        for (int j = 0; j < 8; j++) {
            const int p = 7 - j;
            const int byte = half32 < 0 ? q / 2 : 2 * half32 + q / 4; /* which 8-column byte of a plane */
            t[8 * q + j] = (uint8_t)(p < bits ? 4 * p + byte : 0);
        }
    return _mm512_loadu_si512((const void *)t);
}

static inline __m512i palette_selectors(int lane16) {
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

static inline palette_consts palette_consts_for(int bits) {
    palette_consts k;
    k.bits = bits;
#ifdef PALETTE_GFNI
    k.place16 = palette_place(bits, -1);
    k.place32[0] = palette_place(bits, 0);
    k.place32[1] = palette_place(bits, 1);
    k.sel16 = palette_selectors(1);
    k.sel32 = palette_selectors(0);
    uint64_t m = 0;
    for (int q = 0; q < 8; q++)
        for (int j = 8 - bits; j < 8; j++) m |= (uint64_t)1 << (8 * q + j);
    k.keep = (__mmask64)m;
    k.load = ((__mmask64)1 << (4 * bits)) - 1;
#endif
    return k;
}

#ifdef __AVX512BW__
/* The 32 indices of block b as 16-bit lanes. */
static inline __m512i palette_indices32(const uint8_t *row, int64_t b, const palette_consts *k) {
#ifdef PALETTE_GFNI
    const __m512i v = _mm512_maskz_loadu_epi8(k->load, row + b * 4 * k->bits);
    return _mm512_gf2p8affine_epi64_epi8(k->sel16, _mm512_maskz_permutexvar_epi8(k->keep, k->place16, v), 0);
#else
    __m512i idx = _mm512_setzero_si512();
    for (int p = 0; p < k->bits; p++) /* bits disjoint: add is or */
        idx = _mm512_mask_add_epi16(idx, (__mmask32)plane_word(row, k->bits, b, p), idx, _mm512_set1_epi16((short)(1 << p)));
    return idx;
#endif
}
#endif

/* The 16 indices of columns 32 b + 16 h .. + 15 as 32-bit lanes. */
static inline __m512i palette_indices16(const uint8_t *row, int64_t b, int h, const palette_consts *k) {
#ifdef PALETTE_GFNI
    const __m512i v = _mm512_maskz_loadu_epi8(k->load, row + b * 4 * k->bits);
    return _mm512_gf2p8affine_epi64_epi8(k->sel32, _mm512_maskz_permutexvar_epi8(k->keep, k->place32[h], v), 0);
#else
    __m512i idx = _mm512_setzero_si512();
    for (int p = 0; p < k->bits; p++)
        idx = _mm512_mask_or_epi32(idx, (__mmask16)(plane_word(row, k->bits, b, p) >> (16 * h)), idx,
                                   _mm512_set1_epi32(1 << p));
    return idx;
#endif
}

/* 16 float32 weights for 32-bit-lane indices: a register lookup for up to 32 values, else a gather. */
static inline __m512 palette_lookup16(__m512i idx, int bits, __m512 lo, __m512 hi, const float *lut) {
    if (bits <= 4) return _mm512_permutexvar_ps(idx, lo);
    if (bits == 5) return _mm512_permutex2var_ps(lo, idx, hi);
    return _mm512_i32gather_ps(idx, lut, 4);
}

/* s[r] = x[r] . w for one palettized row w and up to 4 rows of float32 x (x + r * K): its float32 palette
   in lut (lo, hi: its first 32 values), two accumulator chains per row. */
static inline void palette_dot_f32(const uint8_t *row, int64_t K, const palette_consts *k, __m512 lo, __m512 hi,
                                   const float *lut, const float *x, int rows, float *s) {
    __m512 a[4][2];
    for (int r = 0; r < rows; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / 32; b++) {
        const __m512 w0 = palette_lookup16(palette_indices16(row, b, 0, k), k->bits, lo, hi, lut);
        const __m512 w1 = palette_lookup16(palette_indices16(row, b, 1, k), k->bits, lo, hi, lut);
        for (int r = 0; r < rows; r++) {
            a[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + 32 * b), a[r][0]);
            a[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + 32 * b + 16), a[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define PALETTE_BF16 1
/* The same with bfloat16 x and a bfloat16 palette of up to 32 values in lut: 32 weights per `vpermw`, one
   `vdpbf16ps` (products of two bfloat16 are exact in float32); even and odd blocks on two chains. */
static inline void palette_dot_bf16(const uint8_t *row, int64_t K, const palette_consts *k, __m512i lut,
                                    const uint16_t *x, int rows, float *s) {
    __m512 a[4], a1[4];
    for (int r = 0; r < rows; r++) a[r] = a1[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < K / 32; b += 2) {
        const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(palette_indices32(row, b, k), lut);
        const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(palette_indices32(row, b + 1, k), lut);
        for (int r = 0; r < rows; r++) {
            const uint16_t *xr = x + r * K + 32 * b;
            a[r] = _mm512_dpbf16_ps(a[r], w0, (__m512bh)_mm512_loadu_si512((const void *)xr));
            a1[r] = _mm512_dpbf16_ps(a1[r], w1, (__m512bh)_mm512_loadu_si512((const void *)(xr + 32)));
        }
    }
    if (b < K / 32) {
        const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(palette_indices32(row, b, k), lut);
        for (int r = 0; r < rows; r++)
            a[r] = _mm512_dpbf16_ps(a[r], w0, (__m512bh)_mm512_loadu_si512((const void *)(x + r * K + 32 * b)));
    }
    for (int r = 0; r < rows; r++) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], a1[r]));
}

/* A bfloat16 palette of 2^bits <= 32 values as one register. */
static inline __m512i palette_register_bf16(const uint16_t *palette, int bits) {
    const int size = 1 << bits;
    return _mm512_maskz_loadu_epi16((__mmask32)(size >= 32 ? 0xFFFFFFFFu : (1u << size) - 1), palette);
}
#endif
#endif /* __AVX512F__ */
#endif
