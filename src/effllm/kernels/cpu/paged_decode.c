/* Paged decode attention over a float32 or bfloat16 KV cache: the CPU engine's fast path
   (see effllm/kernels/cpu_paged_attention.py). q and out are float32 either way; a bfloat16 key or value
   is widened in registers (it is the top half of a float32). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float widen_bf16(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#define LOAD_F32(x) (x)

/* Rows [row_start, row_end) of a batch of single queries, one per sequence.
   q, out: [B, H, D]; k_cache, v_cache: [blocks, BS, Hkv, D]; tables: [B, width], the sequence's blocks;
   row b sees keys at positions lo[b] .. lens[b]-1 (its query sits at lens[b]-1). Tokens are the outer
   loop, so each block is read front to back, all heads of a token at once. */
#define PAGED_DECODE(NAME, T, LOAD) \
void NAME(const float *q, const T *k_cache, const T *v_cache, const int64_t *tables, \
                      int64_t width, const int64_t *lens, const int64_t *lo, int64_t H, int64_t Hkv, int64_t D, \
                      int64_t BS, float scale, int64_t row_start, int64_t row_end, float *out) { \
    const int64_t G = H / Hkv, token_stride = Hkv * D; \
    int64_t most = 1; \
    for (int64_t b = row_start; b < row_end; b++) \
        if (lens[b] - lo[b] > most) most = lens[b] - lo[b]; \
    float *scores = malloc(sizeof(float) * H * most); \
    for (int64_t b = row_start; b < row_end; b++) { \
        const int64_t n = lens[b] - lo[b]; \
        const int64_t *table = tables + b * width; \
        const float *qb = q + b * H * D; \
        for (int64_t j = 0; j < n; j++) { \
            const int64_t p = lo[b] + j; \
            const T *kt = k_cache + (table[p / BS] * BS + p % BS) * token_stride; \
            for (int64_t h = 0; h < H; h++) { \
                const T *k = kt + (h / G) * D; \
                const float *qh = qb + h * D; \
                float s = 0.f; \
                for (int64_t d = 0; d < D; d++) s += qh[d] * LOAD(k[d]); \
                scores[h * n + j] = s * scale; \
            } \
        } \
        for (int64_t h = 0; h < H; h++) { \
            float *sh = scores + h * n, m = -INFINITY, sum = 0.f; \
            for (int64_t j = 0; j < n; j++) m = sh[j] > m ? sh[j] : m; \
            for (int64_t j = 0; j < n; j++) { sh[j] = expf(sh[j] - m); sum += sh[j]; } \
            const float inv = 1.f / sum; \
            for (int64_t j = 0; j < n; j++) sh[j] *= inv; \
        } \
        float *ob = out + b * H * D; \
        memset(ob, 0, sizeof(float) * H * D); \
        for (int64_t j = 0; j < n; j++) { \
            const int64_t p = lo[b] + j; \
            const T *vt = v_cache + (table[p / BS] * BS + p % BS) * token_stride; \
            for (int64_t h = 0; h < H; h++) { \
                const float w = scores[h * n + j]; \
                const T *v = vt + (h / G) * D; \
                float *oh = ob + h * D; \
                for (int64_t d = 0; d < D; d++) oh[d] += w * LOAD(v[d]); \
            } \
        } \
    } \
    free(scores); \
}

PAGED_DECODE(paged_decode_f32, float, LOAD_F32)
PAGED_DECODE(paged_decode_bf16, uint16_t, widen_bf16)
