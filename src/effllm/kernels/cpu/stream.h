/* Streaming weights at the memory's pace. A decode-sized product reads each weight once, front to back; the
   hardware prefetchers lose the stream at every 4 KiB page and each matrix starts cold, so the loops ask for
   the bytes STREAM_AHEAD past the ones they read (`prefetcht0`, a no-op where the compiler has no
   __builtin_prefetch). On the 2-vCPU Sapphire Rapids VM of docs/benchmarks.md, a two-thread pass over one
   SmolLM-135M decode step's float32 matrices (ad hoc C loop) read 25.5 GB/s without and 33.6 GB/s with it at
   2 KiB, on 2 MiB pages (core/huge_pages.py); 1.5-3 KiB measured alike, NTA hints far slower. */
#ifndef EFFLLM_STREAM_H
#define EFFLLM_STREAM_H
#include <stdint.h>

#define STREAM_AHEAD 2048

#if defined(__GNUC__) || defined(__clang__)
#define stream_ahead(p) __builtin_prefetch((const char *)(p) + STREAM_AHEAD, 0, 3)
#else
#define stream_ahead(p) ((void)(p))
#endif

/* Ask for the STREAM_AHEAD bytes after `bytes` bytes from p, one request per 64-byte line (a row's worth ahead
   of a row-at-a-time loop). */
static inline void stream_row_ahead(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) stream_ahead((const char *)p + b);
}
#endif
