/* Decode attention over a paged float32 or bfloat16 KV cache, shared by paged_decode.c (the engine's batched
   decodes) and decode_step.c (the fused decode step): a sequence's keys are split into shares, `attend`
   computes one share for every head, `merge_shares` combines a head's shares (flash-decoding's split, so
   that a few long sequences still keep every thread busy). Also the bfloat16 helpers both use.

   Cache layout: [blocks, block_size, kv_heads, head_dim] per layer; q is float32 [heads, head_dim]; a
   bfloat16 key or value is widened in registers (it is the top half of a float32). */
#ifndef EFFLLM_ATTENTION_H
#define EFFLLM_ATTENTION_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define EFFLLM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else  /* built without -fopenmp: one thread */
static inline int omp_get_thread_num(void) { return 0; }
#endif

static inline float widen_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t round_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* exp for the softmax, written so that the compiler vectorises it (libm's expf is a call per element):
   Cephes' range reduction x = n ln2 + r and its degree-7 polynomial on |r| <= ln2 / 2, about 2 ulp. The
   arguments here are scores minus their maximum (<= 0); below -87 the result is clamped to 2^-126 * e^r. */
static inline float softmax_exp(float x) {  /* as in paged_decode.c: a vectorisable exp, about 2 ulp */
    x = x < -87.f ? -87.f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* SiLU, g sigmoid(g), through softmax_exp (which vectorises, where expf is a call per element); exp(-g) is
   capped at e^88, below float's overflow: for g < -88 the result is g e^-88 (under 1e-36 in magnitude) where
   expf's would be -0. */
static inline float silu(float g) {
    return g / (1.f + softmax_exp(-g < 88.f ? -g : 88.f));
}

#ifdef __AVX512F__
/* softmax_exp on 16 lanes: the same reduction and polynomial, so both agree to rounding. */
static inline __m512 softmax_exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(two_n));
}
#endif

/* s [n] <- exp(s - max s); returns the maximum, the sum in *sum. */
static inline float softmax_row(float *s, int64_t n, float *sum) {
    float mh = -INFINITY, total = 0.f;
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(-INFINITY), sv = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    if (j < n) mv = _mm512_mask_max_ps(mv, (__mmask16)((1u << (n - j)) - 1), mv, _mm512_maskz_loadu_ps((__mmask16)((1u << (n - j)) - 1), s + j));
    mh = _mm512_reduce_max_ps(mv);
    const __m512 m16 = _mm512_set1_ps(mh);
    for (j = 0; j + 16 <= n; j += 16) {
        const __m512 e = softmax_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m16));
        _mm512_storeu_ps(s + j, e);
        sv = _mm512_add_ps(sv, e);
    }
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        const __m512 e = softmax_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m16));
        _mm512_mask_storeu_ps(s + j, k, e);
        sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
    }
    total = _mm512_reduce_add_ps(sv);
#else
    for (int64_t j = 0; j < n; j++) mh = s[j] > mh ? s[j] : mh;
    for (int64_t j = 0; j < n; j++) { s[j] = softmax_exp(s[j] - mh); total += s[j]; }
#endif
    *sum = total;
    return mh;
}

#ifdef __AVX512F__
/* Lane i of the result is the sum of the 16 lanes of v[i]: a transposing tree of unpacks and shuffles,
   about 3 instructions per sum instead of a horizontal reduction each. */
static inline __m512 sum16(const float *v) {
    __m512 s[8], u[4], w[2];
    for (int k = 0; k < 8; k++) {
        const __m512 a = _mm512_loadu_ps(v + 32 * k), b = _mm512_loadu_ps(v + 32 * k + 16);
        s[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * k], s[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(s[2 * k], s[2 * k + 1], 0xEE));
    for (int k = 0; k < 2; k++)
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline __m512 load16(const void *cache, int bf16, int64_t at) {  /* 16 channels as float32 */
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + at))), 16));
    return _mm512_loadu_ps((const float *)cache + at);
}
#endif

/* The cache offset of each of tokens j0 .. j1 - 1 (position p lives in block table[p / BS] at p % BS). */
static inline void token_offsets(const int64_t *table, int64_t BS, int64_t kv_dim, int64_t j0, int64_t j1, int64_t *at) {
    for (int64_t p = j0; p < j1;) {
        const int64_t in_block = p % BS, count = BS - in_block < j1 - p ? BS - in_block : j1 - p;
        const int64_t first = (table[p / BS] * BS + in_block) * kv_dim;
        for (int64_t t = 0; t < count; t++) at[p - j0 + t] = first + t * kv_dim;
        p += count;
    }
}

static void scores_portable(const float *q, const void *k_cache, int c_bf16, const int64_t *at, int64_t n,
                            int64_t Hkv, int64_t G, int64_t D, float scale, float *sc) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < Hkv * G; h++) {
            const int64_t base = at[j] + (h / G) * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; d++)
                s += q[h * D + d] * (c_bf16 ? widen_bf16(((const uint16_t *)k_cache)[base + d]) : ((const float *)k_cache)[base + d]);
            sc[h * n + j] = s * scale;
        }
}

static void values_portable(const float *sc, const void *v_cache, int c_bf16, const int64_t *at, int64_t n,
                            int64_t Hkv, int64_t G, int64_t D, float *o) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < Hkv * G; h++) {
            const int64_t base = at[j] + (h / G) * D;
            const float w = sc[h * n + j];
            for (int64_t d = 0; d < D; d++)
                o[h * D + d] += w * (c_bf16 ? widen_bf16(((const uint16_t *)v_cache)[base + d]) : ((const float *)v_cache)[base + d]);
        }
}

#ifdef __AVX512F__
#define PREFETCH_AHEAD 8  /* tokens: the next blocks' rows are requested before they are read */

/* Request token j + PREFETCH_AHEAD's row (every kv head) of `cache`: blocks are scattered, so the hardware
   prefetcher restarts at each one; asking ahead keeps the memory stream going. */
static inline void prefetch_row(const void *cache, int c_bf16, const int64_t *at, int64_t j, int64_t n, int64_t kv_dim) {
    if (j + PREFETCH_AHEAD >= n) return;
    const char *row = (const char *)cache + at[j + PREFETCH_AHEAD] * (c_bf16 ? 2 : 4);
    const int64_t bytes = kv_dim * (c_bf16 ? 2 : 4);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* The values pass asks for the row of its kv head VALUES_AHEAD tokens ahead. Earlier the keys pass asked for
   the next group's value rows into L2 (1.88 -> 1.38 ms a layer over no request at all); asking from the
   values pass itself, a head's 2 lines at a time, measured 1.26-1.31 against 1.34-1.37 ms (bfloat16) and
   2.10-2.15 against 2.26 (float32) in scripts/bench_paged_attention.py (64 sequences of 200-640 tokens,
   2 threads, caches on huge pages; three and two alternating runs). */
#define VALUES_AHEAD 64

/* Scores, 16 tokens at a time: each (head, token) dot product is left as 16 lanes in `lanes`, then a
   head's 16 tokens are summed together by sum16 (not one horizontal sum each). A bfloat16 cache is read
   with vdpbf16ps against the queries rounded to bfloat16 (32 channels an instruction, nothing widened). */
static inline __attribute__((always_inline)) void scores_avx512_body(const float *q, const void *k_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, const int64_t D, float scale, float *sc, float *lanes, uint16_t *qb) {
    const int64_t H = Hkv * G, C = D / 16;
#ifdef __AVX512BF16__
    if (c_bf16)
        for (int64_t i = 0; i < H * D; i++) qb[i] = round_bf16(q[i]);
#else
    (void)qb;
#endif
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t tn = n - j0 < 16 ? n - j0 : 16;
        for (int64_t t = 0; t < tn; t++) {
            prefetch_row(k_cache, c_bf16, at, j0 + t, n, Hkv * D);
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t base = at[j0 + t] + g * D;
#ifdef __AVX512BF16__
                if (c_bf16 && D % 32 == 0) {
                    const uint16_t *k = (const uint16_t *)k_cache + base;
                    for (int64_t h = g * G; h < (g + 1) * G; h++) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t c = 0; c < D; c += 32)
                            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(qb + h * D + c)),
                                                   (__m512bh)_mm512_loadu_si512((const void *)(k + c)));
                        _mm512_storeu_ps(lanes + (h * 16 + t) * 16, acc);
                    }
                    continue;
                }
#endif
                __m512 kv[16];
                for (int64_t c = 0; c < C; c++) kv[c] = load16(k_cache, c_bf16, base + 16 * c);
                for (int64_t h = g * G; h < (g + 1) * G; h++) {
                    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), kv[0]);
                    for (int64_t c = 1; c < C; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * c), kv[c], acc);
                    _mm512_storeu_ps(lanes + (h * 16 + t) * 16, acc);
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            if (tn == 16) {
                _mm512_storeu_ps(sc + h * n + j0, _mm512_mul_ps(sum16(lanes + h * 256), _mm512_set1_ps(scale)));
            } else {
                for (int64_t t = 0; t < tn; t++)
                    sc[h * n + j0 + t] = _mm512_reduce_add_ps(_mm512_loadu_ps(lanes + (h * 16 + t) * 16)) * scale;
            }
        }
    }
}


#ifdef EFFLLM_AMX
/* Scores with AMX tiles (a bfloat16 cache, head dim a multiple of 32, at most 16 query heads per kv head).
   For 16 tokens and kv head g, C [16 tokens, G] += K [16 tokens, 32 channels] x Q_g^T [32 channels, G]:
   the keys are tile-loaded straight from the cache (16 rows, one cache row apart), the queries are the
   B operand in AMX's pair layout (built once per share). No horizontal sums, 2 tile products per 16
   tokens per kv head at head dim 64. Linux grants a process the tile state only on request
   (attention_init). */
static int amx_state = 0;  /* 0: not asked yet, 1: granted, -1: refused */

/* Ask Linux for the AMX tile state once, before any parallel region; whether AMX may be used. */
static inline int attention_init(void) {
    if (amx_state == 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    }
    return amx_state == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles: 0 the scores C [16, G] float32, 1 keys [16, 32] bfloat16, 2 queries [16 pairs, G]. */
static inline void scores_amx_config(int64_t G) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16; cfg.colsb[0] = (uint16_t)(G * 4);
    cfg.rows[1] = 16; cfg.colsb[1] = 64;
    cfg.rows[2] = 16; cfg.colsb[2] = (uint16_t)(G * 4);
    _tile_loadconfig(&cfg);
}

/* qt [Hkv][D / 32][16 pairs][G][2]: the queries rounded to bfloat16, channel pairs of head g G + n. */
static inline void queries_amx(const float *q, int64_t Hkv, int64_t G, int64_t D, uint16_t *qt) {
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t c = 0; c < D / 32; c++)
            for (int64_t r = 0; r < 16; r++)
                for (int64_t nn = 0; nn < G; nn++)
                    for (int64_t e = 0; e < 2; e++)
                        qt[(((g * (D / 32) + c) * 16 + r) * G + nn) * 2 + e] = round_bf16(q[(g * G + nn) * D + 32 * c + 2 * r + e]);
}

/* `lanes` (scratch) holds tile stores [16 tokens, H] and a copy of 16 rows for keys that are not 16
   consecutive rows of one block. */
static void scores_amx(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *at, int64_t n,
                       int64_t Hkv, int64_t G, int64_t D, float scale, float *sc, float *lanes, uint16_t *qt) {
    const int64_t H = Hkv * G, C = D / 32, kv_dim = Hkv * D, row_bytes = kv_dim * 2;
    float *S = lanes;                        /* [16, H] */
    uint16_t *rows = (uint16_t *)(lanes + 16 * H);  /* [16, kv_dim] */
    queries_amx(q, Hkv, G, D, qt);
    scores_amx_config(G);
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)H));
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t tn = n - j0 < 16 ? n - j0 : 16;
        const uint16_t *base = k_cache + at[j0];
        for (int64_t t = j0 + 16; t < j0 + 32 && t < n; t++)  /* the next group's keys */
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)(k_cache + at[t]) + b, _MM_HINT_T0);
        if (tn < 16 || at[j0 + 15] - at[j0] != 15 * kv_dim) {  /* not 16 consecutive rows: copy them */
            for (int64_t t = 0; t < 16; t++) {
                if (t < tn) memcpy(rows + t * kv_dim, k_cache + at[j0 + t], row_bytes);
                else memset(rows + t * kv_dim, 0, row_bytes);
            }
            base = rows;
        }
        for (int64_t g = 0; g < Hkv; g++) {
            _tile_zero(0);
            for (int64_t c = 0; c < C; c++) {
                _tile_loadd(1, base + g * D + 32 * c, row_bytes);
                _tile_loadd(2, qt + (g * C + c) * 16 * G * 2, G * 4);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, S + g * G, H * 4);
        }
        const __mmask16 keep = (__mmask16)((1u << tn) - 1);
        for (int64_t h = 0; h < H; h++)
            _mm512_mask_storeu_ps(sc + h * n + j0, keep, _mm512_mul_ps(_mm512_i32gather_ps(idx, S + h, 4), sv));
    }
    _tile_release();
}
#else
static inline int attention_init(void) { return 0; }
#endif

/* The body with the head dim a constant where it is a common one, so its loops unroll. */
static void scores_avx512(const float *q, const void *k_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, int64_t D, float scale, float *sc, float *lanes, uint16_t *qb) {
    if (D == 64) scores_avx512_body(q, k_cache, c_bf16, at, n, Hkv, G, 64, scale, sc, lanes, qb);
    else if (D == 128) scores_avx512_body(q, k_cache, c_bf16, at, n, Hkv, G, 128, scale, sc, lanes, qb);
    else scores_avx512_body(q, k_cache, c_bf16, at, n, Hkv, G, D, scale, sc, lanes, qb);
}

/* Weighted values of HN query heads h0 .. h0 + HN - 1 (all of kv head g) into their outputs o: the outputs
   stay in registers over every token (HN and C constant, so the accumulators are registers, not an array in
   memory), each token's value row widened once for them, the row VALUES_AHEAD tokens on requested. (Chunks
   of 16 tokens with every kv head's heads per chunk measured the same.) */
static inline __attribute__((always_inline)) void values_heads(const float *sc, const void *v_cache, int c_bf16,
                          const int64_t *at, int64_t n, int64_t g, int64_t h0, const int64_t HN, const int64_t C,
                          int64_t D, float *o) {
    __m512 acc[24];
    for (int64_t i = 0; i < HN * C; i++) acc[i] = _mm512_setzero_ps();
    const float *w0 = sc + h0 * n;
    const int64_t width = c_bf16 ? 2 : 4;
    for (int64_t j = 0; j < n; j++) {
        __m512 v[16];
        if (j + VALUES_AHEAD < n) {
            const char *ahead = (const char *)v_cache + (at[j + VALUES_AHEAD] + g * D) * width;
            for (int64_t b = 0; b < D * width; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        }
        for (int64_t c = 0; c < C; c++) v[c] = load16(v_cache, c_bf16, at[j] + g * D + 16 * c);
        for (int64_t hh = 0; hh < HN; hh++) {
            const __m512 w = _mm512_set1_ps(w0[hh * n + j]);
            for (int64_t c = 0; c < C; c++) acc[hh * C + c] = _mm512_fmadd_ps(w, v[c], acc[hh * C + c]);
        }
    }
    for (int64_t hh = 0; hh < HN; hh++)
        for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(o + (h0 + hh) * D + 16 * c, acc[hh * C + c]);
}

/* Weighted values, a kv head at a time, its G query heads in register-sized groups (24 accumulators). */
static inline __attribute__((always_inline)) void values_avx512_body(const float *sc, const void *v_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, const int64_t D, float *o) {
    const int64_t C = D / 16, per = 24 / C < 1 ? 1 : 24 / C;
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += per) {
            const int64_t hn = (g + 1) * G - h0 < per ? (g + 1) * G - h0 : per;
#define EFFLLM_VALUES(HN) case HN: values_heads(sc, v_cache, c_bf16, at, n, g, h0, HN, C, D, o); break;
            if (C == 4) {  /* head dim 64: up to 6 heads a pass */
                switch (hn) { EFFLLM_VALUES(1) EFFLLM_VALUES(2) EFFLLM_VALUES(3) EFFLLM_VALUES(4) EFFLLM_VALUES(5) EFFLLM_VALUES(6) }
            } else if (C == 8) {  /* head dim 128: up to 3 */
                switch (hn) { EFFLLM_VALUES(1) EFFLLM_VALUES(2) EFFLLM_VALUES(3) }
            } else {
                for (int64_t hh = 0; hh < hn; hh++) values_heads(sc, v_cache, c_bf16, at, n, g, h0 + hh, 1, C, D, o);
            }
#undef EFFLLM_VALUES
        }
}

static void values_avx512(const float *sc, const void *v_cache, int c_bf16, const int64_t *at, int64_t n,
                          int64_t Hkv, int64_t G, int64_t D, float *o) {
    if (D == 64) values_avx512_body(sc, v_cache, c_bf16, at, n, Hkv, G, 64, o);
    else if (D == 128) values_avx512_body(sc, v_cache, c_bf16, at, n, Hkv, G, 128, o);
    else values_avx512_body(sc, v_cache, c_bf16, at, n, Hkv, G, D, o);
}
#endif

/* The `lanes` scratch: 16 partial sums per (head, token) of 16 tokens for scores_avx512; for scores_amx its
   tile stores [16, H] and a copy of 16 key rows (at most H D channels each). */
static inline int64_t lanes_size(int64_t H, int64_t D) {
    return H * 256 > 16 * H + 8 * H * D ? H * 256 : 16 * H + 8 * H * D;
}

/* One share of one sequence's keys, positions j0 .. j1 - 1, for all H = Hkv G query heads q [H, D]: per
   head its maximum score m, sum of exp(score - m) l and the unnormalised output o [H, D] =
   sum_j exp(score_j - m) v_j. `sc` is scratch of attend_scratch(H, D, n) floats. */
static inline int64_t attend_scratch(int64_t H, int64_t D, int64_t n) {
    return H * n + lanes_size(H, D) + (H * D + 1) / 2 + 2 * n + 4;  /* scores, lanes, bfloat16 queries, offsets */
}

static void attend(const float *restrict q, const void *k_cache, const void *v_cache, int c_bf16,
                   const int64_t *table, int64_t BS, int64_t Hkv, int64_t G, int64_t D, int64_t j0, int64_t j1,
                   float scale, float *restrict sc, float *m, float *l, float *restrict o) {
    const int64_t n = j1 - j0, H = Hkv * G;
    memset(o, 0, sizeof(float) * H * D);
    for (int64_t h = 0; h < H; h++) { m[h] = -INFINITY; l[h] = 0.f; }
    if (n <= 0) return;
    float *lanes = sc + H * n;
    uint16_t *qb = (uint16_t *)(lanes + lanes_size(H, D));
    int64_t *at = (int64_t *)(sc + H * n + lanes_size(H, D) + (H * D + 1) / 2 + 1);
    at = (int64_t *)(((uintptr_t)at + 7) & ~(uintptr_t)7);
    token_offsets(table, BS, Hkv * D, j0, j1, at);
#ifdef __AVX512F__
    const int vec = D % 16 == 0 && D <= 256;  /* at most 16 vectors of a head's channels */
#ifdef EFFLLM_AMX
    if (c_bf16 && D % 32 == 0 && G <= 16 && amx_state == 1)
        scores_amx(q, (const uint16_t *)k_cache, (const uint16_t *)v_cache, at, n, Hkv, G, D, scale, sc, lanes, qb);
    else
#endif
    if (vec) scores_avx512(q, k_cache, c_bf16, at, n, Hkv, G, D, scale, sc, lanes, qb);
    else
#endif
        scores_portable(q, k_cache, c_bf16, at, n, Hkv, G, D, scale, sc);
    for (int64_t h = 0; h < H; h++) m[h] = softmax_row(sc + h * n, n, l + h);
#ifdef __AVX512F__
    if (vec) values_avx512(sc, v_cache, c_bf16, at, n, Hkv, G, D, o);
    else
#endif
        values_portable(sc, v_cache, c_bf16, at, n, Hkv, G, D, o);
}

/* Head h of one sequence from its `splits` shares (each [H maxima | H sums | H x D outputs]): the softmax
   over all its keys, into out [D]. */
static void merge_shares(const float *parts, int64_t splits, int64_t H, int64_t D, int64_t h, float *out) {
    float m = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < splits; s++) {
        const float pm = parts[s * H * (D + 2) + h];
        m = pm > m ? pm : m;
    }
    memset(out, 0, sizeof(float) * D);
    for (int64_t s = 0; s < splits; s++) {
        const float *pm = parts + s * H * (D + 2), *pl = pm + H, *po = pl + H;
        if (pl[h] == 0.f) continue;  /* an empty share */
        const float f = softmax_exp(pm[h] - m);
        sum += pl[h] * f;
        for (int64_t d = 0; d < D; d++) out[d] += f * po[h * D + d];
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) out[d] *= inv;
}

/* How many shares each of B sequences splits its keys into: enough for two tasks per thread, but shares of
   at least 64 keys. */
static inline int64_t key_splits(int64_t B, int64_t threads, int64_t max_keys) {
    int64_t splits = (2 * threads + B - 1) / B;
    if (splits > max_keys / 64) splits = max_keys / 64;
    return splits < 1 ? 1 : splits;
}

/* Floats of scratch `attend` and the shares need: per thread attend_scratch for the longest share, and
   parts [B splits, H (D + 2)]. */
static inline int64_t attention_work(int64_t B, int64_t H, int64_t D, int64_t max_keys, int64_t threads) {
    return threads * (attend_scratch(H, D, max_keys) + 2) + B * key_splits(B, threads, max_keys) * H * (D + 2);
}
#endif
