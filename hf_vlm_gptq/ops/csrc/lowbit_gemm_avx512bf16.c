/* y[M, N] = x[M, K] @ W^T (+ bias) for a 2-, 4- or 8-bit GPTQ weight, read straight from the checkpoint buffers.
 *
 * W[n, k] = (code(k, n) - zero[g_idx[k], n]) * scale[g_idx[k], n]
 *   x, bias, y : bfloat16, row-major, x and y contiguous
 *   qweight    : int32 [ceil(K * bits / 32), N], c = 32 / bits codes per word:
 *                code(k, n) = (qweight[k / c, n] >> (bits * (k % c))) & (2^bits - 1)
 *   scales     : float16 [G, N]
 *   zeros      : uint8   [G, N] (the zero points themselves, unpacked once by the caller)
 *   g_idx      : int32   [K]
 * Requirements (checked by the Python caller): N % 16 == 0, K even, AVX512F/BW/BF16.
 *
 * The weight is dequantized exactly as the reference does it (integer code - zero, one float32 multiply, one
 * round-to-nearest-even to bfloat16) into an L1-sized buffer in the pair-interleaved layout vdpbf16ps reads,
 * chunk by chunk, and every row block of x is multiplied against that buffer with float32 accumulation.
 * Dequantizing once per chunk and row block of up to MC rows keeps the decode cost small at large M, while
 * memory traffic stays that of the low-bit weight. 4 bits also have dedicated 1-4 row paths (below).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Blocking, tuned with bench/ops.py on a 2-core AVX512-BF16 host (4096x4096 at 1..1024 rows); the defaults can
 * be overridden with -D for experiments. */
#define NP 64 /* output columns per panel: 4 vectors of 16 fp32 lanes (fixed by the micro-kernel table) */
#ifndef KC
#define KC 256 /* input columns dequantized per chunk (multiple of 8): 32 KB of bf16, fits L1 */
#endif
#define MR 6 /* rows per micro-kernel call: 6 x 4 accumulators + 4 weight vectors + 1 broadcast */
#ifndef MC_MAX
#define MC_MAX 1020 /* rows per task (multiple of MR): the weight is dequantized once per MC_MAX rows */
#endif

#include "lowbit_dequant.h"

/* c[i * NP + 16 j + l] (+)= sum_p x[i, 2p..2p+1] . buf pairs, for R rows and V vectors */
#define DEFINE_MICRO(R, V)                                                                                     \
    static void micro_##R##_##V(const uint16_t *a, int64_t lda, const __m512bh *b, int kp, float *c,         \
                                int first) {                                                                  \
        __m512 acc[R][V];                                                                                     \
        for (int i = 0; i < R; i++)                                                                           \
            for (int j = 0; j < V; j++)                                                                       \
                acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * NP + 16 * j);               \
        for (int p = 0; p < kp; p++) {                                                                        \
            __m512bh bv[V];                                                                                   \
            for (int j = 0; j < V; j++) bv[j] = b[p * V + j];                                                 \
            for (int i = 0; i < R; i++) {                                                                     \
                int32_t pair;                                                                                 \
                memcpy(&pair, a + i * lda + 2 * p, sizeof pair);                                              \
                const __m512bh av = as_bh(_mm512_set1_epi32(pair));                                           \
                for (int j = 0; j < V; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);               \
            }                                                                                                 \
        }                                                                                                     \
        for (int i = 0; i < R; i++)                                                                           \
            for (int j = 0; j < V; j++) _mm512_storeu_ps(c + i * NP + 16 * j, acc[i][j]);                     \
    }

#define DEFINE_ROW(R) DEFINE_MICRO(R, 1) DEFINE_MICRO(R, 2) DEFINE_MICRO(R, 3) DEFINE_MICRO(R, 4)
DEFINE_ROW(1) DEFINE_ROW(2) DEFINE_ROW(3) DEFINE_ROW(4) DEFINE_ROW(5) DEFINE_ROW(6)

typedef void (*micro_fn)(const uint16_t *, int64_t, const __m512bh *, int, float *, int);
#define ROW_TABLE(R) {micro_##R##_1, micro_##R##_2, micro_##R##_3, micro_##R##_4}
static const micro_fn MICRO[MR][4] = {ROW_TABLE(1), ROW_TABLE(2), ROW_TABLE(3), ROW_TABLE(4), ROW_TABLE(5),
                                      ROW_TABLE(6)};

/* ---- up to GEMV_MAX_ROWS rows, groups of group_size consecutive columns (a multiple of 8) or one group ----
 * Nothing is dequantized: a code q becomes the bfloat16 number 128 + q by bit operations alone
 * (0x4300 | q; 128 has an exponent whose ulp is 1), so per group
 *   sum_k x_k W[n, k] = s * (sum_k x_k (128 + q_k) - (128 + z) * sum_k x_k)
 * with the first sum taken by vdpbf16ps on raw codes and the scale applied once per group. The weights are
 * not rounded to bfloat16 on the way, so the result is at least as close to the exact product as the
 * reference's (whose weights are). Two instructions turn 32 packed codes into dot-product operands. */
#define GEMV_MAX_ROWS 4
#ifndef GEMV_ACC_FLOATS
#define GEMV_ACC_FLOATS 4096 /* per-group sums kept per pass, all rows: 16 KB, in L1 (multiple of 64) */
#endif

/* out[i * ldo + n0 + 16 v + l] += group g's share of row i of x @ W^T, for R rows and V vectors */
#define DEFINE_GEMV(R, V)                                                                                      \
    static void gemv_##R##_##V(const uint16_t *x, int64_t K, const int32_t *qweight, const uint16_t *scales,  \
                               const uint8_t *zeros, int64_t N, int64_t gs, const float *xsum, int64_t G,     \
                               int64_t g, int64_t n0, float *out, int64_t ldo) {                              \
        __m512i select[4];                                                                                    \
        for (int j = 0; j < 4; j++) select[j] = codes_select(j);                                               \
        const int64_t k_start = g * gs, k_end = (k_start + gs < K) ? k_start + gs : K;                        \
        __m512 acc[R][V];                                                                                     \
        for (int i = 0; i < R; i++)                                                                           \
            for (int v = 0; v < V; v++) acc[i][v] = _mm512_setzero_ps();                                      \
        for (int64_t k = k_start; k < k_end; k += 8) {                                                        \
            const int32_t *row = qweight + (k >> 3) * N + n0;                                                 \
            __m512i w[V];                                                                                     \
            for (int v = 0; v < V; v++) w[v] = _mm512_loadu_si512((const void *)(row + 16 * v));              \
            const int pairs = (int)((k_end - k) >= 8 ? 4 : (k_end - k) / 2);                                  \
            for (int j = 0; j < pairs; j++) {                                                                 \
                __m512bh b[V];                                                                                \
                for (int v = 0; v < V; v++) b[v] = as_bh(codes_as_bf16(w[v], select[j]));                     \
                for (int i = 0; i < R; i++) {                                                                 \
                    int32_t pair;                                                                             \
                    memcpy(&pair, x + i * K + k + 2 * j, sizeof pair);                                        \
                    const __m512bh a = as_bh(_mm512_set1_epi32(pair));                                        \
                    for (int v = 0; v < V; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);             \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        for (int v = 0; v < V; v++) {                                                                         \
            const int64_t at = g * N + n0 + 16 * v;                                                           \
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at)));             \
            const __m512 zc = _mm512_add_ps(                                                                  \
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + at)))),     \
                _mm512_set1_ps(128.0f));                                                                      \
            for (int i = 0; i < R; i++) {                                                                     \
                float *o = out + i * ldo + n0 + 16 * v;                                                       \
                const __m512 d = _mm512_fnmadd_ps(zc, _mm512_set1_ps(xsum[i * G + g]), acc[i][v]);            \
                _mm512_storeu_ps(o, _mm512_fmadd_ps(s, d, _mm512_loadu_ps(o)));                               \
            }                                                                                                 \
        }                                                                                                     \
    }

#define DEFINE_GEMV_ROW(R) DEFINE_GEMV(R, 1) DEFINE_GEMV(R, 2) DEFINE_GEMV(R, 3) DEFINE_GEMV(R, 4)
DEFINE_GEMV_ROW(1) DEFINE_GEMV_ROW(2) DEFINE_GEMV_ROW(3) DEFINE_GEMV_ROW(4)

typedef void (*gemv_fn)(const uint16_t *, int64_t, const int32_t *, const uint16_t *, const uint8_t *, int64_t,
                        int64_t, const float *, int64_t, int64_t, int64_t, float *, int64_t);
#define GEMV_TABLE(R) {gemv_##R##_1, gemv_##R##_2, gemv_##R##_3, gemv_##R##_4}
static const gemv_fn GEMV[GEMV_MAX_ROWS][4] = {GEMV_TABLE(1), GEMV_TABLE(2), GEMV_TABLE(3), GEMV_TABLE(4)};

/* Each thread owns a contiguous range of output columns and walks the groups in order, so it reads every
 * word row of qweight as one contiguous run (its column range) -- friendly to the hardware prefetchers when
 * the weights come from memory. Per-row float32 sums live in out[M][N] until the last group. */
static int gemv(const uint16_t *x, int64_t M, int64_t K, const int32_t *qweight, const uint16_t *scales,
                const uint8_t *zeros, int64_t N, int64_t gs, const uint16_t *bias, uint16_t *y, int nthreads) {
    const int64_t G = (K + gs - 1) / gs;
    float *xsum = malloc(sizeof(float) * M * G);
    float *out = calloc((size_t)(M * N), sizeof(float));
    if (!xsum || !out) {
        free(xsum);
        free(out);
        return 2;
    }
    for (int64_t i = 0; i < M; i++)
        for (int64_t g = 0; g < G; g++) {
            float t = 0.0f;
            for (int64_t k = g * gs; k < K && k < (g + 1) * gs; k++) t += bf16_to_float(x[i * K + k]);
            xsum[i * G + g] = t;
        }
    const int64_t panels = (N + NP - 1) / NP;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t p0 = panels * me / team, p1 = panels * (me + 1) / team;
        for (int64_t g = 0; g < G; g++)
            for (int64_t p = p0; p < p1; p++) {
                const int64_t n0 = p * NP;
                const int nv = (int)((N - n0) / 16 < 4 ? (N - n0) / 16 : 4);
                GEMV[M - 1][nv - 1](x, K, qweight, scales, zeros, N, gs, xsum, G, g, n0, out, N);
            }
        for (int64_t p = p0; p < p1; p++) {
            const int64_t n0 = p * NP;
            const int nv = (int)((N - n0) / 16 < 4 ? (N - n0) / 16 : 4);
            store_rows(out + n0, N, M, nv, bias, n0, y, N);
        }
    }
    free(xsum);
    free(out);
    return 0;
}

/* Groups [g0, g1) and columns [c0, c1) (multiples of 16) of R rows: total[i * N + n] += each group's share.
 * Word rows of qweight are read in memory order, each over the whole column range, so a thread streams one
 * contiguous run of memory; per-group sums wait in gacc[R][c1 - c0] (L1/L2-resident). */
#define DEFINE_GEMV_ROWS(R)                                                                                         \
    static void gemv_rows_##R(const uint16_t *x, int64_t K, const int32_t *qweight, const uint16_t *scales,       \
                         const uint8_t *zeros, int64_t N, int64_t gs, const float *xsum, int64_t G, int64_t g0, \
                         int64_t g1, int64_t c0, int64_t c1, float *gacc, float *total) {                      \
        __m512i select[4];                                                                                    \
        for (int j = 0; j < 4; j++) select[j] = codes_select(j);                                               \
        const int64_t chunk = GEMV_ACC_FLOATS / R / 16 * 16; /* columns per pass: gacc stays in L1 */       \
        for (int64_t g = g0; g < g1; g++) {                                                                   \
            const int64_t k_start = g * gs, k_end = (k_start + gs < K) ? k_start + gs : K;                    \
            for (int64_t d0 = c0; d0 < c1; d0 += chunk) {                                                     \
                const int64_t d1 = (d0 + chunk < c1) ? d0 + chunk : c1, width = d1 - d0;                      \
                memset(gacc, 0, sizeof(float) * R * width);                                                   \
                for (int64_t k = k_start; k < k_end; k += 8) {                                                \
                    const int pairs = (int)((k_end - k) >= 8 ? 4 : (k_end - k) / 2);                          \
                    __m512bh a[R][4];                                                                         \
                    for (int i = 0; i < R; i++)                                                               \
                        for (int j = 0; j < 4; j++) {                                                         \
                            int32_t pair = 0;                                                                 \
                            if (j < pairs) memcpy(&pair, x + i * K + k + 2 * j, sizeof pair);                 \
                            a[i][j] = as_bh(_mm512_set1_epi32(pair));                                         \
                        }                                                                                     \
                    const int32_t *row = qweight + (k >> 3) * N;                                              \
                    for (int64_t n = d0; n < d1; n += 16) {                                                   \
                        const __m512i w = _mm512_loadu_si512((const void *)(row + n));                        \
                        float *ga = gacc + (n - d0);                                                          \
                        __m512 acc[R];                                                                        \
                        for (int i = 0; i < R; i++) acc[i] = _mm512_loadu_ps(ga + i * width);                 \
                        for (int j = 0; j < pairs; j++) {                                                     \
                            const __m512bh b = as_bh(codes_as_bf16(w, select[j]));                            \
                            for (int i = 0; i < R; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a[i][j], b);        \
                        }                                                                                     \
                        for (int i = 0; i < R; i++) _mm512_storeu_ps(ga + i * width, acc[i]);                 \
                    }                                                                                         \
                }                                                                                             \
                for (int64_t n = d0; n < d1; n += 16) {                                                       \
                    const int64_t at = g * N + n;                                                             \
                    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at)));     \
                    const __m512 zc = _mm512_add_ps(                                                          \
                        _mm512_cvtepi32_ps(                                                                   \
                            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + at)))),            \
                        _mm512_set1_ps(128.0f));                                                              \
                    for (int i = 0; i < R; i++) {                                                             \
                        const __m512 d = _mm512_fnmadd_ps(zc, _mm512_set1_ps(xsum[i * G + g]),                \
                                                          _mm512_loadu_ps(gacc + i * width + (n - d0)));      \
                        float *o = total + i * N + n;                                                         \
                        _mm512_storeu_ps(o, _mm512_fmadd_ps(s, d, _mm512_loadu_ps(o)));                       \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }

DEFINE_GEMV_ROWS(1) /* one row only: from two rows on, the panel walk above is faster */

/* One row (decoding): with at least as many groups as threads, each thread takes a contiguous range of groups
 * -- one contiguous block of qweight, read front to back, as the hardware prefetchers like it when the weights
 * come from memory -- into its own float32 sums, added up at the end; with fewer groups (e.g. group_size -1)
 * the threads split the columns instead. Measured (bench/ops.py, 8 layers of 4096x4096 in turn): ~15%
 * faster than torch's int4 kernel, while walking panels of 64 columns down the rows (below) is ~20% slower
 * than it at one row and faster from two rows on. */
static int gemv_one_row(const uint16_t *x, int64_t M, int64_t K, const int32_t *qweight, const uint16_t *scales,
                const uint8_t *zeros, int64_t N, int64_t gs, const uint16_t *bias, uint16_t *y, int nthreads) {
    const int64_t G = (K + gs - 1) / gs;
    const int split_k = G >= nthreads && nthreads > 1;
    const int64_t copies = split_k ? nthreads : 1;
    float *xsum = malloc(sizeof(float) * M * G);
    float *out = calloc((size_t)(copies * M * N), sizeof(float));
    if (!xsum || !out) {
        free(xsum);
        free(out);
        return 2;
    }
    for (int64_t i = 0; i < M; i++)
        for (int64_t g = 0; g < G; g++) {
            float t = 0.0f;
            for (int64_t k = g * gs; k < K && k < (g + 1) * gs; k++) t += bf16_to_float(x[i * K + k]);
            xsum[i * G + g] = t;
        }
    const int64_t lanes = N / 16;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t c0 = 16 * (lanes * me / team), c1 = 16 * (lanes * (me + 1) / team); /* my columns */
        float *gacc = malloc(sizeof(float) * GEMV_ACC_FLOATS);
        if (!gacc) failed = 1;
        if (split_k) { /* a smaller team than asked for leaves some copies at zero */
            if (gacc)
                gemv_rows_1(x, K, qweight, scales, zeros, N, gs, xsum, G, G * me / team, G * (me + 1) / team, 0, N,
                            gacc, out + me * M * N);
#pragma omp barrier
            for (int64_t c = 1; c < copies; c++) /* add the other threads' sums into copy 0, my columns */
                for (int64_t i = 0; i < M; i++)
                    for (int64_t n = c0; n < c1; n += 16)
                        _mm512_storeu_ps(out + i * N + n, _mm512_add_ps(_mm512_loadu_ps(out + i * N + n),
                                                                        _mm512_loadu_ps(out + (c * M + i) * N + n)));
        } else if (gacc && c1 > c0) {
            gemv_rows_1(x, K, qweight, scales, zeros, N, gs, xsum, G, 0, G, c0, c1, gacc, out);
        }
        free(gacc);
        for (int64_t n0 = c0; n0 < c1; n0 += NP) {
            const int nv = (int)((c1 - n0) / 16 < 4 ? (c1 - n0) / 16 : 4);
            store_rows(out + n0, N, M, nv, bias, n0, y, N);
        }
    }
    free(xsum);
    free(out);
    return failed ? 2 : 0;
}

/* regular_group: the group size when g_idx[k] == k / group size and it is a multiple of 8, K when there is
 * one group, 0 otherwise (act-order); with bits == 4 it enables the small-batch paths.
 * Returns 0 on success, 1 on bad arguments, 2 when a work buffer could not be allocated. */
int hvg_lowbit_gemm_bf16(const uint16_t *x, int64_t M, int64_t K, const int32_t *qweight, const uint16_t *scales,
                         const uint8_t *zeros, const int32_t *g_idx, int64_t N, const uint16_t *bias, uint16_t *y,
                         int nthreads, int64_t regular_group, int bits) {
    if (M <= 0 || K <= 0 || N <= 0 || (K & 1) || (N & 15) || nthreads <= 0 || regular_group < 0) return 1;
    if (regular_group > 0 && regular_group % 8 && regular_group < K) return 1;
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    if (M == 1 && regular_group > 0 && bits == 4)
        return gemv_one_row(x, M, K, qweight, scales, zeros, N, regular_group, bias, y, nthreads);
    if (M <= GEMV_MAX_ROWS && regular_group > 0 && bits == 4)
        return gemv(x, M, K, qweight, scales, zeros, N, regular_group, bias, y, nthreads);
    const int64_t m_tasks = (M + MC_MAX - 1) / MC_MAX;
    int64_t mc = (M + m_tasks - 1) / m_tasks;
    mc = (mc + MR - 1) / MR * MR; /* rows per task, balanced, <= MC_MAX */
    const int64_t panels = (N + NP - 1) / NP;
    const int64_t tasks = m_tasks * panels;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        __m512bh *buf = aligned_alloc(64, (KC / 2) * 4 * sizeof(__m512bh));
        float *tile = aligned_alloc(64, MC_MAX * NP * sizeof(float));
        if (!buf || !tile) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!buf || !tile) continue;
            const int64_t m0 = (t / panels) * mc, n0 = (t % panels) * NP;
            const int64_t rows = (M - m0 < mc) ? M - m0 : mc;
            const int nv = (int)((N - n0) / 16 < 4 ? (N - n0) / 16 : 4);
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t k1 = (k0 + KC < K) ? k0 + KC : K;
                dequant_chunk(qweight, N, scales, zeros, g_idx, k0, k1, n0, nv, bits, buf, nv, 0, K);
                for (int64_t r0 = 0; r0 < rows; r0 += MR) {
                    const int r = (int)(rows - r0 < MR ? rows - r0 : MR);
                    MICRO[r - 1][nv - 1](x + (m0 + r0) * K + k0, K, buf, (int)((k1 - k0) / 2),
                                         tile + r0 * NP, k0 == 0);
                }
            }
            store_rows(tile, NP, rows, nv, bias, n0, y + m0 * N, N);
        }
        free(buf);
        free(tile);
    }
    return failed ? 2 : 0;
}
