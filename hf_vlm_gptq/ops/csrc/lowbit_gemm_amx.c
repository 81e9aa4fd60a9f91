/* y[M, N] = x[M, K] @ W^T (+ bias) for a 2-, 4- or 8-bit GPTQ weight on AMX tiles (tdpbf16ps).
 *
 * Same arguments and weight formula as lowbit_gemm_avx512bf16.c (see there), plus x_order (below);
 * requirements checked by the Python caller: N % 16 == 0, K even, AMX-TILE/AMX-BF16 and AVX512F/BW/VBMI/BF16.
 *
 * The weight is dequantized exactly as the reference does it (lowbit_dequant.h: integer code - zero, one
 * float32 multiply, one round-to-nearest-even to bfloat16) into the pair-interleaved layout that is also the
 * layout of tdpbf16ps's second operand, one panel of up to NP columns and KC input columns at a time, and every
 * row block of x is multiplied against it in 16 x 16 float32 tiles. A tile product is 16 x 16 x 32
 * multiply-adds of exact bf16 products summed in float32, as in a float32 matmul of the same values.
 *
 * x is first copied into whole tiles (16 rows x 32 columns, zero padded at the edges), so rows and input
 * columns need no multiple; the weight's padding pairs are zero.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_dequant.h"
#include "amx_tiles.h"
#include "thread_scratch.h"

/* scratch_get slots (thread_scratch.h) */
#define SLOT_XP 0
#define SLOT_WEIGHT 1
#define SLOT_ACC 2
#define SLOT_TOTAL 3

#ifndef KC
#define KC 256 /* input columns dequantized per chunk (multiple of 32): 256 KB of bf16 for NP columns, in L2 */
#endif
#ifndef MC_MAX
#define MC_MAX 512 /* rows per task (multiple of 32): the weight is dequantized once per MC_MAX rows; 512 keeps
                    * a task's float32 sums (1 MB at 512 columns) in L2 beside the dequantized weight */
#endif
#ifndef PREFETCH_K
#define PREFETCH_K 64 /* the dequantization prefetches the words this many inputs ahead (0: none) */
#endif
#ifndef NP
#define NP 512 /* most output columns per panel (multiple of 32): each x tile serves NP / 16 products */
#endif
#define TR 16 /* rows of a tile */
#define TK 32 /* bf16 columns of an x tile (64 bytes a row) */
/* Tiles (amx_tiles.h configures them): 0-3 the 2 x 2 float32 accumulators (rows i, columns j: tile 2 i + j);
 * 4-5 x; 6-7 the weight. */




/* xp[(mt * ks_n + ks) * TR * TK + r * TK + c] = x[16 mt + r, order[32 ks + c]] (order NULL: 32 ks + c), zero
 * outside x */
static void pack_x(const uint16_t *x, int64_t M, int64_t K, int64_t mt_n, int64_t ks_n, uint16_t *xp,
                   const int32_t *order, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t mt = 0; mt < mt_n; mt++) {
        for (int64_t ks = 0; ks < ks_n; ks++) {
            uint16_t *tile = xp + (mt * ks_n + ks) * TR * TK;
            const int64_t k0 = ks * TK, width = K - k0 < TK ? K - k0 : TK;
            for (int r = 0; r < TR; r++) {
                const int64_t m = mt * TR + r;
                if (m < M) {
                    if (order)
                        for (int64_t c = 0; c < width; c++) tile[r * TK + c] = x[m * K + order[k0 + c]];
                    else
                        memcpy(tile + r * TK, x + m * K + k0, sizeof(uint16_t) * width);
                    if (width < TK) memset(tile + r * TK + width, 0, sizeof(uint16_t) * (TK - width));
                } else {
                    memset(tile + r * TK, 0, sizeof(uint16_t) * TK);
                }
            }
        }
    }
}

/* tiles 2 i + j += x tile i (a0, a1; mi used) times weight tile j (b0, b1, rows b_stride bytes apart; nj used) */
static inline __attribute__((always_inline)) void tile_step(const uint16_t *a0, const uint16_t *a1, const void *b0,
                                                            const void *b1, int64_t b_stride, int mi, int nj) {
    _tile_loadd(4, a0, TK * sizeof(uint16_t));
    _tile_loadd(6, b0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (nj > 1) {
        _tile_loadd(7, b1, b_stride);
        _tile_dpbf16ps(1, 4, 7);
    }
    if (mi > 1) {
        _tile_loadd(5, a1, TK * sizeof(uint16_t));
        _tile_dpbf16ps(2, 5, 6);
        if (nj > 1) _tile_dpbf16ps(3, 5, 7);
    }
}

/* The 2 x 2 tiles at c (row stride ldc floats) (+)= the products of two x tile rows a0, a1 (mi of them used)
 * and two weight tile columns b, b + 1 (nj used; pair rows ldb vectors apart), over steps of 32 input columns */
static void tile_block(const uint16_t *a0, const uint16_t *a1, int64_t steps, const __m512bh *b, int64_t ldb, int mi,
                       int nj, float *c, int64_t ldc, int first) {
    const int64_t b_stride = ldb * 64, c_stride = ldc * sizeof(float);
    if (first) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        _tile_loadd(0, c, c_stride);
        _tile_loadd(1, c + 16, c_stride);
        _tile_loadd(2, c + TR * ldc, c_stride);
        _tile_loadd(3, c + TR * ldc + 16, c_stride);
    }
    for (int64_t s = 0; s < steps; s++) {
        const __m512bh *bs = b + s * TR * ldb; /* 16 pair rows per step */
        tile_step(a0 + s * TR * TK, a1 + s * TR * TK, bs, bs + 1, b_stride, mi, nj);
    }
    _tile_stored(0, c, c_stride);
    _tile_stored(1, c + 16, c_stride);
    _tile_stored(2, c + TR * ldc, c_stride);
    _tile_stored(3, c + TR * ldc + 16, c_stride);
}

/* ---- up to SMALL_ROWS rows, 4 or 8 bits, groups of consecutive columns (a multiple of 32, or one group) ----
 * Below a few tiles of rows the exact dequantization is most of the work. Here nothing is dequantized: the
 * codes become bfloat16 numbers c = bias + q, exactly (4 bits: bias 128, codes_as_bf16, two instructions per
 * 32 codes; 8 bits: bias 0, q <= 255 has 8 significant bits) and per group
 *   sum_k x_k W[n, k] = s * (sum_k x_k c_k - (bias + z) * sum_k x_k)
 * with the first sum from the tiles (exact products, float32 sums) and the rest in float32 once per group,
 * as the AVX-512 kernel's 1-4 row paths do (its weights are not rounded to bfloat16 on the way). Panels of
 * 32 output columns: up to two x tiles of rows, both column tiles at once (2 x 2 accumulators); up to four,
 * one column tile at a time (4 x 1). x tiles come from pack_x (rows and columns zero-padded). */
#define SP 32 /* output columns per panel: two tiles */
#ifndef SMALL_ROWS
#define SMALL_ROWS 48 /* 4 bits, at most four x tiles; cpu_amx.py passes its SMALL_BATCH_ROWS[4] */
#endif
#ifndef SMALL_ROWS8
#define SMALL_ROWS8 32 /* 8 bits (their codes cost more), at most four x tiles; SMALL_BATCH_ROWS[8] */
#endif
#ifndef SMALL_PREFETCH_ROWS
#define SMALL_PREFETCH_ROWS 8 /* word rows ahead whose words are prefetched (0: none) */
#endif
#if SMALL_ROWS > 4 * TR || SMALL_ROWS8 > 4 * TR
#error "small_batch keeps four x tiles of rows: SMALL_ROWS and SMALL_ROWS8 must be at most 64"
#endif

/* 8 bits: 16 packed words (one per output column) -> their codes 2 j, 2 j + 1 as bfloat16 numbers, in the
 * pair-interleaved layout; the float32 of a code <= 255 is exact and so is its upper half */
static inline __m512i codes8_as_bf16(__m512i words, int j) {
    const __m512i byte = _mm512_set1_epi32(0xFF);
    const __m512i even = _mm512_and_si512(_mm512_srli_epi32(words, 16 * j), byte);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(words, 16 * j + 8), byte);
    const __m512i fe = _mm512_castps_si512(_mm512_cvtepi32_ps(even));
    const __m512i fo = _mm512_castps_si512(_mm512_cvtepi32_ps(odd));
    return _mm512_ternarylogic_epi32(fo, _mm512_set1_epi32((int)0xFFFF0000), _mm512_srli_epi32(fe, 16), 0xEA);
}

/* tiles 0..mt-1 += x tile i (a + i * a_next) times the weight tile b (16 pair rows of 64 bytes) */
static inline __attribute__((always_inline)) void rows_step(const uint16_t *a, int64_t a_next, const void *b,
                                                            int mt) {
    _tile_loadd(6, b, 64);
    _tile_loadd(4, a, TK * sizeof(uint16_t));
    _tile_dpbf16ps(0, 4, 6);
    if (mt > 1) {
        _tile_loadd(5, a + a_next, TK * sizeof(uint16_t));
        _tile_dpbf16ps(1, 5, 6);
    }
    if (mt > 2) {
        _tile_loadd(4, a + 2 * a_next, TK * sizeof(uint16_t));
        _tile_dpbf16ps(2, 4, 6);
    }
    if (mt > 3) {
        _tile_loadd(5, a + 3 * a_next, TK * sizeof(uint16_t));
        _tile_dpbf16ps(3, 5, 6);
    }
}

/* total[i * width + n - c0] += s[n] * (cg[i * SP + n - n0] - (bias + z[n]) * xsum[i, g]) for one column tile */
static void group_fixup(const float *cg, int64_t M, const uint16_t *scales, const uint8_t *zeros, int64_t at,
                        const float *xsum, int64_t G, int64_t g, float *total, int64_t width, float code_bias) {
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at)));
    const __m512 zc = _mm512_add_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + at)))),
        _mm512_set1_ps(code_bias));
    for (int64_t i = 0; i < M; i++) {
        const __m512 d = _mm512_fnmadd_ps(zc, _mm512_set1_ps(xsum[i * G + g]), _mm512_loadu_ps(cg + i * SP));
        float *o = total + i * width;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(s, d, _mm512_loadu_ps(o)));
    }
}

static int small_batch(int64_t M, int64_t K, const int32_t *qweight, const uint16_t *scales, const uint8_t *zeros,
                       int64_t N, int64_t gs, const uint16_t *bias, uint16_t *y, int nthreads, const uint16_t *xp,
                       int64_t ks_n, int bits) {
    const int per_word = 32 / bits, rows_per_step = TK / per_word; /* 4 bits: 8 codes a word, 4 word rows a step */
    const float code_bias = bits == 4 ? 128.0f : 0.0f;
    const int64_t G = (K + gs - 1) / gs, word_rows = (K + per_word - 1) / per_word, panels = (N + SP - 1) / SP;
    const int64_t group_steps = ((gs < K ? gs : K) + TK - 1) / TK, a_next = ks_n * TR * TK;
    const int mt = (int)((M + TR - 1) / TR);
    float *xsum = malloc(sizeof(float) * M * G);
    if (!xsum) return 2;
    /* xsum[i * G + g]: row i of x (as packed: in its column order) summed over group g, column by column;
     * the 16 rows of a tile are summed side by side */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t tile = 0; tile < mt; tile++)
        for (int64_t g = 0; g < G; g++) {
            float t[TR] = {0.0f};
            for (int64_t k = g * gs; k < K && k < (g + 1) * gs; k++) {
                const uint16_t *column = xp + (tile * ks_n + k / TK) * TR * TK + k % TK;
                for (int r = 0; r < TR; r++) t[r] += bf16_to_float(column[r * TK]);
            }
            for (int r = 0; r < TR && tile * TR + r < M; r++) xsum[(tile * TR + r) * G + g] = t[r];
        }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        /* my contiguous range of panels, walked group by group: every word row of qweight is read as one
         * run over my columns, front to back (as the hardware prefetchers like it when the weights come
         * from memory); the float32 sums of my columns wait in total[M][width] */
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t p0 = panels * me / team, p1 = panels * (me + 1) / team;
        const int64_t c0 = SP * p0, c1 = SP * p1 < N ? SP * p1 : N, width = c1 - c0;
        float *total = width > 0 ? scratch_get(SLOT_TOTAL, (size_t)(M * width) * sizeof(float)) : NULL;
        if (total) memset(total, 0, (size_t)(M * width) * sizeof(float));
        float *cg = aligned_alloc(64, 4 * TR * SP * sizeof(float));
        /* the group's weight tiles: b[(step * 2 + column tile) * 16 + pair row] */
        __m512i *b = aligned_alloc(64, (size_t)(group_steps * 2 * TR) * sizeof(__m512i));
        if ((width > 0 && !total) || !cg || !b) failed = 1;
        __m512i select[4];
        for (int j = 0; j < 4; j++) select[j] = codes_select(j);
        configure_tiles();
        for (int64_t g = 0; g < G && !failed; g++) {
            const int64_t k_start = g * gs, k_end = (k_start + gs < K) ? k_start + gs : K;
            const int64_t steps = (k_end - k_start + TK - 1) / TK;
            for (int64_t p = p0; p < p1; p++) {
                const int64_t n0 = SP * p;
                const int nj = N - n0 >= SP ? 2 : 1;
                for (int64_t st = 0; st < steps; st++)
                    for (int t = 0; t < nj; t++)
                        for (int q = 0; q < rows_per_step; q++) { /* word row (k_start + 32 st) / per_word + q */
                            const int64_t r = (k_start + TK * st) / per_word + q;
                            if (SMALL_PREFETCH_ROWS && r + SMALL_PREFETCH_ROWS < word_rows)
                                _mm_prefetch((const char *)(qweight + (r + SMALL_PREFETCH_ROWS) * N + n0 + 16 * t),
                                             _MM_HINT_T1);
                            const __m512i w = r < word_rows
                                                  ? _mm512_loadu_si512((const void *)(qweight + r * N + n0 + 16 * t))
                                                  : _mm512_setzero_si512();
                            __m512i *pairs = b + (st * 2 + t) * TR + (per_word / 2) * q; /* its pair rows */
                            if (bits == 4)
                                for (int j = 0; j < 4; j++) pairs[j] = codes_as_bf16(w, select[j]);
                            else
                                for (int j = 0; j < 2; j++) pairs[j] = codes8_as_bf16(w, j);
                        }
                const uint16_t *a = xp + (k_start / TK) * TR * TK;
                if (mt <= 2) { /* tile 2 i + j: x tile i, column tile j */
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t st = 0; st < steps; st++)
                        tile_step(a + st * TR * TK, a + a_next + st * TR * TK, b + st * 2 * TR, b + (st * 2 + 1) * TR,
                                  64, mt, nj);
                    _tile_stored(0, cg, SP * sizeof(float));
                    _tile_stored(1, cg + 16, SP * sizeof(float));
                    _tile_stored(2, cg + TR * SP, SP * sizeof(float));
                    _tile_stored(3, cg + TR * SP + 16, SP * sizeof(float));
                } else { /* tile i: x tile i, one column tile t at a time */
                    for (int t = 0; t < nj; t++) {
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                        for (int64_t st = 0; st < steps; st++)
                            rows_step(a + st * TR * TK, a_next, b + (st * 2 + t) * TR, mt);
                        _tile_stored(0, cg + 16 * t, SP * sizeof(float));
                        _tile_stored(1, cg + TR * SP + 16 * t, SP * sizeof(float));
                        _tile_stored(2, cg + 2 * TR * SP + 16 * t, SP * sizeof(float));
                        _tile_stored(3, cg + 3 * TR * SP + 16 * t, SP * sizeof(float));
                    }
                }
                for (int t = 0; t < nj; t++)
                    group_fixup(cg + 16 * t, M, scales, zeros, g * N + n0 + 16 * t, xsum, G, g,
                                total + (n0 - c0) + 16 * t, width, code_bias);
            }
        }
        if (total && !failed) store_rows(total, width, M, (int)(width / 16), bias, c0, y, N);
        _tile_release();
        scratch_done(SLOT_TOTAL);
        free(cg);
        free(b);
    }
    free(xsum);
    return failed ? 2 : 0;
}

/* x_order: NULL, or the column of x each input of the weight multiplies (a permutation of K, in bounds:
 * checked by the caller), gathered while x is packed.
 * regular_group: as in the AVX-512 kernel (the group size when g_idx[k] == k / group size, K for one group,
 * else 0); with 4 or 8 bits, up to SMALL_ROWS / SMALL_ROWS8 rows and groups a multiple of 32 (or one) it
 * selects small_batch.
 * Returns 0 on success, 1 on bad arguments, 2 when a work buffer could not be allocated, 3 when the
 * operating system refuses this process the AMX tile state. */
int hvg_lowbit_gemm_amx(const uint16_t *x, int64_t M, int64_t K, const int32_t *qweight, const uint16_t *scales,
                        const uint8_t *zeros, const int32_t *g_idx, int64_t N, const uint16_t *bias, uint16_t *y,
                        int nthreads, int64_t regular_group, int bits, const int32_t *x_order) {
    if (M <= 0 || K <= 0 || N <= 0 || (K & 1) || (N & 15) || nthreads <= 0) return 1;
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    if (!amx_permitted()) return 3;
    const int64_t mt_n = (M + TR - 1) / TR, ks_n = (K + TK - 1) / TK;
    uint16_t *xp = scratch_get(SLOT_XP, (size_t)(mt_n * ks_n * TR * TK * sizeof(uint16_t)));
    if (!xp) return 2;
    pack_x(x, M, K, mt_n, ks_n, xp, x_order, nthreads);
    const int64_t small_rows = bits == 4 ? SMALL_ROWS : bits == 8 ? SMALL_ROWS8 : 0;
    if (M <= small_rows && regular_group > 0 && (regular_group % TK == 0 || regular_group >= K)) {
        const int rc = small_batch(M, K, qweight, scales, zeros, N, regular_group, bias, y, nthreads, xp, ks_n, bits);
        scratch_done(SLOT_XP);
        return rc;
    }
    const int64_t m_tasks = (M + MC_MAX - 1) / MC_MAX;
    int64_t mc = (M + m_tasks - 1) / m_tasks;
    mc = (mc + 2 * TR - 1) / (2 * TR) * (2 * TR); /* rows per task, balanced, a multiple of two tiles */
    /* panels of equal width (a multiple of 32 columns, at most NP): at least two tasks per thread, and as many
     * tasks as make whole rounds of the threads where the columns allow (the static schedule then gives every
     * thread the same work: 1280 columns on 2 threads take 4 panels of 320, not 5 of 256) */
    const int64_t pairs_n = (N + 31) / 32;
    int64_t want = (N + NP - 1) / NP;
    while (m_tasks * want < 2 * nthreads && want < pairs_n) want *= 2;
    while ((m_tasks * want) % nthreads != 0 && want < pairs_n) want++;
    if (want > pairs_n) want = pairs_n;
    const int64_t np = (pairs_n + want - 1) / want * 32;
    const int64_t panels = (N + np - 1) / np, tasks = m_tasks * panels;
    /* row strides of the weight buffer (vectors) and of the accumulators (floats), one cache line more than a
     * panel's width: a tile's 16 rows then fall in different L1 sets (at a power-of-two stride such as 2 KB they
     * share two sets, and tile loads evict each other) */
    const int64_t ldb = np / 16 + 1, ldc = np + 16;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        __m512bh *buf = scratch_get(SLOT_WEIGHT, (KC / 2) * ldb * sizeof(__m512bh));
        float *acc = scratch_get(SLOT_ACC, mc * ldc * sizeof(float)); /* mc: a multiple of two tiles */
        if (!buf || !acc) failed = 1;
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!buf || !acc) continue;
            const int64_t m0 = (t / panels) * mc, n0 = (t % panels) * np;
            const int64_t rows = (M - m0 < mc) ? M - m0 : mc, tiles = (rows + TR - 1) / TR;
            const int nv = (int)((N - n0) / 16 < np / 16 ? (N - n0) / 16 : np / 16);
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t k1 = (k0 + KC < K) ? k0 + KC : K, steps = (k1 - k0 + TK - 1) / TK;
                for (int v = 0; v < nv; v += 4) /* 64 columns per call */
                    dequant_chunk(qweight, N, scales, zeros, g_idx, k0, k1, n0 + 16 * v, nv - v < 4 ? nv - v : 4, bits,
                                  buf + v, ldb, PREFETCH_K, K);
                const int64_t pairs = (k1 - k0) / 2, padded = steps * TR;
                if (padded > pairs) memset(buf + pairs * ldb, 0, (size_t)((padded - pairs) * ldb) * sizeof(__m512bh));
                for (int64_t i = 0; i < tiles; i += 2) {
                    const uint16_t *a0 = xp + ((m0 / TR + i) * ks_n + k0 / TK) * TR * TK, *a1 = a0 + ks_n * TR * TK;
                    for (int j = 0; j < nv; j += 2)
                        tile_block(a0, a1, steps, buf + j, ldb, tiles - i < 2 ? 1 : 2, nv - j < 2 ? 1 : 2,
                                   acc + i * TR * ldc + 16 * j, ldc, k0 == 0);
                }
            }
            store_rows(acc, ldc, rows, nv, bias, n0, y + m0 * N, N);
        }
        _tile_release();
        scratch_done(SLOT_WEIGHT);
        scratch_done(SLOT_ACC);
    }
    scratch_done(SLOT_XP);
    return failed ? 2 : 0;
}
