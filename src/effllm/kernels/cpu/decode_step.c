/* A whole decode step of a dense Llama-family decoder in one call: every layer of B single-token queries
   (RMSNorm, the fused q/k/v projection, RoPE, the paged KV-cache write, paged attention, o_proj and the
   residual, RMSNorm, the fused gate/up projection, SiLU(gate) * up, down_proj and the residual), inside
   one OpenMP parallel region whose threads split each matrix by output rows and the attention by
   (sequence, kv head). What the PyTorch path does in about 190 small ops per layer (each its own
   dispatch, and each parallel op its own fork and join) becomes 9 barriers per layer: the CPU engine's
   counterpart of a CUDA graph for decode steps (see effllm/engine/cpu_decode_step.py, which gathers the
   model's tensors and checks the step qualifies).

   The residual stream x [B, hidden] is float32 and updated in place; the caller embeds before and applies
   the final norm and the head after. Weights are float32 or bfloat16 ([out, in] rows, q/k/v and gate/up
   concatenated as EffLLM's fused projections hold them); norm weights and biases float32; the cache
   float32 or bfloat16 [blocks, block_size, kv_heads, head_dim] per layer. Activations stay float32,
   except that with bfloat16 weights on a CPU with AVX-512 BF16 the input of each product is rounded to
   bfloat16 for `vdpbf16ps` (what the PyTorch path's bfloat16 linears do too).

   Palettized weights (W_KIND 1, `models/palettized_linear.py`) take the place of the dense ones: each
   matrix is its bit planes (where the weight pointer points), a float32 or bfloat16 palette table and
   each row's palette index (`matrix_tables`, `row_palettes`: four per layer, q/k/v, o, gate/up, down). Their
   rows are looked up in registers as in gemv_palette.c (palette.h), with the bfloat16 copy of the input
   for a bfloat16 palette of up to 32 values where `vdpbf16ps` exists, float32 otherwise.
   Symmetric 4-bit weights (W_KIND 2, compressed-tensors' pack-quantized bytes, groups of W4_GROUP <= 128
   columns; `matrix_tables` holds the group scales) take gemv_w4's dot products (w4.h), the input laid out for
   them once per product; without AVX-512 BF16 a scalar loop does the same sums. 8-bit weights per channel
   (W_KIND 3, W8A16: the unsigned codes; W_KIND 4, W8A8: int8 codes, `row_palettes` holding each row's code
   sum, the input quantized per row once per product) take gemv_w8's and gemv_w8a8's (w8.h); the per-row
   scales are `matrix_tables`. */
#include <stdlib.h>

#include "attention.h"
#include "palette.h"
#include "stream.h"
#include "w4.h"
#include "w8.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_DPBF16 1
#endif

#define MAX_ROWS 64   /* dense bfloat16 weights on AMX (matvec_amx); 16 for every other kind (MAX_ROWS_DOT) */
#define MAX_ROWS_DOT 16

enum { L_, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, BLOCK, WIDTH, ROWS, W_BF16, CACHE_BF16, THREADS, MAX_KEYS,
       W_KIND, PAL_BITS, TABLE_BF16, W4_GROUP, NDIMS };
enum { DENSE, PALETTIZED, W4, W8, W8A8 }; /* W_KIND */

/* Scratch of matvec_amx, in floats: the input in AMX's pair layout (K / 32 blocks of MB 1 KB tiles) and
   per thread four 16 x 16 float32 tiles. */
static inline int64_t amx_work(int64_t B, int64_t K, int64_t threads) {
    return K * ((B + 15) / 16) * 8 + threads * 1024 + 32;
}

/* Whether dense bfloat16 steps of more than MAX_ROWS_DOT rows run here (matvec_amx): AMX-BF16 and the tile
   state granted. */
int decode_step_amx(void) {
#ifdef EFFLLM_AMX
    return attention_init();
#else
    return 0;
#endif
}

int64_t decode_step_work(const int64_t *dims) {  /* floats of `work` decode_step needs */
    const int64_t B = dims[ROWS], hidden = dims[HIDDEN], H = dims[HEADS], Hkv = dims[KV_HEADS], D = dims[HEAD_DIM];
    const int64_t inter = dims[INTER], q_dim = H * D, qkv_n = q_dim + 2 * Hkv * D;
    const int64_t widest = hidden > q_dim ? (hidden > inter ? hidden : inter) : (q_dim > inter ? q_dim : inter);
    return B * (widest + qkv_n + q_dim + 2 * inter) + attention_work(B, H, D, dims[MAX_KEYS], dims[THREADS])
           + (B * widest + 1) / 2 + 1 + (dims[W_KIND] >= W4 ? B * widest + 16 : 0)
           + (B > MAX_ROWS_DOT ? amx_work(B, widest, dims[THREADS]) : 0);
}

int decode_step_dpbf16(void) {
#ifdef HAVE_DPBF16
    return 1;
#else
    return 0;
#endif
}

static inline void dot_bf16(const uint16_t *w, const float *x, const uint16_t *xb, int64_t K, int rows, float *s) {
#ifdef HAVE_DPBF16
    const int64_t full = K & ~(int64_t)63;
    __m512 a[4][2];
    for (int r = 0; r < rows; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 64) {
        stream_ahead(w + k);
        stream_ahead(w + k + 32);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(w + k));
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(w + k + 32));
        for (int r = 0; r < rows; r++) {
            a[r][0] = _mm512_dpbf16_ps(a[r][0], w0, (__m512bh)_mm512_loadu_si512((const void *)(xb + r * K + k)));
            a[r][1] = _mm512_dpbf16_ps(a[r][1], w1, (__m512bh)_mm512_loadu_si512((const void *)(xb + r * K + k + 32)));
        }
    }
    for (int64_t k = full; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w + k);
        for (int r = 0; r < rows; r++)
            a[r][0] = _mm512_dpbf16_ps(a[r][0], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, xb + r * K + k));
    }
    for (int r = 0; r < rows; r++) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
    (void)x;
#else
    (void)xb;
    for (int r = 0; r < rows; r++) {
        float t = 0.f;
        for (int64_t k = 0; k < K; k++) t += x[r * K + k] * widen_bf16(w[k]);
        s[r] = t;
    }
#endif
}

/* Output column n of every row: y[b, n] (= or +=) acc[b] + bias[n]. */
static inline void store_column(const float *acc, const float *bias, int64_t n, int64_t B, float *y,
                                int64_t y_stride, int accumulate) {
    const float add = bias ? bias[n] : 0.f;
    for (int64_t b = 0; b < B; b++) {
        if (accumulate) y[b * y_stride + n] += acc[b] + add;
        else y[b * y_stride + n] = acc[b] + add;
    }
}

/* y[b, n] (= or +=) x[b] . w[n] + bias[n] for n in [0, N), split over the team's threads by rows of w.
   x is float32 [B, K]; xb the same rounded to bfloat16 (read with bfloat16 weights where vdpbf16ps exists). */
static void matvec(const void *w, int w_bf16, const float *bias, const float *x, const uint16_t *xb,
                   int64_t B, int64_t K, int64_t N, float *y, int64_t y_stride, int accumulate) {
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_ROWS];
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            const int rows = B - b0 < 4 ? (int)(B - b0) : 4;
            if (w_bf16)
                dot_bf16((const uint16_t *)w + n * K, x + b0 * K, xb ? xb + b0 * K : NULL, K, rows, acc + b0);
            else
                dot_f32((const float *)w + n * K, x + b0 * K, K, rows, acc + b0);
        }
        store_column(acc, bias, n, B, y, y_stride, accumulate);
    }
}

#ifdef EFFLLM_AMX
/* matvec's contract for bfloat16 weights and 17-64 rows with AMX tiles (K a multiple of 32). Per block of 16
   weight rows, C^T [16 outputs, 16 rows] += W [16 outputs, 32 columns] x X^T: the weights are the A operand,
   tile-loaded straight from their [N, K] rows (no repacked copy), the input the B operand in AMX's pair
   layout xt (built once per product by the team: [K / 32][MB][16 pairs][16 rows][2]). The weights stream
   once; each tile feeds MB = B / 16 products. Output columns past the last full block take dot_bf16. */
static void matvec_amx(const uint16_t *w, const float *bias, const float *x, const uint16_t *xb, int64_t B,
                       int64_t K, int64_t N, float *y, int64_t y_stride, int accumulate, uint16_t *xt, float *cbuf) {
    const int64_t MB = (B + 15) / 16, KB = K / 32, NB = N / 16;
    #pragma omp for schedule(static)
    for (int64_t kb = 0; kb < KB; kb++)
        for (int64_t mb = 0; mb < MB; mb++) {
            uint32_t *tile = (uint32_t *)(xt + (kb * MB + mb) * 512);
            for (int64_t r = 0; r < 16; r++)
                for (int64_t m = 0; m < 16; m++) {
                    const int64_t row = mb * 16 + m;
                    uint32_t pair = 0;
                    if (row < B) memcpy(&pair, xb + row * K + kb * 32 + 2 * r, 4);
                    tile[r * 16 + m] = pair;
                }
        }  /* the implied barrier: every thread reads all of xt */
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 6; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    float *cs = cbuf + (int64_t)omp_get_thread_num() * 1024;
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    #pragma omp for schedule(static) nowait
    for (int64_t nb = 0; nb < NB; nb++) {
        const uint16_t *wb = w + nb * 16 * K;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        /* Tile loads of 16 rows' 64 bytes do not keep the memory stream going by themselves: each step asks
           for 1 KiB of the next block of 16 rows (contiguous, 1 KiB per step), into L2 (T1/T2 measured
           alike, T0 slower, NTA far slower). In a 64-request bfloat16 run (instrumented build, ad hoc) the
           four products took 22-23 ms a step without, 19.2 with T0, 16.9-17.6 with T2, 35-37 with NTA. */
        const char *next = (const char *)(wb + 16 * K);
        for (int64_t kb = 0; kb < KB; kb++) {
            const uint16_t *xk = xt + kb * MB * 512;
            if (nb + 1 < NB)
                for (int64_t b = 0; b < 1024; b += 64) __builtin_prefetch(next + kb * 1024 + b, 0, 1);
            _tile_loadd(4, wb + kb * 32, K * 2);
            _tile_loadd(5, xk, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (MB > 1) { _tile_loadd(5, xk + 512, 64); _tile_dpbf16ps(1, 4, 5); }
            if (MB > 2) { _tile_loadd(5, xk + 1024, 64); _tile_dpbf16ps(2, 4, 5); }
            if (MB > 3) { _tile_loadd(5, xk + 1536, 64); _tile_dpbf16ps(3, 4, 5); }
        }
        _tile_stored(0, cs, 64);
        if (MB > 1) _tile_stored(1, cs + 256, 64);
        if (MB > 2) _tile_stored(2, cs + 512, 64);
        if (MB > 3) _tile_stored(3, cs + 768, 64);
        const __m512 bv = bias ? _mm512_loadu_ps(bias + nb * 16) : _mm512_setzero_ps();
        for (int64_t b = 0; b < B; b++) {  /* row b of the output: column b % 16 of tile b / 16 */
            __m512 v = _mm512_add_ps(_mm512_i32gather_ps(column, cs + (b / 16) * 256 + b % 16, 4), bv);
            float *yr = y + b * y_stride + nb * 16;
            if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(yr));
            _mm512_storeu_ps(yr, v);
        }
    }
    _tile_release();
    #pragma omp for schedule(static)
    for (int64_t n = NB * 16; n < N; n++) {
        float acc[MAX_ROWS];
        for (int64_t b0 = 0; b0 < B; b0 += 4)
            dot_bf16(w + n * K, x + b0 * K, xb + b0 * K, K, B - b0 < 4 ? (int)(B - b0) : 4, acc + b0);
        store_column(acc, bias, n, B, y, y_stride, accumulate);
    }
}
#endif

/* A palettized matrix: its planes, palette table, each row's palette and the index constants. */
typedef struct {
    const uint8_t *planes;
    const void *palette;
    const int32_t *row_palette;
    int bits, bf16;
#ifdef __AVX512F__
    palette_consts consts;
#endif
} palettized;

/* matvec's contract for a palettized matrix. */
static void matvec_palette(const palettized *w, const float *bias, const float *x, const uint16_t *xb, int64_t B,
                           int64_t K, int64_t N, float *y, int64_t y_stride, int accumulate) {
    const int bits = w->bits;
    const int64_t row_bytes = K / 8 * bits, size = (int64_t)1 << bits;
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_ROWS];
        const int64_t which = w->row_palette[n];
        const uint8_t *row = w->planes + n * row_bytes;
        int done = 0;
#ifdef PALETTE_BF16
        if (w->bf16 && xb && bits <= 5) {
            const __m512i lut = palette_register_bf16((const uint16_t *)w->palette + which * size, bits);
            const palette_consts k = w->consts; /* in registers, not re-read through w */
            for (int64_t b0 = 0; b0 < B; b0 += 4)
                palette_dot_bf16(row, K, &k, lut, xb + b0 * K, B - b0 < 4 ? (int)(B - b0) : 4, acc + b0);
            done = 1;
        }
#endif
        if (!done) {
            float lut[256];
            memset(lut, 0, 32 * sizeof(float));
            for (int64_t j = 0; j < size; j++)
                lut[j] = w->bf16 ? widen_bf16(((const uint16_t *)w->palette)[which * size + j])
                                 : ((const float *)w->palette)[which * size + j];
#ifdef __AVX512F__
            const __m512 lo = _mm512_loadu_ps(lut), hi = _mm512_loadu_ps(lut + 16);
            const palette_consts k = w->consts;
            for (int64_t b0 = 0; b0 < B; b0 += 4)
                palette_dot_f32(row, K, &k, lo, hi, lut, x + b0 * K, B - b0 < 4 ? (int)(B - b0) : 4, acc + b0);
#else
            for (int64_t b = 0; b < B; b++) acc[b] = 0.f;
            for (int64_t blk = 0; blk < K / 32; blk++) {
                uint32_t words[8];
                for (int p = 0; p < bits; p++) words[p] = plane_word(row, bits, blk, p);
                for (int j = 0; j < 32; j++) {
                    int v = 0;
                    for (int p = 0; p < bits; p++) v |= (int)((words[p] >> j) & 1) << p;
                    for (int64_t b = 0; b < B; b++) acc[b] += x[b * K + 32 * blk + j] * lut[v];
                }
            }
#endif
        }
        store_column(acc, bias, n, B, y, y_stride, accumulate);
    }
}

/* matvec's contract for symmetric 4-bit weights w [N, K/2 bytes] with group scales [N, K / group]
   (float32 or bfloat16); xw and xs are scratch for the input's layout and group sums. */
static void matvec_w4(const uint8_t *w, const void *scale, int scale_bf16, int64_t group, const float *bias,
                      const float *x, uint16_t *xw, float *xs, int64_t B, int64_t K, int64_t N, float *y,
                      int64_t y_stride, int accumulate) {
    const int64_t G = K / group;
#ifdef W4_BF16DOT
    const int64_t chunks = (K + 127) / 128;
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < B * chunks; u++) w4_prepare_chunk(x, xw, xs, u / chunks, (u % chunks) * 128, K, group);
    const w4_consts consts = w4_consts_for(K, group);
#else
    (void)xw, (void)xs;
#endif
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_ROWS];
        const void *sn = scale_bf16 ? (const void *)((const uint16_t *)scale + n * G) : (const void *)((const float *)scale + n * G);
        const uint8_t *wn = w + n * (K / 2);
#ifdef W4_BF16DOT
        for (int64_t b0 = 0; b0 < B; b0 += 4)
            w4_dot_bf16(wn, sn, scale_bf16, NULL, xw + b0 * K, xs + b0 * G, B - b0 < 4 ? (int)(B - b0) : 4, &consts, acc + b0);
#else
        for (int64_t b = 0; b < B; b++) {
            float total = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float part = 0.f;
                for (int64_t k = g * group; k < (g + 1) * group; k++) {
                    const int u = k & 1 ? wn[k / 2] >> 4 : wn[k / 2] & 0xF;
                    part += (float)(u - 8) * x[b * K + k];
                }
                total += part * (scale_bf16 ? widen_bf16(((const uint16_t *)sn)[g]) : ((const float *)sn)[g]);
            }
            acc[b] = total;
        }
#endif
        store_column(acc, bias, n, B, y, y_stride, accumulate);
    }
}

/* matvec's contract for 8-bit weights per channel with per-row scales: W8A16 (rowsum NULL; unsigned codes
   u = q + 128) or W8A8 (int8 codes, rowsum[n] = sum_k q[n, k]; the input quantized per row into xq, sx). */
static void matvec_w8(const uint8_t *w, const void *scale, int scale_bf16, const int32_t *rowsum, const float *bias,
                      const float *x, uint8_t *xq, float *sx, int64_t B, int64_t K, int64_t N, float *y,
                      int64_t y_stride, int accumulate) {
    if (rowsum) {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) w8_quantize_row(x, xq, sx, b, K);
    }
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_ROWS];
        const float sn = scale_bf16 ? widen_bf16(((const uint16_t *)scale)[n]) : ((const float *)scale)[n];
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            const int rows = B - b0 < 4 ? (int)(B - b0) : 4;
            if (rowsum) {
                int32_t t[4];
                w8a8_dot((const int8_t *)w + n * K, xq + b0 * K, K, rows, t);
                for (int r = 0; r < rows; r++) acc[b0 + r] = (float)(t[r] - 128 * rowsum[n]) * sx[b0 + r] * sn;
            } else {
                w8_dot_f32(w + n * K, x + b0 * K, K, rows, acc + b0);
                for (int r = 0; r < rows; r++) acc[b0 + r] *= sn;
            }
        }
        store_column(acc, bias, n, B, y, y_stride, accumulate);
    }
}

/* What a layer's matrix is beyond its weight pointer: palettized, 4-bit or 8-bit (its scales), or dense. */
typedef struct {
    const palettized *pal;
    int kind;
    const void *scale;
    int scale_bf16;
    int64_t group;
    const int32_t *rowsum;
    uint16_t *xw; /* scratch for the input's layout (4-bit) or codes (W8A8) */
    float *xs;    /* and its group sums (4-bit) or steps (W8A8) */
    uint16_t *xt; /* dense bfloat16 on AMX: the input's pair layout (matvec_amx), or NULL */
    float *cbuf;  /* and the threads' output tiles */
} matrix_extra;

/* The product of matrix m (0 q/k/v, 1 o, 2 gate/up, 3 down) of a layer: dense, palettized or 4-bit. */
static inline void layer_matvec(const void *w, int w_bf16, const matrix_extra *e, const float *bias, const float *x,
                                const uint16_t *xb, int64_t B, int64_t K, int64_t N, float *y, int64_t y_stride,
                                int accumulate) {
    if (e->kind == PALETTIZED) matvec_palette(e->pal, bias, x, xb, B, K, N, y, y_stride, accumulate);
    else if (e->kind == W4) matvec_w4(w, e->scale, e->scale_bf16, e->group, bias, x, e->xw, e->xs, B, K, N, y, y_stride, accumulate);
    else if (e->kind == W8 || e->kind == W8A8)
        matvec_w8(w, e->scale, e->scale_bf16, e->rowsum, bias, x, (uint8_t *)e->xw, e->xs, B, K, N, y, y_stride, accumulate);
#ifdef EFFLLM_AMX
    else if (w_bf16 && xb && B > MAX_ROWS_DOT && e->xt && K % 32 == 0)
        matvec_amx(w, bias, x, xb, B, K, N, y, y_stride, accumulate, e->xt, e->cbuf);
#endif
    else matvec(w, w_bf16, bias, x, xb, B, K, N, y, y_stride, accumulate);
}

/* out[b] = x[b] / rms(x[b]) * weight, and its bfloat16 copy. */
static void rms_norm(const float *x, const float *weight, int64_t B, int64_t K, float eps, float *out, uint16_t *outb) {
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * K;
        float ss = 0.f;
        for (int64_t k = 0; k < K; k++) ss += xr[k] * xr[k];
        const float r = 1.f / sqrtf(ss / (float)K + eps);
        for (int64_t k = 0; k < K; k++) out[b * K + k] = xr[k] * r * weight[k];
        if (outb)
            for (int64_t k = 0; k < K; k++) outb[b * K + k] = round_bf16(out[b * K + k]);
    }
}

/* HF's rotate-half RoPE of one head in place: h[i] = h[i] cos[i] - h[i + D/2] sin[i], and for the second
   half h[i] cos[i] + h[i - D/2] sin[i]. */
static inline void rope(float *h, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = h[i], c = h[i + half];
        h[i] = a * cos[i] - c * sin[i];
        h[i + half] = c * cos[i + half] + a * sin[i + half];
    }
}

void decode_step(const int64_t *dims, const float *fparams, float *x, const float *cos, const float *sin,
                 const void *const *w_qkv, const float *const *b_qkv, const void *const *w_o, const float *const *b_o,
                 const void *const *w_gu, const float *const *b_gu, const void *const *w_down,
                 const float *const *b_down, const float *const *norm_in, const float *const *norm_post,
                 void *const *k_cache, void *const *v_cache, const int64_t *slots, const int64_t *tables,
                 const int64_t *lens, const int64_t *windows, const void *const *matrix_tables,
                 const int32_t *const *row_palettes, float *work) {
    const int64_t L = dims[L_], hidden = dims[HIDDEN], H = dims[HEADS], Hkv = dims[KV_HEADS], D = dims[HEAD_DIM];
    const int64_t inter = dims[INTER], BS = dims[BLOCK], width = dims[WIDTH], B = dims[ROWS];
    const int w_bf16 = (int)dims[W_BF16], c_bf16 = (int)dims[CACHE_BF16], threads = (int)dims[THREADS];
    const int64_t max_keys = dims[MAX_KEYS];
    const float eps = fparams[0], scale = fparams[1];
    const int64_t G = H / Hkv, q_dim = H * D, kv_dim = Hkv * D, qkv_n = q_dim + 2 * kv_dim;
    const int64_t widest = hidden > q_dim ? (hidden > inter ? hidden : inter) : (q_dim > inter ? q_dim : inter);
    const int64_t splits = key_splits(B, threads, max_keys);
    attention_init();  /* AMX tiles for a bfloat16 cache's scores, where the CPU and Linux allow */
    /* work: xn [B, widest] | qkv [B, qkv_n] | attn [B, q_dim] | gu [B, 2 inter] | scores [threads, H, max_keys]
       | parts [B splits, H (D + 2)] | xb (bfloat16) */
    float *xn = work, *qkv = xn + B * widest, *attn = qkv + B * qkv_n, *gu = attn + B * q_dim;
    float *scores = gu + B * 2 * inter, *parts = scores + (int64_t)threads * (attend_scratch(H, D, max_keys) + 2);
    uint16_t *xb = (uint16_t *)(scores + attention_work(B, H, D, max_keys, threads));
#ifndef HAVE_DPBF16
    xb = NULL;
#endif
    const int w_kind = (int)dims[W_KIND], pal_bits = (int)dims[PAL_BITS], table_bf16 = (int)dims[TABLE_BF16];
    uint16_t *xbw = (w_kind == DENSE ? w_bf16 : w_kind == PALETTIZED && table_bf16 && pal_bits <= 5) ? xb : NULL;
    palettized *pals = NULL;
    matrix_extra *extras = calloc((size_t)(L * 4), sizeof(matrix_extra));
    if (w_kind == PALETTIZED) {
        pals = aligned_alloc(64, sizeof(palettized) * L * 4); /* its index constants are 64-byte vectors */
        const void *const *w[4] = {w_qkv, w_o, w_gu, w_down};
#ifdef __AVX512F__
        const palette_consts consts = palette_consts_for(pal_bits); /* one bit width: built once a step */
#endif
        for (int64_t l = 0; l < L; l++)
            for (int m = 0; m < 4; m++) {
                palettized *p = pals + l * 4 + m;
                p->planes = w[m][l];
                p->palette = matrix_tables[l * 4 + m];
                p->row_palette = row_palettes[l * 4 + m];
                p->bits = pal_bits;
                p->bf16 = table_bf16;
#ifdef __AVX512F__
                p->consts = consts;
#endif
                extras[l * 4 + m].pal = p;
                extras[l * 4 + m].kind = PALETTIZED;
            }
    } else if (w_kind >= W4) {
        /* scratch: B * widest bf16 (or bytes), then up to B * widest / 32 floats (group sums or steps) */
        uint16_t *xw = (uint16_t *)(work + decode_step_work(dims) - (B * widest + 16));
        float *xs = (float *)(xw + B * widest);
        for (int64_t i = 0; i < L * 4; i++)
            extras[i] = (matrix_extra){NULL, w_kind, matrix_tables[i], table_bf16, dims[W4_GROUP],
                                       w_kind == W8A8 ? row_palettes[i] : NULL, xw, xs};
    }
#ifdef EFFLLM_AMX
    if (w_kind == DENSE && w_bf16 && xbw && B > MAX_ROWS_DOT && amx_state == 1) {  /* the last amx_work floats */
        float *amx = work + decode_step_work(dims) - amx_work(B, widest, threads);
        amx = (float *)(((uintptr_t)amx + 63) & ~(uintptr_t)63);
        for (int64_t i = 0; i < L * 4; i++) {
            extras[i].xt = (uint16_t *)amx;
            extras[i].cbuf = amx + widest * ((B + 15) / 16) * 8;
        }
    }
#endif
#define EXTRA(m) (extras + l * 4 + (m))

    #pragma omp parallel num_threads(threads)
    {
        float *sc = scores + (int64_t)omp_get_thread_num() * (attend_scratch(H, D, max_keys) + 2);
        for (int64_t l = 0; l < L; l++) {
            rms_norm(x, norm_in[l], B, hidden, eps, xn, xbw);
            layer_matvec(w_qkv[l], w_bf16, EXTRA(0), b_qkv[l], xn, xbw, B, hidden, qkv_n, qkv, qkv_n, 0);
            /* RoPE on every q and k head; each k and v head goes to the cache at the token's slot. */
            #pragma omp for schedule(static)
            for (int64_t u = 0; u < B * (H + Hkv); u++) {
                const int64_t b = u / (H + Hkv), h = u % (H + Hkv);
                float *row = qkv + b * qkv_n;
                if (h < H) {
                    rope(row + h * D, cos + b * D, sin + b * D, D);
                    continue;
                }
                const int64_t g = h - H;
                float *k = row + q_dim + g * D, *v = row + q_dim + kv_dim + g * D;
                rope(k, cos + b * D, sin + b * D, D);
                const int64_t at = slots[b] * kv_dim + g * D;
                if (c_bf16) {
                    uint16_t *kc = (uint16_t *)k_cache[l] + at, *vc = (uint16_t *)v_cache[l] + at;
                    for (int64_t d = 0; d < D; d++) { kc[d] = round_bf16(k[d]); vc[d] = round_bf16(v[d]); }
                } else {
                    memcpy((float *)k_cache[l] + at, k, sizeof(float) * D);
                    memcpy((float *)v_cache[l] + at, v, sizeof(float) * D);
                }
            }
            /* Attention in two passes. Each task is a (sequence, kv head, share of its keys): the G query
               heads of the kv head read each key once, and write their share's maximum score, sum of
               exponentials and unnormalised output; then each (sequence, kv head) merges its shares
               (flash-decoding's split, so that a few long sequences still keep every thread busy). */
            #pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < B * splits; t++) {
                const int64_t b = t / splits, part = t % splits, n_keys = lens[b];
                const int64_t lo = windows[l] > 0 && n_keys > windows[l] ? n_keys - windows[l] : 0;
                const int64_t j0 = lo + (n_keys - lo) * part / splits, j1 = lo + (n_keys - lo) * (part + 1) / splits;
                float *pm = parts + t * H * (D + 2), *pl = pm + H, *po = pl + H;
                attend(qkv + b * qkv_n, k_cache[l], v_cache[l], c_bf16, tables + b * width, BS, Hkv, G, D, j0, j1,
                       scale, sc, pm, pl, po);
            }
            #pragma omp for schedule(static)
            for (int64_t u = 0; u < B * H; u++) {
                const int64_t b = u / H, h = u % H;
                float *oh = attn + b * q_dim + h * D;
                merge_shares(parts + b * splits * H * (D + 2), splits, H, D, h, oh);
                if (xbw)
                    for (int64_t d = 0; d < D; d++) xbw[b * q_dim + h * D + d] = round_bf16(oh[d]);
            }
            layer_matvec(w_o[l], w_bf16, EXTRA(1), b_o[l], attn, xbw, B, q_dim, hidden, x, hidden, 1);
            rms_norm(x, norm_post[l], B, hidden, eps, xn, xbw);
            layer_matvec(w_gu[l], w_bf16, EXTRA(2), b_gu[l], xn, xbw, B, hidden, 2 * inter, gu, 2 * inter, 0);
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                const float *gr = gu + b * 2 * inter, *ur = gr + inter;
                float *ar = xn + b * inter;
                for (int64_t i = 0; i < inter; i++) ar[i] = silu(gr[i]) * ur[i];
                if (xbw)
                    for (int64_t i = 0; i < inter; i++) xbw[b * inter + i] = round_bf16(ar[i]);
            }
            layer_matvec(w_down[l], w_bf16, EXTRA(3), b_down[l], xn, xbw, B, inter, hidden, x, hidden, 1);
        }
    }
#undef EXTRA
    free(pals);
    free(extras);
}
