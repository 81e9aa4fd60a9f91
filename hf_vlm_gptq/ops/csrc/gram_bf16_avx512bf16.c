/* h[i, j] += alpha * sum_k x[k, i] * x[k, j] over the upper block triangle of h, for bfloat16 rows x (ops/cpu_gram.py).
 *
 *   xt : bfloat16 [d, ldxt], the rows' transpose (xt[i, k] = x[k, i]) for k < n, n even (the caller pads an odd
 *        count with a zero row), ldxt even
 *   h  : float32 [d, ldh]; for every column panel [n0, n0 + 64) the rows [0, min(n0 + 64, d)) are updated (the
 *        diagonal panel whole, so the caller mirrors the strict upper triangle into the lower one)
 * Requirements (checked by the Python caller): d % 16 == 0, ldxt < 2^26, AVX512F/BW/BF16.
 *
 * Every product of two bfloat16 numbers is exact in float32, and vdpbf16ps adds the two products of a pair into a
 * float32 accumulator, so the sums are float32 sums of exact products, as in a float32 matmul of the same values
 * (the order differs; inputs and results below float32's normal range are flushed to zero). The sum over each
 * chunk of KP row pairs is taken in registers and added, times alpha, into h.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NP 64 /* output columns per panel: 4 vectors of 16 fp32 lanes */
#define MR 6  /* rows per micro-kernel call: 6 x 4 accumulators + 4 panel vectors + 1 broadcast */
#ifndef KP
#define KP 256 /* row pairs per chunk: the panel's chunk is KP x 64 pairs = 64 KB */
#endif

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

/* buf[p * nv + v] = 16 pairs (xt[n0 + 16 v + l, 2 (p0 + p)], xt[.., 2 (p0 + p) + 1]), l = 0..15 */
static void pack_panel(const uint16_t *xt, int64_t ldxt, int64_t n0, int nv, int64_t p0, int kp, __m512i *buf) {
    const int32_t *base = (const int32_t *)xt; /* a pair of bfloat16 is one int32; row stride ldxt / 2 of them */
    const int64_t ld = ldxt / 2;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int32_t)ld));
    for (int v = 0; v < nv; v++) {
        const int32_t *rows = base + (n0 + 16 * v) * ld + p0;
        for (int p = 0; p < kp; p++) buf[p * nv + v] = _mm512_i32gather_epi32(idx, (const void *)(rows + p), 4);
    }
}

#define DEFINE_MICRO(R, V)                                                                                     \
    static void micro_##R##_##V(const uint16_t *a, int64_t lda, const __m512i *b, int kp, float *c,           \
                                int64_t ldc, __m512 alpha) {                                                  \
        __m512 acc[R][V];                                                                                     \
        for (int i = 0; i < R; i++)                                                                           \
            for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_ps();                                      \
        for (int p = 0; p < kp; p++) {                                                                        \
            __m512bh bv[V];                                                                                   \
            for (int j = 0; j < V; j++) bv[j] = as_bh(b[p * V + j]);                                          \
            for (int i = 0; i < R; i++) {                                                                     \
                int32_t pair;                                                                                 \
                memcpy(&pair, a + i * lda + 2 * p, sizeof pair);                                              \
                const __m512bh av = as_bh(_mm512_set1_epi32(pair));                                           \
                for (int j = 0; j < V; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);               \
            }                                                                                                 \
        }                                                                                                     \
        for (int i = 0; i < R; i++)                                                                           \
            for (int j = 0; j < V; j++) {                                                                     \
                float *at = c + i * ldc + 16 * j;                                                             \
                _mm512_storeu_ps(at, _mm512_fmadd_ps(acc[i][j], alpha, _mm512_loadu_ps(at)));                 \
            }                                                                                                 \
    }

#define DEFINE_ROW(R) DEFINE_MICRO(R, 1) DEFINE_MICRO(R, 2) DEFINE_MICRO(R, 3) DEFINE_MICRO(R, 4)
DEFINE_ROW(1) DEFINE_ROW(2) DEFINE_ROW(3) DEFINE_ROW(4) DEFINE_ROW(5) DEFINE_ROW(6)

typedef void (*micro_fn)(const uint16_t *, int64_t, const __m512i *, int, float *, int64_t, __m512);
#define ROW_TABLE(R) {micro_##R##_1, micro_##R##_2, micro_##R##_3, micro_##R##_4}
static const micro_fn MICRO[MR][4] = {ROW_TABLE(1), ROW_TABLE(2), ROW_TABLE(3), ROW_TABLE(4), ROW_TABLE(5),
                                      ROW_TABLE(6)};

/* 0 on success; 1 bad arguments (h untouched), 2 out of memory */
int hvg_gram_bf16(const uint16_t *xt, int64_t ldxt, int64_t d, int64_t n, float *h, int64_t ldh, float alpha,
                  int threads) {
    if (d <= 0 || n < 0 || d % 16 != 0 || n % 2 != 0 || ldxt % 2 != 0 || ldxt < n || ldh < d || threads < 1)
        return 1;
    if (ldxt / 2 > INT32_MAX / 64) return 1; /* the gather's 32-bit byte offsets: 15 rows of ldxt / 2 pairs */
    if (n == 0) return 0;
    const int64_t panels = (d + NP - 1) / NP;
    const int64_t pairs = n / 2;
    const __m512 av = _mm512_set1_ps(alpha);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        __m512i *buf = (__m512i *)aligned_alloc(64, (size_t)KP * 4 * sizeof(__m512i));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        /* the widest panels (most rows above them) first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < panels; t++) {
            if (!buf) continue;
            const int64_t panel = panels - 1 - t;
            const int64_t n0 = panel * NP;
            const int nv = (int)((d - n0 < NP ? d - n0 : NP) / 16);
            const int64_t rows = n0 + 16 * nv; /* rows [0, n0 + width): the triangle above and the diagonal block */
            for (int64_t p0 = 0; p0 < pairs; p0 += KP) {
                const int kp = (int)(pairs - p0 < KP ? pairs - p0 : KP);
                pack_panel(xt, ldxt, n0, nv, p0, kp, buf);
                for (int64_t i = 0; i < rows; i += MR) {
                    const int r = (int)(rows - i < MR ? rows - i : MR);
                    MICRO[r - 1][nv - 1](xt + i * ldxt + 2 * p0, ldxt, buf, kp, h + i * ldh + n0, ldh, av);
                }
            }
        }
        free(buf);
    }
    return failed ? 2 : 0;
}
